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

{{/*
Per-component full names, as the community kiam chart computes them for its ServiceAccounts:
agent.fullnameOverride / server.fullnameOverride, else <release>-<component name> (the release
name holding the chart name) or <release>-<name>-<component name>. fullnameOverride does not
reach them there, so it does not here: IRSA trust policies and RBAC bindings name these.
*/}}
{{- define "kiam.componentFullname" -}}
{{- $values := index .root.Values .component -}}
{{- if $values.fullnameOverride -}}
{{- $values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default "kiam" .root.Values.nameOverride -}}
{{- if contains $name .root.Release.Name -}}
{{- printf "%s-%s" .root.Release.Name $values.name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s-%s" .root.Release.Name $name $values.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kiam.serviceAccountName.agent" -}}
{{- if .Values.serviceAccounts.agent.create -}}
{{- default (include "kiam.componentFullname" (dict "root" . "component" "agent")) .Values.serviceAccounts.agent.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccounts.agent.name -}}
{{- end -}}
{{- end -}}

{{- define "kiam.serviceAccountName.server" -}}
{{- if .Values.serviceAccounts.server.create -}}
{{- default (include "kiam.componentFullname" (dict "root" . "component" "server")) .Values.serviceAccounts.server.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccounts.server.name -}}
{{- end -}}
{{- end -}}

{{/*
kube2iam mode's name: <fullname>-kube2iam, or with kube2iam.nameOverride as kube2iam's chart
names its objects (<release>-<nameOverride>, or the release name alone when they are equal).
*/}}
{{- define "kiam.kube2iam.fullname" -}}
{{- with .Values.kube2iam.nameOverride -}}
{{- if ne . $.Release.Name -}}
{{- printf "%s-%s" $.Release.Name . | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- . | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- else -}}
{{- printf "%s-kube2iam" (include "kiam.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
"true" when the chart makes kube2iam mode's ServiceAccount and ClusterRole: rbac.create and
kube2iam.rbac.create (kube2iam's chart key; false there means "use rbac.serviceAccountName").
*/}}
{{- define "kiam.kube2iam.rbac" -}}
{{- if and .Values.rbac.create (ne (toString .Values.kube2iam.rbac.create) "false") -}}true{{- end -}}
{{- end -}}

{{- define "kiam.serviceAccountName.kube2iam" -}}
{{- if eq (toString .Values.kube2iam.rbac.create) "false" -}}
{{- default "default" .Values.kube2iam.rbac.serviceAccountName -}}
{{- else if .Values.serviceAccounts.kube2iam.create -}}
{{- default (include "kiam.kube2iam.fullname" .) .Values.serviceAccounts.kube2iam.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccounts.kube2iam.name -}}
{{- end -}}
{{- end -}}

{{/* "true" when kube2iam mode serves metrics: on a port other than its app port. */}}
{{- define "kiam.kube2iam.metrics" -}}
{{- if ne (int .Values.kube2iam.prometheus.metricsPort) (int .Values.kube2iam.host.port) -}}true{{- end -}}
{{- end -}}

{{/*
The image reference; called with (dict "image" IMAGE "key" "agent.image"). kiam's and
kube2iam's own images do not take kiam-rs's arguments: a values file that still names them is
refused rather than rolled out into a crash loop.
*/}}
{{- define "kiam.image" -}}
{{- $image := .image -}}
{{- if regexMatch "(^|/)(uswitch/kiam|jtblin/kube2iam)$" (toString $image.repository) -}}
{{- fail (printf "%s.repository is %s, the upstream image, which does not run kiam-rs's arguments: set it (and %s.tag) to your kiam-rs image" .key $image.repository .key) -}}
{{- end -}}
{{- printf "%s:%s" $image.repository (toString (default "latest" $image.tag)) -}}
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
extraArgs, as a map (the community charts' form), called with (dict "args" MAP "key" "agent.extraArgs"):
key: value gives --key=value, key: true, null or "" gives --key. key: false (and 0) is refused:
kiam's and kube2iam's charts render it as the bare --key, which turns a switch on, while older
kiam-rs charts dropped it; the message names the key. A list of literal arguments is accepted too.
*/}}
{{- define "kiam.extraArgs" -}}
{{- $path := .key -}}
{{- if kindIs "slice" .args -}}
{{- range .args }}
- {{ . | quote }}
{{- end -}}
{{- else -}}
{{- range $key, $value := .args }}
{{- if and (not $value) (not (kindIs "invalid" $value)) (ne (toString $value) "") }}
{{- fail (printf "%s.%s: %v is ambiguous (kiam's and kube2iam's charts render it as the bare --%s, which turns a switch on): write true for --%s, the string \"%v\" for --%s=%v, or remove it" $path $key $value $key $key $value $key $value) }}
{{- else if or (kindIs "bool" $value) (kindIs "invalid" $value) (eq (toString $value) "") }}
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

{{/*
Pod or Service annotations: the prometheus.io ones the community chart adds when
prometheus.scrape is on, merged with the user's (called with (dict "prometheus" P "user" MAP));
the user's win, so a key never appears twice (Helm and kubectl refuse duplicates).
*/}}
{{- define "kiam.annotations" -}}
{{- $out := dict -}}
{{- if .prometheus.scrape -}}
{{- $_ := set $out "prometheus.io/scrape" "true" -}}
{{- $_ := set $out "prometheus.io/port" (toString .prometheus.port) -}}
{{- end -}}
{{- range $k, $v := .user -}}
{{- $_ := set $out $k (toString $v) -}}
{{- end -}}
{{- if $out -}}
{{- toYaml $out -}}
{{- end -}}
{{- end -}}
