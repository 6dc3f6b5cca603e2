{{/*
PromQL label matchers for one component's series ({root, component: agent|server}): the
monitoring.prometheusRule.<component>Selector value, or by default the namespace and pod-name
labels the Prometheus Operator's PodMonitors and ServiceMonitors put on every target.
*/}}
{{- define "kiam.monitoring.selector" -}}
{{- $rule := .root.Values.monitoring.prometheusRule -}}
{{- $given := index $rule (printf "%sSelector" .component) -}}
{{- if $given -}}
{{- $given -}}
{{- else -}}
namespace="{{ .root.Release.Namespace }}",pod=~"{{ include "kiam.fullname" .root }}-{{ .component }}-.*"
{{- end -}}
{{- end -}}

{{/* The namespace a monitoring object goes to: its own value, or the release's. */}}
{{- define "kiam.monitoring.namespace" -}}
{{- default .root.Release.Namespace .namespace -}}
{{- end -}}
