#!/usr/bin/env bash
# Install the external tools ferry's test suite uses. Idempotent; does nothing
# (and runs in well under a second) when everything is present at the pinned version.
#
#   Debian packages (system-wide, only if the binary is missing):
#     coturn      -> turnutils_stunclient, turnserver   (STUN interop)
#     prometheus  -> promtool                            (metrics format check)
#     iptables, iproute2 -> iptables, ip                 (client NAT lab: network namespaces)
#   Go tools (project-local, <repo>/.tools/bin, pinned):
#     tailscale.com/cmd/derpprobe, tailscale.com/cmd/derper  @ $TAILSCALE_VERSION
#     tailscale.com/cmd/tailscaled, tailscale.com/cmd/tailscale @ $TAILSCALE_VERSION
#     github.com/juanfont/headscale/cmd/headscale            @ $HEADSCALE_VERSION
#     github.com/letsencrypt/pebble/v2/cmd/pebble           @ $PEBBLE_VERSION
#
# Exports nothing: tests look in <repo>/.tools/bin and then PATH.
# Env knobs: SKIP_APT=1 skips the Debian part, SKIP_GO=1 the Go part.
set -euo pipefail

# Newest tailscale release whose go.mod accepts Go 1.26 (v1.104.x needs go >= 1.27).
TAILSCALE_VERSION=v1.102.5
PEBBLE_VERSION=v2.10.1
HEADSCALE_VERSION=v0.27.1
# Debian 12 (bookworm) versions these were tested with; a differing version only warns
# (Debian replaces versions on its mirrors with security updates, so no hard pin).
DEB_COTURN_VERSION=4.6.1-1
DEB_PROMETHEUS_VERSION=2.42.0+ds-5+deb12u1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_BIN="$REPO/.tools/bin"

log() { printf '[test-deps] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- Debian packages
apt_part() {
    local missing=() bin pkg
    for pair in turnutils_stunclient:coturn promtool:prometheus stun:stun-client iptables:iptables ip:iproute2; do
        bin="${pair%%:*}"; pkg="${pair#*:}"
        if command -v "$bin" >/dev/null 2>&1; then
            log "ok: $bin ($(command -v "$bin"))"
        else
            log "missing: $bin -> will install Debian package '$pkg'"
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]})); then
        local sudo=()
        if [[ $(id -u) -ne 0 ]]; then
            command -v sudo >/dev/null 2>&1 || die "not root and no sudo: install ${missing[*]} by hand"
            sudo=(sudo)
        fi
        command -v apt-get >/dev/null 2>&1 || die "no apt-get: install ${missing[*]} by hand"
        # Keep package postinst scripts from starting daemons (prometheus would listen on
        # :9090 on every interface, turnserver on 3478): a temporary policy-rc.d denies it.
        local policy=/usr/sbin/policy-rc.d made_policy=0
        if [[ ! -e $policy ]]; then
            "${sudo[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
            made_policy=1
        fi
        log "running: apt-get update"
        "${sudo[@]}" apt-get update -q || { ((made_policy)) && "${sudo[@]}" rm -f "$policy"; die "apt-get update failed"; }
        log "running: apt-get install -y --no-install-recommends ${missing[*]}"
        if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends "${missing[@]}"; then
            ((made_policy)) && "${sudo[@]}" rm -f "$policy"
            die "apt-get install ${missing[*]} failed"
        fi
        ((made_policy)) && "${sudo[@]}" rm -f "$policy"
        # Belt and braces: if an init system still started them, stop them again.
        for svc in coturn prometheus; do
            if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
                log "stopping service $svc started by the package"
                "${sudo[@]}" systemctl disable --now "$svc" >/dev/null 2>&1 || true
            fi
        done
    fi
    for bin in turnutils_stunclient promtool iptables ip; do
        command -v "$bin" >/dev/null 2>&1 || die "$bin still missing after install"
    done
    local v
    v=$(dpkg-query -W -f='${Version}' coturn 2>/dev/null || true)
    [[ -n $v && $v != "$DEB_COTURN_VERSION" ]] && log "note: coturn $v (tested with $DEB_COTURN_VERSION)"
    v=$(dpkg-query -W -f='${Version}' prometheus 2>/dev/null || true)
    [[ -n $v && $v != "$DEB_PROMETHEUS_VERSION" ]] && log "note: prometheus $v (tested with $DEB_PROMETHEUS_VERSION)"
    return 0
}

# ---------------------------------------------------------------- Go tools
# have_go_tool BIN MODULE VERSION: true when BIN exists and was built from MODULE@VERSION.
have_go_tool() {
    local bin="$1" mod="$2" ver="$3"
    [[ -x $bin ]] || return 1
    go version -m "$bin" 2>/dev/null | awk -v m="$mod" -v v="$ver" \
        '$1 == "mod" && $2 == m && $3 == v { found = 1 } END { exit !found }'
}

