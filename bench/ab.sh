#!/usr/bin/env bash
# Two ferry-relay binaries side by side, in alternating rounds (A B, then B A, ...): packets
# delivered per server CPU-second, relay pinned to CPU 0 and the load to CPU 1, as in
# bench/run.sh scenario 1. For a change to the relay's hot path, where rounds of one binary
# spread more than the change moves them: compare the rounds pairwise, and the medians.
#
#   bench/ab.sh MODE SIZE ROUNDS BIN_A BIN_B [ferry-loadtest derp options...]
#   bench/ab.sh plain 1200 6 /tmp/ferry-relay.before target/release/ferry-relay
#   WINDOW=32 bench/ab.sh tls 64 6 A B
#   bench/ab.sh rustls 1200 6 A B        # TLS with tokio-rustls' records (--tls-record-layer rustls)
#
# MODE: plain (--dev, plain HTTP), tls (the relay's own TLS records) or rustls. Each round is a
# fresh relay and `ferry-loadtest derp --clients 16 --window 16 --warmup 1s --duration 4s`
# (DURATION=... to change; WINDOW=0: no window, every sender floods as scenario 7 does). Prints
# one line per round (with the packets lost) and the medians. Loopback only.
set -euo pipefail
if [ $# -lt 5 ]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
mode=$1 size=$2 rounds=$3 A=$4 B=$5
shift 5
LTARGS=("$@")
case $mode in plain | tls | rustls) ;; *) echo "ab.sh: MODE is plain, tls or rustls, not $mode" >&2; exit 2 ;; esac
for bin in "$A" "$B"; do
    [ -x "$bin" ] || { echo "ab.sh: $bin is not an executable (build one: cargo build --release -p ferry-relay)" >&2; exit 2; }
done
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LT=$ROOT/target/release/ferry-loadtest
[ -x "$LT" ] || (cd "$ROOT" && cargo build --release -p ferry-loadtest)
PORT=${PORT:-29443}
DURATION=${DURATION:-4s}
WINDOW=${WINDOW:-16}
WINDOW_ARGS=()
[ "$WINDOW" = 0 ] || WINDOW_ARGS=(--window "$WINDOW")
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

run() { # run BIN -> "per-CPU-second lost"
    local bin=$1 d
    d=$(mktemp -d -p "$WORK")
    local url extra=()
    if [ "$mode" = plain ]; then
        taskset -c 0 "$bin" --dev --listen "127.0.0.1:$PORT" --metrics-listen off --no-stun \
            --udp-relay-listen off --log-level warn >"$d/log" 2>&1 &
        url=http://127.0.0.1:$PORT/derp
    else
        local layer=ferry
        [ "$mode" = rustls ] && layer=rustls
        taskset -c 0 "$bin" --hostname localhost --listen "127.0.0.1:$PORT" --http-listen off \
            --metrics-listen off --no-stun --udp-relay-listen off --key-file "$d/relay.key" \
            --cert-mode self-signed --tls-record-layer "$layer" --log-level warn >"$d/log" 2>&1 &
        url=https://127.0.0.1:$PORT/derp
        extra=(--insecure)
    fi
    local pid=$!
    local i
    for i in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || { cat "$d/log" >&2; exit 1; }
        sleep 0.05
    done
    taskset -c 1 "$LT" derp "$url" "${extra[@]}" --server-pid "$pid" --json --no-progress \
        --clients 16 --size "$size" "${WINDOW_ARGS[@]}" --warmup 1s --duration "$DURATION" \
        "${LTARGS[@]}" >"$d/r.json"
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['server']['per_cpu_second']), r['packets']['lost'])" "$d/r.json"
}

a_all=() b_all=()
for r in $(seq "$rounds"); do
    if [ $((r % 2)) = 1 ]; then a=$(run "$A"); b=$(run "$B"); else b=$(run "$B"); a=$(run "$A"); fi
    set -- $a; a_rate=$1 a_lost=$2
    set -- $b; b_rate=$1 b_lost=$2
    a_all+=("$a_rate") b_all+=("$b_rate")
    printf 'round %d  A %9d per server CPU-s (lost %s)  B %9d (lost %s)  B/A %.2f\n' \
        "$r" "$a_rate" "$a_lost" "$b_rate" "$b_lost" "$(python3 -c "print($b_rate/$a_rate)")"
done
python3 - "${a_all[*]}" "${b_all[*]}" <<'EOF'
import statistics, sys
a = [int(x) for x in sys.argv[1].split()]
b = [int(x) for x in sys.argv[2].split()]
ma, mb = statistics.median(a), statistics.median(b)
pairs = statistics.median(y / x for x, y in zip(a, b))
print(f"medians: A {ma:,.0f}  B {mb:,.0f}  B/A {mb / ma:.2f}  (median of the per-round ratios {pairs:.2f})")
EOF
