{{/* Names and labels. */}}
{{- define "ot.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "ot.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector of one component (web, worker, beat, migrate, postgresql, ...): pass (list $ "web"). */}}
{{- define "ot.selector" -}}
app.kubernetes.io/name: {{ (index . 0).Chart.Name }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "ot.image" -}}
{{- if .digest -}}{{ .repository }}@{{ .digest }}{{- else -}}{{ .repository }}:{{ .tag }}{{- end -}}
{{- end -}}

{{/* The command of a platform role: deploy/processes.py's, which tests/deploy/test_helm.py holds these to. */}}
{{- define "ot.command" -}}
{{- if eq . "migrate" -}}["python", "manage.py", "migrate", "--noinput"]
{{- else if eq . "web" -}}["python", "deploy/web.py"]
{{- else if eq . "worker" -}}["python", "-m", "celery", "-A", "portal", "worker", "--loglevel=INFO", "--without-gossip", "--without-mingle"]
{{- else if eq . "beat" -}}["python", "-m", "celery", "-A", "portal", "beat", "--loglevel=INFO", "--schedule=/tmp/celerybeat-schedule"]
{{- else -}}{{ fail (printf "no command for role %s" .) }}
{{- end -}}
{{- end -}}

{{/* Every platform container's environment: settings from the ConfigMap, secrets from the Secret; with the
     bundled services their URLs are made here from the Secret's passwords ($(VAR) expands earlier entries). */}}
{{- define "ot.env" -}}
envFrom:
  - configMapRef: {name: {{ include "ot.fullname" . }}-config}
  - secretRef: {name: {{ .Values.existingSecret }}}
env:
  - {name: PYTHONUNBUFFERED, value: "1"}
{{- if .Values.postgresql.enabled }}
  - name: POSTGRES_PASSWORD
    valueFrom: {secretKeyRef: {name: {{ .Values.existingSecret }}, key: POSTGRES_PASSWORD}}
  - name: DATABASE_URL
    value: postgres://opentinker:$(POSTGRES_PASSWORD)@{{ include "ot.fullname" . }}-postgresql:5432/opentinker
{{- end }}
{{- if .Values.minio.enabled }}
  - name: AWS_ACCESS_KEY_ID
    valueFrom: {secretKeyRef: {name: {{ .Values.existingSecret }}, key: MINIO_ROOT_USER}}
  - name: AWS_SECRET_ACCESS_KEY
    valueFrom: {secretKeyRef: {name: {{ .Values.existingSecret }}, key: MINIO_ROOT_PASSWORD}}
{{- end }}
{{- end -}}

{{- define "ot.podSpecCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{ toYaml . | nindent 2 }}
{{- end }}
securityContext: {{ toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{/* Volumes of a platform pod: /tmp (the root file system is read-only) and the var directory. */}}
{{- define "ot.volumes" -}}
volumes:
  - name: tmp
    emptyDir: {}
  - name: var
    emptyDir: {}
{{- end -}}

{{- define "ot.volumeMounts" -}}
volumeMounts:
  - {name: tmp, mountPath: /tmp}
  - {name: var, mountPath: /var/lib/opentinker}
{{- end -}}

{{/* Waits until the database has every migration of this image (the migrations Job applies them). */}}
{{- define "ot.waitForMigrations" -}}
initContainers:
  - name: wait-for-migrations
    image: {{ include "ot.image" .Values.image.platform }}
    imagePullPolicy: {{ .Values.image.platform.pullPolicy }}
    command: ["sh", "-c", "until python manage.py migrate --check >/dev/null; do echo waiting for migrations; sleep 5; done"]
    {{- include "ot.env" . | nindent 4 }}
    securityContext: {{ toYaml .Values.securityContext | nindent 6 }}
    {{- include "ot.volumeMounts" . | nindent 4 }}
{{- end -}}

{{/* A Ray pod's environment (every Ray job inherits it): the object store's credentials from the pool's own
     Secret (secrets do not cross namespaces) and its endpoint. Pass (list $ pool). */}}
{{- define "ot.rayEnv" -}}
{{- $ := index . 0 -}}{{- $pool := index . 1 -}}
envFrom:
  - secretRef: {name: {{ $pool.s3Secret }}, optional: true}
env:
  - {name: AWS_DEFAULT_REGION, value: us-east-1}
{{- if $.Values.minio.enabled }}
  - {name: AWS_ENDPOINT_URL, value: {{ printf "http://%s-minio.%s.svc:9000" (include "ot.fullname" $) $.Release.Namespace | quote }}}
{{- else if $.Values.objectStore.endpoint }}
  - {name: AWS_ENDPOINT_URL, value: {{ $.Values.objectStore.endpoint | quote }}}
{{- end }}
{{- end -}}

{{/* uvicorn processes per web pod: web.workers, else one per requested CPU, rounded up (deploy/web.py's rule
of one per core; in a container os.cpu_count() counts the node's cores, not the pod's share). */}}
{{- define "ot.webWorkers" -}}
{{- if .Values.web.workers -}}
{{- .Values.web.workers -}}
{{- else -}}
{{- $cpu := toString .Values.web.resources.requests.cpu -}}
{{- if hasSuffix "m" $cpu -}}
{{- max 1 (div (add (trimSuffix "m" $cpu | atoi) 999) 1000) -}}
{{- else -}}
{{- max 1 (ceil (float64 $cpu) | int) -}}
{{- end -}}
{{- end -}}
{{- end -}}
