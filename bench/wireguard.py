#!/usr/bin/env python3
"""Scenario 8: real WireGuard through the relay.

Two stock `tailscaled` (userspace networking, the relay path forced with
TS_DEBUG_ALWAYS_USE_DERP=1) under Headscale, in a network namespace with only `lo`. One DERP
region, one node, one port: ferry-relay and Tailscale's derper take turns serving it with the
same certificate (so the map's CertName pin holds for both). Each round, for each relay in
alternating order: start it, wait until a `tailscale ping` goes through it, send BYTES from node 1
to node 2 through node 1's SOCKS5 server (node 2 forwards to a sink on the namespace's loopback),
and record goodput, the relay's CPU seconds (utime+stime from /proc) and the packets it dropped
(ferry's metrics, derper's /debug/varz).

  bench/wireguard.py OUT_DIR ROUNDS MIB [--pin]

Writes OUT_DIR/s8/{ferry,derper}-rN.json. Needs root, and the tools from scripts/test-deps.sh.
"""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, ".tools", "bin")
FERRY = os.path.join(ROOT, "target", "release", "ferry-relay")
NS = f"ferrywg-{os.getpid()}"
HOST = "derp.ferry.test"
DERP_PORT, STUN_PORT, METRICS, HEADSCALE, SINK = 8443, 3478, "127.0.0.1:9090", "127.0.0.1:8080", 5201


def log(*a):
    print("[wireguard]", *a, file=sys.stderr, flush=True)


def sh(*args, check=True, **kw):
    r = subprocess.run(args, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))[:300]}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def in_ns(*args):
    return ["ip", "netns", "exec", NS, *args]


