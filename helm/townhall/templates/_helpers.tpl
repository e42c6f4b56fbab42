{{/*
The chart name, or nameOverride; used in the app.kubernetes.io/name label.
*/}}
{{- define "townhall.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The resource name prefix: fullnameOverride, else the release name (plus the chart name unless the release
name already contains it). Kept to 40 characters so "<fullname>-admission-headless" fits in 63.
*/}}
{{- define "townhall.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "townhall.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource. Call with (dict "ctx" $ "component" "admission"); component may be empty.
*/}}
{{- define "townhall.labels" -}}
helm.sh/chart: {{ include "townhall.chart" .ctx }}
{{ include "townhall.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: townhall
{{- end }}

{{/*
Selector labels: name, instance and (when given) component. Call with (dict "ctx" $ "component" "relay").
*/}}
{{- define "townhall.selectorLabels" -}}
app.kubernetes.io/name: {{ include "townhall.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/*
The name of a component's resources: <fullname>-<component>. Call with (dict "ctx" $ "component" "relay").
*/}}
{{- define "townhall.componentName" -}}
{{- printf "%s-%s" (include "townhall.fullname" .ctx) .component }}
{{- end }}

{{/*
The Townhall image reference; the tag defaults to the chart's appVersion.
*/}}
{{- define "townhall.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The ServiceAccount of admission and relay pods.
*/}}
{{- define "townhall.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "townhall.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret holding the keys (auth-keys, service-keys, tickets-private-key, tickets-public-keys).
*/}}
{{- define "townhall.secretName" -}}
{{- default (include "townhall.fullname" .) .Values.keys.existingSecret }}
{{- end }}

{{/*
Stops the render when a key is missing: no key is generated or defaulted (see keys in values.yaml).
*/}}
{{- define "townhall.checkKeys" -}}
{{- if not .Values.keys.existingSecret }}
{{- $missing := list }}
{{- if not .Values.keys.service }}{{ $missing = append $missing "keys.service" }}{{ end }}
{{- if not .Values.keys.tickets.privateKey }}{{ $missing = append $missing "keys.tickets.privateKey" }}{{ end }}
{{- if not .Values.keys.tickets.publicKeys }}{{ $missing = append $missing "keys.tickets.publicKeys" }}{{ end }}
{{- if not (or .Values.keys.auth .Values.keys.jwksSecret) }}{{ $missing = append $missing "keys.auth (or keys.jwksSecret)" }}{{ end }}
{{- if $missing }}
{{- fail (printf "keys are required and never generated: set %s (`townhall keys --helm` prints a fresh set), or keys.existingSecret" (join ", " $missing)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The keys each component's container gets, as (environment variable, Secret key): admission signs tickets
and checks users; relays verify tickets with the public keys only; the notifier checks users.
*/}}
{{- define "townhall.componentKeys" -}}
{{- $auth := dict "TOWNHALL_AUTH_KEYS" "auth-keys" }}
{{- $service := dict "TOWNHALL_AUTH_SERVICE_KEYS" "service-keys" }}
{{- $public := dict "TOWNHALL_TICKETS_PUBLIC_KEYS" "tickets-public-keys" }}
{{- $private := dict "TOWNHALL_TICKETS_PRIVATE_KEY" "tickets-private-key" }}
{{- if eq . "relay" }}
{{- toJson (merge $service $public) }}
{{- else if eq . "notifier" }}
{{- toJson (merge $auth $service) }}
{{- else }}
{{- toJson (merge $auth $service $public $private) }}
{{- end }}
{{- end }}

{{/*
An address of each relay's internal port, the relays' pull source: $(POD_NAME) under the relay headless
Service. Each relay reports it with its load; admission names it in tickets as an edge's pull source.
*/}}
{{- define "townhall.relayInternal" -}}
{{- printf "$(POD_NAME).%s-headless.%s.svc.%s:%d" (include "townhall.componentName" (dict "ctx" . "component" "relay")) .Release.Namespace .Values.clusterDomain (int .Values.relay.internalPort) }}
{{- end }}

{{/*
The name in the pods' TLS certificate that every channel expects: tls.serverName, else <fullname>.<ns>.svc.
*/}}
{{- define "townhall.tlsServerName" -}}
{{- default (printf "%s.%s.svc" (include "townhall.fullname" .) .Release.Namespace) .Values.tls.serverName }}
{{- end }}

{{/*
The gRPC health probe of a Townhall container: its plaintext health-only port, which no Service exposes.
*/}}
{{- define "townhall.probePort" -}}
{{ .ctx.Values.probes.healthPort }}
{{- end }}

{{/*
A Prometheus duration of one unit (values.schema.json: [0-9]+(ms|s|m|h)) in milliseconds, e.g. "15s" -> 15000.
*/}}
{{- define "townhall.durationMs" -}}
{{- $units := dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 }}
{{- mul (regexFind "^[0-9]+" .) (get $units (regexFind "[a-z]+$" .)) }}
{{- end }}

{{/*
Kafka bootstrap servers: the bundled broker's Service, or kafka.external.bootstrap.
*/}}
{{- define "townhall.kafkaBootstrap" -}}
{{- if .Values.kafka.bundled }}
{{- printf "%s.%s.svc.%s:%d" (include "townhall.componentName" (dict "ctx" . "component" "kafka")) .Release.Namespace .Values.clusterDomain (int .Values.kafka.port) }}
{{- else }}
{{- required "kafka.external.bootstrap is required when kafka.bundled is false" .Values.kafka.external.bootstrap }}
{{- end }}
{{- end }}

{{/*
Effective replica count of a sharded service: autoscaling.minReplicas when its HPA is on, else replicas.
Call with the service's values (e.g. .Values.relay).
*/}}
{{- define "townhall.shards" -}}
{{- if .autoscaling.enabled }}{{ int .autoscaling.minReplicas }}{{ else }}{{ int .replicas }}{{ end }}
{{- end }}

{{/*
The relay advertise template: relay.advertise, or the pod's stable name behind the headless Service.
"$(POD_NAME)" in it is expanded by the kubelet from the POD_NAME variable (downward API). An address without
$(POD_NAME) names one relay, so it needs exactly one. With relay.externalAccess it is the host alone, and
each relay adds its own port (relay.advertise_port_base + its ordinal). Admission finds the relays by these
addresses in their load reports (admission/relays.py): the chart lists none, so relays the HPA adds get
listeners too.
*/}}
{{- define "townhall.relayAdvertise" -}}
{{- $external := .Values.relay.externalAccess }}
{{- if $external.enabled }}
{{- if .Values.relay.advertise }}
{{- fail "relay.advertise and relay.externalAccess both say what relays advertise: with externalAccess.enabled leave relay.advertise empty (each relay advertises externalAccess.host:<nodePortBase + its ordinal>)" }}
{{- end }}
{{- required "relay.externalAccess.host is required when relay.externalAccess.enabled: the address clients reach the nodes at (127.0.0.1 on kind)" $external.host }}
{{- else }}
{{- if and .Values.relay.advertise (not (contains "$(POD_NAME)" .Values.relay.advertise)) (or (ne (int .Values.relay.replicas) 1) .Values.relay.autoscaling.enabled) }}
{{- fail "relay.advertise without $(POD_NAME) gives every relay the same address: use relay.replicas=1 without autoscaling, put $(POD_NAME) in it, or use relay.externalAccess (a NodePort per relay)" }}
{{- end }}
{{- if .Values.relay.advertise }}
{{- .Values.relay.advertise }}
{{- else }}
{{- printf "$(POD_NAME).%s-headless.%s.svc.%s:%d" (include "townhall.componentName" (dict "ctx" . "component" "relay")) .Release.Namespace .Values.clusterDomain (int .Values.relay.port) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The most relays that can run at once: autoscaling.maxReplicas with the relay HPA, else relay.replicas.
*/}}
{{- define "townhall.relayMaxReplicas" -}}
{{- if .Values.relay.autoscaling.enabled }}{{ int .Values.relay.autoscaling.maxReplicas }}{{ else }}{{ int .Values.relay.replicas }}{{ end }}
{{- end }}

{{/*
A config key as its environment variable, refusing the millisecond keys that are gone (every duration is in
seconds now, `_s`): the process would refuse the variable at start; the render says so at install.
*/}}
{{- define "townhall.envName" -}}
{{- if hasSuffix "_ms" .key }}
{{- fail (printf "%s.%s is gone: durations are in seconds, set %s.%s_s" .where .key .where (trimSuffix "_ms" .key)) }}
{{- end }}
{{- printf "TOWNHALL_%s_%s" (upper .section) (upper .key) }}
{{- end }}

{{/*
One config value as environment text: lists comma-joined, whole numbers without an exponent (YAML numbers
reach templates as float64, and 1000000 would otherwise print as 1e+06).
*/}}
{{- define "townhall.envValue" -}}
{{- if kindIs "slice" . }}
{{- join "," . }}
{{- else if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: preStop sleep + the drain notice (config.server.drain_notice_s, rounded up)
+ the server's drain (config.server.grace_s) + time to close.
*/}}
{{- define "townhall.terminationGracePeriod" -}}
{{- $notice := ceil (default 0 .Values.config.server.drain_notice_s) | int }}
{{- add (int .Values.termination.preStopSleepSeconds) $notice (ceil .Values.config.server.grace_s | int) (int .Values.termination.closeSeconds) }}
{{- end }}

{{/*
Pod annotations of a Townhall service: config checksum and Prometheus scrape hints.
Call with (dict "ctx" $ "values" .Values.relay).
*/}}
{{- define "townhall.podAnnotations" -}}
checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
{{- /* Keys reach the containers as environment variables, read at start: new keys (or a new
     existingSecret name) roll the pods. */}}
checksum/keys: {{ toJson .ctx.Values.keys | sha256sum }}
{{- if .ctx.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .values.metricsPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Affinity of a Townhall service: its own, else soft anti-affinity spreading its pods over nodes.
Call with (dict "ctx" $ "component" "relay" "values" .Values.relay).
*/}}
{{- define "townhall.affinity" -}}
{{- if .values.affinity }}
{{- toYaml .values.affinity }}
{{- else if eq .ctx.Values.podAntiAffinity "preferred" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "townhall.selectorLabels" . | nindent 12 }}
{{- end }}
{{- end }}

{{/*
The container of a Townhall service: command, ports, config, probes, shutdown, resources, security.
Call with (dict "ctx" $ "component" "relay" "values" .Values.relay); optional "extraEnv" and "extraMounts"
are lists appended to the container's env and volumeMounts, and "module" names the service to run when it
is not the component (the crowd lane runs townhall.admission).
*/}}
{{- define "townhall.container" -}}
{{- $ctx := .ctx -}}
- name: {{ .component }}
  image: {{ include "townhall.image" $ctx }}
  imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
  command: ["python", "-m", "townhall.{{ .module | default .component }}"]
  ports:
    - name: grpc
      containerPort: {{ .values.port }}
      protocol: TCP
    {{- if .values.internalPort }}
    - name: internal
      containerPort: {{ .values.internalPort }}
      protocol: TCP
    {{- end }}
    - name: metrics
      containerPort: {{ .values.metricsPort }}
      protocol: TCP
    - name: health
      containerPort: {{ $ctx.Values.probes.healthPort }}
      protocol: TCP
  envFrom:
    - configMapRef:
        name: {{ include "townhall.fullname" $ctx }}
  env:
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    {{- range $env, $key := include "townhall.componentKeys" (.module | default .component) | fromJson }}
    - name: {{ $env }}
      valueFrom:
        secretKeyRef:
          name: {{ include "townhall.secretName" $ctx }}
          key: {{ $key }}
    {{- end }}
    {{- if hasPrefix "SASL_" (include "townhall.kafkaProtocol" $ctx) }}
    {{- /* This service's own Kafka user: ACLs let it write only its own topics. */}}
    - name: TOWNHALL_KAFKA_USERNAME
      value: {{ index $ctx.Values.kafka.users (.module | default .component) | quote }}
    - name: TOWNHALL_KAFKA_PASSWORD_FILE
      value: /etc/townhall/kafka/password
    {{- end }}
    {{- with .extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  startupProbe:
    grpc:
      port: {{ include "townhall.probePort" . }}
    periodSeconds: {{ $ctx.Values.probes.startup.periodSeconds }}
    failureThreshold: {{ $ctx.Values.probes.startup.failureThreshold }}
  readinessProbe:
    grpc:
      port: {{ include "townhall.probePort" . }}
    periodSeconds: {{ $ctx.Values.probes.readiness.periodSeconds }}
    failureThreshold: {{ $ctx.Values.probes.readiness.failureThreshold }}
  livenessProbe:
    grpc:
      port: {{ include "townhall.probePort" . }}
    periodSeconds: {{ $ctx.Values.probes.liveness.periodSeconds }}
    timeoutSeconds: {{ $ctx.Values.probes.liveness.timeoutSeconds }}
    failureThreshold: {{ $ctx.Values.probes.liveness.failureThreshold }}
  lifecycle:
    preStop:
      sleep:
        seconds: {{ $ctx.Values.termination.preStopSleepSeconds }}
  resources:
    {{- toYaml .values.resources | nindent 4 }}
  securityContext:
    {{- toYaml $ctx.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- if $ctx.Values.tls.enabled }}
    - name: tls
      mountPath: /etc/townhall/tls
      readOnly: true
    {{- end }}
    {{- if $ctx.Values.keys.jwksSecret }}
    - name: jwks
      mountPath: /etc/townhall/jwks
      readOnly: true
    {{- end }}
    {{- if include "townhall.kafkaVolume" (dict "ctx" $ctx "service" "admission") }}
    - name: kafka
      mountPath: /etc/townhall/kafka
      readOnly: true
    {{- end }}
    {{- with .extraMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
The volumes every Townhall pod has: /tmp, and the TLS and JWKS Secrets when configured.
*/}}
{{- define "townhall.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.secretName is required when tls.enabled is true" .Values.tls.secretName }}
{{- end }}
{{- if .Values.keys.jwksSecret }}
- name: jwks
  secret:
    secretName: {{ .Values.keys.jwksSecret }}
    items:
      - key: jwks.json
        path: jwks.json
{{- end }}
{{- end }}

{{/*
The security protocol every Townhall Kafka client uses: SASL_SSL with the bundled broker, else
kafka.external.securityProtocol.
*/}}
{{- define "townhall.kafkaProtocol" -}}
{{- if .Values.kafka.bundled }}SASL_SSL{{ else }}{{ .Values.kafka.external.securityProtocol }}{{ end }}
{{- end }}

{{/*
The SASL mechanism of the Kafka clients: SCRAM-SHA-512 with the bundled broker.
*/}}
{{- define "townhall.kafkaMechanism" -}}
{{- if .Values.kafka.bundled }}SCRAM-SHA-512{{ else }}{{ .Values.kafka.external.saslMechanism }}{{ end }}
{{- end }}

{{/*
The Secret holding the Kafka users' passwords (keys admin, admission, relay, notifier): the given one, or
the chart's, made from kafka.users.passwords.
*/}}
{{- define "townhall.kafkaUsersSecret" -}}
{{- default (include "townhall.componentName" (dict "ctx" . "component" "kafka-users")) .Values.kafka.users.existingSecret }}
{{- end }}

{{/*
The bundled broker's host name, the name its certificate must carry (the bootstrap address's host).
*/}}
{{- define "townhall.kafkaHost" -}}
{{- printf "%s.%s.svc.%s" (include "townhall.componentName" (dict "ctx" . "component" "kafka")) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/*
The bundled broker's certificate Secret (tls.crt, tls.key, ca.crt): kafka.tlsSecret, or the chart's, made
from kafka.tls.
*/}}
{{- define "townhall.kafkaTlsSecret" -}}
{{- default (include "townhall.componentName" (dict "ctx" . "component" "kafka-tls")) .Values.kafka.tlsSecret }}
{{- end }}

{{/*
The Secret whose ca.crt the Kafka clients check the brokers against; empty when there is none.
*/}}
{{- define "townhall.kafkaCaSecret" -}}
{{- if .Values.kafka.bundled }}{{ include "townhall.kafkaTlsSecret" . }}{{ else if has .Values.kafka.external.securityProtocol (list "SSL" "SASL_SSL") }}{{ .Values.kafka.external.caSecret }}{{ end }}
{{- end }}

{{/*
A Kafka client pod's credentials volume: only its own user's password, and the CA. Call with
(dict "ctx" $ "service" "relay"); renders nothing when the connection needs neither.
*/}}
{{- define "townhall.kafkaVolume" -}}
{{- $ctx := .ctx }}
{{- $sasl := hasPrefix "SASL_" (include "townhall.kafkaProtocol" $ctx) }}
{{- $ca := include "townhall.kafkaCaSecret" $ctx }}
{{- if or $sasl $ca }}
- name: kafka
  projected:
    defaultMode: 0440
    sources:
      {{- if $sasl }}
      - secret:
          name: {{ include "townhall.kafkaUsersSecret" $ctx }}
          items:
            - key: {{ .service }}
              path: password
      {{- end }}
      {{- if $ca }}
      - secret:
          name: {{ $ca }}
          items:
            - key: ca.crt
              path: ca.crt
      {{- end }}
{{- end }}
{{- end }}
