{{/* Names, labels and the few values several templates derive. */}}

{{- define "lrsa-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lrsa-serve.fullname" -}}
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

{{- define "lrsa-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lrsa-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lrsa-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lrsa-serve.labels" -}}
helm.sh/chart: {{ include "lrsa-serve.chart" . }}
{{ include "lrsa-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lrsa-serve
{{- end }}

{{- define "lrsa-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lrsa-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image: an explicit tag, else appVersion (+ "-cpu" for the CPU image). */}}
{{- define "lrsa-serve.image" -}}
{{- $tag := .Values.image.tag }}
{{- if not $tag }}
{{- $tag = ternary .Chart.AppVersion (printf "%s-cpu" .Chart.AppVersion) .Values.gpu.enabled }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "lrsa-serve.claimName" -}}
{{- default (printf "%s-models" (include "lrsa-serve.fullname" .)) .Values.modelVolume.existingClaim }}
{{- end }}

{{/* Training identity: a hash of everything that changes the trained weights. A new hash means a
new Job (Job specs are immutable), a new output folder and a new completion marker. */}}
{{- define "lrsa-serve.trainingHash" -}}
{{- $t := .Values.training }}
{{- $in := dict "base" $t.baseModel "data" $t.data "steps" $t.steps "maxLen" $t.maxLen "lr" $t.lr "batch" $t.batchSize "accum" $t.gradAccum "nproc" $t.nprocPerNode "extra" $t.extraArgs "lagkv" .Values.lagkv "image" (include "lrsa-serve.image" .) }}
{{- toJson $in | sha256sum | trunc 8 }}
{{- end }}

{{- define "lrsa-serve.trainingEnabled" -}}
{{- if or .Values.training.enabled .Values.pipeline.enabled }}true{{ end }}
{{- end }}

{{/* Training output, inside the container. */}}
{{- define "lrsa-serve.trainingOutput" -}}
{{- $dir := .Values.training.outputDir }}
{{- if not $dir }}
{{- $dir = printf "checkpoints/%s-%s" (include "lrsa-serve.fullname" .) (include "lrsa-serve.trainingHash" .) }}
{{- end }}
{{- printf "%s/%s" (trimSuffix "/" .Values.modelVolume.mountPath) (trimPrefix "/" $dir) }}
{{- end }}

{{/* Written by the Job after `lrsa train` exits 0; the server's init container waits for it. */}}
{{- define "lrsa-serve.trainingMarker" -}}
{{- printf "%s/.lrsa-train-complete" (include "lrsa-serve.trainingOutput" .) }}
{{- end }}

{{/* The folder the server serves. */}}
{{- define "lrsa-serve.servedPath" -}}
{{- if .Values.pipeline.enabled }}
{{- include "lrsa-serve.trainingOutput" . }}
{{- else }}
{{- .Values.model.path }}
{{- end }}
{{- end }}

{{/* Cross-field rules the schema cannot express; a violation fails the render. */}}
{{- define "lrsa-serve.validate" -}}
{{- if and .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- fail "autoscaling: enable either hpa or keda, not both (KEDA manages its own HPA)" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both" }}
{{- end }}
{{- if and (include "lrsa-serve.trainingEnabled" .) (not .Values.modelVolume.enabled) }}
{{- fail "training/pipeline: the checkpoint is written to the model volume; set modelVolume.enabled" }}
{{- end }}
{{- if .Values.lagkv.enabled }}
{{- $block := int (.Values.server.blockSize | default (ternary 16 32 .Values.gpu.enabled)) }}
{{- $keep := int (mulf .Values.lagkv.ratio .Values.lagkv.lag) }}
{{- if or (mod (int .Values.lagkv.sink) $block) (mod (int .Values.lagkv.lag) $block) (mod $keep $block) (not $keep) }}
{{- fail (printf "lagkv: sink (%d), lag (%d) and keep = int(ratio*lag) (%d) must be positive multiples of the KV block size %d (%s)" (int .Values.lagkv.sink) (int .Values.lagkv.lag) $keep $block (ternary "GPU default" "CPU default" .Values.gpu.enabled)) }}
{{- end }}
{{- end }}
{{- if and .Values.pipeline.enabled .Values.lagkv.fromCheckpoint (not .Values.lagkv.enabled) }}
{{- fail "lagkv: fromCheckpoint needs lagkv.enabled" }}
{{- end }}
{{- if and .Values.modelVolume.enabled (not .Values.pipeline.enabled) (not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.modelVolume.mountPath)) .Values.model.path)) (not (hasPrefix "/opt/lrsa/" .Values.model.path)) }}
{{- fail (printf "model.path %s is neither under modelVolume.mountPath %s nor baked into the image (/opt/lrsa/...)" .Values.model.path .Values.modelVolume.mountPath) }}
{{- end }}
{{- if and (not .Values.modelVolume.enabled) (not .Values.pipeline.enabled) (not (hasPrefix "/opt/lrsa/" .Values.model.path)) }}
{{- fail (printf "model.path %s: without modelVolume only a model baked into the image (/opt/lrsa/models/...) can be served" .Values.model.path) }}
{{- end }}
{{- end }}

{{/* Environment shared by the server, the training Job and helm-test pods. */}}
{{- define "lrsa-serve.commonEnv" -}}
- name: HOME
  value: /home/lrsa
- name: XDG_CACHE_HOME
  value: /home/lrsa/.cache
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
- name: VLLM_NO_USAGE_STATS
  value: "1"
- name: DO_NOT_TRACK
  value: "1"
{{- end }}

{{/* Writable mounts for a read-only root filesystem. */}}
{{- define "lrsa-serve.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/lrsa
- name: shm
  mountPath: /dev/shm
{{- end }}

{{- define "lrsa-serve.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
- name: home
  emptyDir:
    sizeLimit: {{ .Values.scratch.cacheSizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.scratch.shmSizeLimit }}
{{- end }}

{{/* Tolerations: the user's plus, when GPUs are requested, the GPU taint's. */}}
{{- define "lrsa-serve.tolerations" -}}
{{- $tol := concat (.tolerations | default list) (ternary .root.Values.gpu.tolerations list .root.Values.gpu.enabled) }}
{{- if $tol -}}
tolerations:
  {{- toYaml $tol | nindent 2 }}
{{- end }}
{{- end }}

{{/* Job names are at most 63 characters: 48 + "-train-" + 8. */}}
{{- define "lrsa-serve.trainingJobName" -}}
{{- printf "%s-train-%s" (include "lrsa-serve.fullname" . | trunc 48 | trimSuffix "-") (include "lrsa-serve.trainingHash" .) }}
{{- end }}
