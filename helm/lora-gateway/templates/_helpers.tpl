{{/*
Names, labels and the settings derived from values. Every object carries
app.kubernetes.io/{name,instance,version,component}; selectors use name, instance and component.
*/}}

{{- define "lora-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lora-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A component's object name: <fullname>-<suffix>, within 63 characters. */}}
{{- define "lora-gateway.componentName" -}}
{{- printf "%s-%s" (include "lora-gateway.fullname" .root | trunc (int (sub 62 (len .suffix))) | trimSuffix "-") .suffix }}
{{- end }}

{{- define "lora-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: include "lora-gateway.selectorLabels" (dict "root" $ "component" "gateway") */}}
{{- define "lora-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lora-gateway.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "lora-gateway.labels" -}}
helm.sh/chart: {{ include "lora-gateway.chart" .root }}
{{ include "lora-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: lora-gateway
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{- define "lora-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lora-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lora-gateway.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion (ternary "gpu" "cpu" .Values.gpu.enabled)) }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* --- object store ------------------------------------------------------------------------ */}}

{{- define "lora-gateway.minio.fullname" -}}
{{- include "lora-gateway.componentName" (dict "root" . "suffix" "minio") }}
{{- end }}

{{- define "lora-gateway.minio.secretName" -}}
{{- .Values.minio.auth.existingSecret | default (include "lora-gateway.minio.fullname" .) }}
{{- end }}

{{- define "lora-gateway.minio.endpoint" -}}
{{- printf "http://%s.%s.svc:9000" (include "lora-gateway.minio.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "lora-gateway.s3.store" -}}
{{- if .Values.s3.store }}
{{- .Values.s3.store }}
{{- else if .Values.minio.enabled }}
{{- printf "s3://%s/adapters" .Values.minio.bucket }}
{{- end }}
{{- end }}

{{- define "lora-gateway.s3.endpoint" -}}
{{- if .Values.s3.endpoint }}
{{- .Values.s3.endpoint }}
{{- else if .Values.minio.enabled }}
{{- include "lora-gateway.minio.endpoint" . }}
{{- end }}
{{- end }}

{{/* The access key pair as secretKeyRef env entries; nothing when the store needs no keys. */}}
{{- define "lora-gateway.s3.env" -}}
{{- if .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.secretAccessKeyKey }}
{{- else if .Values.minio.enabled }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "lora-gateway.minio.secretName" . }}
      key: root-user
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "lora-gateway.minio.secretName" . }}
      key: root-password
{{- end }}
{{- end }}

{{/* --- gateway settings -------------------------------------------------------------------- */}}

{{- define "lora-gateway.modelDir" -}}
{{- if .Values.model.path }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.path) }}
{{- else }}
{{- .Values.model.mountPath }}
{{- end }}
{{- end }}

{{- define "lora-gateway.tenantsSecretName" -}}
{{- .Values.tenants.existingSecret | default (include "lora-gateway.componentName" (dict "root" . "suffix" "tenants")) }}
{{- end }}

{{/* The gateway's config file (Settings fields): the values' `config` plus what the chart owns. */}}
{{- define "lora-gateway.configFile" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $_ := set $cfg "model" (include "lora-gateway.modelDir" .) }}
{{- $_ = set $cfg "listen" "0.0.0.0:50051" }}
{{- $_ = set $cfg "metrics_listen" "0.0.0.0:9400" }}
{{- $_ = set $cfg "cache_dir" "/var/cache/lora-gateway" }}
{{- $_ = set $cfg "spool_dir" "/var/spool/lora-gateway" }}
{{- $_ = set $cfg "health_listen" "0.0.0.0:50052" }}
{{- if .Values.openai.enabled }}
{{- $_ = set $cfg "openai_listen" "0.0.0.0:8000" }}
{{- end }}
{{- $_ = set $cfg "tenants_file" (printf "/etc/lora-gateway/tenants/%s" .Values.tenants.secretKey) }}
{{- $_ = set $cfg "store" (include "lora-gateway.s3.store" . | default "file:///var/lib/lora-gateway/adapters") }}
{{- with (include "lora-gateway.s3.endpoint" .) }}
{{- $_ = set $cfg "s3_endpoint" . }}
{{- end }}
{{- with .Values.s3.region }}
{{- $_ = set $cfg "s3_region" . }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* The spool volume's size limit: config.spool_budget_bytes (the gateway's own budget, which
refuses uploads beyond it) plus a tenth for the filesystem's overhead, so the budget acts before
the kubelet's eviction does. */}}
{{- define "lora-gateway.spoolSizeLimit" -}}
{{- $budget := .Values.config.spool_budget_bytes | default 4294967296 | int64 }}
{{- add $budget (div $budget 10) }}
{{- end }}

{{/* Refuse values that would deploy a broken gateway. */}}
{{- define "lora-gateway.validate" -}}
{{- $drain := .Values.config.drain_grace_s | default 20 | float64 }}
{{- $needed := addf $drain .Values.preStopSleepSeconds }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.drain_grace_s + preStopSleepSeconds (%v)" .Values.terminationGracePeriodSeconds $needed) }}
{{- end }}
{{- if and .Values.gpu.enabled (gt (int (.Values.config.tensor_parallel_size | default 1)) (int .Values.gpu.count)) }}
{{- fail "config.tensor_parallel_size exceeds gpu.count" }}
{{- end }}
{{- if and (eq .Values.model.source "hostPath") (not .Values.model.hostPath.path) }}
{{- fail "model.source=hostPath needs model.hostPath.path" }}
{{- end }}
{{- if and (eq .Values.model.source "s3") (not .Values.model.s3.uri) }}
{{- fail "model.source=s3 needs model.s3.uri (s3://bucket/prefix)" }}
{{- end }}
{{- if and (eq .Values.cache.type "pvc") (not .Values.cache.pvc.claimName) }}
{{- fail "cache.type=pvc needs cache.pvc.claimName" }}
{{- end }}
{{- if and (not (include "lora-gateway.s3.store" .)) (or .Values.s3.endpoint .Values.s3.existingSecret) }}
{{- fail "s3.endpoint / s3.existingSecret given without s3.store (or minio.enabled)" }}
{{- end }}
{{- end }}
