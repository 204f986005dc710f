{{/*
Names. The full name is kept short: KubeRay appends "-<5 chars>" for the RayCluster of each
RayJob and "-head-"/"-<group>-worker-" for pods, and label values stop at 63 characters.
*/}}
{{- define "ray-inspect.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 30 | trimSuffix "-" }}
{{- end }}

{{- define "ray-inspect.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 30 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ray-inspect.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "ray-inspect.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels of the Ray pods. app.kubernetes.io/name is left to KubeRay ("kuberay"); the PodMonitor
selects part-of + instance.
*/}}
{{- define "ray-inspect.podSelectorLabels" -}}
app.kubernetes.io/part-of: ray-inspect
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The image of a pod; args: root, gpu (bool). GPU workers get the CUDA build, every other pod
(head, CPU workers, submitters) the smaller CPU one, unless image.tag fixes one tag for all. */}}
{{- define "ray-inspect.image" -}}
{{- $v := .root.Values }}
{{- $flavor := ternary $v.image.cudaFlavor "cpu" (.gpu | default false) }}
{{- $tag := $v.image.tag | default (printf "%s-%s" .root.Chart.AppVersion $flavor) }}
{{- printf "%s:%s" $v.image.repository $tag }}
{{- end }}

{{/* Labels and annotations of a Ray pod or submitter; args: root, component, group (its values).
pods.* first, the group's own over them; the chart's selector labels cannot be overridden. */}}
{{- define "ray-inspect.podMetadata" -}}
{{- $p := .root.Values.pods }}
{{- $labels := merge (deepCopy (.group.labels | default dict)) (deepCopy ($p.labels | default dict)) }}
{{- $labels = omit $labels "app.kubernetes.io/part-of" "app.kubernetes.io/instance" "app.kubernetes.io/component" }}
{{- $annotations := merge (deepCopy (.group.annotations | default dict)) (deepCopy ($p.annotations | default dict)) -}}
labels:
  {{- include "ray-inspect.podSelectorLabels" .root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with $labels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod-level settings a site adds (service account, runtime and priority class, volumes); args:
root, group. */}}
{{- define "ray-inspect.podExtras" -}}
{{- $p := .root.Values.pods }}
{{- with $p.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with (.group.runtimeClassName | default $p.runtimeClassName) }}
runtimeClassName: {{ . }}
{{- end }}
{{- with (.group.priorityClassName | default $p.priorityClassName) }}
priorityClassName: {{ . }}
{{- end }}
{{- with concat ($p.volumes | default list) (.group.volumes | default list) }}
volumes:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Extra environment entries of a container (pods.extraEnv, then the group's); args: root, group. */}}
{{- define "ray-inspect.extraEnv" -}}
{{- with concat (.root.Values.pods.extraEnv | default list) (.group.extraEnv | default list) }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* envFrom and volumeMounts of a container; args: root, group. */}}
{{- define "ray-inspect.containerExtras" -}}
{{- $p := .root.Values.pods }}
{{- with concat ($p.envFrom | default list) (.group.envFrom | default list) }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with concat ($p.volumeMounts | default list) (.group.volumeMounts | default list) }}
volumeMounts:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* S3 environment: endpoint as a value or from the Secret; credentials only by secretKeyRef. */}}
{{- define "ray-inspect.s3Env" -}}
{{- $sec := .Values.s3.credentialsSecret -}}
{{- if .Values.s3.endpoint }}
- name: RAY_INSPECT_S3_ENDPOINT
  value: {{ .Values.s3.endpoint | quote }}
{{- else if and $sec.name $sec.endpointKey }}
- name: RAY_INSPECT_S3_ENDPOINT
  valueFrom:
    secretKeyRef:
      name: {{ $sec.name }}
      key: {{ $sec.endpointKey }}
      optional: true
{{- end }}
{{- if .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- end }}
{{- if $sec.name }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $sec.name }}
      key: {{ $sec.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $sec.name }}
      key: {{ $sec.secretAccessKeyKey }}
{{- end }}
{{- end }}

{{/* Options before the subcommand: the driver's metrics endpoint and log format. */}}
{{- define "ray-inspect.globalArgs" -}}
{{- $t := .Values.telemetry -}}
ray-inspect --metrics-port {{ $t.metricsPort | int }} --metrics-bind 0.0.0.0 --log-format {{ $t.logFormat }}
{{- with $t.pushgateway }} --pushgateway {{ . }}{{ end }}
{{- end }}

{{- define "ray-inspect.useGpu" -}}
{{- if eq (toString .Values.training.useGpu) "auto" }}{{ .Values.workers.gpu.enabled }}{{ else }}{{ .Values.training.useGpu }}{{ end }}
{{- end }}