class Lab:
    def __init__(self, pin):
        self.dir = tempfile.mkdtemp(prefix="ferry-wg-")
        self.procs = []
        # Relay on CPU 0, everything else (the two WireGuard nodes are the load) on CPU 1.
        self.pin_relay = ["taskset", "-c", "0"] if pin else []
        self.pin_load = ["taskset", "-c", "1"] if pin else []
        sh("ip", "netns", "add", NS)
        sh("ip", "-n", NS, "link", "set", "lo", "up")

    def path(self, f):
        return os.path.join(self.dir, f)

    def spawn(self, args, logname, env=None, pin=None):
        f = open(self.path(logname), "ab")
        p = subprocess.Popen(in_ns(*(pin if pin is not None else self.pin_load), *args),
                             stdout=f, stderr=f, env={**os.environ, **(env or {})})
        self.procs.append(p)
        return p

    def run(self, *args, timeout=60):
        return sh(*in_ns(*args), timeout=timeout)

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait()
        out = sh("ip", "netns", "pids", NS, check=False).stdout.split()
        for pid in out:
            sh("kill", "-9", pid, check=False)
        sh("ip", "netns", "del", NS, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def get(lab, addr, path, tls=False):
    """HTTP(S) GET from inside the namespace."""
    if tls:
        cmd = ["curl", "-sfk", "--resolve", f"{HOST}:{DERP_PORT}:127.0.0.1", f"https://{HOST}:{DERP_PORT}{path}"]
    else:
        cmd = ["curl", "-sf", f"http://{addr}{path}"]
    return sh(*in_ns(*cmd), check=False).stdout


def dropped(lab, relay):
    if relay == "ferry":
        text, name = get(lab, METRICS, "/metrics"), "ferry_relay_packets_dropped_total"
    else:
        text, name = get(lab, None, "/debug/varz", tls=True), "derp_packets_dropped"
    total = 0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def wait_tcp(lab, addr, limit=30):
    host, port = addr.rsplit(":", 1)
    deadline = time.time() + limit
    while time.time() < deadline:
        if sh(*in_ns("bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"), check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {addr} in the namespace; logs in {lab.dir}")


def start_relay(lab, relay):
    if relay == "ferry":
        p = lab.spawn([FERRY, "--listen", f"127.0.0.1:{DERP_PORT}", "--hostname", HOST,
                       "--key-file", lab.path("relay.key"), "--stun-listen", f"127.0.0.1:{STUN_PORT}",
                       "--http-listen", "off", "--metrics-listen", METRICS, "--log-level", "warn"],
                      "ferry.log", pin=lab.pin_relay)
    else:
        p = lab.spawn([os.path.join(TOOLS, "derper"), "-c", lab.path("derper.json"),
                       "-a", f"127.0.0.1:{DERP_PORT}", "-certmode", "manual", "-certdir", lab.path("certs"),
                       "-hostname", HOST, "-http-port", "-1", "-stun-port", str(STUN_PORT)],
                      "derper.log", pin=lab.pin_relay)
    wait_tcp(lab, f"127.0.0.1:{DERP_PORT}")
    return p


def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def transfer(lab, to_ip, nbytes):
    """node 1 -> node 2 through the tailnet; returns (seconds, ok)."""
    open(lab.path("sink.log"), "w").close()
    sink = lab.spawn(["python3", "-c", f"""
import socket, hashlib, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', {SINK})); s.listen(1); print('listening', flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
open('{lab.path('sink.out')}', 'w').write(f'{{n}} {{h.hexdigest()}}')
"""], "sink.log")
    # (Not a probe connection: the sink takes the first connection it gets.)
    deadline = time.time() + 30
    while "listening" not in open(lab.path("sink.log")).read():
        if time.time() > deadline:
            raise SystemExit(f"the sink never listened; logs in {lab.dir}")
        time.sleep(0.05)
    src = f"""
import socket, struct, hashlib, time
s = socket.create_connection(('127.0.0.1', 1081))
s.sendall(b'\\x05\\x01\\x00'); assert s.recv(2) == b'\\x05\\x00'
s.sendall(b'\\x05\\x01\\x00\\x01' + socket.inet_aton('{to_ip}') + struct.pack('>H', {SINK}))
assert s.recv(10)[1] == 0
block = bytes(range(256)) * 256; h = hashlib.sha256(); sent = 0; t = time.time()
while sent < {nbytes}:
    s.sendall(block); h.update(block); sent += len(block)
s.shutdown(socket.SHUT_WR); s.recv(1)
print(time.time() - t, sent, h.hexdigest())
"""
    out = lab.run(*lab.pin_load, "python3", "-c", src, timeout=600).stdout.split()
    sink.wait(timeout=30)
    secs, sent, sha = float(out[0]), int(out[1]), out[2]
    got = open(lab.path("sink.out")).read().split()
    return secs, int(got[0]) == sent and got[1] == sha


def main():
    out_dir, rounds, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pin = "--pin" in sys.argv
    os.makedirs(os.path.join(out_dir, "s8"), exist_ok=True)
    lab = Lab(pin)
    try:
        # ferry once, to create its self-signed certificate; derper serves the same one.
        p = start_relay(lab, "ferry")
        os.makedirs(lab.path("certs"))
        shutil.copy(lab.path("self-signed-cert.pem"), lab.path(f"certs/{HOST}.crt"))
        shutil.copy(lab.path("self-signed-key.pem"), lab.path(f"certs/{HOST}.key"))
        derp_map = lab.run(FERRY, "derpmap", "--format", "headscale", "--listen", f"127.0.0.1:{DERP_PORT}",
                           "--hostname", HOST, "--key-file", lab.path("relay.key"),
                           "--stun-listen", f"127.0.0.1:{STUN_PORT}", "--ipv4", "127.0.0.1").stdout
        open(lab.path("derp.yaml"), "w").write(derp_map)
        stop(p)
        d = lab.dir
        open(lab.path("headscale.yaml"), "w").write(f"""server_url: http://{HEADSCALE}
listen_addr: {HEADSCALE}
metrics_listen_addr: 127.0.0.1:9091
grpc_listen_addr: 127.0.0.1:50443
noise: {{private_key_path: {d}/noise.key}}
prefixes: {{v4: 100.64.0.0/10, v6: "fd7a:115c:a1e0::/48", allocation: sequential}}
derp: {{server: {{enabled: false}}, urls: [], paths: [{d}/derp.yaml], auto_update_enabled: false}}
disable_check_updates: true
database: {{type: sqlite, sqlite: {{path: {d}/hs.sqlite}}}}
log: {{level: warn}}
dns: {{magic_dns: false, base_domain: ferry.test, override_local_dns: false, nameservers: {{global: []}}}}
unix_socket: {d}/hs.sock
logtail: {{enabled: false}}
""")
        hs = [os.path.join(TOOLS, "headscale"), "-c", lab.path("headscale.yaml")]
        lab.spawn(hs + ["serve"], "headscale.log")
        wait_tcp(lab, HEADSCALE)
        lab.run(*hs, "users", "create", "bench")
        key = lab.run(*hs, "preauthkeys", "create", "--user", "1", "--reusable", "--expiration", "2h").stdout.split()[-1]
        relay = start_relay(lab, "ferry")
        ips = []
        env = {"TS_ASSUME_NETWORK_UP_FOR_TEST": "1", "TS_DEBUG_ALWAYS_USE_DERP": "1", "TS_NO_LOGS_NO_SUPPORT": "true"}
        ts = lambda n, *a: lab.run(*lab.pin_load, os.path.join(TOOLS, "tailscale"), "--socket", lab.path(f"n{n}.sock"), *a, timeout=90)
        for n in (1, 2):
            lab.spawn([os.path.join(TOOLS, "tailscaled"), "--tun=userspace-networking",
                       f"--statedir={lab.path(f'n{n}')}", f"--socket={lab.path(f'n{n}.sock')}",
                       f"--port={41640 + n}", "--no-logs-no-support", f"--socks5-server=127.0.0.1:{1080 + n}"],
                      f"tailscaled-{n}.log", env=env)
            while not os.path.exists(lab.path(f"n{n}.sock")):
                time.sleep(0.1)
            ts(n, "up", "--login-server", f"http://{HEADSCALE}", "--authkey", key, "--hostname", f"node{n}", "--timeout", "60s")
            ips.append(ts(n, "ip", "-4").stdout.strip())
        stop(relay)
        versions = {"tailscaled": "v" + sh(os.path.join(TOOLS, "tailscaled"), "--version").stdout.split()[0].split("-")[0],
                    "headscale": open(os.path.join(TOOLS, "headscale.version")).read().strip()}
        for rnd in range(1, rounds + 1):
            order = ["ferry", "derper"] if rnd % 2 else ["derper", "ferry"]
            for name in order:
                relay = start_relay(lab, name)
                deadline = time.time() + 60
                while "via DERP" not in sh(*in_ns(os.path.join(TOOLS, "tailscale"), "--socket", lab.path("n1.sock"),
                                                  "ping", "-c", "1", "--timeout", "2s", ips[1]), check=False).stdout:
                    if time.time() > deadline:
                        raise SystemExit(f"no ping through {name}; logs in {lab.dir}")
                d0, c0 = dropped(lab, name), cpu_seconds(relay.pid)
                secs, ok = transfer(lab, ips[1], mib << 20)
                d1, c1 = dropped(lab, name), cpu_seconds(relay.pid)
                r = {"relay": name, "round": rnd, "bytes": mib << 20, "seconds": secs, "intact": ok,
                     "goodput_mb_per_s": (mib << 20) / secs / 1e6, "relay_cpu_seconds": c1 - c0, "relay_cores": (c1 - c0) / secs,
                     "relay_cpu_seconds_per_gb": (c1 - c0) / ((mib << 20) / 1e9), "relay_drops": d1 - d0,
                     "pinned": pin, **versions}
                json.dump(r, open(os.path.join(out_dir, "s8", f"{name}-r{rnd}.json"), "w"), indent=1)
                log(f"round {rnd} {name:6s}: {r['goodput_mb_per_s']:.1f} MB/s, relay {r['relay_cpu_seconds_per_gb']:.2f} CPU-s/GB, "
                    f"{r['relay_drops']} dropped, intact={ok}")
                stop(relay)
                if not ok:
                    raise SystemExit(f"transfer through {name} arrived changed")
    finally:
        lab.close()


if __name__ == "__main__":
    main()
