{{/* Image reference of one daemon. */}}
{{- define "cs.image" -}}
{{ .root.Values.image.registry }}/constellation-{{ .name }}:{{ .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end -}}

{{/* Labels of one daemon. */}}
{{- define "cs.labels" -}}
app.kubernetes.io/name: constellation-{{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/part-of: constellation
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ .root.Chart.Name }}-{{ .root.Chart.Version }}
{{- end -}}

{{- define "cs.selector" -}}
app.kubernetes.io/name: constellation-{{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* Control-plane scheduling: required node affinity plus the taints' tolerations. */}}
{{- define "cs.controlPlaneAffinity" -}}
affinity:
  nodeAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      nodeSelectorTerms:
        - matchExpressions:
            - key: node-role.kubernetes.io/control-plane
              operator: Exists
{{- end -}}

{{- define "cs.tolerations" -}}
tolerations:
  - key: node-role.kubernetes.io/control-plane
    operator: Exists
    effect: NoSchedule
  - key: node-role.kubernetes.io/master
    operator: Exists
    effect: NoSchedule
{{- end -}}

{{/* Pod security: a fixed non-root user; fsGroup makes the mounted Secret files group-readable. */}}
{{- define "cs.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  fsGroup: 65532
  {{- if .Values.tpm.group }}
  supplementalGroups: [{{ .Values.tpm.group }}]
  {{- end }}
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "cs.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  privileged: false
  capabilities:
    drop: ["ALL"]
{{- end -}}

{{/* Probes on the daemon's HTTP health server. */}}
{{- define "cs.probes" -}}
livenessProbe:
  httpGet: {path: /healthz, port: health}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: health}
  periodSeconds: 5
  failureThreshold: 2
startupProbe:
  httpGet: {path: /healthz, port: health}
  periodSeconds: 2
  failureThreshold: 30
{{- end -}}

{{- define "cs.daemonSettings" -}}
daemon:
  health_listen: "0.0.0.0:{{ .healthPort }}"
  log_format: {{ .root.Values.logFormat }}
  shutdown_grace_secs: {{ .root.Values.shutdownGraceSecs }}
  reload_interval_ms: {{ .root.Values.reloadIntervalMs }}
{{- end -}}

{{/* Downward-API environment: the node's name and IP, used in flags only (never secrets). */}}
{{- define "cs.nodeEnv" -}}
env:
  - name: NODE_NAME
    valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
  - name: NODE_IP
    valueFrom: {fieldRef: {fieldPath: status.hostIP}}
{{- end -}}
