{{/*
Names. The chart name is "capgate"; namespaced resources are named after the release (like cert-manager),
cluster-scoped names the operator relies on are fixed (see capgate/operator/manifests.py).
*/}}
{{- define "capgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "capgate.fullname" -}}
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

{{- define "capgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "capgate.labels" -}}
helm.sh/chart: {{ include "capgate.chart" . }}
app.kubernetes.io/name: {{ include "capgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: capgate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels selecting the operator pods (never change them: Deployment selectors are immutable). */}}
{{- define "capgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "capgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "capgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "capgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The webhook Service; the operator's serving certificate names it (<service>.<namespace>.svc). */}}
{{- define "capgate.webhookService" -}}
{{- printf "%s-webhook" (include "capgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "capgate.metricsService" -}}
{{- printf "%s-metrics" (include "capgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* cert-manager: the Certificate (also named by the cainjector annotation) and its Secret. */}}
{{- define "capgate.webhookCertificate" -}}
{{- printf "%s-webhook" (include "capgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "capgate.webhookCertSecret" -}}
{{- printf "%s-webhook-cert" (include "capgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "capgate.selfSignedIssuer" -}}
{{- printf "%s-selfsigned" (include "capgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fixed cluster-scoped names, as capgate/operator/manifests.py expects them. */}}
{{- define "capgate.mutatingWebhookConfiguration" -}}capgate-sidecar-injector{{- end }}
{{- define "capgate.validatingWebhookConfiguration" -}}capgate-capability-validator{{- end }}
{{- define "capgate.revocationReaderRole" -}}capgate-revocation-reader{{- end }}

{{/* repository:tag, or repository@digest when a digest is given; the tag defaults to appVersion. */}}
{{- define "capgate.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (.image.tag | default .appVersion) }}
{{- end }}
{{- end }}

{{- define "capgate.image" -}}
{{- include "capgate.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{/* The sidecar: its own repository (with its own tag or digest), else exactly the operator's image. */}}
{{- define "capgate.sidecarImage" -}}
{{- if .Values.sidecar.image.repository }}
{{- include "capgate.imageRef" (dict "image" .Values.sidecar.image "appVersion" .Chart.AppVersion) }}
{{- else }}
{{- include "capgate.image" . }}
{{- end }}
{{- end }}

{{/* The namespaceSelector of the injecting webhook: never the release namespace. */}}
{{- define "capgate.webhookNamespaceSelector" -}}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values:
      {{- toYaml (uniq (prepend .Values.webhook.excludedNamespaces .Release.Namespace)) | nindent 6 }}
{{- end }}
