#!/usr/bin/env python3
"""Record real traffic on loopback and turn it into fuzz seeds (fuzz/seeds/<target>/).

Runs, with nothing leaving 127.0.0.1: Tailscale's derper (--dev: plain HTTP on :3340, STUN on
:3478) and ferry-relay (--dev on :13340/:13478); coturn's turnutils_stunclient and Debian's
stun client against ferry's STUN; `ferry netcheck` against both relays' STUN; two `ferry ping`
nodes through each relay (DERP upgrade, handshake, E2E packets, disco over the relay and over
direct UDP). A raw packet socket on `lo` (root) records every segment; TCP streams are
reassembled per direction. Each run replaces the recorded seeds (files named by a hash of their
bytes); inputs kept as regression tests live in fuzz/regressions/<target>/ and are not touched.

    sudo scripts/fuzz-seeds.py [--bin target/debug]     (needs .tools/bin/derper)
"""
import argparse, hashlib, os, shutil, socket, struct, subprocess, sys, tempfile, threading, time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DERP_PORTS = {3340, 13340}
STUN_PORTS = {3478, 13478}


def sniff(stop, packets):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind(("lo", 0))
    s.settimeout(0.2)
    while not stop.is_set():
        try:
            data, addr = s.recvfrom(70000)
        except socket.timeout:
            continue
        if addr[2] == 4:  # PACKET_OUTGOING: loopback shows each packet twice
            continue
        packets.append(data)


def parse(packets):
    """-> (tcp: {(src,dst): {seq: payload}}, udp: [(sport, dport, payload)])"""
    tcp, udp = {}, []
    for p in packets:
        if len(p) < 34 or p[12:14] != b"\x08\x00":
            continue
        ip = p[14:]
        ihl = (ip[0] & 15) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        proto, body = ip[9], ip[ihl:total]
        if proto == 17:
            sport, dport = struct.unpack("!HH", body[:4])
            udp.append((sport, dport, body[8:]))
        elif proto == 6:
            sport, dport, seq = struct.unpack("!HHI", body[:8])
            off = (body[12] >> 4) * 4
            if len(body) > off:
                tcp.setdefault((sport, dport), {})[seq] = body[off:]
    return tcp, udp


def stream(segs):
    out = b""
    for seq in sorted(segs):
        out += segs[seq]
    return out


def save(target, data, prefix=b""):
    d = os.path.join(REPO, "fuzz", "seeds", target)
    os.makedirs(d, exist_ok=True)
    data = prefix + data
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)


def frames(buf):
    """Split a DERP byte stream into (type, payload)."""
    out = []
    while len(buf) >= 5:
        t, n = buf[0], struct.unpack("!I", buf[1:5])[0]
        if len(buf) < 5 + n:
            break
        out.append((t, buf[5:5 + n]))
        buf = buf[5 + n:]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=os.path.join(REPO, "target", "debug"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (a raw packet socket on lo)")
    ferry, relay = os.path.join(a.bin, "ferry"), os.path.join(a.bin, "ferry-relay")
    derper = os.path.join(REPO, ".tools", "bin", "derper")
    stop, packets = threading.Event(), []
    th = threading.Thread(target=sniff, args=(stop, packets))
    th.start()
    time.sleep(0.3)
    tmp = tempfile.mkdtemp()
    procs = [
        subprocess.Popen([derper, "--dev"], cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([relay, "--dev", "--listen", "127.0.0.1:13340", "--stun-listen", "127.0.0.1:13478",
                          "--metrics-listen", "off", "--key-file", os.path.join(tmp, "relay.key")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        time.sleep(1.5)
        run = lambda *c: subprocess.run(list(c), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        run("turnutils_stunclient", "-p", "13478", "127.0.0.1")
        run("stun", "127.0.0.1", "-p", "13478", "-v")
        for port in (3340, 13340):
            url = f"http://127.0.0.1:{port}"
            run(ferry, "netcheck", "--relay", url)
            bkey = os.path.join(tmp, f"b{port}.key")
            out = subprocess.run([ferry, "keygen", "--out", bkey], capture_output=True, text=True).stdout
            peer = out.split()[-1]
            listener = subprocess.Popen([ferry, "ping", "--listen", "--key-file", bkey, "--relay", url],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            run(ferry, "ping", peer, "--relay", url, "--count", "3", "--interval", "0.5",
                "--payload", "fuzz seed")
            listener.terminate()
            listener.wait()
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        time.sleep(0.3)
        stop.set()
        th.join()

    tcp, udp = parse(packets)
    shutil.rmtree(os.path.join(REPO, "fuzz", "seeds"), ignore_errors=True)
    counts = {}
    def add(t, data, prefix=b""):
        save(t, data, prefix)
        counts[t] = counts.get(t, 0) + 1
    for (sport, dport), segs in tcp.items():
        data = stream(segs)
        if not data:
            continue
        head_end = data.find(b"\r\n\r\n")
        if dport in DERP_PORTS and head_end >= 0:  # client -> relay
            for listener in (b"\x00", b"\x01", b"\x02"):  # DERP, port 80, metrics
                add("http_request", data, listener)
            body = data[head_end + 4:]
            add("derp_client_frames", body, b"\xff")
            add("derp_client_frames", body, b"\x07")
            for t, payload in frames(body):
                if t == 0x02:  # ClientInfo: key, nonce, box
                    add("derp_server_handshake", payload, b"\x00")
                if t == 0x04 and len(payload) > 32:  # SendPacket: disco or E2E inside
                    inner = payload[32:]
                    if inner.startswith(b"TS\xf0\x9f\x92\xac"):
                        add("disco", inner, b"\x00")
        elif sport in DERP_PORTS and head_end >= 0:  # relay -> client
            add("derp_client_handshake", data, b"\xff\x01")
            add("derp_server_frames", data[head_end + 4:], b"\xff")
    for sport, dport, payload in udp:
        if dport in STUN_PORTS or sport in STUN_PORTS:
            add("stun_message", payload)
            if dport in STUN_PORTS:
                # Input{tcp, software, grid: None, v6, ip, port, request}
                add("stun_handler", payload, b"\x00\x00\x00\x00" + bytes([127, 0, 0, 1] + [0] * 12) + b"\x30\x39")
        elif payload.startswith(b"TS\xf0\x9f\x92\xac"):
            add("disco", payload, b"\x00")
    # The relay map parser: what `ferry-relay derpmap` prints, and the test suite's map files.
    out = subprocess.run([relay, "derpmap", "--dev", "--hostname", "127.0.0.1", "--format", "json"],
                         capture_output=True).stdout
    if out:
        add("relay_map", out)
    for root, _, files in os.walk(os.path.join(REPO, "client-lib", "tests")):
        for f in files:
            if f.endswith(".json"):
                add("relay_map", open(os.path.join(root, f), "rb").read())
    # The config loader: the example file every key is documented in.
    add("config_toml", open(os.path.join(REPO, "relay", "ferry-relay.example.toml"), "rb").read())
    for t, n in sorted(counts.items()):
        print(f"{t}: {n} seeds")
    if not counts:
        sys.exit("no traffic recorded")


if __name__ == "__main__":
    main()
