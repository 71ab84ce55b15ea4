#!/usr/bin/env bash
# Loopback benchmark: ferry-stun against coturn, same machine, same load generator, same run.
#
#   stun/bench/compare.sh                 # 5 rounds x 5 s per server
#   ROUNDS=7 RUN_SECONDS=8 stun/bench/compare.sh
#
# Both servers run for the whole benchmark, pinned to CPU 0 (PIN=0 disables pinning); the load
# generator (examples/stun_flood.rs) runs on CPU 1 and alternates between them, swapping the
# order every round. For every run it reports answers per second and the server's CPU time
# from /proc/PID/stat, hence answers per server CPU-second. Medians at the end.
#
# Needs: coturn (`apt-get install -y coturn`: turnserver, turnutils_stunclient), taskset,
# python3. Traffic stays on 127.0.0.1.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
RUN_SECONDS=${RUN_SECONDS:-5}
WARMUP=${WARMUP:-1}
SOCKETS=${SOCKETS:-4}
WINDOW=${WINDOW:-128}
PIN=${PIN:-1}
FERRY_PORT=${FERRY_PORT:-34780}
COTURN_PORT=${COTURN_PORT:-34781}

cd "$(dirname "$0")/../.."
for tool in turnserver turnutils_stunclient python3; do
    command -v "$tool" >/dev/null || { echo "$tool not found (apt-get install -y coturn python3)" >&2; exit 1; }
done
cargo build --release -q -p ferry-stun --bin ferry-stun --example stun_flood

pin_server=()
pin_flood=()
if [ "$PIN" = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    pin_server=(taskset -c 0)
    pin_flood=(taskset -c 1)
fi

out=$(mktemp -d)
"${pin_server[@]}" target/release/ferry-stun --listen "127.0.0.1:$FERRY_PORT" --no-tcp \
    >"$out/ferry.log" 2>&1 &
ferry_pid=$!
"${pin_server[@]}" turnserver -n --no-auth -S -L 127.0.0.1 -p "$COTURN_PORT" --no-tls --no-dtls \
    --no-cli --no-rfc5780 -m 1 >"$out/coturn.log" 2>&1 &
coturn_pid=$!
trap 'kill "$ferry_pid" "$coturn_pid" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

for port in "$FERRY_PORT" "$COTURN_PORT"; do
    ready=0
    for _ in $(seq 50); do
        if timeout 2 turnutils_stunclient -p "$port" 127.0.0.1 2>/dev/null | grep -q "UDP reflexive addr"; then
            ready=1
            break
        fi
        sleep 0.2
    done
    [ "$ready" = 1 ] || { echo "server on port $port does not answer; logs in $out" >&2; exit 1; }
done

echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), kernel $(uname -r)"
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# coturn: $(dpkg-query -W -f='${Version}' coturn 2>/dev/null || echo unknown); $(rustc --version)"
echo "# flood: --sockets $SOCKETS --window $WINDOW --seconds $RUN_SECONDS --warmup $WARMUP; pinned: ${pin_server[*]:-no} / ${pin_flood[*]:-no}"

results="$out/results.txt"
for round in $(seq "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="ferry coturn"; else order="coturn ferry"; fi
    for server in $order; do
        if [ "$server" = ferry ]; then port=$FERRY_PORT; pid=$ferry_pid; else port=$COTURN_PORT; pid=$coturn_pid; fi
        line=$("${pin_flood[@]}" target/release/examples/stun_flood --target "127.0.0.1:$port" \
            --sockets "$SOCKETS" --window "$WINDOW" --seconds "$RUN_SECONDS" --warmup "$WARMUP" --pid "$pid")
        echo "server=$server round=$round $line" | tee -a "$results"
    done
done

python3 - "$results" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    kv = dict(p.split("=", 1) for p in line.split())
    rows.setdefault(kv["server"], []).append(kv)
def med(server, key):
    return statistics.median(float(r[key]) for r in rows[server])
print()
print("| server | runs | median answers/s | median server cores | median answers per server CPU-second | lost |")
print("| --- | --- | --- | --- | --- | --- |")
for s in ("ferry", "coturn"):
    lost = sum(int(r["lost"]) + int(r["invalid"]) for r in rows[s])
    print(f"| {s} | {len(rows[s])} | {med(s,'answers_per_sec'):,.0f} | {med(s,'server_cores'):.2f} | "
          f"{med(s,'answers_per_server_cpu_sec'):,.0f} | {lost} |")
print()
print(f"ratio ferry/coturn: answers/s {med('ferry','answers_per_sec')/med('coturn','answers_per_sec'):.2f}x, "
      f"answers per server CPU-second {med('ferry','answers_per_server_cpu_sec')/med('coturn','answers_per_server_cpu_sec'):.2f}x")
EOF