go_install() {  # go_install NAME PACKAGE MODULE VERSION
    local name="$1" pkg="$2" mod="$3" ver="$4" bin="$TOOLS_BIN/$1" t0 t1
    if have_go_tool "$bin" "$mod" "$ver"; then
        log "ok: $name $ver ($bin)"
        return 0
    fi
    log "running: GOBIN=$TOOLS_BIN go install $pkg@$ver"
    t0=$(date +%s)
    GOBIN="$TOOLS_BIN" GOTOOLCHAIN=local CGO_ENABLED=0 \
        go install "$pkg@$ver" || die "go install $pkg@$ver failed"
    t1=$(date +%s)
    have_go_tool "$bin" "$mod" "$ver" || die "$bin is not $mod@$ver after install"
    log "installed: $name $ver in $((t1 - t0))s"
}

# Headscale: `go install ...@version` fails here (the module proxy refuses the module's version
# list, which go install reads), but the exact version's module downloads; it is built from its
# own go.mod in a writable copy of the module directory.
headscale_install() {
    local bin="$TOOLS_BIN/headscale" mod=github.com/juanfont/headscale ver="$HEADSCALE_VERSION" dir src t0
    # A build outside the module cache records no version in the binary: a stamp beside it
    # says which one it is.
    if [[ -x $bin && $(cat "$bin.version" 2>/dev/null) == "$ver" ]]; then
        log "ok: headscale $ver ($bin)"
        return 0
    fi
    log "building headscale $ver from its module (go mod download + go build)"
    t0=$(date +%s)
    dir=$(GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod download -json "$mod@$ver" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])') \
        || die "go mod download $mod@$ver failed"
    src=$(mktemp -d)
    cp -r "$dir/." "$src/" && chmod -R u+w "$src"
    (cd "$src" && GOTOOLCHAIN=local CGO_ENABLED=0 go build -trimpath -o "$bin" ./cmd/headscale) \
        || { rm -rf "$src"; die "building headscale $ver failed"; }
    rm -rf "$src"
    echo "$ver" > "$bin.version"
    log "installed: headscale $ver in $(($(date +%s) - t0))s"
}

go_part() {
    command -v go >/dev/null 2>&1 || die "go not found in PATH (need Go >= 1.26)"
    mkdir -p "$TOOLS_BIN"
    go_install derper    tailscale.com/cmd/derper    tailscale.com "$TAILSCALE_VERSION"
    go_install derpprobe tailscale.com/cmd/derpprobe tailscale.com "$TAILSCALE_VERSION"
    go_install tailscaled tailscale.com/cmd/tailscaled tailscale.com "$TAILSCALE_VERSION"
    go_install tailscale tailscale.com/cmd/tailscale tailscale.com "$TAILSCALE_VERSION"
    headscale_install
    go_install pebble    github.com/letsencrypt/pebble/v2/cmd/pebble \
        github.com/letsencrypt/pebble/v2 "$PEBBLE_VERSION"
    # pebble's HTTPS certificate and its CA, from the module, to a fixed place for the tests.
    local pdir
    pdir="$(GOTOOLCHAIN=local go env GOMODCACHE)/github.com/letsencrypt/pebble/v2@$PEBBLE_VERSION"
    [[ -d $pdir ]] || GOTOOLCHAIN=local go mod download "github.com/letsencrypt/pebble/v2@$PEBBLE_VERSION" \
        || die "go mod download pebble $PEBBLE_VERSION failed"
    mkdir -p "$REPO/.tools/pebble"
    cp -f "$pdir/test/certs/localhost/cert.pem" "$pdir/test/certs/localhost/key.pem" \
        "$pdir/test/certs/pebble.minica.pem" "$REPO/.tools/pebble/" \
        || die "pebble test certificates missing in $pdir"
    chmod 0644 "$REPO/.tools/pebble/"*.pem
}

[[ ${SKIP_APT:-0} == 1 ]] && log "SKIP_APT=1: skipping Debian packages" || apt_part
[[ ${SKIP_GO:-0} == 1 ]] && log "SKIP_GO=1: skipping Go tools" || go_part

# ---------------------------------------------------------------- summary
echo "test dependencies:"
for bin in turnutils_stunclient turnserver promtool iptables ip; do
    printf '  %-22s %s\n' "$bin" "$(command -v "$bin" || echo MISSING)"
done
if [[ ${SKIP_GO:-0} != 1 ]]; then
    for bin in derper derpprobe tailscaled tailscale headscale pebble; do
        printf '  %-22s %s\n' "$bin" "$TOOLS_BIN/$bin"
    done
    printf '  %-22s %s\n' "pebble certs" "$REPO/.tools/pebble/{cert,key,pebble.minica}.pem"
fi