{{/* The training entrypoint (run by the RayJob on the head pod; RAY_ADDRESS is set there). */}}
{{- define "ray-inspect.trainEntrypoint" -}}
{{- $t := .Values.training -}}
{{ include "ray-inspect.globalArgs" . }} train {{ $t.patches }} {{ $t.model }} --loss {{ $t.loss }} --epochs {{ $t.epochs | int }} --batch-size {{ $t.batchSize | int }} --workers {{ $t.workers | int }} {{ ternary "--use-gpu" "--no-gpu" (eq (include "ray-inspect.useGpu" .) "true") }} --storage {{ $t.storage }} --checkpoint-every {{ $t.checkpointEvery | int }} --max-failures {{ $t.maxFailures | int }} --address auto
{{- with $t.runName }} --run-name {{ . }}{{ end }}
{{- range $t.extraArgs }} {{ . }}{{ end }}
{{- end }}

{{- define "ray-inspect.scanGpus" -}}
{{- if kindIs "invalid" .Values.scan.gpusPerWorker }}{{ ternary 1 0 .Values.workers.gpu.enabled }}{{ else }}{{ .Values.scan.gpusPerWorker }}{{ end }}
{{- end }}

{{/* The scan entrypoint: one command, no shell syntax (KubeRay joins it into the submitter's own
command line); with allowBadInputs, a night whose only failures are bad inputs exits 0. A {date} in
source or out is the night before the run in the schedule's time zone. */}}
{{- define "ray-inspect.scanEntrypoint" -}}
{{- $s := .Values.scan -}}
{{ include "ray-inspect.globalArgs" . }} scan {{ $s.model | default .Values.training.model }} {{ $s.source }} {{ $s.out }} --workers {{ $s.workers | int }} --gpus-per-worker {{ include "ray-inspect.scanGpus" . }} --address auto
{{- if $s.force }} --force{{ end }}
{{- if or (contains "{date" $s.source) (contains "{date" $s.out) }} --timezone {{ $s.timeZone }}{{ end }}
{{- if $s.allowBadInputs }} --allow-bad-inputs{{ end }}
{{- range $s.extraArgs }} {{ . }}{{ end }}
{{- end }}

