{{/* Name of the chart, overridable. */}}
{{- define "capstan.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, prefixed with the chart name unless it contains it. */}}
{{- define "capstan.fullname" -}}
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

{{- define "capstan.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "capstan.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: capstan
{{- end }}

{{- define "capstan.selectorLabels" -}}
app.kubernetes.io/name: {{ include "capstan.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "capstan.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "capstan.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "capstan.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end }}
{{- end }}

{{- define "capstan.webhookService" -}}
{{ include "capstan.fullname" . }}-webhook
{{- end }}

{{- define "capstan.webhookSecret" -}}
{{ include "capstan.fullname" . }}-webhook-tls
{{- end }}

{{/* Cluster-wide install unless watchNamespaces is set. */}}
{{- define "capstan.clusterwide" -}}
{{- if not .Values.operator.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
RBAC rules for the operator's work in the namespaces it serves. Each rule names the code path
that needs it; tests/packaging/test_packaging_rbac.py compares them with the calls the operator
makes against the API emulator (plus the commented allowlist there).
*/}}
{{- define "capstan.rules.namespaced" -}}
# Capstan resources: kopf lists and watches them, patches its finalizer and progress annotations,
# and the TTL of finished TrainingJobs deletes them.
- apiGroups: [capstan.dev]
  resources: [trainingjobs, modelservings]
  verbs: [get, list, watch, patch, delete]
# Status is written only through the status subresource.
- apiGroups: [capstan.dev]
  resources: [trainingjobs/status, modelservings/status]
  verbs: [get, patch]
# Gang workers: created and deleted as a whole; rank 0 is annotated with checkpoint requests.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, patch, delete]
# Headless rendezvous Services and serving Services, checkpoint PVCs.
- apiGroups: [""]
  resources: [services, persistentvolumeclaims]
  verbs: [get, list, watch, create, patch, delete]
# Events on every transition; a repeat is read and its count patched (kubectl-style aggregation).
- apiGroups: [""]
  resources: [events]
  verbs: [get, create, patch]
# ModelServing revisions and their autoscalers.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, delete]
# Multi-host ModelServing replicas: a LeaderWorkerSet per revision where the cluster has it, else a
# ControllerRevision holding the group templates (the groups' pods are created like gang workers).
- apiGroups: [leaderworkerset.x-k8s.io]
  resources: [leaderworkersets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [apps]
  resources: [controllerrevisions]
  verbs: [get, list, watch, create, patch, delete]
# ModelServing model.cache: the Job that fetches a revision's model once into its volume.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# Checkpoint snapshots (CSI): taken on schedule, pruned to spec.checkpoint.snapshots.keep.
- apiGroups: [snapshot.storage.k8s.io]
  resources: [volumesnapshots]
  verbs: [get, list, watch, create, delete]
# Canary traffic split through Gateway API, when the cluster has it.
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes]
  verbs: [get, list, watch, create, patch, delete]
{{- if .Values.routing.endpointPickers }}
# routing.endpointPickers: inference routing (Gateway API Inference Extension), when the cluster has
# it: an InferencePool per revision, and its endpoint picker's ServiceAccount, Role and RoleBinding.
- apiGroups: [inference.networking.k8s.io]
  resources: [inferencepools]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, patch, delete]
# What the picker's Role grants: Kubernetes lets the operator grant only what it holds itself.
- apiGroups: [inference.networking.x-k8s.io]
  resources: [inferenceobjectives, inferencemodelrewrites]
  verbs: [get, list, watch]
{{- end }}
# Autoscaling through KEDA (scale to zero), when the cluster has it.
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [get, list, watch, create, patch, delete]
# NetworkPolicies around gangs and servers (spec.networkPolicy): created with a gang, applied
# and removed with a ModelServing's spec.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, create, patch, delete]
{{- end }}

{{/* Cluster-scoped reads every install needs (nodes are cluster-scoped even for a namespaced install). */}}
{{- define "capstan.rules.cluster" -}}
# Topology-aware placement and the webhook's capacity checks read Nodes (labels, allocatable GPUs).
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
# kopf discovers the CRDs at runtime (served versions, added or removed CRDs).
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end }}

{{/* kopf peering (leader election among the replicas). */}}
{{- define "capstan.rules.peering.cluster" -}}
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- define "capstan.rules.peering.namespaced" -}}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
