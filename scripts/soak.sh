#!/usr/bin/env bash
# Soak and scale runs of a release ferry-relay on 127.0.0.1 (not in CI; results in
# docs/reliability-scale.md). Three modes:
#
#   scripts/soak.sh soak      10,000 TLS clients, 100 connects + 100 disconnects/s, 1,000 pairs
#                             exchanging packets for SOAK_MINUTES (default 10); RSS, fds, tasks and
#                             queued bytes every 10 s (CSV + SVG), slopes, exact accounting
#   scripts/soak.sh idle19k   19,000 idle TLS clients from two load generators: RSS per client,
#                             accept-storm time, KeepAlive lateness (keepalive_interval 5 s)
#   scripts/soak.sh abuse     5,000 stalled handshakes (after TCP, after TLS), 5,000 drips (request
#                             head, frames), 1 GiB garbage frames — each while 100 honest pairs
#                             exchange packets (round-trip p99 before/during, honest loss)
#
# Everything listens on 127.0.0.1. The relay runs on core 0 and the load on core 1 (taskset).
# Outputs go to OUT (default /tmp/ferry-scale). NO_BUILD=1 skips the release build.
# EXTRA_LIMITS: more [limits] lines for the relay (e.g. the abuse mitigations:
# EXTRA_LIMITS=$'accept_rate = 200\naccept_burst = 200\nclient_rate_limit = 16777216');
# RELAY_ARGS: more ferry-relay flags (e.g. --tls-record-layer rustls).
# ATTACKS_ONLY: a regex of the abuse run's attack names to run (default: all).
# ABUSE_SOURCE=N: the abuser connects from 127.0.0.N alone (honest clients use .1-.32), so a
# per-IP limit (EXTRA_LIMITS max_connections_per_ip) applies to it and not to them.
set -euo pipefail
MODE=${1:-soak}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/ferry-scale}
SOAK_MINUTES=${SOAK_MINUTES:-10}
PORT=${PORT:-18443}
MPORT=${MPORT:-19090}
URL=https://127.0.0.1:$PORT/derp
mkdir -p "$OUT/bin"
if [[ ${NO_BUILD:-0} != 1 ]]; then
    (cd "$ROOT" && cargo build --release -p ferry-relay -p ferry-loadtest)
fi
# Private copies: another build replacing target/release mid-run cannot change what runs.
cp "$ROOT/target/release/ferry-relay" "$ROOT/target/release/ferry-loadtest" "$OUT/bin/"
RELAY=$OUT/bin/ferry-relay
LT=$OUT/bin/ferry-loadtest
ulimit -n "$(ulimit -Hn)"

metrics() { curl -sf "http://127.0.0.1:$MPORT/metrics"; }

start_relay() { # $1: keepalive interval
    cat >"$OUT/relay.toml" <<EOF
listen = "127.0.0.1:$PORT"
hostname = "127.0.0.1"
key_file = "$OUT/relay.key"
http_listen = "off"
metrics_listen = "127.0.0.1:$MPORT"
log_level = "warn"
[tls]
mode = "self-signed"
dir = "$OUT"
[stun]
enabled = false
[limits]
keepalive_interval = "$1"
${EXTRA_LIMITS:-}
EOF
    # shellcheck disable=SC2086 # RELAY_ARGS: extra flags, word-split on purpose
    taskset -c 0 "$RELAY" --config "$OUT/relay.toml" ${RELAY_ARGS:-} >"$OUT/relay-$MODE.log" 2>&1 &
    RELAY_PID=$!
    # A failed step (set -e) must not leave the relay holding the ports for the next run.
    trap 'kill "$RELAY_PID" 2>/dev/null || true' EXIT
    for _ in $(seq 50); do metrics >/dev/null 2>&1 && break; sleep 0.1; done
    metrics >/dev/null || { echo "relay did not start:"; cat "$OUT/relay-$MODE.log"; exit 1; }
    echo "relay pid $RELAY_PID, keepalive_interval $1, fd limit $(awk '/open files/ {print $4}' /proc/$RELAY_PID/limits)"
}

stop_relay() {
    if kill -0 "$RELAY_PID" 2>/dev/null; then
        echo "relay alive at the end (no crash)"
        kill -TERM "$RELAY_PID"; wait "$RELAY_PID" || true
    else
        echo "RELAY DIED: see $OUT/relay-$MODE.log"; wait "$RELAY_PID" || true; exit 1
    fi
}