{{/* Resources of a worker group, with the GPUs added to requests and limits. */}}
{{- define "ray-inspect.workerResources" -}}
{{- $g := .group -}}
{{- $res := deepCopy ($g.resources | default dict) }}
{{- if .gpus }}
{{- $limits := $res.limits | default dict }}
{{- $requests := $res.requests | default dict }}
{{- $_ := set $limits $g.gpuResourceName (int $g.gpusPerPod) }}
{{- $_ := set $requests $g.gpuResourceName (int $g.gpusPerPod) }}
{{- $_ := set $res "limits" $limits }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Pod spec settings shared by head, workers and submitter. */}}
{{- define "ray-inspect.podCommon" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{ end -}}
securityContext:
  {{- toYaml .Values.cluster.podSecurityContext | nindent 2 }}
{{- end }}

{{/* One worker group; args: root, group (values), gpus (bool). */}}
{{- define "ray-inspect.workerGroup" -}}
{{- $root := .root }}
{{- $g := .group }}
{{- if or (gt (int $g.minReplicas) (int $g.replicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "workers.%s: need minReplicas <= replicas <= maxReplicas" $g.groupName) }}
{{- end }}
- groupName: {{ $g.groupName }}
  replicas: {{ $g.replicas | int }}
  minReplicas: {{ $g.minReplicas | int }}
  maxReplicas: {{ $g.maxReplicas | int }}
  rayStartParams:
    {{- toYaml ($g.rayStartParams | default dict) | nindent 4 }}
  template:
    metadata:
      {{- include "ray-inspect.podMetadata" (dict "root" $root "component" .component "group" $g) | nindent 6 }}
    spec:
      {{- include "ray-inspect.podCommon" $root | nindent 6 }}
      {{- include "ray-inspect.podExtras" (dict "root" $root "group" $g) | nindent 6 }}
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "ray-inspect.image" (dict "root" $root "gpu" .gpus) }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          ports:
            - name: metrics
              containerPort: 8080
          {{- $env := printf "%s\n%s" (include "ray-inspect.s3Env" $root) (include "ray-inspect.extraEnv" (dict "root" $root "group" $g)) | trim }}
          {{- with $env }}
          env:
            {{- . | nindent 12 }}
          {{- end }}
          {{- include "ray-inspect.containerExtras" (dict "root" $root "group" $g) | nindent 10 }}
          resources:
            {{- include "ray-inspect.workerResources" . | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.cluster.containerSecurityContext | nindent 12 }}
{{- end }}

{{/*
The RayCluster spec of a RayJob; args: root, component ("train" or "scan").
The head exposes Ray's metrics (8080, named "metrics" as KubeRay expects) and the driver's own
metrics (telemetry.metricsPort, named "inspect-metrics"): the entrypoint runs on the head.
*/}}
{{- define "ray-inspect.rayClusterSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $head := $v.cluster.head }}
{{- if not (or $v.workers.gpu.enabled $v.workers.cpu.enabled) }}
{{- fail "enable at least one worker group: workers.gpu.enabled or workers.cpu.enabled" }}
{{- end -}}
rayVersion: {{ $v.rayVersion | quote }}
authOptions:
  mode: {{ $v.cluster.auth.mode }}
  {{- with $v.cluster.auth.secretName }}
  secretName: {{ . }}
  {{- end }}
enableInTreeAutoscaling: {{ $v.cluster.autoscaling.enabled }}
{{- if $v.cluster.autoscaling.enabled }}
autoscalerOptions:
  upscalingMode: {{ $v.cluster.autoscaling.upscalingMode }}
  idleTimeoutSeconds: {{ $v.cluster.autoscaling.idleTimeoutSeconds | int }}
  securityContext:
    {{- toYaml $v.cluster.containerSecurityContext | nindent 4 }}
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- toYaml $head.rayStartParams | nindent 4 }}
  template:
    metadata:
      {{- include "ray-inspect.podMetadata" (dict "root" $root "component" .component "group" $head) | nindent 6 }}
    spec:
      {{- include "ray-inspect.podCommon" $root | nindent 6 }}
      {{- include "ray-inspect.podExtras" (dict "root" $root "group" $head) | nindent 6 }}
      {{- with $head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $head.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ include "ray-inspect.image" (dict "root" $root "gpu" false) }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          ports:
            - name: gcs-server
              containerPort: 6379
            - name: dashboard
              containerPort: 8265
            - name: client
              containerPort: 10001
            - name: metrics
              containerPort: 8080
            - name: inspect-metrics
              containerPort: {{ $v.telemetry.metricsPort | int }}
          env:
            - name: RAY_INSPECT_PIPELINE
              value: {{ $v.telemetry.pipeline | default $root.Release.Name | quote }}
            {{- with include "ray-inspect.s3Env" $root | trim }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with include "ray-inspect.extraEnv" (dict "root" $root "group" $head) | trim }}
            {{- . | nindent 12 }}
            {{- end }}
          {{- include "ray-inspect.containerExtras" (dict "root" $root "group" $head) | nindent 10 }}
          resources:
            {{- toYaml $head.resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.cluster.containerSecurityContext | nindent 12 }}
workerGroupSpecs:
{{- if $v.workers.gpu.enabled }}
{{- include "ray-inspect.workerGroup" (dict "root" $root "group" $v.workers.gpu "gpus" true "component" .component) }}
{{- end }}
{{- if $v.workers.cpu.enabled }}
{{- include "ray-inspect.workerGroup" (dict "root" $root "group" $v.workers.cpu "gpus" false "component" .component) }}
{{- end }}
{{- end }}

{{/* The submitter pod: image pull secrets and a small footprint; KubeRay fills in the command. */}}
{{- define "ray-inspect.submitterPodTemplate" -}}
{{- $root := .root -}}
{{- $sub := $root.Values.submitter -}}
metadata:
  {{- include "ray-inspect.podMetadata" (dict "root" $root "component" (printf "%s-submitter" .component) "group" $sub) | nindent 2 }}
spec:
  restartPolicy: Never
  {{- include "ray-inspect.podCommon" $root | nindent 2 }}
  {{- include "ray-inspect.podExtras" (dict "root" $root "group" $sub) | nindent 2 }}
  containers:
    - name: ray-job-submitter
      image: {{ include "ray-inspect.image" (dict "root" $root "gpu" false) }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- with include "ray-inspect.extraEnv" (dict "root" $root "group" $sub) | trim }}
      env:
        {{- . | nindent 8 }}
      {{- end }}
      {{- include "ray-inspect.containerExtras" (dict "root" $root "group" $sub) | nindent 6 }}
      resources:
        {{- toYaml $root.Values.submitter.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.cluster.containerSecurityContext | nindent 8 }}
{{- end }}

{{/* Spec of the nightly scan RayJob, shared by the RayCronJob and the CronJob's RayJob. */}}
{{- define "ray-inspect.scanRayJobSpec" -}}
{{- $s := .Values.scan -}}
entrypoint: {{ include "ray-inspect.scanEntrypoint" . | quote }}
submissionMode: K8sJobMode
shutdownAfterJobFinishes: {{ $s.shutdownAfterJobFinishes }}
ttlSecondsAfterFinished: {{ $s.ttlSecondsAfterFinished | int }}
activeDeadlineSeconds: {{ $s.activeDeadlineSeconds | int }}
backoffLimit: {{ $s.backoffLimit | int }}
submitterPodTemplate:
  {{- include "ray-inspect.submitterPodTemplate" (dict "root" . "component" "scan") | nindent 2 }}
rayClusterSpec:
  {{- include "ray-inspect.rayClusterSpec" (dict "root" . "component" "scan") | nindent 2 }}
{{- end }}
