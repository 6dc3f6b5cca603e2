{{/* The server's pod template, shared by its DaemonSet and its Deployment. */}}
{{- define "kiam.server.podTemplate" -}}
{{- $server := .Values.server -}}
{{- $sel := dict "root" . "component" $server.name -}}
{{- $privileged := include "kiam.server.privilegedPort" . -}}
metadata:
  labels:
    {{- include "kiam.selectorLabels" $sel | nindent 4 }}
    {{- with $server.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- /* As the community chart: prometheus.io annotations go on the Service, not the pods. */}}
  {{- with $server.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "kiam.serviceAccountName.server" . }}
  {{- if $server.useHostNetwork }}
  hostNetwork: true
  dnsPolicy: ClusterFirstWithHostNet
  {{- end }}
  {{- with $server.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  securityContext:
    {{- if and $privileged $server.useHostNetwork }}
    # A port below 1024 on the host network: root with NET_BIND_SERVICE only.
    runAsUser: 0
    runAsNonRoot: false
    {{- else }}
    runAsUser: 65532
    runAsGroup: 65532
    runAsNonRoot: true
    {{- if $privileged }}
    # Lets the non-root server bind a port below 1024 in its own network namespace.
    sysctls:
      - name: net.ipv4.ip_unprivileged_port_start
        value: "0"
    {{- end }}
    {{- end }}
    seccompProfile:
      type: RuntimeDefault
  {{- with $server.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $server.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $affinity := deepCopy (default dict $server.affinity) }}
  {{- if and $server.deployment.enabled (not (hasKey $affinity "podAntiAffinity")) }}
  {{- /* As the community chart: one server per node, so a node's loss takes one replica. */}}
  {{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchExpressions" (list (dict "key" "app" "operator" "In" "values" (list (include "kiam.name" .))) (dict "key" "component" "operator" "In" "values" (list $server.name)))) }}
  {{- $_ := set $affinity "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term)) }}
  {{- end }}
  {{- with $affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    - name: {{ . }}
  {{- end }}
  {{- with $server.initContainers }}
  initContainers:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ include "kiam.name" . }}-{{ $server.name }}
      image: {{ include "kiam.image" (dict "image" $server.image "key" "server.image") | quote }}
      imagePullPolicy: {{ $server.image.pullPolicy }}
      command:
        - /kiam
        - server
      args:
        {{- if $server.log.jsonOutput }}
        - --json-log
        {{- end }}
        - --level={{ $server.log.level }}
        - --bind=0.0.0.0:{{ $server.service.targetPort }}
        {{- include "kiam.tlsArgs" (dict "root" . "tlsCerts" $server.tlsCerts) | nindent 8 }}
        {{- if $server.roleBaseArn }}
        - --role-base-arn={{ $server.roleBaseArn }}
        {{- else }}
        - --role-base-arn-autodetect
        {{- end }}
        {{- with $server.assumeRoleArn }}
        - --assume-role-arn={{ . }}
        {{- end }}
        {{- with $server.sessionDuration }}
        - --session-duration={{ . }}
        {{- end }}
        {{- with $server.region }}
        - --region={{ . }}
        {{- end }}
        - --sync={{ $server.cache.syncInterval }}
        {{- if $server.disableStrictNamespaceRegexp }}
        - --disable-strict-namespace-regexp
        {{- end }}
        {{- if $server.serviceAccountRoles }}
        - --service-account-roles
        {{- end }}
        {{- if $server.peers }}
        {{- /* The headless Service resolves to every server pod; peers are reached on the pods' own port. */}}
        - --peers={{ include "kiam.fullname" . }}-server:{{ $server.service.targetPort }}
        {{- end }}
        {{- with $server.stsRate }}
        - --sts-rate={{ . }}
        {{- end }}
        {{- with $server.sessionTags }}
        - --session-tags={{ join "," . }}
        {{- end }}
        {{- with $server.clusterName }}
        - --cluster-name={{ . }}
        {{- end }}
        {{- with $server.clusterArn }}
        - --cluster-arn={{ . }}
        {{- end }}
        {{- with $server.nodeReadiness.taint }}
        - --node-readiness-taint={{ . }}
        {{- if $server.nodeReadiness.reapply }}
        - --node-readiness-reapply
        {{- end }}
        {{- end }}
        {{- if $server.prometheus.scrape }}
        - --prometheus-listen-addr=0.0.0.0:{{ $server.prometheus.port }}
        - --prometheus-sync-interval={{ $server.prometheus.syncInterval }}
        {{- end }}
        {{- with $server.keepaliveParams.time }}
        - --grpc-keepalive-time-duration={{ . }}
        {{- end }}
        {{- with $server.keepaliveParams.timeout }}
        - --grpc-keepalive-timeout-duration={{ . }}
        {{- end }}
        {{- with $server.keepaliveParams.maxConnectionIdle }}
        - --grpc-max-connection-idle-duration={{ . }}
        {{- end }}
        {{- with $server.keepaliveParams.maxConnectionAge }}
        - --grpc-max-connection-age-duration={{ . }}
        {{- end }}
        {{- with $server.keepaliveParams.maxConnectionAgeGrace }}
        - --grpc-max-connection-age-grace-duration={{ . }}
        {{- end }}
        {{- include "kiam.extraArgs" (dict "args" .Values.extraArgs "key" "extraArgs") | nindent 8 }}
        {{- include "kiam.extraArgs" (dict "args" $server.extraArgs "key" "server.extraArgs") | nindent 8 }}
      {{- $token := include "kiam.agentToken" . }}
      {{- if or $server.agentNodeBinding $token $server.extraEnv }}
      env:
        {{- if $server.peers }}
        # --peers: the server binds every address, and finds itself among its peers by this one.
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        {{- end }}
        # The settings that deploy/kustomize's components switch are given as each flag's KIAM_*
        # variable, not as args, so that a component sets or deletes one by name.
        {{- if $server.agentNodeBinding }}
        - name: KIAM_AGENT_NODE_BINDING
          value: "true"
        {{- end }}
        {{- if $token }}
        - name: KIAM_AGENT_TOKEN_AUDIENCE
          value: {{ .Values.agent.nodeToken.audience | quote }}
        - name: KIAM_AGENT_SERVICE_ACCOUNT
          value: {{ printf "%s:%s" .Release.Namespace (include "kiam.serviceAccountName.agent" .) }}
        {{- end }}
        {{- include "kiam.extraEnv" $server.extraEnv | nindent 8 }}
      {{- end }}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop: [ALL]
          {{- if and $privileged $server.useHostNetwork }}
          add: [NET_BIND_SERVICE]
          {{- end }}
        {{- with $server.seLinuxOptions }}
        seLinuxOptions:
          {{- toYaml . | nindent 10 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ $server.service.targetPort }}
          protocol: TCP
        {{- if $server.prometheus.scrape }}
        - name: metrics
          containerPort: {{ $server.prometheus.port }}
          protocol: TCP
        {{- end }}
      {{- $probe := list "/kiam" "health" (printf "--server-address=%s:%v" $server.probes.serverAddress $server.service.targetPort) "--timeout=5s" (printf "--gateway-timeout-creation=%v" $server.gatewayTimeoutCreation) }}
      {{- $tls := include "kiam.tlsArgs" (dict "root" . "tlsCerts" $server.tlsCerts) | fromYamlArray }}
      livenessProbe:
        exec:
          command:
            {{- toYaml (concat $probe $tls) | nindent 12 }}
        {{- toYaml $server.livenessProbe | nindent 8 }}
      readinessProbe:
        exec:
          command:
            {{- toYaml (concat $probe $tls) | nindent 12 }}
        {{- toYaml $server.readinessProbe | nindent 8 }}
      {{- with $server.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: tls
          mountPath: /etc/kiam/tls
          readOnly: true
        {{- if $server.sslCertHostPath }}
        - name: ssl-certs
          mountPath: /etc/ssl/certs
          readOnly: true
        {{- end }}
        {{- range $server.extraHostPathMounts }}
        - name: {{ .name }}
          mountPath: {{ .mountPath }}
          readOnly: {{ default false .readOnly }}
        {{- end }}
  volumes:
    - name: tls
      secret:
        secretName: {{ include "kiam.serverTlsSecret" . }}
    {{- with $server.sslCertHostPath }}
    - name: ssl-certs
      hostPath:
        path: {{ . }}
    {{- end }}
    {{- range $server.extraHostPathMounts }}
    - name: {{ .name }}
      hostPath:
        path: {{ .hostPath }}
    {{- end }}
{{- end -}}
