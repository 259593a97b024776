{{/* Object names start with this: fullnameOverride, else the release name when it contains "spotd", else
<release>-spotd. */}}
{{- define "spotd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of a component: (dict "component" "agent"). The same as deploy/'s. */}}
{{- define "spotd.selectorLabels" -}}
app.kubernetes.io/name: spotd
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Metadata labels: (dict "root" $ "component" "agent"). deploy/kustomization.yaml adds part-of to every
object's metadata, not to selectors or pod templates; commonLabels likewise. */}}
{{- define "spotd.labels" -}}
{{ include "spotd.selectorLabels" . }}
app.kubernetes.io/part-of: spotd
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The image of a component: (dict "root" $ "image" .Values.agent.image). A digest wins over a tag; the tag
is the component's, else image.tag, else the chart's appVersion. A digest is never shared: the two
components are two images. */}}
{{- define "spotd.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (toString (.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion)) -}}
{{- end -}}
{{- end -}}

{{/* A component's ServiceAccount name: (dict "root" $ "component" "agent" "serviceAccount" ...). Fails closed
when the chart does not create it and no name is given: binding spotd's RBAC to "default" would hand it to
every pod of the namespace. */}}
{{- define "spotd.serviceAccountName" -}}
{{- if .serviceAccount.create -}}
{{- .serviceAccount.name | default (printf "%s-%s" (include "spotd.fullname" .root) .component) -}}
{{- else -}}
{{- required (printf "%s.serviceAccount.name is required when %s.serviceAccount.create is false" .component .component) .serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "spotd.agentServiceAccountName" -}}
{{- include "spotd.serviceAccountName" (dict "root" . "component" "agent" "serviceAccount" .Values.agent.serviceAccount) -}}
{{- end -}}

{{- define "spotd.controllerServiceAccountName" -}}
{{- include "spotd.serviceAccountName" (dict "root" . "component" "controller" "serviceAccount" .Values.controller.serviceAccount) -}}
{{- end -}}

{{/* The username the API server gives the agent's token: what the admission policies match. */}}
{{- define "spotd.agentUsername" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "spotd.agentServiceAccountName" .) -}}
{{- end -}}

{{/* The admission policies' matchCondition for the agent (CEL; names and namespaces are DNS labels, no quotes
to escape). */}}
{{- define "spotd.agentMatchCondition" -}}
- name: spotd-agent
  expression: >-
    has(request.userInfo.username) &&
    request.userInfo.username == '{{ include "spotd.agentUsername" . }}'
{{- end -}}

{{- define "spotd.leaseName" -}}
{{- .Values.controller.leaseName | default (printf "%s-controller" (include "spotd.fullname" .)) -}}
{{- end -}}

{{- define "spotd.placeholderPriorityClassName" -}}
{{- .Values.placeholderPriorityClass.name | default (printf "%s-placeholder" (include "spotd.fullname" .)) -}}
{{- end -}}

{{/* topologySpreadConstraints with the component's selector labels where a constraint has none:
(dict "constraints" ... "component" "agent"). */}}
{{- define "spotd.topologySpreadConstraints" -}}
{{- $component := .component -}}
{{- range .constraints }}
{{- $constraint := deepCopy . }}
{{- if not $constraint.labelSelector }}
{{- $_ := set $constraint "labelSelector" (dict "matchLabels" (include "spotd.selectorLabels" (dict "component" $component) | fromYaml)) }}
{{- end }}
- {{ toYaml $constraint | nindent 2 | trim }}
{{- end }}
{{- end -}}

{{/* The Alertmanager flags both programs take (spotd/alerts/flags.py). */}}
{{- define "spotd.alertArgs" -}}
{{- with .Values.alertmanager }}
{{- range .urls }}
- --alertmanager-url={{ . }}
{{- end }}
{{- if .clusterName }}
- --cluster-name={{ .clusterName }}
{{- end }}
{{- range $key, $value := .labels }}
- --alert-label={{ $key }}={{ $value }}
{{- end }}
{{- if .resendInterval }}
- --alert-resend-interval={{ .resendInterval }}
{{- end }}
{{- if .bearerTokenSecret.name }}
- --alertmanager-bearer-token-file=/etc/spotd/alertmanager-token/{{ .bearerTokenSecret.key }}
{{- end }}
{{- if .caConfigMap.name }}
- --alertmanager-ca-file=/etc/spotd/alertmanager-ca/{{ .caConfigMap.key }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "spotd.alertVolumeMounts" -}}
{{- if .Values.alertmanager.bearerTokenSecret.name }}
- name: alertmanager-token
  mountPath: /etc/spotd/alertmanager-token
  readOnly: true
{{- end }}
{{- if .Values.alertmanager.caConfigMap.name }}
- name: alertmanager-ca
  mountPath: /etc/spotd/alertmanager-ca
  readOnly: true
{{- end }}
{{- end -}}

{{- define "spotd.alertVolumes" -}}
{{- with .Values.alertmanager.bearerTokenSecret }}
{{- if .name }}
- name: alertmanager-token
  secret:
    secretName: {{ .name }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- with .Values.alertmanager.caConfigMap }}
{{- if .name }}
- name: alertmanager-ca
  configMap:
    name: {{ .name }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- end -}}
