#!/usr/bin/env bash
# Side-by-side benchmark, one command: ferry-relay against Tailscale's derper and iroh-relay
# (relay scenarios), and ferry against coturn and derper (STUN). Writes docs/benchmarks.md and
# its charts (docs/bench-*.svg) from the JSON reports it collects in $OUT.
#
#   bench/run.sh                      # everything, 3 rounds per scenario
#   ROUNDS=5 RUN_SECONDS=10 bench/run.sh
#   SCENARIOS="1 2" SKIP_IROH=1 bench/run.sh   # a subset: written to docs/benchmarks-s1-2.md
#   WINDOW=32 bench/run.sh            # another closed-loop window for scenarios 1 and 2
#
# Scenarios (see docs/benchmarks.md for what each measures):
#   1  1200-byte packets, 8 pairs, closed loop (--window $WINDOW): capacity, delivered
#      packets/s and per server CPU-second, loss ~0
#   2  64-byte packets, the same
#      (1 and 2 also run ferry and derper in plain HTTP: what TLS costs each (PLAIN=0: not),
#      and Hyper-DERP, plain HTTP only, when HYPERDERP=path/to/binary is given)
#   3  round trips at a fixed rate (relay carries half of derper's scenario-1 capacity)
#   4  10,000 idle TLS clients                   server RSS per client
#   5  connect storm (32 dialers)               handshakes/s, per server CPU-second
#   6  STUN Binding requests (4 sockets x 128)  answers per server CPU-second
#   7  overload: 1200- and 64-byte floods, 8 pairs (open loop): goodput under overload and
#      the drops, which ferry counts in ferry_relay_packets_dropped_total (read from its
#      metrics listener after each run)
#   8  real WireGuard: two stock tailscaled under Headscale send WG_MIB MiB (default 200)
#      through ferry and through derper in turn (bench/wireguard.py; root: network namespace)
#   9  UDP relay capacity (issue 15): ferry's UDP relay (ferry-loadtest udp-relay: 8 pairs,
#      closed loop) and coturn's TURN relay (ferry-loadtest turn: 8 clients with a peer each,
#      the same closed loop, each driven as hard as one load-generator thread can; at most
#      240 s per run, as TURN permissions expire at 300 s), 1200- and 64-byte datagrams:
#      datagrams forwarded per server CPU-second; each run also with the clients sending UDP
#      GSO bursts (--gso; ferry reads them coalesced with GRO, coturn one by one); and coturn
#      under its own turnutils_uclient (200 clients through turnutils_peer; it paces itself),
#      with ferry again at that rate (open loop) for the same load
#  10  UDP relay vs DERP under random loss (issue 15): two ferry tunnels between hard-NAT homes
#      in the NAT lab; one router is a slow, lossy link (NFQUEUE: this kernel has no netem):
#      DELAY_MS (20) ms each way and LOSS_PERCENT (1) % dropped at random, per packet, both
#      ways; a ping stream's round trips and a bulk stream's goodput, with DERP's TCP on each
#      congestion control in S10_TCP_CC ("reno bbr")
#      (client-lib/tests/nat_lab_loss_bench.rs; root: network namespaces)
#  11  the client's UDP GSO on the UDP relay path (issue 15): two ferry tunnels between hard-NAT
#      homes, 1200-byte datagrams at GSO_BENCH_MBPS (40) MB/s, with and without --no-udp-gso,
#      alternating: CPU per delivered datagram of the relay and of both tunnels
#      (client-lib/tests/nat_lab_gso_bench.rs; root)
#
# Every server runs over TLS with the same certificate (a throw-away CA and a leaf for
# localhost/127.0.0.1), fresh for every scenario, pinned to CPU 0 (PIN=0: no pinning); the load
# generator runs on CPU 1. Servers alternate within a round (A B C, then C B A, ...). CPU time
# (utime+stime) and peak RSS (VmHWM) come from /proc. Everything listens on 127.0.0.1 only.
#
# Needs: Rust, Go (derper, via scripts/test-deps.sh), Debian's coturn and openssl (installed with
# apt-get when missing), python3. iroh-relay is installed with `cargo install` (~8 min, once).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
RUN_SECONDS=${RUN_SECONDS:-8}
WARMUP=${WARMUP:-2}
IDLE_CLIENTS=${IDLE_CLIENTS:-10000}
IDLE_HOLD=${IDLE_HOLD:-5}
PIN=${PIN:-1}
SKIP_IROH=${SKIP_IROH:-0}
SCENARIOS=${SCENARIOS:-"1 2 3 4 5 6 7 8 9 10 11"}
# Scenario 9: coturn's load, per round and size: TURN_CLIENTS clients x TURN_MSGS messages, each
# client one every millisecond (turnutils_uclient -z 1; it paces itself, so this is its load).
TURN_CLIENTS=${TURN_CLIENTS:-200}
TURN_MSGS=${TURN_MSGS:-2000}
WG_MIB=${WG_MIB:-200}
# The report's file in docs/: a run of some scenarios only must not replace the full report.
if [ -z "${REPORT_NAME:-}" ]; then
    if [ "$SCENARIOS" = "1 2 3 4 5 6 7 8 9 10 11" ]; then REPORT_NAME=benchmarks.md; else
        REPORT_NAME=benchmarks-s$(echo "$SCENARIOS" | tr -s ' ' '-').md
    fi
