{{/* Names: <release>-tandem unless the release is already called so. */}}
{{- define "tandem.fullname" -}}
{{- if contains "tandem" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-tandem" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: tandem
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tandem.labels" -}}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tandem.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end -}}

{{- define "tandem.claimName" -}}
{{- default (printf "%s-store" (include "tandem.fullname" .)) .Values.modelStore.existingClaim -}}
{{- end -}}

{{- define "tandem.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "tandem.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{- define "tandem.hasApiKeys" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys -}}true{{- end -}}
{{- end -}}

{{- define "tandem.redisSecret" -}}
{{- default (printf "%s-redis" (include "tandem.fullname" .)) .Values.redis.existingSecret -}}
{{- end -}}

{{- define "tandem.internalSecret" -}}
{{- default (printf "%s-internal" (include "tandem.fullname" .)) .Values.internal.existingSecret -}}
{{- end -}}

{{- define "tandem.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "tandem.fullname" .) -}}
{{- else -}}
{{- .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* The deployment config `tandem up` reads: the values' platform section plus what the cluster sets. */}}
{{- define "tandem.platformConfig" -}}
{{- $p := deepCopy .Values.platform -}}
{{- $gpus := .Values.ray.gpuWorkers.gpusPerActor -}}
{{- $res := default dict $p.resources -}}
{{- range $role := list "prefill" "decode" "monolithic" -}}
{{- $r := default dict (get $res $role) -}}
{{- $_ := set $r "num_gpus" $gpus -}}
{{- $_ := set $res $role $r -}}
{{- end -}}
{{- $gw := default dict (get $res "gateway") -}}
{{- $_ := set $gw "custom" (dict "tandem-gateway" 1) -}}
{{- $_ := set $res "gateway" $gw -}}
{{- $_ := set $p "resources" $res -}}
{{- $_ := set $p "model_store" (printf "%s/models" .Values.modelStore.mountPath) -}}
{{- $_ := set $p "bind" "node" -}}
{{- $_ := set $p "gateway" (dict "host" "0.0.0.0" "port" (int .Values.gateway.port) "api_keys" (list)) -}}
{{- $kv := default dict $p.kvstore -}}
{{- $url := include "tandem.redisUrl" . -}}
{{- $_ := set $kv "redis_url" (ternary $url nil (ne $url "")) -}}
{{- $_ := set $p "kvstore" $kv -}}
{{- $t := default dict $p.training -}}
{{- if eq (default "ray" $t.executor) "kubernetes" -}}
{{- $_ := set $t "k8s_namespace" .Release.Namespace -}}
{{- $_ := set $t "k8s_image" (include "tandem.image" .) -}}
{{- $_ := set $t "k8s_claim" (include "tandem.claimName" .) -}}
{{- end -}}
{{- $_ := set $p "training" $t -}}
{{- toYaml $p -}}
{{- end -}}

{{/* Environment every Ray container gets: where Tandem's state lives, and its secrets. */}}
{{- define "tandem.env" -}}
- name: TANDEM_HOME
  value: {{ .Values.modelStore.mountPath | quote }}
{{- if include "tandem.hasApiKeys" . }}
- name: TANDEM_API_KEYS
  valueFrom:
    secretKeyRef: {name: {{ include "tandem.apiKeysSecret" . }}, key: api-keys}
{{- end }}
{{- if .Values.redis.enabled }}
- name: TANDEM_REDIS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ include "tandem.redisSecret" . }}, key: redis-password}
{{- end }}
- name: TANDEM_INTERNAL_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "tandem.internalSecret" . }}, key: internal-token}
{{- with .Values.internal.tlsSecret }}
- {name: TANDEM_TLS_CERT, value: /etc/tandem-tls/tls.crt}
- {name: TANDEM_TLS_KEY, value: /etc/tandem-tls/tls.key}
- {name: TANDEM_TLS_CA, value: /etc/tandem-tls/ca.crt}
- {name: TANDEM_TLS_SERVER_NAME, value: {{ $.Values.internal.tlsServerName | quote }}}
{{- end }}
{{- end -}}

{{- define "tandem.volumeMounts" -}}
- {name: tandem-data, mountPath: {{ .Values.modelStore.mountPath | quote }}}
- {name: deploy-config, mountPath: /etc/tandem, readOnly: true}
{{- if .Values.internal.tlsSecret }}
- {name: internal-tls, mountPath: /etc/tandem-tls, readOnly: true}
{{- end }}
{{- end -}}

{{- define "tandem.volumes" -}}
- name: tandem-data
  persistentVolumeClaim: {claimName: {{ include "tandem.claimName" . }}}
- name: deploy-config
  configMap: {name: {{ include "tandem.fullname" . }}-deploy}
{{- with .Values.internal.tlsSecret }}
- name: internal-tls
  secret: {secretName: {{ . | quote }}}
{{- end }}
{{- end -}}

{{- define "tandem.securityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
{{- end -}}

{{- define "tandem.containerSecurity" -}}
allowPrivilegeEscalation: false
capabilities: {drop: [ALL]}
{{- end -}}
