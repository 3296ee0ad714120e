{{/* Names: <release>-sluice unless the release name already holds it. */}}
{{- define "sluice.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sluice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; "component" is the role. */}}
{{- define "sluice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sluice.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Selector labels: name, release and component. */}}
{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sluice.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sluice.authSecret" -}}
{{- default (printf "%s-auth" (include "sluice.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "sluice.orchestratorUrl" -}}
http://{{ include "sluice.fullname" . }}-orchestrator.{{ .Release.Namespace }}.svc:{{ .Values.orchestrator.port }}
{{- end -}}

{{- define "sluice.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "sluice.fullname" . }}-redis.{{ .Release.Namespace }}.svc:6379
{{- else -}}
{{- required "redis.url is required when redis.enabled is false" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* The learner pods' stable DNS names, comma-separated, as gRPC endpoints. */}}
{{- define "sluice.learnerUrls" -}}
{{- $full := include "sluice.fullname" . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.learner.replicas) -}}
{{- $urls = append $urls (printf "http://%s-learner-%d.%s-learner.%s.svc:%d" $full $i $full $.Release.Namespace (int $.Values.learner.port)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/* Environment every sluice process gets. */}}
{{- define "sluice.commonEnv" -}}
- name: SLUICE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "sluice.authSecret" . }}
      key: token
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- if .Values.telemetry.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.telemetry.otlpEndpoint | quote }}
{{- end }}
{{- end -}}

{{/* Where a submitted job may read and write on a worker (learners, actors):
see `--runs-root`, `--models-root`, `--data-root`. */}}
{{- define "sluice.rootsEnv" -}}
- name: SLUICE_RUNS_ROOT
  value: /data/runs
{{- with .Values.roots.models }}
- name: SLUICE_MODELS_ROOT
  value: {{ . | quote }}
{{- end }}
{{- with .Values.roots.data }}
- name: SLUICE_DATA_ROOT
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by every workload. */}}
{{- define "sluice.podSpecCommon" -}}
serviceAccountName: {{ include "sluice.serviceAccountName" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The checksum that rolls pods when the job file or the token changes. */}}
{{- define "sluice.configChecksum" -}}
checksum/config: {{ .Values.job | sha256sum }}
{{- end -}}
