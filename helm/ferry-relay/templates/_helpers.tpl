{{/* Names */}}
{{- define "ferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ferry.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ferry.headless" -}}{{ include "ferry.fullname" . }}-headless{{- end -}}
{{- define "ferry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "ferry.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ferry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ferry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: relay
ferry.dev/region: {{ .Values.region.code | quote }}
{{- end -}}

{{- define "ferry.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}
{{- end -}}

{{/* Ports inside the pod (hostNetwork: on the node). */}}
{{- define "ferry.derpPort" -}}
{{- if eq .Values.exposure.mode "hostNetwork" -}}{{ .Values.exposure.hostNetwork.ports.derp }}{{- else -}}{{ .Values.exposure.loadBalancer.containerPorts.derp }}{{- end -}}
{{- end -}}
{{- define "ferry.httpPort" -}}
{{- if eq .Values.exposure.mode "hostNetwork" -}}{{ .Values.exposure.hostNetwork.ports.http }}{{- else -}}{{ .Values.exposure.loadBalancer.containerPorts.http }}{{- end -}}
{{- end -}}

{{/* "true" when the container must run as uid 0 with NET_BIND_SERVICE (hostNetwork, port < 1024). */}}
{{- define "ferry.needsRoot" -}}
{{- if and (eq .Values.exposure.mode "hostNetwork") (or (lt (int .Values.exposure.hostNetwork.ports.derp) 1024) (lt (int .Values.exposure.hostNetwork.ports.http) 1024) (lt (int .Values.stunPort) 1024) (lt (int .Values.metricsPort) 1024)) -}}
true
{{- end -}}
{{- end -}}

{{/* Secret names */}}
{{- define "ferry.tlsSecretName" -}}
{{- if eq .Values.tls.mode "secret" -}}{{ .Values.tls.secret.name }}{{- else -}}{{ include "ferry.fullname" . }}-tls{{- end -}}
{{- end -}}
{{- define "ferry.meshSecretName" -}}
{{- default (printf "%s-mesh" (include "ferry.fullname" .)) .Values.mesh.existingSecret -}}
{{- end -}}
{{- define "ferry.meshSecretKey" -}}
{{- if .Values.mesh.existingSecret -}}{{ .Values.mesh.existingSecretKey }}{{- else -}}mesh.key{{- end -}}
{{- end -}}
{{- define "ferry.serverKeySecretName" -}}
{{- default (printf "%s-server-keys" (include "ferry.fullname" .)) .Values.serverKey.existingSecret -}}
{{- end -}}
{{- define "ferry.allowlistConfigMap" -}}
{{- default (printf "%s-allowlist" (include "ferry.fullname" .)) .Values.admission.allowlist.existingConfigMap -}}
{{- end -}}

{{/* relay.hostname for ordinal $i: $(POD_INDEX) and $(POD_NAME) replaced. Call with (list $ $i). */}}
{{- define "ferry.hostnameFor" -}}
{{- $root := index . 0 -}}{{- $i := index . 1 -}}
{{- $root.Values.relay.hostname | replace "$(POD_INDEX)" (toString $i) | replace "$(POD_NAME)" (printf "%s-%d" (include "ferry.fullname" $root) (int $i)) -}}
{{- end -}}

{{/* Mesh peer discovery actually used: dns | static | none. */}}
{{- define "ferry.meshDiscovery" -}}
{{- $d := .Values.mesh.discovery -}}
{{- if not .Values.mesh.enabled -}}none
{{- else if ne $d "auto" -}}{{ $d }}
{{- else if eq .Values.tls.mode "acme" -}}static
{{- else -}}dns
{{- end -}}
{{- end -}}

{{/* Checks that the schema cannot express. */}}
{{- define "ferry.validate" -}}
{{- $_ := required "relay.hostname is required: the name clients use to reach a relay (with hostNetwork e.g. \"nyc-$(POD_INDEX).derp.example.com\")" .Values.relay.hostname -}}
{{- if and (eq .Values.tls.mode "secret") (not .Values.tls.secret.name) -}}
{{- fail "tls.mode=secret needs tls.secret.name (a kubernetes.io/tls Secret)" -}}
{{- end -}}
{{- if and (eq .Values.tls.mode "acme") (not .Values.persistence.enabled) -}}
{{- fail "tls.mode=acme needs persistence.enabled=true: the ACME account and certificates must survive restarts (CA rate limits)" -}}
{{- end -}}
{{- if and (eq .Values.tls.mode "acme") (eq .Values.exposure.mode "loadBalancer") (gt (int .Values.replicas) 1) -}}
{{- fail "tls.mode=acme with exposure.mode=loadBalancer works only with replicas=1: each relay answers its own HTTP-01 challenge, and the load balancer may send the CA's request to another relay. Use certManager or secret, or hostNetwork with one hostname per relay" -}}
{{- end -}}
{{- if and (eq .Values.tls.mode "acme") (eq .Values.exposure.mode "hostNetwork") (ne (int .Values.exposure.hostNetwork.ports.http) 80) -}}
{{- fail "tls.mode=acme needs the port-80 listener on port 80 (HTTP-01): set exposure.hostNetwork.ports.http=80" -}}
{{- end -}}
{{- if and (eq .Values.tls.mode "acme") (eq .Values.exposure.mode "loadBalancer") (ne (int .Values.exposure.loadBalancer.ports.http) 80) -}}
{{- fail "tls.mode=acme needs the load balancer's HTTP port to be 80 (HTTP-01): set exposure.loadBalancer.ports.http=80" -}}
{{- end -}}
{{- if and (eq .Values.tls.mode "selfSigned") (gt (int .Values.replicas) 1) (eq .Values.exposure.mode "loadBalancer") -}}
{{- fail "tls.mode=selfSigned behind a load balancer works only with replicas=1: each relay makes its own certificate, so clients would meet a different certificate (and CertName pin) on each connection. Use certManager, secret or acme" -}}
{{- end -}}
{{- if and (eq .Values.tls.mode "selfSigned") (gt (int .Values.replicas) 1) .Values.mesh.enabled -}}
{{- fail "tls.mode=selfSigned with several meshed relays: peers cannot verify each other's self-signed certificates. Use certManager, secret or acme (or mesh.enabled=false for independent relays)" -}}
{{- end -}}
{{- if and (eq .Values.serverKey.store "persistentVolume") (not .Values.persistence.enabled) -}}
{{- fail "serverKey.store=persistentVolume needs persistence.enabled=true (or use serverKey.store=secret, or ephemeral for tests)" -}}
{{- end -}}
{{- if and (eq .Values.exposure.mode "hostNetwork") (gt (int .Values.replicas) 1) (not (or (contains "$(POD_INDEX)" .Values.relay.hostname) (contains "$(POD_NAME)" .Values.relay.hostname))) -}}
{{- fail "exposure.mode=hostNetwork with several replicas: each relay is its own DERP node and needs its own name; put $(POD_INDEX) or $(POD_NAME) in relay.hostname" -}}
{{- end -}}
{{- $drain := .Values.relay.limits.shutdownTimeout -}}
{{- $drainSecs := -1 -}}
{{- if regexMatch "^[0-9]+s$" $drain -}}{{- $drainSecs = atoi (trimSuffix "s" $drain) -}}
{{- else if regexMatch "^[0-9]+m$" $drain -}}{{- $drainSecs = mul 60 (atoi (trimSuffix "m" $drain)) -}}
{{- end -}}
{{- if and (ge (int $drainSecs) 0) (lt (int .Values.terminationGracePeriodSeconds) (add $drainSecs 2)) -}}
{{- fail (printf "terminationGracePeriodSeconds=%d is shorter than the drain: the relay needs up to relay.limits.shutdownTimeout (%s) + 1 s to exit after SIGTERM, and Kubernetes kills it at the grace period, losing what is in flight. Set terminationGracePeriodSeconds to at least %d" (int .Values.terminationGracePeriodSeconds) $drain (add $drainSecs 2)) -}}
{{- end -}}
{{- if and (eq (include "ferry.meshDiscovery" .) "static") (eq .Values.exposure.mode "loadBalancer") (gt (int .Values.replicas) 1) (not .Values.mesh.peers) -}}
{{- fail "mesh.discovery=static behind a load balancer: the relays share one name, so list the peers in mesh.peers (or use mesh.discovery=dns)" -}}
{{- end -}}
{{- end -}}

{{/* The ferry-relay TOML config. Keys: relay/ferry-relay.example.toml. */}}
{{- define "ferry.config" -}}
{{- $v := .Values -}}
{{- $hn := eq $v.exposure.mode "hostNetwork" -}}
# Generated by the ferry-relay Helm chart. Per-pod settings come from the environment:
# FERRY_HOSTNAME{{ if eq $v.serverKey.store "secret" }}, FERRY_KEY_FILE{{ end }}{{ if $hn }}, FERRY_METRICS_LISTEN{{ end }}.
listen = {{ printf "0.0.0.0:%s" (include "ferry.derpPort" .) | toJson }}
http_listen = {{ printf "0.0.0.0:%s" (include "ferry.httpPort" .) | toJson }}
metrics_listen = {{ printf "0.0.0.0:%d" (int $v.metricsPort) | toJson }}
key_file = "/var/lib/ferry/relay.key"
log_format = {{ $v.relay.logFormat | toJson }}
log_level = {{ $v.relay.logLevel | toJson }}
{{- with $v.relay.extraConfig }}
{{ . }}
{{- end }}

[tls]
{{- if eq $v.tls.mode "selfSigned" }}
mode = "self-signed"
dir = "/var/lib/ferry"
{{- else if eq $v.tls.mode "acme" }}
mode = "acme"
dir = "/var/lib/ferry"
acme_directory = {{ $v.tls.acme.directory | toJson }}
{{- with $v.tls.acme.email }}
acme_email = {{ . | toJson }}
{{- end }}
{{- if $v.tls.acme.caConfigMap }}
acme_ca_file = "/etc/ferry/acme-ca/ca.crt"
{{- end }}
{{- else }}
mode = "manual"
cert_file = "/etc/ferry/tls/tls.crt"
key_file = "/etc/ferry/tls/tls.key"
{{- end }}
record_layer = {{ $v.tls.recordLayer | default "ferry" | toJson }}

[udp_relay]
{{- if $v.relay.udpRelay.enabled }}
listen = {{ printf "0.0.0.0:%d" (int $v.udpRelayPort) | toJson }}
max_sessions = {{ int $v.relay.udpRelay.maxSessions }}
max_sessions_per_client = {{ int $v.relay.udpRelay.maxSessionsPerClient }}
gso = {{ $v.relay.udpRelay.gso }}
{{- with $v.relay.udpRelay.advertise }}
advertise = {{ toJson . }}
{{- end }}
{{- else }}
listen = "off"
{{- end }}

[stun]
enabled = {{ $v.relay.stun.enabled }}
listen = [{{ printf "0.0.0.0:%d" (int $v.stunPort) | toJson }}{{ if $v.relay.stun.ipv6 }}, {{ printf "[::]:%d" (int $v.stunPort) | toJson }}{{ end }}]
tcp = {{ $v.relay.stun.tcp }}
{{- with $v.relay.stun.software }}
software = {{ . | toJson }}
{{- end }}
{{- $disc := include "ferry.meshDiscovery" . }}
{{- if ne $disc "none" }}

[mesh]
key_file = "/etc/ferry/mesh/mesh.key"
{{- $peers := list }}
{{- range $v.mesh.peers }}{{ $peers = append $peers . }}{{ end }}
{{- if eq $disc "static" }}
{{- range $i := until (int $v.replicas) }}
{{- $peers = append $peers (printf "%s:%s" (include "ferry.hostnameFor" (list $ $i)) (include "ferry.derpPort" $)) }}
{{- end }}
{{- end }}
peers = {{ $peers | toJson }}
{{- if eq $disc "dns" }}
dns = {{ printf "%s.%s.svc.%s" (include "ferry.headless" .) .Release.Namespace $v.clusterDomain | toJson }}
dns_port = {{ include "ferry.derpPort" . }}
dns_interval = {{ $v.mesh.dnsInterval | toJson }}
{{- end }}
{{- with $v.mesh.tlsName }}
tls_name = {{ . | toJson }}
{{- end }}
{{- if $v.mesh.caConfigMap }}
ca_file = "/etc/ferry/mesh-ca/ca.crt"
{{- end }}
{{- end }}
{{- if or $v.admission.allowlist.enabled $v.admission.verifyUrl }}

[admission]
{{- if $v.admission.allowlist.enabled }}
allowlist_file = "/etc/ferry/allow/keys.txt"
{{- end }}
{{- if $v.admission.verifyUrl }}
verify_url = {{ $v.admission.verifyUrl | toJson }}
verify_timeout = {{ $v.admission.verifyTimeout | toJson }}
verify_fail = {{ $v.admission.verifyFail | toJson }}
{{- end }}
{{- end }}

[derpmap]
# What `ferry-relay derpmap` prints (the relay itself ignores this section).
region_id = {{ int $v.region.id }}
region_code = {{ $v.region.code | toJson }}
region_name = {{ $v.region.name | toJson }}
{{- if not $hn }}
derp_port = {{ int $v.exposure.loadBalancer.ports.derp }}
stun_port = {{ if $v.relay.stun.enabled }}{{ int $v.exposure.loadBalancer.ports.stun }}{{ else }}-1{{ end }}
{{- end }}

[limits]
{{- with $v.relay.limits }}
max_connections = {{ int .maxConnections }}
handshake_timeout = {{ .handshakeTimeout | toJson }}
write_timeout = {{ .writeTimeout | toJson }}
keepalive_interval = {{ .keepaliveInterval | toJson }}
queue_depth = {{ int .queueDepth }}
queue_bytes = {{ int .queueBytes }}
mesh_queue_bytes = {{ int .meshQueueBytes }}
watcher_backlog = {{ int .watcherBacklog }}
shutdown_timeout = {{ .shutdownTimeout | toJson }}
client_rate_limit = {{ int64 .clientRateLimit }}
client_rate_burst = {{ int64 .clientRateBurst }}
accept_rate = {{ int64 .acceptRate }}
accept_burst = {{ int64 .acceptBurst }}
max_connections_per_ip = {{ int64 .maxConnectionsPerIp }}
{{- end }}
{{- end -}}
