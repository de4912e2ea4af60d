{{/* Names ----------------------------------------------------------------------------- */}}

{{- define "tollgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tollgate.fullname" -}}
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

{{- define "tollgate.operatorName" -}}
{{- printf "%s-operator" (include "tollgate.fullname" .) }}
{{- end }}

{{/* The InferenceGateway's name; the operator names its children "<name>-gateway". */}}
{{- define "tollgate.gatewayName" -}}
{{- default (include "tollgate.fullname" .) .Values.gateway.name }}
{{- end }}

{{- define "tollgate.gatewayService" -}}
{{- printf "%s-gateway" (include "tollgate.gatewayName" .) }}
{{- end }}

{{/* The GPUExporter's name; the operator names its children "<name>-gpu-exporter". */}}
{{- define "tollgate.exporterName" -}}
{{- default (include "tollgate.fullname" .) .Values.gpuExporter.name }}
{{- end }}

{{/* The namespaces the operator watches, as a JSON list: operator.watchNamespaces, or the
     release namespace alone. Empty (all) in cluster-wide mode. */}}
{{- define "tollgate.watchNamespaces" -}}
{{- if .Values.operator.clusterWide }}
{{- list | toJson }}
{{- else }}
{{- .Values.operator.watchNamespaces | default (list .Release.Namespace) | toJson }}
{{- end }}
{{- end }}

{{- define "tollgate.postgresName" -}}
{{- printf "%s-postgres" (include "tollgate.fullname" .) }}
{{- end }}

{{/* Labels ---------------------------------------------------------------------------- */}}

{{- define "tollgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/part-of: tollgate
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* Selector labels of one chart component: (dict "ctx" $ "component" "operator") */}}
{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-%s" (include "tollgate.name" .ctx) .component }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- end }}

{{- define "tollgate.componentLabels" -}}
{{ include "tollgate.labels" .ctx }}
{{ include "tollgate.selectorLabels" . }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Images ---------------------------------------------------------------------------- */}}

{{/* (dict "ctx" $ "repository" "tollgate/gateway") -> registry/repository:tag */}}
{{- define "tollgate.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .ctx.Values.images.tag }}
{{- if .ctx.Values.images.registry }}
{{- printf "%s/%s:%s" (trimSuffix "/" .ctx.Values.images.registry) .repository $tag }}
{{- else }}
{{- printf "%s:%s" .repository $tag }}
{{- end }}
{{- end }}

{{/* Security ---------------------------------------------------------------------------- */}}

{{/* Pod Security "restricted": non-root (the images' numeric USER), no privilege
     escalation, read-only root filesystem, every capability dropped, RuntimeDefault seccomp. */}}
{{- define "tollgate.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 65532 }}
runAsGroup: {{ .uid | default 65532 }}
{{- if .fsGroup }}
fsGroup: {{ .fsGroup }}
fsGroupChangePolicy: OnRootMismatch
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "tollgate.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Database -------------------------------------------------------------------------- */}}

{{/* The Secret (name, key) that holds DATABASE_URL, or nothing with mode "none". */}}
{{- define "tollgate.databaseSecretName" -}}
{{- $db := .Values.database }}
{{- if eq $db.mode "embedded" }}
{{- include "tollgate.postgresName" . }}
{{- else if eq $db.mode "external" }}
{{- if $db.external.existingSecret.name }}
{{- $db.external.existingSecret.name }}
{{- else }}
{{- printf "%s-database" (include "tollgate.fullname" .) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tollgate.databaseSecretKey" -}}
{{- $db := .Values.database }}
{{- if and (eq $db.mode "external") $db.external.existingSecret.name }}
{{- $db.external.existingSecret.key }}
{{- else }}
{{- "database-url" }}
{{- end }}
{{- end }}

{{/* Checks values.schema.json cannot express (they span several keys). */}}
{{- define "tollgate.validate" -}}
{{- $db := .Values.database }}
{{- if eq $db.mode "external" }}
{{- if and $db.external.url $db.external.existingSecret.name }}
{{- fail "database.external: set either url or existingSecret.name, not both" }}
{{- end }}
{{- if not (or $db.external.url $db.external.existingSecret.name) }}
{{- fail "database.mode is external: set database.external.url or database.external.existingSecret.name" }}
{{- end }}
{{- else if or $db.external.url $db.external.existingSecret.name }}
{{- fail (printf "database.external is set but database.mode is %q: set database.mode=external to use it" $db.mode) }}
{{- end }}
{{- if and .Values.gateway.enabled (gt (len (include "tollgate.gatewayName" .)) 40) }}
{{- fail (printf "the InferenceGateway name %q is longer than 40 characters: set gateway.name (or a shorter release name)" (include "tollgate.gatewayName" .)) }}
{{- end }}
{{- if and .Values.gpuExporter.enabled (gt (len (include "tollgate.exporterName" .)) 50) }}
{{- fail (printf "the GPUExporter name %q is longer than 50 characters: set gpuExporter.name" (include "tollgate.exporterName" .)) }}
{{- end }}
{{- if and .Values.operator.clusterWide .Values.operator.watchNamespaces }}
{{- fail "operator.clusterWide watches every namespace: leave operator.watchNamespaces empty" }}
{{- end }}
{{- $watch := .Values.operator.watchNamespaces }}
{{- $ownCRs := or .Values.gateway.enabled .Values.gpuExporter.enabled (gt (len .Values.quotaPolicies) 0) }}
{{- if and $watch $ownCRs (not (has .Release.Namespace $watch)) }}
{{- fail (printf "operator.watchNamespaces %v leaves out the release namespace %q, where the chart creates its gateway/policies/exporter: add it, or turn those off" $watch .Release.Namespace) }}
{{- end }}
{{- if and (eq $db.mode "embedded") $watch (not (has .Release.Namespace $watch)) }}
{{- fail (printf "database.mode embedded: the operator creates the Postgres password Secret in %q, so operator.watchNamespaces must include it" .Release.Namespace) }}
{{- end }}
{{- if and .Values.monitoring.serviceMonitor.enabled (not (or .Values.gateway.enabled .Values.gpuExporter.enabled)) }}
{{- fail "monitoring.serviceMonitor.enabled needs gateway.enabled or gpuExporter.enabled: there is nothing to scrape" }}
{{- end }}
{{- end }}