fi
# Closed-loop window for scenarios 1 and 2: at most the 32-packet receive queue of ferry and
# derper, so no relay has to drop in pairs; 16 leaves room for the end marker and control
# frames and keeps 8 x 16 = 128 packets in flight.
WINDOW=${WINDOW:-16}
IROH_VERSION=1.4.1

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/target/bench}
# Absolute: scenarios 10 and 11 write their JSON from the package's directory.
case $OUT in /*) ;; *) OUT=$ROOT/$OUT ;; esac
export PATH="$ROOT/.tools/bin:$PATH"
mkdir -p "$OUT"
log() { printf '\n[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# Build and install.
# Builds run under nice: they must not compete with anything else on the machine.
log "building ferry (release)"
nice -n 19 cargo build --release -p ferry-relay -p ferry-loadtest
FERRY=$ROOT/target/release/ferry-relay
LT=$ROOT/target/release/ferry-loadtest

if ! command -v derper >/dev/null || ! command -v tailscaled >/dev/null || ! command -v headscale >/dev/null; then
    log "derper, tailscaled or headscale missing: scripts/test-deps.sh installs them"
    bash scripts/test-deps.sh
fi
for tool in turnserver openssl python3 taskset; do
    if ! command -v "$tool" >/dev/null; then
        log "installing Debian packages for $tool"
        apt-get update -qq && apt-get install -y -qq coturn openssl python3 util-linux >/dev/null
    fi
done
if [ "$SKIP_IROH" != 1 ]; then
    if ! iroh-relay --version 2>/dev/null | grep -q "$IROH_VERSION"; then
        log "installing iroh-relay $IROH_VERSION (cargo install, several minutes)"
        nice -n 19 cargo install "iroh-relay@$IROH_VERSION" --features server --root .tools --locked
    fi
    log "building bench/iroh-load (its own lockfile, not in the workspace)"
    CARGO_TARGET_DIR=$ROOT/target/iroh-load nice -n 19 cargo build --release --locked --manifest-path bench/iroh-load/Cargo.toml
    IROH_LOAD=$ROOT/target/iroh-load/release/iroh-load
fi

# ---------------------------------------------------------------------------------------------
# Certificates: a CA, and a leaf for localhost and 127.0.0.1 that every server uses.
CERTS=$OUT/certs
mkdir -p "$CERTS"
if [ ! -s "$CERTS/localhost.crt" ]; then
    log "making a throw-away CA and a localhost certificate"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
        -subj "/CN=ferry bench CA" -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=localhost" -keyout "$CERTS/localhost.key" -out "$CERTS/localhost.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$CERTS/ext.cnf"
    openssl x509 -req -in "$CERTS/localhost.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" \
        -CAcreateserial -days 30 -extfile "$CERTS/ext.cnf" -out "$CERTS/localhost.crt" 2>/dev/null
fi

# ---------------------------------------------------------------------------------------------
# Servers.
FERRY_PORT=18443 FERRY_METRICS=19090 FERRY_STUN=13478 FERRY_UDP_RELAY=13480
DERPER_PORT=28443 DERPER_STUN=23478
# Plain-HTTP rows of scenarios 1 and 2 (issue 17): what TLS costs each relay, and the peer that
# runs only without TLS here (Hyper-DERP: kernel TLS only, and this kernel has none).
FERRY_PLAIN_PORT=18340 FERRY_PLAIN_STUN=13479 FERRY_PLAIN_METRICS=19091
# ferry with tokio-rustls records (--tls-record-layer rustls): the record layer's same-run baseline.
FERRY_RUSTLS_PORT=18444 FERRY_RUSTLS_METRICS=19092
DERPER_PLAIN_PORT=28340 DERPER_PLAIN_STUN=23479
# Below the ephemeral range (32768-60999 here), so no outgoing connection can hold it in TIME-WAIT.
HYPERDERP_PORT=29340
# HYPERDERP=path/to/hyper-derp adds it to scenarios 1 and 2. It is built by hand out of tree: no
# build recipe for it is kept here (the project commits no code of a fetched peer, nor a script
# that builds one); docs/benchmarks.md says how the measured binary was made.
HYPERDERP=${HYPERDERP:-}
IROH_PORT=30443 IROH_HTTP=30080
COTURN_PORT=31478 TURN_PORT=31479 TURN_PEER_PORT=31480

pin_server=()
pin_load=()
if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ]; then
    pin_server=(taskset -c 0)
    pin_load=(taskset -c 1)
fi

declare -A PIDS=()
RUN=$OUT/run
mkdir -p "$RUN"

wait_tcp() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1; logs in $RUN" >&2
    return 1
}

# Every fixed port must lie below the kernel's ephemeral range: a loopback client elsewhere on
# the machine (a fuzzer, a test suite) takes ports from that range for its own connections, and
# one left in TIME-WAIT makes a server without SO_REUSEADDR fail to bind (iroh-relay did, on
# 38080, while a fuzzer ran).
ports_below_ephemeral() {
    local lo _hi name
    read -r lo _hi </proc/sys/net/ipv4/ip_local_port_range
    # Every port variable above, by its name's shape, so a port added later is checked too.
    for name in $(compgen -v | grep -E '^(FERRY|DERPER|HYPERDERP|IROH|COTURN|TURN)[A-Z_]*_(PORT|STUN|METRICS|HTTP|UDP_RELAY)$'); do
        if ((${!name} >= lo)); then
            echo "bench/run.sh: $name=${!name} is in the ephemeral port range ($lo-$_hi):" \
                "pick a port below $lo" >&2
            exit 1
        fi
    done
}
ports_below_ephemeral

# A port already taken (a leftover server) would silently measure the wrong process.
port_free() { # port_free tcp|udp PORT
    if ss -Hln "--$1" "sport = :$2" 2>/dev/null | grep -q .; then
        echo "127.0.0.1:$2 ($1) is already in use: stop whatever listens there (ss -lnp '( sport = :$2 )')" >&2
        exit 1
    fi
}

start() { # start NAME
    case $1 in
    ferry) port_free tcp "$FERRY_PORT"; port_free udp "$FERRY_STUN"; port_free udp "$FERRY_UDP_RELAY" ;;
    derper) port_free tcp "$DERPER_PORT"; port_free udp "$DERPER_STUN" ;;
    ferryplain) port_free tcp "$FERRY_PLAIN_PORT"; port_free udp "$FERRY_PLAIN_STUN" ;;
    ferryrustls) port_free tcp "$FERRY_RUSTLS_PORT" ;;
    derperplain) port_free tcp "$DERPER_PLAIN_PORT"; port_free udp "$DERPER_PLAIN_STUN" ;;
    hyperderp) port_free tcp "$HYPERDERP_PORT" ;;
    iroh) port_free tcp "$IROH_PORT"; port_free tcp "$IROH_HTTP" ;;
    coturn) port_free udp "$COTURN_PORT" ;;
    turn) port_free udp "$TURN_PORT"; port_free udp "$TURN_PEER_PORT" ;;
    esac
    case $1 in
    ferry)
        rm -f "$RUN/ferry.key"
        "${pin_server[@]}" "$FERRY" --hostname localhost --listen "127.0.0.1:$FERRY_PORT" \
            --http-listen off --metrics-listen "127.0.0.1:$FERRY_METRICS" \
            --stun-listen "127.0.0.1:$FERRY_STUN" --udp-relay-listen "127.0.0.1:$FERRY_UDP_RELAY" \
            --key-file "$RUN/ferry.key" \
            --cert-mode manual --cert-file "$CERTS/localhost.crt" --cert-key-file "$CERTS/localhost.key" \
            --log-level warn >"$RUN/ferry.log" 2>&1 &
        PIDS[ferry]=$!
        wait_tcp "$FERRY_PORT"
        ;;
    derper)
        mkdir -p "$RUN/derper-certs"
        cp "$CERTS/localhost.crt" "$CERTS/localhost.key" "$RUN/derper-certs/"
        "${pin_server[@]}" derper -c "$RUN/derper.conf" -a "127.0.0.1:$DERPER_PORT" -certmode manual \
            -certdir "$RUN/derper-certs" -hostname localhost -http-port -1 \
            -stun-port "$DERPER_STUN" >"$RUN/derper.log" 2>&1 &
        PIDS[derper]=$!
        wait_tcp "$DERPER_PORT"
        ;;
    ferryrustls)
        # The same relay over TLS with tokio-rustls doing the records (the relay before its own
        # record layer), on ports of its own and without STUN or the UDP relay.
        rm -f "$RUN/ferryrustls.key"
        "${pin_server[@]}" "$FERRY" --hostname localhost --listen "127.0.0.1:$FERRY_RUSTLS_PORT" \
            --http-listen off --metrics-listen "127.0.0.1:$FERRY_RUSTLS_METRICS" --no-stun \
            --udp-relay-listen off --key-file "$RUN/ferryrustls.key" --tls-record-layer rustls \
            --cert-mode manual --cert-file "$CERTS/localhost.crt" --cert-key-file "$CERTS/localhost.key" \
            --log-level warn >"$RUN/ferryrustls.log" 2>&1 &
        PIDS[ferryrustls]=$!
        wait_tcp "$FERRY_RUSTLS_PORT"
        ;;
    ferryplain)
        # The same relay in plain HTTP (--dev's mode: no TLS), on ports of its own.
        "${pin_server[@]}" "$FERRY" --dev --listen "127.0.0.1:$FERRY_PLAIN_PORT" \
            --metrics-listen "127.0.0.1:$FERRY_PLAIN_METRICS" --stun-listen "127.0.0.1:$FERRY_PLAIN_STUN" \
            --udp-relay-listen off --log-level warn >"$RUN/ferryplain.log" 2>&1 &
        PIDS[ferryplain]=$!
        wait_tcp "$FERRY_PLAIN_PORT"
        ;;
    derperplain)
        # derper serves TLS only on :443 or with -certmode manual; anything else is plain HTTP.
        "${pin_server[@]}" derper -c "$RUN/derperplain.conf" -a "127.0.0.1:$DERPER_PLAIN_PORT" \
            -certmode letsencrypt -hostname localhost -http-port -1 \
            -stun-port "$DERPER_PLAIN_STUN" >"$RUN/derperplain.log" 2>&1 &
        PIDS[derperplain]=$!
        wait_tcp "$DERPER_PLAIN_PORT"
        ;;
    hyperderp)
        # One io_uring worker (the server is pinned to one core, as the others are). It binds
        # 0.0.0.0 with no option to change that: the shim makes it loopback, and it is stopped
        # if it listens anywhere else anyway.
        cc -shared -fPIC -O2 -o "$RUN/loopback-bind.so" "$ROOT/bench/loopback-bind.c" -ldl
        LD_PRELOAD="$RUN/loopback-bind.so" "${pin_server[@]}" "$HYPERDERP" --port "$HYPERDERP_PORT" \
            --workers 1 ${HYPERDERP_ARGS:-} >"$RUN/hyperderp.log" 2>&1 &
        PIDS[hyperderp]=$!
        wait_tcp "$HYPERDERP_PORT"
        if ss -Htlnp | grep "pid=${PIDS[hyperderp]}," | awk '{print $4}' | grep -qv '^127\.0\.0\.1:'; then
            ss -Htlnp | grep "pid=${PIDS[hyperderp]}," >&2
            echo "Hyper-DERP listens beyond loopback; stopped" >&2
            exit 1
        fi
        ;;
    iroh)
        cat >"$RUN/iroh.toml" <<EOF
enable_relay = true
http_bind_addr = "127.0.0.1:$IROH_HTTP"
enable_quic_addr_discovery = false
enable_metrics = false

[tls]
https_bind_addr = "127.0.0.1:$IROH_PORT"
cert_mode = "Manual"
manual_cert_path = "$CERTS/localhost.crt"
manual_key_path = "$CERTS/localhost.key"
hostname = "localhost"
EOF
        RUST_LOG=warn "${pin_server[@]}" iroh-relay --config-path "$RUN/iroh.toml" >"$RUN/iroh.log" 2>&1 &
        PIDS[iroh]=$!
        wait_tcp "$IROH_PORT"
        ;;
    coturn)
        "${pin_server[@]}" turnserver -n --no-auth -S -L 127.0.0.1 -p "$COTURN_PORT" --no-tls \
            --no-dtls --no-cli --no-rfc5780 -m 1 --log-file stdout >"$RUN/coturn.log" 2>&1 &
        PIDS[coturn]=$!
        sleep 1
        ;;
    turn)
        # coturn as a TURN relay (no auth, loopback peers allowed), and the UDP echo peer its
        # clients send to (on the load generator's CPU). coturn logs to stdout, i.e. $RUN/*.log,
        # not to a new file in /var/log per start.
        "${pin_server[@]}" turnserver -n --no-auth -L 127.0.0.1 -p "$TURN_PORT" --no-tls --no-dtls \
            --no-cli -m 1 --relay-ip 127.0.0.1 --allow-loopback-peers --min-port 50000 \
            --max-port 50999 --log-file stdout >"$RUN/turn.log" 2>&1 &
        PIDS[turn]=$!
        "${pin_load[@]}" turnutils_peer -L 127.0.0.1 -p "$TURN_PEER_PORT" >"$RUN/turn-peer.log" 2>&1 &
        PIDS[turn_peer]=$!
        sleep 1
        ;;
    esac
}

# Scenario 9, coturn: one turnutils_uclient run; JSON like ferry-loadtest udp-relay's to FILE.
# Each echoed message crosses the TURN relay twice (client -> peer, peer -> client): forwarded =
# messages sent + echoes received. Server CPU is utime+stime over the run (allocations
# included: a few hundred, next to hundreds of thousands of datagrams).
turn_run() { # turn_run SIZE FILE
    local size=$1 file=$2 pid=${PIDS[turn]}
    local c0 t0 c1 t1 s0 s1 attempt
    # uclient sometimes fails its channel binds at start ("You cannot use the same channel
    # number with different peer", seen once in 12 runs) and prints no totals: run it again.
    for attempt in 1 2 3; do
        c0=$(awk '{print $14+$15}' "/proc/$pid/stat")
        s0=$(awk '{print $15}' "/proc/$pid/stat")
        t0=$(date +%s.%N)
        "${pin_load[@]}" turnutils_uclient -c -e 127.0.0.1 -r "$TURN_PEER_PORT" -n "$TURN_MSGS" \
            -m "$TURN_CLIENTS" -l "$size" -z 1 -p "$TURN_PORT" 127.0.0.1 >"$RUN/uclient.log" 2>&1 || true
        grep -q 'tot_send_msgs=' "$RUN/uclient.log" && break
        log "turnutils_uclient printed no totals (attempt $attempt): $(grep -m1 -i error "$RUN/uclient.log")"
    done
    c1=$(awk '{print $14+$15}' "/proc/$pid/stat")
    s1=$(awk '{print $15}' "/proc/$pid/stat")
    t1=$(date +%s.%N)
    python3 - "$RUN/uclient.log" "$file" "$size" "$c0" "$c1" "$t0" "$t1" "$(getconf CLK_TCK)" "$s0" "$s1" <<'EOF'
import json, re, sys
log, out, size, c0, c1, t0, t1, hz, s0, s1 = sys.argv[1:]
m = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", open(log).read())
if not m:
    sys.exit(f"turnutils_uclient printed no totals; see {log}")
sent, recv = map(int, m[-1])
cpu = (int(c1) - int(c0)) / int(hz)
secs = float(t1) - float(t0)
fwd = sent + recv
r = {"server_name": "coturn", "size": int(size), "sent": sent, "delivered": recv, "forwarded": fwd,
     "seconds": secs, "delivered_per_second": fwd / secs, "lost": sent - recv,
     "server": {"cpu_seconds": cpu, "system_seconds": (int(s1) - int(s0)) / int(hz), "cores": cpu / secs,
                "per_cpu_second": fwd / cpu if cpu else 0}}
json.dump(r, open(out, "w"))
print(f"    coturn  {size} B: {fwd / secs:,.0f} forwarded/s, {r['server']['per_cpu_second']:,.0f} per server CPU-s, "
      f"server cores {cpu / secs:.2f}, lost {sent - recv:,}/{sent:,}", file=sys.stderr)
EOF
}

# Scenario 9, coturn driven like ferry: one ferry-loadtest turn run (the same closed loop as
# udp-relay's, through TURN channels to peer sockets of the load generator) to FILE; extra args
# follow.
turn_load_run() { # turn_load_run FILE ARGS...
    local file=$1
    shift
    "${pin_load[@]}" "$LT" turn "127.0.0.1:$TURN_PORT" --server-pid "${PIDS[turn]}" --json \
        --no-progress "$@" >"$file"
    python3 -c "
import json,sys
r=json.load(open('$file'))
print(f\"    coturn  {r['size']} B, ferry-loadtest turn{' --gso' if r['gso'] else ''}: {r['delivered_per_second']:,.0f} forwarded/s, {r['server']['per_cpu_second']:,.0f} per server CPU-s, server cores {r['server']['cores']:.2f}, lost {r['lost']}\", file=sys.stderr)"
}

# Scenario 9, ferry: one ferry-loadtest udp-relay run to FILE; extra args follow.
udp_relay_run() { # udp_relay_run FILE ARGS...
    local file=$1
    shift
    "${pin_load[@]}" "$LT" udp-relay "https://127.0.0.1:$FERRY_PORT/derp" --ca-file "$CERTS/ca.crt" \
        --tls-name localhost --server-pid "${PIDS[ferry]}" --json --no-progress "$@" >"$file"
    python3 -c "
import json,sys
r=json.load(open('$file'))
print(f\"    ferry   {r['size']} B{' at '+format(r['rate'],',')+'/s' if r['rate'] else ''}: {r['delivered_per_second']:,.0f} forwarded/s, {r['server']['per_cpu_second']:,.0f} per server CPU-s, server cores {r['server']['cores']:.2f}, lost {r['lost']}\", file=sys.stderr)"
}

# Scenarios 10 and 11 (the NAT lab): false, with a log line, unless root; else a clean
# $OUT/sN and release binaries of the relay and the client.
natlab_scenario() { # natlab_scenario N WHAT
    if [ "$(id -u)" != 0 ]; then
        log "scenario $1 skipped: it needs root (the NAT lab's network namespaces)"
        return 1
    fi
    log "scenario $1: $2"
    mkdir -p "$OUT/s$1"
    rm -f "$OUT/s$1"/*.json
    nice -n 19 cargo build --release -p ferry-relay -p ferry-client
}

stop_all() {
    for name in "${!PIDS[@]}"; do
        kill "${PIDS[$name]}" 2>/dev/null || true
        wait "${PIDS[$name]}" 2>/dev/null || true
    done
    PIDS=()
}
trap stop_all EXIT

relay_servers() { # relay_servers N: the relays of scenario N
    local s="ferry derper"
    [ "$SKIP_IROH" = 1 ] || s="$s iroh"
    # Capacity scenarios: each relay also in plain HTTP, and Hyper-DERP (plain only) if built.
    if [ "$1" = 1 ] || [ "$1" = 2 ]; then
        [ "${RUSTLS_ROW:-1}" = 1 ] && s="$s ferryrustls"
        [ "${PLAIN:-1}" = 1 ] && s="$s ferryplain derperplain"
        [ -n "$HYPERDERP" ] && s="$s hyperderp"
    fi
    echo "$s"
}

order() { # order ROUND SERVERS... -> the servers, reversed on even rounds
    local round=$1
    shift
    if [ $((round % 2)) = 1 ]; then echo "$@"; else echo "$@" | tr ' ' '\n' | tac | tr '\n' ' '; fi
}

# One run of the relay load generator against SERVER; JSON to FILE. Extra args follow.
relay_run() { # relay_run SERVER FILE MODE ARGS...
    local server=$1 file=$2 mode=$3
    shift 3
    local pid=${PIDS[$server]}
    case $server in
    ferry | derper | ferryrustls)
        local port=$FERRY_PORT
        [ "$server" = derper ] && port=$DERPER_PORT
        [ "$server" = ferryrustls ] && port=$FERRY_RUSTLS_PORT
        "${pin_load[@]}" "$LT" "$mode" "https://127.0.0.1:$port/derp" --ca-file "$CERTS/ca.crt" \
            --tls-name localhost --server-pid "$pid" --json --no-progress "$@" >"$file"
        ;;
    ferryplain | derperplain | hyperderp)
        local port=$FERRY_PLAIN_PORT
        [ "$server" = derperplain ] && port=$DERPER_PLAIN_PORT
        [ "$server" = hyperderp ] && port=$HYPERDERP_PORT
        "${pin_load[@]}" "$LT" "$mode" "http://127.0.0.1:$port/derp" \
            --server-pid "$pid" --json --no-progress "$@" >"$file"
        ;;
    iroh)
        # iroh-load takes seconds as numbers and no --no-progress.
        local args=()
        while [ $# -gt 0 ]; do
            case $1 in
            --warmup | --duration | --hold) args+=("$1" "${2%s}"); shift 2 ;;
            *) args+=("$1"); shift ;;
            esac
        done
        "${pin_load[@]}" "$IROH_LOAD" "$mode" "https://127.0.0.1:$IROH_PORT" --ca-file "$CERTS/ca.crt" \
            --server-pid "$pid" "${args[@]}" >"$file"
        ;;
    esac
    if [ -n "${DROPS_FILE:-}" ]; then
        # The relay's own count of what it dropped, by reason (overload scenario): ferry's
        # metrics listener, derper's /debug/varz (served to localhost on its DERP port).
        case $server in
        ferry) curl -sf "http://127.0.0.1:$FERRY_METRICS/metrics" |
            grep '^ferry_relay_packets_dropped_total' >"$DROPS_FILE" || true ;;
        derper) curl -sf --cacert "$CERTS/ca.crt" --resolve "localhost:$DERPER_PORT:127.0.0.1" \
            "https://localhost:$DERPER_PORT/debug/varz" | grep '^derp_packets_dropped{' >"$DROPS_FILE" || true ;;
        esac
    fi
    python3 - "$file" "$server" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
p, h, i, s = r.get("packets"), r.get("handshakes"), r.get("idle"), r.get("server") or {}
msg = []
if p: msg.append(f"delivered {p['delivered_per_second']:,.0f}/s, lost {p['lost']:,}/{p['sent']:,}")
if r["latency"].get("round_trip"): msg.append(f"rtt p99 {r['latency']['round_trip']['p99_us']:,.0f} us")
if h and not i: msg.append(f"handshakes {h['per_second']:,.0f}/s")
if i and i.get("server_rss_per_connection_bytes") is not None: msg.append(f"{i['server_rss_per_connection_bytes']/1024:.1f} KiB/conn")
if s.get("per_cpu_second"): msg.append(f"{s['per_cpu_second']:,.0f} per server CPU-s")
if s.get("cores") is not None: msg.append(f"server cores {s['cores']:.2f}")
print(f"    {sys.argv[2]:7s} " + ", ".join(msg), file=sys.stderr)
EOF
}

scenario_relay() { # scenario_relay N MODE ARGS...   (TAG=x: files SERVER-x-rR.json)
    local n=$1 tag=${TAG:+-$TAG}
    shift
    mkdir -p "$OUT/s$n"
    rm -f "$OUT/s$n"/*"$tag"-r*.json "$OUT/s$n"/*"$tag"-r*.drops
    for round in $(seq "$ROUNDS"); do
        # Fresh servers every round: no state carried from one run to the next, and ferry's
        # drop counters cover exactly one run.
        for s in $(relay_servers "$n"); do start "$s"; done
        log "scenario $n${tag}, round $round"
        for s in $(order "$round" $(relay_servers "$n")); do
            DROPS_FILE=${COUNT_DROPS:+$OUT/s$n/$s$tag-r$round.drops} \
                relay_run "$s" "$OUT/s$n/$s$tag-r$round.json" "$@"
        done
        stop_all
    done
}

median_of() { # median_of FILES... : median delivered_per_second
    python3 - "$@" <<'EOF'
import json, statistics, sys
print(int(statistics.median(json.load(open(f))["packets"]["delivered_per_second"] for f in sys.argv[1:])))
EOF
}

T=(--warmup "${WARMUP}s" --duration "${RUN_SECONDS}s")

# The machine's AEAD throughput on one core (openssl speed, EVP), at a relayed packet's TLS
# record size (1,237 bytes: a 1,200-byte packet's DERP frame) and at 16 KiB records: the crypto
# ceiling the relay scenarios are set against. Measured before the scenarios and again after
# them (SUFFIX _after): on a shared host one reading moved 1.7x within an hour, and the report
# takes the higher reading (the machine's capability) and shows both.
aead_speeds() { # aead_speeds SUFFIX
    for aead in aes-128-gcm aes-256-gcm chacha20-poly1305; do
        for bytes in 1237 16384; do
            # openssl once printed "inf" here (a run it timed as taking no time): a reading that
            # is not a finite number is taken again, and left empty (not reported) after 3 tries.
            for _try in 1 2 3; do
                v=$(taskset -c 0 openssl speed -evp "$aead" -bytes "$bytes" -seconds 2 2>/dev/null |
                    awk -v a="$aead" 'tolower($1) == a { v = $NF }
                        END { sub(/k$/, "", v); if (v ~ /^[0-9]+(\.[0-9]+)?$/ && v > 0) print v * 1000 }')
                [[ -n $v ]] && break
            done
            echo "aead_${aead//-/_}_$bytes$1=$v"
        done
    done
}


{
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc=$(nproc)"
    echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    # What the AEADs can use (issue 17): the ratios move with the CPU's crypto instructions.
    echo "cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'aes|vaes|pclmulqdq|vpclmulqdq|avx|avx2|avx512f|avx512vl|sha_ni' | tr '\n' ' ')"
    aead_speeds ""
    echo "kernel=$(uname -r)"
    echo "rustc=$(rustc --version)"
    echo "derper=$(derper -version 2>&1 | head -1)"
    # A VERSION file beside the binary or one directory up (commit, date, compiler) names it.
    hd_version=
    if [ -n "$HYPERDERP" ]; then
        hd_version=$( (cat "$(dirname "$HYPERDERP")/VERSION" "$(dirname "$HYPERDERP")/../VERSION" 2>/dev/null || true) | head -1)
        hd_version=${hd_version:-$HYPERDERP}
    fi
    echo "hyperderp=$hd_version"
    echo "coturn=$(dpkg-query -W -f='${Version}' coturn 2>/dev/null || echo unknown)"
    echo "iroh=$( [ "$SKIP_IROH" = 1 ] && echo skipped || iroh-relay --version)"
    echo "ferry=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- relay stun || echo '+uncommitted')"
    echo "ferry_relay_commit=$(git log -1 --format='%h %cI' -- relay stun)"
    echo "loadavg_before=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "cpu_stat_before=$(head -1 /proc/stat)"
    echo "pinned=${pin_server[*]:-no} / ${pin_load[*]:-no}"
    echo "rounds=$ROUNDS run_seconds=$RUN_SECONDS warmup=$WARMUP idle_clients=$IDLE_CLIENTS window=$WINDOW turn_clients=$TURN_CLIENTS turn_msgs=$TURN_MSGS"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

for n in $SCENARIOS; do
    case $n in
    1) log "scenario 1: capacity, 1200-byte packets, 8 pairs, window $WINDOW"
       scenario_relay 1 derp --clients 16 --size 1200 --window "$WINDOW" "${T[@]}" ;;
    2) log "scenario 2: capacity, 64-byte packets, 8 pairs, window $WINDOW"
       scenario_relay 2 derp --clients 16 --size 64 --window "$WINDOW" "${T[@]}" ;;
    3) # The relay carries data + echoes, so a send rate of a quarter of derper's scenario-1
       # delivered packets/s (its closed-loop capacity, measured in this run) puts half of
       # derper's capacity through each relay.
       if [ -z "${RATE3:-}" ]; then
           if ls "$OUT"/s1/derper-r*.json >/dev/null 2>&1; then
               RATE3=$(( $(median_of "$OUT"/s1/derper-r*.json) / 4 ))
           else
               RATE3=20000
           fi
       fi
       echo "$RATE3" >"$OUT/rate3.txt"
       log "scenario 3: round trips at $RATE3 packets/s sent ($((RATE3 * 2)) relayed), 1200 bytes, 8 pairs"
       scenario_relay 3 derp --clients 16 --size 1200 --echo --rate "$RATE3" "${T[@]}" ;;
    4) log "scenario 4: $IDLE_CLIENTS idle TLS clients"
       scenario_relay 4 idle --clients "$IDLE_CLIENTS" --hold "${IDLE_HOLD}s" ;;
    5) log "scenario 5: connect storm, 32 dialers"
       scenario_relay 5 connect --concurrency 32 "${T[@]}" ;;
    6) log "scenario 6: STUN"
       mkdir -p "$OUT/s6"
       rm -f "$OUT/s6"/*.json
       for round in $(seq "$ROUNDS"); do
           start ferry; start derper; start coturn
           log "scenario 6, round $round"
           for s in $(order "$round" ferry coturn derper); do
               case $s in
               ferry) port=$FERRY_STUN ;; coturn) port=$COTURN_PORT ;; derper) port=$DERPER_STUN ;;
               esac
               # Tailscale-style requests (SOFTWARE + FINGERPRINT): the only kind derper answers.
               "${pin_load[@]}" "$LT" stun "127.0.0.1:$port" --tailscale --sockets 4 --window 128 \
                   --server-pid "${PIDS[$s]}" --json --no-progress "${T[@]}" >"$OUT/s6/$s-ts-r$round.json"
               if [ "$s" != derper ]; then
                   # Plain 20-byte requests, as in stun/bench/compare.sh.
                   "${pin_load[@]}" "$LT" stun "127.0.0.1:$port" --sockets 4 --window 128 \
                       --server-pid "${PIDS[$s]}" --json --no-progress "${T[@]}" >"$OUT/s6/$s-plain-r$round.json"
               fi
               python3 -c "
import json,sys
for kind in ('ts','plain'):
    try: r=json.load(open('$OUT/s6/$s-'+kind+'-r$round.json'))
    except FileNotFoundError: continue
    print('    $s', kind, f\"{r['stun']['answers_per_second']:,.0f}/s, {r['server']['per_cpu_second'] or 0:,.0f} per server CPU-s, lost {r['stun']['lost']}\", file=sys.stderr)"
           done
           stop_all
       done ;;
    7) for size in 1200 64; do
           log "scenario 7: overload, $size-byte flood, 8 pairs (open loop)"
           TAG=$size COUNT_DROPS=1 scenario_relay 7 derp --clients 16 --size "$size" "${T[@]}"
       done ;;
    8) if [ "$(id -u)" != 0 ]; then
           log "scenario 8 skipped: it needs root (a network namespace for the WireGuard nodes)"
       else
           log "scenario 8: real WireGuard (tailscaled x2 under Headscale), $WG_MIB MiB per transfer"
           rm -f "$OUT"/s8/*.json
           python3 bench/wireguard.py "$OUT" "$ROUNDS" "$WG_MIB" $([ "$PIN" = 1 ] && echo --pin)
       fi ;;
    9) log "scenario 9: UDP relay capacity, ferry vs coturn (TURN), 1200 and 64 bytes"
       mkdir -p "$OUT/s9"
       rm -f "$OUT/s9"/*.json
       for round in $(seq "$ROUNDS"); do
           for size in 1200 64; do
               log "scenario 9, $size bytes, round $round"
               start ferry; start turn
               for s in $(order "$round" ferry coturn); do
                   case $s in
                   ferry) udp_relay_run "$OUT/s9/ferry-$size-r$round.json" --pairs 8 --size "$size" \
                       --window 64 "${T[@]}"
                       # The same with the clients sending bursts as UDP GSO (WireGuard's and
                       # Tailscale's Linux clients do): the relay gets them coalesced (GRO).
                       udp_relay_run "$OUT/s9/ferrygso-$size-r$round.json" --pairs 8 --size "$size" \
                       --window 64 --gso "${T[@]}" ;;
                   coturn)
                       # Driven like ferry's rows: the same closed loop (8 clients, each with a
                       # peer: 16 flows, as ferry's 8 pairs), without and with GSO.
                       turn_load_run "$OUT/s9/coturnfull-$size-r$round.json" --clients 8 \
                           --size "$size" --window 64 "${T[@]}"
                       turn_load_run "$OUT/s9/coturngsofull-$size-r$round.json" --clients 8 \
                           --size "$size" --window 64 --gso "${T[@]}"
                       # At coturn's own load generator's pace (the rate ferry is also run at).
                       turn_run "$size" "$OUT/s9/coturn-$size-r$round.json" ;;
                   esac
               done
               # ferry at coturn's forwarding rate: the same load, per CPU-second.
               rate=$(python3 -c "import json; print(int(json.load(open('$OUT/s9/coturn-$size-r$round.json'))['delivered_per_second']))")
               udp_relay_run "$OUT/s9/ferry-rate-$size-r$round.json" --pairs 8 --size "$size" \
                   --rate "$rate" "${T[@]}"
               udp_relay_run "$OUT/s9/ferrygso-rate-$size-r$round.json" --pairs 8 --size "$size" \
                   --rate "$rate" --gso "${T[@]}"
               stop_all
           done
       done ;;
    10) if natlab_scenario 10 "UDP relay vs DERP under ${LOSS_PERCENT:-1} % random loss and ${DELAY_MS:-20} ms each way (NAT lab, ferry tunnel)"; then
           # DERP's fate under loss is its TCP congestion control's: a loss-based one (Reno;
           # this host lets a namespace choose only reno or bbr) and BBR, alternating.
           for round in $(seq "$ROUNDS"); do
               for cc in ${S10_TCP_CC:-reno bbr}; do
                   log "scenario 10, round $round, TCP $cc"
                   TCP_CC=$cc LOSS_BENCH_JSON="$OUT/s10/r$round-$cc.json" cargo test --release \
                       -p ferry-client --test nat_lab_loss_bench -- --ignored --nocapture \
                       udp_relay_vs_derp 2>&1 |
                       grep -E '^(udp-relay|derp|UDP relay /)' | cut -c1-220 >&2
               done
           done
       fi ;;
    11) if natlab_scenario 11 "the client's UDP GSO on the UDP relay path (NAT lab, ferry tunnel, $ROUNDS rounds)"; then
           GSO_BENCH_ROUNDS=$ROUNDS GSO_BENCH_JSON="$OUT/s11/gso.json" cargo test --release \
               -p ferry-client --test nat_lab_gso_bench -- --ignored --nocapture 2>&1 |
               grep -E '^(round|medians)' | cut -c1-240 >&2
       fi ;;
    *) echo "unknown scenario $n" >&2; exit 2 ;;
    esac
done

# Whatever else ran meanwhile: niced processes (other builds) show in /proc/stat's nice column.
{
    echo "loadavg_after=$(cut -d' ' -f1-3 /proc/loadavg)"
    aead_speeds _after
    echo "cpu_stat_after=$(head -1 /proc/stat)"
    echo "date_end=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >>"$OUT/machine.txt"

log "writing docs/$REPORT_NAME"
python3 bench/report.py "$OUT" docs "$REPORT_NAME"
log "done: docs/$REPORT_NAME, docs/bench-*.svg; raw JSON in $OUT"
