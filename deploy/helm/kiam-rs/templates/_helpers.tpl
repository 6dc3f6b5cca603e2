{{/*
Names. The default name is "kiam", as in the community kiam chart, so that a release of that
chart can be upgraded in place: resource names and selector labels stay the same.
*/}}
{{- define "kiam.name" -}}
{{- default "kiam" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kiam.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default "kiam" .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kiam.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object; "component" is passed in as .component. */}}
{{- define "kiam.labels" -}}
app: {{ include "kiam.name" .root }}
chart: {{ include "kiam.chart" .root }}
component: {{ .component | quote }}
heritage: {{ .root.Release.Service }}
release: {{ .root.Release.Name }}
app.kubernetes.io/name: {{ include "kiam.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{/* Selector labels: exactly the community chart's, which are immutable on upgrade. */}}
{{- define "kiam.selectorLabels" -}}
app: {{ include "kiam.name" .root }}
component: {{ .component | quote }}
release: {{ .root.Release.Name }}
{{- end -}}

{{- define "kiam.serviceAccountName.agent" -}}
{{- if .Values.serviceAccounts.agent.create -}}
{{- default (printf "%s-agent" (include "kiam.fullname" .)) .Values.serviceAccounts.agent.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccounts.agent.name -}}
{{- end -}}
{{- end -}}

{{- define "kiam.serviceAccountName.server" -}}
{{- if .Values.serviceAccounts.server.create -}}
{{- default (printf "%s-server" (include "kiam.fullname" .)) .Values.serviceAccounts.server.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccounts.server.name -}}
{{- end -}}
{{- end -}}

{{- define "kiam.serviceAccountName.kube2iam" -}}
{{- if .Values.serviceAccounts.kube2iam.create -}}
{{- default (printf "%s-kube2iam" (include "kiam.fullname" .)) .Values.serviceAccounts.kube2iam.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccounts.kube2iam.name -}}
{{- end -}}
{{- end -}}

{{/* "true" when kube2iam mode serves metrics: on a port other than its app port. */}}
{{- define "kiam.kube2iam.metrics" -}}
{{- if ne (int .Values.kube2iam.prometheus.metricsPort) (int .Values.kube2iam.host.port) -}}true{{- end -}}
{{- end -}}

{{- define "kiam.image" -}}
{{- printf "%s:%s" .repository (toString (default "latest" .tag)) -}}
{{- end -}}

{{/* TLS secret names: the community chart's defaults, <fullname>-agent and <fullname>-server. */}}
{{- define "kiam.agentTlsSecret" -}}
{{- default (printf "%s-agent" (include "kiam.fullname" .)) .Values.agent.tlsSecret -}}
{{- end -}}
{{- define "kiam.serverTlsSecret" -}}
{{- default (printf "%s-server" (include "kiam.fullname" .)) .Values.server.tlsSecret -}}
{{- end -}}

{{/*
File names inside the TLS secret. cert-manager writes tls.crt, tls.key and ca.crt, so those are
used with certManager.enabled; otherwise tlsCerts.* (the community chart's cert, key, ca).
*/}}
{{- define "kiam.tlsArgs" -}}
{{- $files := .tlsCerts -}}
{{- if .root.Values.certManager.enabled -}}
{{- $files = dict "certFileName" "tls.crt" "keyFileName" "tls.key" "caFileName" "ca.crt" -}}
{{- end -}}
- --cert=/etc/kiam/tls/{{ $files.certFileName }}
- --key=/etc/kiam/tls/{{ $files.keyFileName }}
- --ca=/etc/kiam/tls/{{ $files.caFileName }}
{{- end -}}

{{/*
extraArgs, as a map (the community chart's form): key: value gives --key=value, key: true or an
empty value gives --key, key: false gives nothing. A list of literal arguments is accepted too.
*/}}
{{- define "kiam.extraArgs" -}}
{{- if kindIs "slice" . -}}
{{- range . }}
- {{ . | quote }}
{{- end -}}
{{- else -}}
{{- range $key, $value := . }}
{{- if kindIs "bool" $value }}
{{- if $value }}
- --{{ $key }}
{{- end }}
{{- else if or (kindIs "invalid" $value) (eq (toString $value) "") }}
- --{{ $key }}
{{- else }}
- {{ printf "--%s=%v" $key $value | quote }}
{{- end }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* extraEnv: a list of EnvVar objects (the community chart's form) or a name: value map. */}}
{{- define "kiam.extraEnv" -}}
{{- if kindIs "map" . -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ toString $value | quote }}
{{- end -}}
{{- else if . -}}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{/* The node ports below 1024 need root or the unprivileged-port sysctl. */}}
{{- define "kiam.server.privilegedPort" -}}
{{- if lt (int .Values.server.service.targetPort) 1024 -}}true{{- end -}}
{{- end -}}

{{/*
"true" when agents prove their node with a projected ServiceAccount token: agent.nodeToken
unless a per-node certificate (agent.tlsHostPath) proves it. The servers then check tokens.
*/}}
{{- define "kiam.agentToken" -}}
{{- if and .Values.agent.nodeToken.enabled (not .Values.agent.tlsHostPath) -}}true{{- end -}}
{{- end -}}

{{/* Where the agent's projected token is mounted. */}}
{{- define "kiam.agentTokenDir" -}}/var/run/secrets/kiam{{- end -}}
