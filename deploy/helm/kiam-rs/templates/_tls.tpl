{{/*
The certificates the chart makes itself (no tlsSecret, no tlsFiles, certManager off), decided
from what the release already has, read with `lookup`:
- the CA lives in the secret <fullname>-ca (tls.crt, tls.key) and is reused as long as it exists;
- a leaf secret that exists is kept, unless its kiam-rs.io/not-after annotation says it expires
  within kiam.tls.renewDays: it is then signed anew by the same CA;
- without the CA's key (a release from a chart that kept none) the leaves are kept as they are;
  a missing leaf then needs a new CA, and so new leaves on both sides.
Offline renders (`helm template`, Argo CD) get nothing from `lookup`: each mints a new CA,
which is why those users must set tlsSecret or certManager (docs/tls.md).

"kiam.tls.plan" returns JSON: {generate, ca: {from: existing|new|none, cert, key, notAfter},
agent/server: {action: keep|mint, data: {ca, cert, key}, notAfter}}. tls-secrets.yaml mints what
it says; NOTES.txt prints its dates. Both compute it, so it holds no key material of its own.
*/}}
{{- define "kiam.tls.caDays" -}}3650{{- end -}}
{{- define "kiam.tls.leafDays" -}}365{{- end -}}
{{- define "kiam.tls.renewDays" -}}30{{- end -}}
{{- define "kiam.tls.notAfterKey" -}}kiam-rs.io/not-after{{- end -}}

{{/* A date `days` from now, as RFC 3339 in UTC (what the certificates minted now carry). */}}
{{- define "kiam.tls.notAfter" -}}
{{- dateInZone "2006-01-02T15:04:05Z" (now | dateModify (printf "+%dh" (mul (int .) 24))) "UTC" -}}
{{- end -}}

{{- define "kiam.tls.plan" -}}
{{- $agent := .Values.agent }}
{{- $server := .Values.server }}
{{- $given := or $agent.tlsFiles.cert $server.tlsFiles.cert $agent.tlsSecret $server.tlsSecret }}
{{- $plan := dict "generate" false }}
{{- if and (not $given) (not .Values.certManager.enabled) (or $agent.enabled $server.enabled) }}
{{- $_ := set $plan "generate" true }}
{{- $ns := .Release.Namespace }}
{{- $fullname := include "kiam.fullname" . }}
{{- $annotation := include "kiam.tls.notAfterKey" . }}
{{- $renewBy := now | dateModify (printf "+%dh" (mul (int (include "kiam.tls.renewDays" .)) 24)) | unixEpoch | int64 }}
{{- $caSecret := lookup "v1" "Secret" $ns (printf "%s-ca" $fullname) }}
{{- $caData := dig "data" dict $caSecret }}
{{- $ca := dict "from" "none" }}
{{- if and (index $caData "tls.crt") (index $caData "tls.key") }}
{{- $ca = dict "from" "existing" "cert" (index $caData "tls.crt") "key" (index $caData "tls.key") "notAfter" (dig "metadata" "annotations" $annotation "" $caSecret) }}
{{- end }}
{{- $missing := false }}
{{- range $component := list "agent" "server" }}
{{- $names := (index $.Values $component).tlsCerts }}
{{- $secret := lookup "v1" "Secret" $ns (include (printf "kiam.%sTlsSecret" $component) $) }}
{{- $data := dig "data" dict $secret }}
{{- $notAfter := dig "metadata" "annotations" $annotation "" $secret }}
{{- $leaf := dict "action" "mint" }}
{{- if index $data $names.certFileName }}
{{- $kept := dict "ca" (index $data $names.caFileName) "cert" (index $data $names.certFileName) "key" (index $data $names.keyFileName) }}
{{- $leaf = dict "action" "keep" "data" $kept "notAfter" $notAfter }}
{{- if and $notAfter (le (toDate "2006-01-02T15:04:05Z07:00" $notAfter | unixEpoch | int64) $renewBy) }}
{{- $leaf = dict "action" "mint" "expiring" $notAfter }}
{{- end }}
{{- end }}
{{- if eq $leaf.action "mint" }}
{{- $missing = true }}
{{- end }}
{{- $_ := set $plan $component $leaf }}
{{- end }}
{{- if and $missing (eq $ca.from "none") }}
{{- /* Nothing can sign the missing leaf for the CA the other side trusts: start over. */}}
{{- $ca = dict "from" "new" "notAfter" (include "kiam.tls.notAfter" (include "kiam.tls.caDays" .)) }}
{{- range $component := list "agent" "server" }}
{{- $_ := set $plan $component (dict "action" "mint") }}
{{- end }}
{{- end }}
{{- range $component := list "agent" "server" }}
{{- $leaf := index $plan $component }}
{{- if eq $leaf.action "mint" }}
{{- $_ := set $leaf "notAfter" (include "kiam.tls.notAfter" (include "kiam.tls.leafDays" $)) }}
{{- end }}
{{- end }}
{{- $_ := set $plan "ca" $ca }}
{{- end }}
{{- toJson $plan }}
{{- end -}}