# Counters that moved between two scrapes (files), nonzero deltas only.
delta() {
    python3 - "$1" "$2" <<'EOF'
import sys
def load(p):
    d = {}
    for l in open(p):
        if l.startswith('#') or not l.strip(): continue
        k, v = l.rsplit(' ', 1)
        d[k] = float(v)
    return d
a, b = load(sys.argv[1]), load(sys.argv[2])
for k in sorted(b):
    if any(s in k for s in ('handshake_failures', 'connections_closed', 'frames_ignored',
                            'packets_dropped', 'rejected', 'handshakes_total', 'accepts_total')):
        d = b[k] - a.get(k, 0)
        if d: print(f"    {k} +{d:.0f}")
EOF
}

honest() { # $1: output name; 100 pairs, echo, 2,000 packets/s, 20 s measured
    # --connect-retries: honest clients retry like real ones when the relay sheds an attack at
    # accept (EXTRA_LIMITS accept_rate); without it, any refused connect ends the run.
    taskset -c 1 "$LT" derp "$URL" --insecure --clients 200 --echo --rate 2000 --size 200 --connect-retries 20 \
        --warmup 2s --duration 20s --no-progress --server-pid "$RELAY_PID" --json >"$OUT/$1.json"
    python3 - "$OUT/$1.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
p, rt = r["packets"], r["latency"]["round_trip"]
print(f"  honest {sys.argv[1].rsplit('/',1)[1][:-5]}: RTT p50 {rt['p50_us']/1000:.2f} ms p99 {rt['p99_us']/1000:.2f} ms max {rt['max_us']/1000:.1f} ms; sent {p['sent']} received {p['received']} lost {p['lost']} drain_complete {p['drain_complete']}")
EOF
}

