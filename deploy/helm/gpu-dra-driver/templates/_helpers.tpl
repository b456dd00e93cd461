{{/* The chart name, or nameOverride. */}}
{{- define "gpu-dra-driver.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name: object names, the ServiceAccount, cluster-scoped RBAC. */}}
{{- define "gpu-dra-driver.fullname" -}}
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

{{- define "gpu-dra-driver.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpu-dra-driver.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gpu-dra-driver.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gpu-dra-driver.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gpu-dra-driver.serviceAccountName" -}}
{{- default (include "gpu-dra-driver.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{/* The username the ServiceAccount's tokens authenticate as. */}}
{{- define "gpu-dra-driver.serviceAccountUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "gpu-dra-driver.serviceAccountName" .) }}
{{- end }}

{{/* Exclusive to the driver; the same path inside the pod and on the host, because the
kubelet dials the DRA socket at the path the plugin reports. */}}
{{- define "gpu-dra-driver.pluginDataDir" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.kubeletPlugin.pluginsDir) .Values.driverName }}
{{- end }}

{{- define "gpu-dra-driver.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* A DeviceClass selecting this driver's devices of one type (gpu or mig). */}}
{{- define "gpu-dra-driver.deviceClass" -}}
apiVersion: resource.k8s.io/v1
kind: DeviceClass
metadata:
  name: {{ .name }}
  labels:
    {{- include "gpu-dra-driver.labels" .root | nindent 4 }}
spec:
  selectors:
  - cel:
      expression: >-
        device.driver == "{{ .root.Values.driverName }}" &&
        device.attributes["{{ .root.Values.driverName }}"].type == "{{ .type }}"
  {{- with tpl (.class.extendedResourceName | default "") .root }}
  extendedResourceName: {{ . }}
  {{- end }}
{{- end }}

{{/* kubeletPlugin.affinity; with skipDevicePluginNodes each required node selector term
also asks for a node not labelled nvidia.com/gpu.deploy.dra-driver=false (the GPU
operator's way to keep an operand off a node: the node is the device plugin's alone). */}}
{{- define "gpu-dra-driver.affinity" -}}
{{- $affinity := deepCopy (.Values.kubeletPlugin.affinity | default dict) }}
{{- if .Values.kubeletPlugin.skipDevicePluginNodes }}
{{- $node := $affinity.nodeAffinity | default dict }}
{{- $required := $node.requiredDuringSchedulingIgnoredDuringExecution | default dict }}
{{- $given := $required.nodeSelectorTerms | default (list dict) }}
{{- $terms := list }}
{{- range $given }}
{{- $expressions := .matchExpressions | default list }}
{{- $terms = append $terms (set (deepCopy .) "matchExpressions" (append $expressions (dict "key" "nvidia.com/gpu.deploy.dra-driver" "operator" "NotIn" "values" (list "false")))) }}
{{- end }}
{{- $_ := set $required "nodeSelectorTerms" $terms }}
{{- $_ = set $node "requiredDuringSchedulingIgnoredDuringExecution" $required }}
{{- $_ = set $affinity "nodeAffinity" $node }}
{{- end }}
{{- toYaml $affinity }}
{{- end }}
