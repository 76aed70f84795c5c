{{- define "vlm.name" -}}{{ .Release.Name }}-vlm{{- end -}}

{{- define "vlm.labels" -}}
app.kubernetes.io/name: vlm-serve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "vlm.selector" -}}
app.kubernetes.io/name: vlm-serve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}