case $MODE in
abuse)
    SRC=""
    [ -n "${ABUSE_SOURCE:-}" ] && SRC="--source-first $ABUSE_SOURCE --source-ips 1"
    start_relay 60s
    # name | abuse arguments ("garbage" loops 1 GiB clients for the honest run's length)
    ATTACKS=(
        "handshake-never-tcp|--mode handshake-never --stall-at tcp --conns 5000"
        "handshake-never-tls|--mode handshake-never --stall-at tls --conns 5000"
        "handshake-never-http|--mode handshake-never --stall-at http --conns 5000"
        "drip-head|--mode drip --drip-phase head --conns 5000"
        "drip-frames|--mode drip --drip-phase frames --conns 5000"
        "garbage-unknown-type|--mode garbage --garbage unknown-type --bytes 1GiB"
        "garbage-unknown-dest|--mode garbage --garbage unknown-dest --frame-size 1200 --bytes 1GiB"
    )
    for a in "${ATTACKS[@]}"; do
        name=${a%%|*}; args=${a#*|}
        [[ $name =~ ${ATTACKS_ONLY:-.} ]] || continue
        echo "== $name: $args"
        honest "before-$name"
        metrics >"$OUT/m0-$name.txt"
        if [[ $name == garbage* ]]; then
            # 1 GiB clients one after another while the honest run lasts (one alone takes ~1-2 s).
            ( end=$((SECONDS + 24)); i=0
              while ((SECONDS < end)); do
                  # shellcheck disable=SC2086
                  nice -n 5 taskset -c 1 "$LT" abuse "$URL" --insecure $args $SRC --json >"$OUT/$name-$i.json"; i=$((i + 1))
              done ) &
            ABUSE=$!
            sleep 1
        else
            # shellcheck disable=SC2086
            nice -n 5 taskset -c 1 "$LT" abuse "$URL" --insecure $args $SRC --duration 50s --json >"$OUT/$name.json" &
            ABUSE=$!
            sleep 8 # all open (and, for stalls, the first handshake timeouts) before measuring
        fi
        honest "during-$name"
        wait $ABUSE
        metrics >"$OUT/m1-$name.txt"
        echo "  relay counted:"; delta "$OUT/m0-$name.txt" "$OUT/m1-$name.txt"
        if [[ $name == garbage* ]]; then
            python3 -c "
import json,glob
for f in sorted(glob.glob('$OUT/$name-*.json')):
    r=json.load(open(f)); print(f\"  {f.rsplit('/',1)[1]}: {r['bytes_sent']} B, {r['frames_sent']} frames, {r['bytes_per_second']/1e6:.0f} MB/s, pong after {r['pong_after_seconds']} s\")"
        else
            python3 -c "
import json; r=json.load(open('$OUT/$name.json'))
print(f\"  abuse: all {r['conns']} open after {r['all_open_after_seconds']} s, open min {r['open_min']} mean {r['open_mean']:.0f}, opened {r['opened']}, closed by relay {r['closed_by_relay']}, lifetime p50 {r['lifetime_p50_seconds']} s, failures {r['open_failures']}\")"
        fi
        sleep 12 # the relay's handshake timeout clears what is left
    done
    stop_relay
    ;;
idle19k)
    start_relay 5s
    N=${IDLE_CLIENTS:-19000}
    HALF=$((N / 2))
    rss0=$(awk '/VmRSS/ {print $2}' /proc/$RELAY_PID/status)
    echo "relay RSS before: $rss0 KiB"
    t0=$(date +%s.%N)
    for i in 1 2; do
        n=$HALF; [[ $i == 2 ]] && n=$((N - HALF))
        taskset -c 1 "$LT" idle "$URL" --insecure --clients "$n" --concurrency 64 --hold 60s \
            --keepalive-interval 5s --keepalive-jitter 5s --no-progress --json >"$OUT/idle-$i.json" &
        eval "P$i=\$!"
    done
    # Accept storm: until the relay has all N connections.
    peak=0
    while true; do
        c=$(metrics | awk '$1 == "ferry_relay_connections" {print $2}')
        if [[ ${c%.*} -ge $N ]]; then
            t1=$(date +%s.%N); echo "all $N connected after $(echo "$t1 - $t0" | bc) s (relay gauge)"; break
        fi
        kill -0 "$P1" 2>/dev/null || kill -0 "$P2" 2>/dev/null || { echo "load generators ended early"; break; }
        sleep 0.2
    done
    sleep 20
    rss1=$(awk '/VmRSS/ {print $2}' /proc/$RELAY_PID/status)
    fds=$(ls /proc/$RELAY_PID/fd | wc -l)
    tasks=$(metrics | awk '$1 == "ferry_relay_tasks" {print $2}')
    echo "relay with $N clients: RSS $rss1 KiB, fds $fds, tasks $tasks; $(( (rss1 - rss0) * 1024 / N )) bytes per client"
    wait "$P1" "$P2"
    for i in 1 2; do
        python3 - "$OUT/idle-$i.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); i = r["idle"]; k = i["keepalive"]
print(f"  generator {sys.argv[1][-6]}: {i['connections']} held, open after {i['open_seconds']:.2f} s, handshake p99 {r['latency']['handshake']['p99_us']/1000:.1f} ms, warnings {r['warnings']}")
for name in ("all", "after_all_open"):
    g = k[name]
    print(f"    keepalive gaps ({name}): {g['count']} on {k['connections_with_keepalives']} conns; min {g['min_seconds']:.3f} p50 {g['p50_seconds']:.3f} p99 {g['p99_seconds']:.3f} max {g['max_seconds']:.3f} s; bound {g['bound_seconds']} s; late {g['late']}, max lateness {g['max_lateness_seconds']:.3f} s")
EOF
    done
    sleep 2
    echo "after all closed: relay RSS $(awk '/VmRSS/ {print $2}' /proc/$RELAY_PID/status) KiB, tasks $(metrics | awk '$1 == "ferry_relay_tasks" {print $2}')"
    stop_relay
    ;;
soak)
    start_relay 60s
    taskset -c 1 "$LT" soak "$URL" --insecure --clients 10000 --pairs 1000 --churn 100 \
        --rate 10000 --size 200 --duration "${SOAK_MINUTES}m" --sample-every 10s --settle 2m \
        --server-pid "$RELAY_PID" --metrics-addr "127.0.0.1:$MPORT" \
        --csv "$OUT/soak.csv" --svg "$OUT/soak.svg" --json >"$OUT/soak.json"
    python3 -c "
import json; r=json.load(open('$OUT/soak.json')); r.pop('samples')
print(json.dumps(r, indent=1))"
    echo "relay after the soak: RSS $(awk '/VmRSS/ {print $2}' /proc/$RELAY_PID/status) KiB, fds $(ls /proc/$RELAY_PID/fd | wc -l), tasks $(metrics | awk '$1 == "ferry_relay_tasks" {print $2}')"
    stop_relay
    ;;
*)
    echo "usage: $0 soak|idle19k|abuse" >&2; exit 2 ;;
esac
