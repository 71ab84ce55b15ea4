#!/usr/bin/env python3
"""Turns the JSON reports of bench/run.sh into docs/benchmarks.md and its SVG charts.

    python3 bench/report.py OUT_DIR DOCS_DIR [NAME]

NAME (default benchmarks.md) is the file written in DOCS_DIR: a run of some scenarios only
(SCENARIOS=9 bench/run.sh) goes to a report of its own (REPORT_NAME=...), so the full report
is only ever written from a full run.

OUT_DIR holds machine.txt, rate3.txt and s1/ .. s6/ with one ferry-loadtest (or iroh-load)
JSON report per server and round. Medians over rounds are reported; every round is listed too.
"""

import json
import re
import os
import statistics
import sys
from glob import glob

OUT, DOCS = sys.argv[1], sys.argv[2]
REPORT_NAME = sys.argv[3] if len(sys.argv) > 3 else "benchmarks.md"
# Chart files: bench-*.svg for the full report; a partial report's carry its name, so that it
# never overwrites the full report's charts.
CHART = "bench-" if REPORT_NAME == "benchmarks.md" else REPORT_NAME[: -len(".md")] + "-"
NAMES = {"ferry": "ferry-relay", "derper": "derper", "iroh": "iroh-relay", "coturn": "coturn",
         "ferryplain": "ferry-relay (plain HTTP)", "ferryrustls": "ferry-relay (TLS, tokio-rustls records)", "derperplain": "derper (plain HTTP)",
         "hyperderp": "Hyper-DERP (plain HTTP)", "ferrygso": "ferry-relay (clients send UDP GSO)",
         "coturngso": "coturn (clients send UDP GSO)"}
COLORS = {"ferry": "#1f77b4", "derper": "#d62728", "iroh": "#2ca02c", "coturn": "#9467bd",
          "ferryplain": "#9ecae1", "derperplain": "#fc9272", "hyperderp": "#ff7f0e", "ferrygso": "#17becf",
          "ferryrustls": "#6baed6", "coturngso": "#c5b0d5"}
# Report order; the plain-HTTP rows (scenarios 1 and 2, issue 17) after the TLS ones.
SERVERS = ("ferry", "ferryrustls", "derper", "iroh", "coturn", "ferryplain", "derperplain", "hyperderp",
           "ferrygso", "coturngso")


def machine():
    m = {}
    for line in open(os.path.join(OUT, "machine.txt")):
        k, _, v = line.strip().partition("=")
        if k == "note":
            m.setdefault("notes", []).append(v)
        else:
            m[k] = v
    return m


def runs(scenario, prefix=""):
    """{server: [report, ...]} for one scenario, in round order."""
    by = {}
    for f in sorted(glob(os.path.join(OUT, f"s{scenario}", f"*{prefix}-r*.json"))):
        base = os.path.basename(f)
        server = base.split("-")[0]
        if prefix and f"-{prefix.strip('-')}-" not in base:
            continue
        try:
            by.setdefault(server, []).append(json.load(open(f)))
        except json.JSONDecodeError:
            pass
    return by


def get(r, *path):
    for p in path:
        if r is None:
            return None
        r = r.get(p)
    return r


def med(reports, *path):
    vals = [get(r, *path) for r in reports]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(x, digits=0):
    if x is None:
        return "—"
    return f"{x:,.{digits}f}"


def ratio(a, b):
    if a is None or b in (None, 0):
        return "—"
    return f"**{a / b:.2f}×**"


def order(servers):
    return [s for s in SERVERS if s in servers]


# --------------------------------------------------------------------------------------------
# SVG charts (hand-written: no plotting library needed).

def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def bar_chart(path, title, groups, unit):
    """groups: [(label, {server: value})]; one panel, grouped bars."""
    servers = order({s for _, vals in groups for s in vals})
    W, H, L, T, PH = 900, 360, 90, 60, 220
    n = max(len(groups), 1)
    gw = (W - L - 40) / n
    bw = min(60, gw * 0.8 / max(len(servers), 1))
    vmax = max([v for _, vals in groups for v in vals.values() if v is not None] + [1]) * 1.15
    y = lambda v: T + PH - v / vmax * PH
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="20" y="28" font-size="16" font-weight="bold">{esc(title)}</text>']
    for i in range(5):
        v = vmax / 1.15 * i / 4
        out.append(f'<line x1="{L}" y1="{y(v):.1f}" x2="{W-40}" y2="{y(v):.1f}" stroke="#eee"/>'
                   f'<text x="{L-6}" y="{y(v)+4:.1f}" text-anchor="end" fill="#444">{esc(fmt(v))}</text>')
    out.append(f'<text x="14" y="{T + PH/2}" transform="rotate(-90 14 {T + PH/2})" text-anchor="middle" fill="#444">{esc(unit)}</text>')
    for gi, (label, vals) in enumerate(groups):
        x0 = L + gi * gw + (gw - bw * len(servers)) / 2
        for si, s in enumerate(servers):
            v = vals.get(s)
            if v is None:
                continue
            x = x0 + si * bw
            out.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bw*0.9:.1f}" height="{T+PH-y(v):.1f}" fill="{COLORS[s]}"/>'
                       f'<text x="{x+bw*0.45:.1f}" y="{y(v)-4:.1f}" text-anchor="middle" font-size="10">{esc(fmt(v))}</text>')
        out.append(f'<text x="{L + gi*gw + gw/2:.1f}" y="{T+PH+18}" text-anchor="middle">{esc(label)}</text>')
    for si, s in enumerate(servers):
        # Legend: four to a row (the plain-HTTP names are long).
        rows = (len(servers) + 3) // 4
        lx, ly = L + (si % 4) * 190, H - 30 - 18 * (rows - 1 - si // 4)
        out.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{COLORS[s]}"/>'
                   f'<text x="{lx + 18}" y="{ly + 10}">{esc(NAMES[s])}</text>')
    out.append("</svg>")
    open(path, "w").write("\n".join(out) + "\n")


def curve_chart(path, title, series):
    """series: {server: [[percentile, us], ...]}: latency by percentile, log y."""
    import math
    W, H, L, T, PW, PH = 900, 380, 90, 60, 760, 250
    nines = lambda p: 5.0 if p >= 100 else min(5.0, -math.log10(1 - p / 100))
    pts = [us for s in series.values() for _, us in s]
    lo = math.floor(math.log10(max(min(pts), 0.1)))
    hi = max(math.ceil(math.log10(max(pts))), lo + 1)
    x = lambda p: L + nines(p) / 5 * PW
    y = lambda us: T + PH - (math.log10(max(us, 0.1)) - lo) / (hi - lo) * PH
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="20" y="28" font-size="16" font-weight="bold">{esc(title)}</text>',
           f'<rect x="{L}" y="{T}" width="{PW}" height="{PH}" fill="none" stroke="#888"/>']
    for d in range(lo, hi + 1):
        us = 10 ** d
        label = f"{us:g} µs" if us < 1000 else f"{us/1000:g} ms"
        out.append(f'<line x1="{L}" y1="{y(us):.1f}" x2="{L+PW}" y2="{y(us):.1f}" stroke="#eee"/>'
                   f'<text x="{L-6}" y="{y(us)+4:.1f}" text-anchor="end" fill="#444">{label}</text>')
    for p, label in [(0, "0"), (90, "90"), (99, "99"), (99.9, "99.9"), (99.99, "99.99"), (99.999, "99.999")]:
        out.append(f'<line x1="{x(p):.1f}" y1="{T}" x2="{x(p):.1f}" y2="{T+PH}" stroke="#eee"/>'
                   f'<text x="{x(p):.1f}" y="{T+PH+16}" text-anchor="middle" fill="#444">{label}</text>')
    out.append(f'<text x="{L+PW/2}" y="{T+PH+36}" text-anchor="middle" fill="#444">percentile</text>')
    for i, (s, curve) in enumerate(series.items()):
        p = " ".join(f"{x(pc):.1f},{y(us):.1f}" for pc, us in curve)
        out.append(f'<polyline points="{p}" fill="none" stroke="{COLORS[s]}" stroke-width="2"/>')
        out.append(f'<rect x="{L + 10}" y="{T + 10 + 18*i}" width="12" height="3" fill="{COLORS[s]}"/>'
                   f'<text x="{L + 28}" y="{T + 16 + 18*i}">{esc(NAMES[s])}</text>')
    out.append("</svg>")
    open(path, "w").write("\n".join(out) + "\n")


# --------------------------------------------------------------------------------------------

m = machine()
# AEAD speeds were read before and after the scenarios: the ceiling is the higher reading (a
# lower one means the host was busier then), and the table shows both.
for k in [k for k in m if k.startswith("aead_") and not k.endswith("_after")]:
    after = m.get(k + "_after")
    try:
        before_v, after_v = float(m[k]), float(after) if after else None
    except ValueError:
        continue
    if after_v:
        m[k + "_both"] = f"{before_v / 1e6:,.0f} MB/s before the scenarios, {after_v / 1e6:,.0f} MB/s after"
        m[k] = str(max(before_v, after_v))
if m.get("cpu_stat_before") and m.get("cpu_stat_after"):
    a = [int(x) for x in m["cpu_stat_before"].split()[1:]]
    b = [int(x) for x in m["cpu_stat_after"].split()[1:]]
    total = sum(y - x for x, y in zip(a, b))
    m["other_cpu"] = f"{100 * (b[1] - a[1]) / total:.1f} % of both CPUs ({m.get('date', '?')} to {m.get('date_end', '?')})" if total else "?"
date = m.get("date", "?")[:10]
knobs = dict(kv.split("=", 1) for kv in m.get("rounds", "").split() if "=" in kv)
doc = []
w = doc.append
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPORT_NAME == "benchmarks.md":
    w("# ferry benchmarks\n")
else:
    ran = sorted(d[1:] for d in os.listdir(OUT) if d.startswith("s") and d[1:].isdigit())
    w(f"# ferry benchmarks: scenario{'s' if len(ran) > 1 else ''} {', '.join(ran)} only\n")
    w("A run of some scenarios (`SCENARIOS=... bench/run.sh`); the full report, from a full run on its "
      "own machine, is [benchmarks.md](benchmarks.md). Same-run ratios only: absolute figures move 2–3× "
      "between machines.\n")
w(f"Every figure here comes from one run of `bench/run.sh` on **{m.get('date','?')}** (UTC), on the "
  f"machine below; raw JSON reports were in `{os.path.relpath(OUT, ROOT)}/`. The report is written by "
  "`bench/report.py` from those files; nothing is typed in by hand. Medians over rounds; every "
  "round is listed under each scenario.\n")
w("## Machine and versions\n")
w("| | |\n| --- | --- |")
for k, label in [("nproc", "CPUs"), ("cpu", "CPU model"), ("kernel", "kernel"), ("rustc", "Rust"),
                 ("ferry", "ferry (git HEAD)"), ("ferry_relay_commit", "last commit to relay/ or stun/ (the code measured)"), ("derper", "Tailscale derper (`derper -version`)"),
                 ("iroh", "iroh-relay"), ("coturn", "coturn (Debian)"),
                 ("hyperderp", "Hyper-DERP (built out of tree; plain HTTP, `--workers 1`)"),
                 ("loadavg_before", "load average before the run"), ("loadavg_after", "load average after the run"),
                 ("other_cpu", "CPU time of niced processes (other builds) during the run"),
                 ("pinned", "CPU pinning (servers / load generator)"),
                 ("cpu_flags", "CPU crypto instructions"),
                 ("aead_aes_128_gcm_1237", "AES-128-GCM, one core, 1,237-byte records (openssl speed -evp), bytes/s"),
                 ("aead_aes_128_gcm_16384", "AES-128-GCM, 16 KiB records, bytes/s"),
                 ("aead_aes_256_gcm_1237", "AES-256-GCM, 1,237-byte records, bytes/s"),
                 ("aead_aes_256_gcm_16384", "AES-256-GCM, 16 KiB records, bytes/s"),
                 ("aead_chacha20_poly1305_1237", "ChaCha20-Poly1305, 1,237-byte records, bytes/s"),
                 ("rounds", "rounds and durations")]:
    if k == "hyperderp" and not m.get(k):
        continue  # not asked for (HYPERDERP unset)
    v = m.get(k, '?')
    if k.startswith("aead_") and m.get(k + "_both"):
        v = f"{float(v):,.0f} (the higher of {m[k + '_both']})"
    w(f"| {label} | {esc(v)} |")
w("")
w("## How it was run\n")
w("```sh\nbench/run.sh          # ROUNDS=3 RUN_SECONDS=8 WARMUP=2 IDLE_CLIENTS=10000 WINDOW=16 by default\n```\n")
for note in machine().get("notes", []):
    # `note=` lines in machine.txt: what the person who ran it wrote down about this run.
    w(f"- **Note on this run (written by whoever ran it, not measured):** {note}")
if machine().get("notes"):
    w("")
w("`bench/run.sh` builds ferry in release mode, installs what is missing (derper via "
  "`scripts/test-deps.sh`, coturn with apt-get, `cargo install iroh-relay --features server`), makes a "
  "throw-away CA and one certificate for localhost/127.0.0.1, and serves it from every relay:\n")
w("```sh")
w("taskset -c 0 target/release/ferry-relay --hostname localhost --listen 127.0.0.1:18443 --http-listen off \\\n"
  "    --metrics-listen 127.0.0.1:19090 --stun-listen 127.0.0.1:13478 --key-file K \\\n"
  "    --cert-mode manual --cert-file localhost.crt --cert-key-file localhost.key --log-level warn")
w("taskset -c 0 derper -a 127.0.0.1:28443 -certmode manual -certdir DIR -hostname localhost -http-port -1 -stun-port 23478")
w("taskset -c 0 iroh-relay --config-path iroh.toml   # https 127.0.0.1:30443, manual cert, no QUIC, no metrics")
w("taskset -c 0 turnserver -n --no-auth -S -L 127.0.0.1 -p 31478 --no-tls --no-dtls --no-cli --no-rfc5780 -m 1")
if glob(os.path.join(OUT, "s1", "*plain*")) or glob(os.path.join(OUT, "s2", "*plain*")):
    w("# plain HTTP rows (scenarios 1 and 2): TLS's cost per relay, and the peer that has no TLS here")
    w("taskset -c 0 target/release/ferry-relay --dev --listen 127.0.0.1:18340 ... --udp-relay-listen off")
    w("taskset -c 0 derper -a 127.0.0.1:28340 -certmode letsencrypt -hostname localhost -http-port -1   # not :443: plain HTTP")
if m.get("hyperderp"):
    w("LD_PRELOAD=loopback-bind.so taskset -c 0 hyper-derp --port 29340 --workers 1   # binds 0.0.0.0; the shim (bench/loopback-bind.c) makes it 127.0.0.1")
w("```\n")
w("The load generator runs on the other core: `ferry-loadtest` (this repository, `loadtest/`) for "
  "ferry, derper, coturn, and `bench/iroh-load` (the iroh-relay crate's own client) for iroh-relay, "
  "whose protocol is not DERP. Every relay round starts fresh server processes, and the order of "
  "servers alternates from round to round. Queue depths: ferry and derper both queue 32 packets per "
  "receiver (derper's default, ferry's default matches it); iroh-relay runs with its defaults. "
  "Server CPU (utime+stime) over the measured window and peak RSS (VmHWM) come from /proc, so "
  "*per server CPU-second* figures do not depend on how much CPU the load generator left over.\n")

goals = []

def pct(num, den):
    return f"{100 * num / den:.3g} %" if den else "—"


def sum_of(rs, *path):
    vals = [get(r, *path) for r in rs]
    return sum(v for v in vals if v is not None) if any(v is not None for v in vals) else None


def ratio_goal(n, by, what):
    """Ratio lines ferry/peer for a throughput scenario; the goal row against derper."""
    f = by.get("ferry", [])
    for peer in ("derper", "iroh"):
        if f and peer in by:
            a, b = med(f, "packets", "delivered_per_second"), med(by[peer], "packets", "delivered_per_second")
            c, d = med(f, "server", "per_cpu_second"), med(by[peer], "server", "per_cpu_second")
            w(f"- ferry / {NAMES[peer]}: {what} packets/s {ratio(a, b)}, per server CPU-second {ratio(c, d)}")
            if peer == "derper" and n in (1, 2):
                goals.append((f"scenario {n}: ferry/derper ≥ 2× packets/s (capacity, closed loop)",
                              f"{a/b:.2f}× packets/s ({fmt(a)} vs {fmt(b)}), {c/d:.2f}× per server CPU-s" if a and b and c and d else "—",
                              "met" if a and b and a / b >= 2 else "not met"))
                goals.append((f"scenario {n}: ferry-TLS/derper-TLS ≥ 2.5× packets per server CPU-second (issue 17)",
                              f"{c/d:.2f}× ({fmt(c)} vs {fmt(d)})" if c and d else "—",
                              "met" if c and d and c / d >= 2.5 else "not met"))
    # Issue 17: what TLS costs (each relay against itself in plain HTTP), and ferry against
    # Hyper-DERP, which runs in plain HTTP only here (kernel TLS only; this kernel has none).
    cpu = {s: med(by[s], "server", "per_cpu_second") for s in by}
    if cpu.get("ferry") and cpu.get("ferryrustls"):
        w(f"- {NAMES['ferry']} (its own TLS record layer) / {NAMES['ferryrustls']}: per server CPU-second "
          f"{ratio(cpu['ferry'], cpu['ferryrustls'])}")
    if cpu.get("ferryrustls") and cpu.get("ferryplain"):
        w(f"- {NAMES['ferryrustls']} / plain HTTP: per server CPU-second {ratio(cpu['ferryrustls'], cpu['ferryplain'])}")
    for tls, plain in (("ferry", "ferryplain"), ("derper", "derperplain")):
        if cpu.get(tls) and cpu.get(plain):
            w(f"- {NAMES[tls]} TLS / plain HTTP: per server CPU-second {ratio(cpu[tls], cpu[plain])}")
            if tls == "ferry" and n == 1:
                goals.append(("scenario 1: ferry-TLS / ferry-plain ≥ 0.75 per server CPU-second (issue 17)",
                              f"{cpu[tls]/cpu[plain]:.2f} ({fmt(cpu[tls])} vs {fmt(cpu[plain])})",
                              "met" if cpu[tls] / cpu[plain] >= 0.75 else "not met"))
    if n in (1, 2) and cpu.get("ferryplain"):
        for peer in ("derperplain", "hyperderp"):
            if cpu.get(peer):
                a, b = med(by["ferryplain"], "packets", "delivered_per_second"), med(by[peer], "packets", "delivered_per_second")
                w(f"- {NAMES['ferryplain']} / {NAMES[peer]}: {what} packets/s {ratio(a, b)}, "
                  f"per server CPU-second {ratio(cpu['ferryplain'], cpu[peer])}")
        h = cpu.get("hyperderp")
        goals.append((f"scenario {n}: ferry-plain / Hyper-DERP-plain ≥ 1.2× per server CPU-second (issue 17)",
                      f"{cpu['ferryplain']/h:.2f}× ({fmt(cpu['ferryplain'])} vs {fmt(h)})" if h else
                      "not measured: Hyper-DERP did not run (HYPERDERP unset; see docs/notes-tls-perf.md)",
                      ("met" if cpu["ferryplain"] / h >= 1.2 else "not met") if h else "not measured"))


def relay_capacity(n, title, size):
    by = runs(n)
    if not by:
        return
    window = knobs.get("window", "?")
    w(f"## {n}. {title}\n")
    w(f"`ferry-loadtest derp URL --clients 16 --size {size} --window {window} --warmup {knobs.get('warmup', '?')}s "
      f"--duration {knobs.get('run_seconds', '?')}s`: 8 pairs over TLS (the *plain HTTP* rows: the same without TLS, `http://` URLs), **closed loop**: each sender keeps at most "
      f"{window} packets in flight to its receiver (sent and not yet read; the receiver task wakes the sender "
      "as packets arrive), so a relay is offered only what it forwards (no overload), and no receive queue (32 packets in "
      "ferry and derper) can overflow. *Delivered* counts packets read by their receivers in the measured "
      "window; *lost* is exact (end-of-run drain: sent = received + dropped by the relay); *window timeouts* "
      "count windows that saw no progress for 200 ms and were written off (a relay dropping the tail of a window).\n")
    w("| server | rounds | delivered packets/s | payload MB/s | server cores | delivered per server CPU-second | lost / sent | window timeouts | one-way p50 | one-way p99 | peak RSS |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in order(by):
        rs = by[s]
        lost, sent = sum_of(rs, "packets", "lost"), sum_of(rs, "packets", "sent")
        w(f"| {NAMES[s]} | {len(rs)} | {fmt(med(rs,'packets','delivered_per_second'))} | "
          f"{fmt((med(rs,'packets','delivered_bytes_per_second') or 0)/1e6,1)} | {fmt(med(rs,'server','cores'),2)} | "
          f"{fmt(med(rs,'server','per_cpu_second'))} | {fmt(lost)} / {fmt(sent)} ({pct(lost or 0, sent)}) | "
          f"{fmt(sum_of(rs,'packets','window_timeouts'))} | {fmt(med(rs,'latency','one_way','p50_us'))} µs | "
          f"{fmt(med(rs,'latency','one_way','p99_us'))} µs | {fmt((med(rs,'server','peak_rss_bytes') or 0)/2**20,1)} MiB |")
    w("")
    ratio_goal(n, by, "delivered")
    if size == 1200 and m.get("aead_aes_128_gcm_1237"):
        # Issue 17: forwarded TLS bytes per server CPU-second against the machine's AEAD
        # throughput. Each packet is a 1,237-byte DERP frame read (decrypted) from the sender's
        # connection and written (encrypted) to the receiver's: two AEAD passes per byte, so
        # the ceiling is the AEAD's bytes/s divided by two.
        w("\n*Against the crypto ceiling* (issue 17): a forwarded 1,200-byte packet is a 1,237-byte DERP "
          "frame decrypted once and encrypted once, so a core could forward at most (AEAD bytes/s at "
          "1,237-byte records) / 2 bytes per second if it did nothing else. The relay picks its AEAD: ferry "
          "AES-128-GCM on CPUs with AES instructions (since issue 17); derper follows the client's order, "
          "and ferry-loadtest (rustls) offers AES-256-GCM first.\n")
        for s_, aead in (("ferry", "aes_128_gcm"), ("derper", "aes_256_gcm"), ("iroh", "aes_256_gcm")):
            if s_ in by and m.get(f"aead_{aead}_1237"):
                pcs = med(by[s_], "server", "per_cpu_second") or 0
                ceiling = float(m[f"aead_{aead}_1237"]) / 2
                frac = pcs * 1237 / ceiling if ceiling else 0
                w(f"- {NAMES[s_]}: {fmt(pcs * 1237 / 1e6)} MB/s of frames forwarded per server CPU-second = "
                  f"**{100 * frac:.0f} %** of the {aead.replace('_', '-').upper()} ceiling ({fmt(ceiling / 1e6)} MB/s)")
                if s_ == "ferry":
                    goals.append(("scenario 1: ferry's forwarded bytes per server CPU-second ≥ 50 % of the crypto ceiling",
                                  f"{100 * frac:.0f} % (AES-128-GCM at 1,237 B: {fmt(float(m[f'aead_{aead}_1237']) / 1e6)} MB/s per core)",
                                  "met" if frac >= 0.5 else "not met"))
        a16 = float(m.get("aead_aes_128_gcm_16384") or 0)
        plain = [get(r, "server", "per_cpu_second") for r in by.get("ferryplain", [])]
        plain = [p for p in plain if p]
        if a16 and plain and by.get("ferry"):
            # Issue 17's TLS/plain and plain/Hyper-DERP goals, against the AEAD's speed. A TLS
            # relay does the plain relay's work (the same frames, the same sockets) plus two AEAD
            # passes per frame; the cheapest passes are at 16 KiB records (ferry coalesces
            # frames into records up to that size). So ferry-TLS per CPU-second is at most
            # 1 / (1/P + c), P = ferry-plain per CPU-second, c = 2 x 1,237 / AEAD(16 KiB), and
            # TLS/plain is at most 1 / (1 + c P).
            c = 2 * 1237 / a16
            best = max(plain)
            tls = med(by["ferry"], "server", "per_cpu_second")
            bound = 1 / (1 / best + c)
            w(f"\n*What the AEAD allows* (issue 17): ferry-TLS does ferry-plain's work per packet plus two "
              f"AES-128-GCM passes over 1,237 bytes, cheapest at 16 KiB records ({fmt(a16 / 1e6)} MB/s per core "
              f"here): {c * 1e6:.3f} µs per packet. ferry-plain's fastest round here ({fmt(best)} per server "
              f"CPU-second, {1e6 / best:.3f} µs per packet) thus bounds ferry-TLS at {fmt(bound)} per server "
              f"CPU-second; it measured {fmt(tls)}, **{100 * tls / bound:.0f} %** of that bound.")
            h = med(by.get("hyperderp", []), "server", "per_cpu_second")
            limit = 1 / (3 * c)
            line = (f"TLS / plain ≥ 0.75 needs 1 / (1 + c × plain) ≥ 0.75, that is ferry-plain at most "
                    f"1 / (3c) = {fmt(limit)} per server CPU-second on this machine")
            if h:
                line += (f"; ferry-plain / Hyper-DERP ≥ 1.2× needs it at least {fmt(1.2 * h)}. "
                         + ("So on this machine the two goals exclude each other: a run meets both only if "
                            "its plain rounds are slower than its TLS rounds allow, as in the slow plain-HTTP "
                            "rounds seen on this machine (docs/notes-tls-perf.md)." if 1.2 * h > limit else
                            "Both can hold here."))
            w(f"- {line}")
    w("\n<details><summary>every round</summary>\n")
    w("| server | round | delivered/s | server cores | per server CPU-s | lost/sent | window timeouts (written off) | generator CPU-s |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in order(by):
        for i, r in enumerate(by[s], 1):
            p, sv = r["packets"], r.get("server") or {}
            w(f"| {NAMES[s]} | {i} | {fmt(p['delivered_per_second'])} | {fmt(sv.get('cores'),2)} | "
              f"{fmt(sv.get('per_cpu_second'))} | {p['lost']:,}/{p['sent']:,} | {fmt(p.get('window_timeouts'))} ({fmt(p.get('written_off'))}) | "
              f"{fmt(get(r,'client','cpu_seconds'),1)} |")
    w("\n</details>\n")
    return by


def relay_drops(path):
    """{reason: packets} from a .drops file (ferry's metrics or derper's varz lines)."""
    import re
    out = {}
    if not os.path.exists(path):
        return None
    for line in open(path):
        m = re.match(r'^\S+\{([^}]*)\}\s+(\S+)', line.strip())
        if not m:
            continue
        reason = re.search(r'reason="([^"]+)"', m.group(1))
        if reason:
            out[reason.group(1)] = out.get(reason.group(1), 0) + int(float(m.group(2)))
    return out


def overload():
    sizes = [sz for sz in ("1200", "64") if runs(7, f"-{sz}")]
    if not sizes:
        return None
    w("## 7. Overload: floods, 8 pairs (open loop)\n")
    w(f"`ferry-loadtest derp URL --clients 16 --size SIZE --warmup {knobs.get('warmup', '?')}s "
      f"--duration {knobs.get('run_seconds', '?')}s` (no --window, no --rate): every sender writes as fast as TCP "
      "takes it. A relay that reads packets faster than it can forward them drops the excess at the receivers' "
      "queues; one that reads only about as fast as it forwards pushes back on the senders through TCP and drops "
      "little (the *lost* column says which). This is not capacity (scenarios 1 and 2 are): *delivered* is goodput under overload, and it shows how "
      "a relay behaves when overloaded and whether its drops are counted. *Counted by the relay* is the "
      "relay's own drop counter after the run (ferry: `ferry_relay_packets_dropped_total` from its metrics "
      "listener; derper: `derp_packets_dropped` from `/debug/varz`), every reason except `write_error`, "
      "which both count at teardown when the load generator closes its connections; ferry-loadtest's *lost* "
      "is exact, so the two must be equal.\n")
    result = {}
    all_exact = []
    for sz in sizes:
        by = runs(7, f"-{sz}")
        result[sz] = by
        w(f"### {sz}-byte packets\n")
        w("| server | rounds | delivered (goodput) packets/s | offered (sent) packets/s | server cores | delivered per server CPU-second | lost / sent | counted by the relay | write_error at teardown |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for s in order(by):
            rs = by[s]
            lost, sent = sum_of(rs, "packets", "lost"), sum_of(rs, "packets", "sent")
            counted, teardown, have = 0, 0, s in ("ferry", "derper")
            for i in range(1, len(rs) + 1):
                d = relay_drops(os.path.join(OUT, "s7", f"{s}-{sz}-r{i}.drops"))
                if d is None:
                    have = False
                    continue
                counted += sum(v for k, v in d.items() if k != "write_error")
                teardown += d.get("write_error", 0)
            if have and s == "ferry":
                exact = all(get(r, "packets", "drain_complete") for r in rs) and counted == lost
                all_exact.append((sz, counted, lost, exact))
            w(f"| {NAMES[s]} | {len(rs)} | {fmt(med(rs,'packets','delivered_per_second'))} | {fmt(med(rs,'packets','sent_per_second'))} | "
              f"{fmt(med(rs,'server','cores'),2)} | {fmt(med(rs,'server','per_cpu_second'))} | {fmt(lost)} / {fmt(sent)} ({pct(lost or 0, sent)}) | "
              f"{fmt(counted) + (' (= lost)' if counted == lost else ' (≠ lost)') if have else '—'} | {fmt(teardown) if have else '—'} |")
        w("")
        ratio_goal(7, by, "goodput")
        w("")
    if all_exact:
        ok = all(e for *_, e in all_exact)
        goals.append(("overload: drops counted in metrics, never silent (ferry)",
                      "; ".join(f"{sz} B: relay counted {fmt(c)}, load generator lost {fmt(l)}" for sz, c, l, _ in all_exact),
                      "met" if ok else "not met"))
    w("<details><summary>every round</summary>\n")
    w("| size | server | round | delivered/s | sent/s | server cores | per server CPU-s | lost/sent | counted by the relay |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for sz, by in result.items():
        for s in order(by):
            for i, r in enumerate(by[s], 1):
                p, sv = r["packets"], r.get("server") or {}
                d = relay_drops(os.path.join(OUT, "s7", f"{s}-{sz}-r{i}.drops"))
                c = sum(v for k, v in d.items() if k != "write_error") if d is not None else None
                w(f"| {sz} | {NAMES[s]} | {i} | {fmt(p['delivered_per_second'])} | {fmt(p.get('sent_per_second'))} | {fmt(sv.get('cores'),2)} | "
                  f"{fmt(sv.get('per_cpu_second'))} | {p['lost']:,}/{p['sent']:,} | {fmt(c)} |")
    w("\n</details>\n")
    groups = []
    for sz, by in result.items():
        groups.append((f"{sz} B: goodput/s", {s: med(by[s], "packets", "delivered_per_second") for s in by}))
        groups.append((f"{sz} B: per server CPU-s", {s: med(by[s], "server", "per_cpu_second") for s in by}))
    bar_chart(os.path.join(DOCS, CHART + "overload.svg"), f"Goodput under overload, 8 pairs flooding (median of rounds, {date})", groups, "packets")
    w(f"![overload]({CHART}overload.svg)\n")
    return result


s1 = relay_capacity(1, "Capacity, 1200-byte packets, 8 pairs, closed loop", 1200)
s2 = relay_capacity(2, "Capacity, 64-byte packets, 8 pairs, closed loop", 64)
groups = []
for n, by in ((1, s1), (2, s2)):
    if by:
        groups.append((f"{'1200' if n == 1 else '64'} B: packets/s", {s: med(by[s], "packets", "delivered_per_second") for s in by}))
        groups.append((f"{'1200' if n == 1 else '64'} B: per server CPU-s", {s: med(by[s], "server", "per_cpu_second") for s in by}))
if groups:
    bar_chart(os.path.join(DOCS, CHART + "throughput.svg"), f"Relay capacity, 8 pairs, closed loop, window {knobs.get('window', '?')} (median of rounds, {date})", groups, "packets")
    w(f"![throughput]({CHART}throughput.svg)\n")

by = runs(3)
if by:
    rate = open(os.path.join(OUT, "rate3.txt")).read().strip() if os.path.exists(os.path.join(OUT, "rate3.txt")) else "?"
    w("## 3. Round-trip latency at a fixed rate\n")
    w(f"`ferry-loadtest derp URL --clients 16 --size 1200 --echo --rate {rate}`: 8 senders share "
      f"{int(rate):,} packets/s and every receiver sends each packet straight back, so each relay carries "
      f"{2*int(rate):,} packets/s, half of derper's median capacity in scenario 1 of this run (closed loop). "
      "Latency is measured by the sender on one clock (open loop at a fixed rate, so queues do not hide delay). "
      "The rate is paced by a 1 ms timer, so packets leave in small bursts; packets a relay drops have no round "
      "trip and are not in the percentiles (see *lost*).\n")
    w("| server | rounds | RTT p50 | p90 | p99 | p99.9 | one-way p99 | delivered packets/s | lost / sent | server cores |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in order(by):
        rs = by[s]
        w(f"| {NAMES[s]} | {len(rs)} | {fmt(med(rs,'latency','round_trip','p50_us'))} µs | {fmt(med(rs,'latency','round_trip','p90_us'))} µs | "
          f"{fmt(med(rs,'latency','round_trip','p99_us'))} µs | {fmt(med(rs,'latency','round_trip','p999_us'))} µs | "
          f"{fmt(med(rs,'latency','one_way','p99_us'))} µs | {fmt(med(rs,'packets','delivered_per_second'))} | "
          f"{fmt(sum_of(rs,'packets','lost'))} / {fmt(sum_of(rs,'packets','sent'))} ({pct(sum_of(rs,'packets','lost') or 0, sum_of(rs,'packets','sent'))}) | "
          f"{fmt(med(rs,'server','cores'),2)} |")
    f = by.get("ferry", [])
    w("")
    for peer in ("derper", "iroh"):
        if f and peer in by:
            a, b = med(f, "latency", "round_trip", "p99_us"), med(by[peer], "latency", "round_trip", "p99_us")
            w(f"- ferry / {NAMES[peer]}: RTT p99 {ratio(a, b)} (lower is better)")
            if peer == "derper" and a and b:
                goals.append(("scenario 3: ferry RTT p99 ≤ 0.3× derper's (issue 17; was ≤ 0.5×)", f"{a/b:.2f}× ({fmt(a)} µs vs {fmt(b)} µs)", "met" if a / b <= 0.3 else "not met"))
    # Chart: the round with the median p99 per server.
    series = {}
    for s in order(by):
        rs = sorted([r for r in by[s] if get(r, "latency", "round_trip")], key=lambda r: r["latency"]["round_trip"]["p99_us"])
        if rs:
            series[s] = rs[len(rs) // 2]["latency"]["round_trip"]["percentiles"]
    if series:
        curve_chart(os.path.join(DOCS, CHART + "latency.svg"), f"Round-trip latency by percentile at {2*int(rate):,} relayed packets/s (median round, {date})", series)
        w(f"\n![latency]({CHART}latency.svg)\n")

by = runs(4)
if by:
    w("## 4. Idle TLS clients: memory per connection\n")
    w(f"`ferry-loadtest idle URL --clients {knobs.get('idle_clients', '?')} --hold 5s`: "
      "the server's VmRSS before any connection and after all are open and have been held, divided by the number held.\n")
    w("| server | rounds | connections held | RSS per connection | RSS after | peak RSS | handshakes/s while opening |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for s in order(by):
        rs = by[s]
        w(f"| {NAMES[s]} | {len(rs)} | {fmt(med(rs,'idle','connections'))} | {fmt((med(rs,'idle','server_rss_per_connection_bytes') or 0)/1024,1)} KiB | "
          f"{fmt((med(rs,'idle','server_rss_after_bytes') or 0)/2**20,1)} MiB | {fmt((med(rs,'server','peak_rss_bytes') or 0)/2**20,1)} MiB | "
          f"{fmt(med(rs,'handshakes','per_second'))} |")
    f = by.get("ferry", [])
    w("")
    for peer in ("derper", "iroh"):
        if f and peer in by:
            a, b = med(f, "idle", "server_rss_per_connection_bytes"), med(by[peer], "idle", "server_rss_per_connection_bytes")
            w(f"- ferry / {NAMES[peer]}: RSS per connection {ratio(a, b)} (lower is better)")
    if f:
        a = med(f, "idle", "server_rss_per_connection_bytes")
        d = med(by["derper"], "idle", "server_rss_per_connection_bytes") if "derper" in by else None
        goals.append(("scenario 4: ≤ 16 KiB per idle TLS client", (f"{a/1024:.1f} KiB" if a else "—") + (f" (derper {d/1024:.1f} KiB)" if d else ""),
                      "met" if a and a <= 16 * 1024 else "not met"))
    bar_chart(os.path.join(DOCS, CHART + "idle.svg"), f"Server RSS per idle TLS connection, KiB (median, {date})",
              [("KiB per connection", {s: (med(by[s], "idle", "server_rss_per_connection_bytes") or 0) / 1024 for s in by})], "KiB")
    w(f"\n![idle]({CHART}idle.svg)\n")

by = runs(5)
if by:
    w("## 5. Connect storm\n")
    w("`ferry-loadtest connect URL --concurrency 32`: TCP + TLS + HTTP upgrade + DERP handshake, then "
      "close, by 32 dialers spread over 32 loopback source addresses (iroh-load: iroh's own handshake).\n")
    w("| server | rounds | handshakes/s | server cores | handshakes per server CPU-second | handshake p50 | p99 | failures |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in order(by):
        rs = by[s]
        w(f"| {NAMES[s]} | {len(rs)} | {fmt(med(rs,'handshakes','per_second'))} | {fmt(med(rs,'server','cores'),2)} | "
          f"{fmt(med(rs,'server','per_cpu_second'))} | {fmt((med(rs,'latency','handshake','p50_us') or 0)/1000,2)} ms | "
          f"{fmt((med(rs,'latency','handshake','p99_us') or 0)/1000,2)} ms | {sum(get(r,'handshakes','failed') or 0 for r in rs)} |")
    f = by.get("ferry", [])
    w("")
    for peer in ("derper", "iroh"):
        if f and peer in by:
            w(f"- ferry / {NAMES[peer]}: handshakes/s {ratio(med(f,'handshakes','per_second'), med(by[peer],'handshakes','per_second'))}, "
              f"per server CPU-second {ratio(med(f,'server','per_cpu_second'), med(by[peer],'server','per_cpu_second'))}")
    bar_chart(os.path.join(DOCS, CHART + "connect.svg"), f"Connect storm (median, {date})",
              [("handshakes/s", {s: med(by[s], "handshakes", "per_second") for s in by}),
               ("per server CPU-second", {s: med(by[s], "server", "per_cpu_second") for s in by})], "handshakes")
    w(f"\n![connect]({CHART}connect.svg)\n")

ts, plain = runs(6, "-ts"), runs(6, "-plain")
if ts or plain:
    w("## 6. STUN Binding answers\n")
    w("`ferry-loadtest stun ADDR --sockets 4 --window 128 [--tailscale]`: 4 UDP sockets, 128 requests "
      "in flight each, `sendmmsg`/`recvmmsg` on one thread. ferry's STUN server runs inside "
      "ferry-relay (the process measured). Tailscale-style requests carry SOFTWARE=tailnode and a "
      "FINGERPRINT (40 bytes), the only kind derper answers; plain requests are the bare 20-byte header.\n")
    w("| server | requests | rounds | answers/s | server cores | answers per server CPU-second | lost |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, by in (("Tailscale-style", ts), ("plain", plain)):
        for s in order(by):
            rs = by[s]
            w(f"| {NAMES[s]} | {kind} | {len(rs)} | {fmt(med(rs,'stun','answers_per_second'))} | {fmt(med(rs,'server','cores'),2)} | "
              f"{fmt(med(rs,'server','per_cpu_second'))} | {sum(get(r,'stun','lost') or 0 for r in rs)} |")
    w("")
    for kind, by in (("Tailscale-style", ts), ("plain", plain)):
        f = by.get("ferry", [])
        for peer in ("coturn", "derper"):
            if f and peer in by:
                a, b = med(f, "server", "per_cpu_second"), med(by[peer], "server", "per_cpu_second")
                w(f"- {kind}: ferry / {NAMES[peer]} answers per server CPU-second {ratio(a, b)}, answers/s "
                  f"{ratio(med(f,'stun','answers_per_second'), med(by[peer],'stun','answers_per_second'))}")
                if peer == "coturn" and a and b:
                    goals.append((f"scenario 6: STUN ≥ 5× coturn per server CPU-second ({kind} requests)",
                                  f"{a/b:.2f}× ({fmt(a)} vs {fmt(b)} answers per server CPU-second)", "met" if a / b >= 5 else "not met"))
    groups = [(f"{k}: per server CPU-s", {s: med(by[s], "server", "per_cpu_second") for s in by}) for k, by in (("Tailscale-style", ts), ("plain", plain)) if by]
    bar_chart(os.path.join(DOCS, CHART + "stun.svg"), f"STUN answers per server CPU-second (median, {date})", groups, "answers")
    w(f"\n![stun]({CHART}stun.svg)\n")

s7 = overload()

wg = {}
for f in sorted(glob(os.path.join(OUT, "s8", "*-r*.json"))):
    r = json.load(open(f))
    wg.setdefault(r["relay"], []).append(r)
if wg:
    anyr = next(iter(wg.values()))[0]
    w("## 8. Real WireGuard through the relay\n")
    w(f"`bench/wireguard.py`: two stock `tailscaled` {anyr.get('tailscaled', '')} (userspace networking, the relay "
      f"path forced with `TS_DEBUG_ALWAYS_USE_DERP=1`) under Headscale {anyr.get('headscale', '')}, in a network "
      "namespace with only `lo`. One DERP region and port, served in turn by ferry-relay and derper with the same "
      f"certificate; each round sends {anyr['bytes'] >> 20} MiB from node 1 to node 2 (TCP over WireGuard over DERP, "
      "through node 1's SOCKS5 server), alternating which relay goes first. The relay is pinned to CPU 0, the nodes "
      "to CPU 1" + ("" if anyr.get("pinned") else " (not pinned in this run)") + ". Relay CPU is utime+stime from /proc "
      "during the transfer; drops are the relay's own counters.\n")
    w("| relay | rounds | goodput (median) | relay cores | relay CPU-seconds per GB (median) | drops per transfer (median, max) | intact |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for s in order(wg):
        rs = wg[s]
        w(f"| {NAMES[s]} | {len(rs)} | {fmt(med(rs, 'goodput_mb_per_s'), 1)} MB/s | {fmt(med(rs, 'relay_cores'), 2)} | {fmt(med(rs, 'relay_cpu_seconds_per_gb'), 2)} | "
          f"{fmt(med(rs, 'relay_drops'))}, {fmt(max(r['relay_drops'] for r in rs))} | {sum(r['intact'] for r in rs)}/{len(rs)} |")
    if "ferry" in wg and "derper" in wg:
        f, d = wg["ferry"], wg["derper"]
        w(f"\n- derper / ferry relay CPU per GB: {ratio(med(d, 'relay_cpu_seconds_per_gb'), med(f, 'relay_cpu_seconds_per_gb'))} "
          f"(per round: {', '.join(f'{a:.2f}' for a in sorted(x['relay_cpu_seconds_per_gb'] / y['relay_cpu_seconds_per_gb'] for x, y in zip(d, f)))})")
        w(f"- goodput ferry / derper: {ratio(med(f, 'goodput_mb_per_s'), med(d, 'goodput_mb_per_s'))}. Neither relay used a "
          "whole core (the *relay cores* column): the two userspace WireGuard nodes, sharing one core, set the pace.")
    w("")

s9 = {}
for f in sorted(glob(os.path.join(OUT, "s9", "*-r*.json"))):
    name = os.path.basename(f).rsplit("-r", 1)[0]  # ferry-1200, ferry-rate-64, coturn-1200
    s9.setdefault(name, []).append(json.load(open(f)))
if s9:
    w("## 9. UDP relay capacity: ferry's UDP relay vs coturn's TURN relay\n")
    w("ferry: `ferry-loadtest udp-relay URL --pairs 8 --size S --window 64` (sessions allocated over TLS DERP "
      "connections, then Geneve-framed datagrams of S bytes, header included, through the relay in both "
      "directions of each pair: 16 flows, closed loop, `sendmmsg`/`recvmmsg` on one thread). coturn: "
      "`turnserver` (no auth, one relay thread) as a TURN relay, driven by `ferry-loadtest turn ADDR "
      "--clients 8 --size S --window 64`: the same loop and thread, each of 8 clients with an allocation and "
      "a channel to a peer socket of the load generator, ChannelData (S bytes + a 4-byte header) from the "
      "client, S-byte datagrams from the peer to the relayed address: 16 flows again, and every datagram that "
      "arrives is one forward, so the two are driven the same way and counted alike, each as hard as one "
      "load-generator thread can (coturn uses its whole core; ferry, cheaper per datagram, may not, and "
      "then its per-CPU-second figure is a lower bound: a busier relay finds more datagrams per wake-up). Each also with "
      "`--gso`: the clients send each burst as one UDP GSO send (as WireGuard's and Tailscale's Linux clients "
      "do); ferry reads such a burst as one coalesced read (UDP GRO) that it still checks datagram by "
      "datagram, and forwards runs as GSO sends; coturn does not ask for GRO, so the kernel hands it the "
      "datagrams one by one. Without `--gso` both servers get datagrams one by one; ferry still sends runs "
      "to one address as one GSO send. Last, coturn under its own load generator, "
      f"`turnutils_uclient -c -m {knobs.get('turn_clients', '200')} -l S -z 1` through `turnutils_peer` (an "
      "echo; forwarded = sent + echoed), which paces itself (one message per client per millisecond), and "
      "ferry at that same rate (`--rate`, open loop): the two at the same, light load. Server CPU is "
      "utime+stime from /proc over the measured window (uclient: over its run); both servers pinned to "
      "CPU 0, the load generators to CPU 1.\n")
    w("| server | datagram | load | rounds | forwarded/s | server cores | of it in the kernel | forwarded per server CPU-second | lost |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = (("ferry-{}", "closed loop"), ("coturnfull-{}", "closed loop"),
            ("ferrygso-{}", "closed loop, clients send GSO"), ("coturngsofull-{}", "closed loop, clients send GSO"),
            ("coturn-{}", "uclient's pace"), ("ferry-rate-{}", "at uclient's rate"),
            ("ferrygso-rate-{}", "at uclient's rate, clients send GSO"))
    for size in ("1200", "64"):
        for pattern, label in rows:
            rs = s9.get(pattern.format(size))
            if not rs:
                continue
            srv = "coturn" if pattern.startswith("coturn") else "ferry"
            kern = [r["server"]["system_seconds"] / r["server"]["cpu_seconds"] for r in rs
                    if r["server"].get("system_seconds") is not None and r["server"]["cpu_seconds"]]
            w(f"| {NAMES[srv]} | {size} B | {label} | {len(rs)} | {fmt(med(rs, 'delivered_per_second'))} | "
              f"{fmt(med(rs, 'server', 'cores'), 2)} | {fmt(100 * statistics.median(kern)) + ' %' if kern else '—'} | "
              f"{fmt(med(rs, 'server', 'per_cpu_second'))} | {sum(r.get('lost', 0) for r in rs)} |")
    w("")
    # (ferry's row, coturn's row, what the pair measures): each goal row compares like with like.
    pairs9 = (("ferry-{}", "coturnfull-{}", "closed loop, both driven alike, clients send datagram by datagram"),
              ("ferrygso-{}", "coturngsofull-{}", "closed loop, both driven alike, clients send GSO bursts"),
              ("ferry-rate-{}", "coturn-{}", "same light load: uclient's pace"),
              ("ferrygso-rate-{}", "coturn-{}", "same light load, ferry's clients send GSO"))
    for size in ("1200", "64"):
        for fk, ck, label in pairs9:
            a = med(s9.get(fk.format(size)) or [], "server", "per_cpu_second")
            cb = med(s9.get(ck.format(size)) or [], "server", "per_cpu_second")
            if a and cb:
                w(f"- {size} B, {label}: ferry / coturn forwarded per server CPU-second {ratio(a, cb)}")
                goals.append((f"scenario 9: UDP relay ≥ 3× coturn per server CPU-second ({size} B, {label})",
                              f"{a/cb:.2f}× ({fmt(a)} vs {fmt(cb)})", "met" if a / cb >= 3 else "not met"))
    bar_chart(os.path.join(DOCS, CHART + "udp-relay.svg"), f"UDP relay: datagrams forwarded per server CPU-second (median, {date})",
              [(f"{size} B", {srv: med(s9.get(f"{key}-{size}") or [], "server", "per_cpu_second") or 0
                              for srv, key in (("ferry", "ferry"), ("coturn", "coturnfull"),
                                               ("ferrygso", "ferrygso"), ("coturngso", "coturngsofull"))})
               for size in ("1200", "64")], "datagrams")
    w(f"\n![udp relay]({CHART}udp-relay.svg)\n")

s10 = [json.load(open(f)) for f in sorted(glob(os.path.join(OUT, "s10", "r*.json")))]
if s10:
    r0 = s10[0]
    delay = r0.get("delay_ms", 0)
    w("## 10. UDP relay vs DERP under random loss\n")
    w(f"`client-lib/tests/nat_lab_loss_bench.rs`: the NAT lab (network namespaces) with two hard-NAT homes, so "
      "there is no direct path. Router 1 is a slow, lossy link (`client-lib/tests/natlab/impair.rs`, an NFQUEUE "
      "reader, since this kernel has no `netem`): every packet it forwards, either way, waits "
      f"{delay:g} ms and {r0['loss_percent']} % of them are dropped at random, per packet on the wire, so the "
      f"pair's round trip is about {2 * delay:g} ms. Two `ferry tunnel`s, once on the UDP relay (the default) and "
      "once with `--no-udp-relay` (DERP over TCP). Ping stream: a 100-byte datagram every 10 ms for "
      f"{r0['ping_seconds']:.0f} s, echoed by the far application. Bulk: 1,200-byte datagrams at "
      f"{r0['bulk_mbps']} MB/s for {r0['bulk_seconds']:.0f} s, counted at the far end. DERP's fate under loss is "
      "its TCP congestion control's, set in every namespace of the lab: Reno (loss-based, like CUBIC in its "
      "Reno-friendly region at this round trip; this host lets a namespace choose only `reno` or `bbr`) and "
      "BBR (this host's default, which slows down far less for random loss). Medians over rounds.\n")
    w("| DERP's TCP | path | rounds | pings answered | RTT p50 | RTT p99 | RTT max | bulk offered | goodput | link: packets, dropped |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ccs = []
    for r in s10:
        if r.get("tcp_cc", "host") not in ccs:
            ccs.append(r.get("tcp_cc", "host"))
    ratios = {}
    for cc in ccs:
        rc = [r for r in s10 if r.get("tcp_cc", "host") == cc]
        for key, label in (("udp_relay", "UDP relay"), ("derp", "DERP (`--no-udp-relay`)")):
            rs = [r[key] for r in rc]
            w(f"| {cc} | {label} | {len(rs)} | {fmt(med(rs, 'replies'))}/{fmt(med(rs, 'pings'))} | {fmt(med(rs, 'rtt_p50_ms'), 2)} ms | "
              f"{fmt(med(rs, 'rtt_p99_ms'), 2)} ms | {fmt(med(rs, 'rtt_max_ms'), 1)} ms | "
              f"{fmt((med(rs, 'bulk_offered_bytes_per_s') or 0) / 1e6, 2)} MB/s | {fmt((med(rs, 'bulk_goodput_bytes_per_s') or 0) / 1e6, 2)} MB/s | "
              f"{fmt(med(rs, 'link_packets'))}, {fmt(med(rs, 'link_dropped'))} |")
        u, d = [r["udp_relay"] for r in rc], [r["derp"] for r in rc]
        ratios[cc] = ((med(u, "rtt_p99_ms") or 0) / (med(d, "rtt_p99_ms") or 1),
                      (med(u, "bulk_goodput_bytes_per_s") or 0) / (med(d, "bulk_goodput_bytes_per_s") or 1),
                      [a["bulk_goodput_bytes_per_s"] / (b["bulk_goodput_bytes_per_s"] or 1) for a, b in zip(u, d)])
    w("")
    for cc, (p99, gp, per) in ratios.items():
        w(f"- DERP on TCP {cc}: UDP relay / DERP RTT p99 **{p99:.2f}×**, goodput **{gp:.3f}×** (per round: "
          f"{', '.join(format(x, '.3f') for x in per)}).")
    share = {cc: [(r["derp"]["bulk_goodput_bytes_per_s"] / (r["derp"]["bulk_offered_bytes_per_s"] or 1))
                  for r in s10 if r.get("tcp_cc", "host") == cc] for cc in ccs}
    late = max(max(r[k].get("link_late_max_ms", 0) for k in ("udp_relay", "derp")) for r in s10)
    w("\nLost pings and bulk datagrams are the UDP relay's price: a lost datagram stays lost, as on any UDP path, "
      "and the protocol inside (WireGuard's TCP, QUIC) resends what it needs end to end. DERP's TCP resends "
      "them itself, so they arrive late, in order, holding up what follows: that is its p99. What the bulk stream gets "
      "through DERP is what TCP's congestion control allows at this loss and round trip ("
      + "; ".join(f"{cc}: {100 * min(v):.0f}–{100 * max(v):.0f} % of what was offered" for cc, v in share.items())
      + "): a loss-based one cuts its window on each loss, BBR slows down far less for random loss. "
      "The link's own figures (packets it forwarded, dropped on purpose) are in the table; it lost nothing else "
      "(the bench fails if the kernel's queue dropped any), and it released a packet at most "
      f"{late:.1f} ms after its due time (its thread shares the 2 cores with both tunnels and the relay).\n")
    for cc, (p99, gp, _) in ratios.items():
        goals.append((f"scenario 10: UDP relay RTT p99 ≤ 0.5× DERP's under {r0['loss_percent']} % loss, {2 * delay:g} ms RTT, DERP on TCP {cc}", f"{p99:.2f}×", "met" if p99 <= 0.5 else "not met"))
        goals.append((f"scenario 10: UDP relay goodput ≥ DERP's under {r0['loss_percent']} % loss, {2 * delay:g} ms RTT, DERP on TCP {cc}", f"{gp:.3f}×", "met" if gp >= 1 else "not met"))


s11 = sorted(glob(os.path.join(OUT, "s11", "*.json")))
if s11:
    r11 = json.load(open(s11[0]))
    g, n = r11["gso"], r11["no_gso"]
    w("## 11. The client's UDP GSO on the UDP relay path\n")
    w("`client-lib/tests/nat_lab_gso_bench.rs`: the NAT lab with two hard-NAT homes (so the pair uses the "
      "relay's UDP relay), two `ferry tunnel`s and the lab's `ferry-relay`. A's application sends "
      f"{r11['size']}-byte datagrams at {r11['mbps']:g} MB/s, paced per millisecond, for {r11['seconds']:g} s; "
      "B's counts them. Once as shipped (tunnel A reads what its socket holds and sends it with "
      "`Endpoint::send_batch`, so each burst leaves as UDP GSO runs; every main socket reads with GRO) and once "
      f"with `--no-udp-gso` on both tunnels, alternating, {r11['rounds']} rounds each; medians. CPU is utime + "
      "stime from /proc per delivered datagram; the relay's includes the NAT routers' softirq work done in its "
      "context, the same in both arms.\n")
    w("| tunnels | delivered | goodput | relay CPU / datagram | tunnel A | tunnel B | A: datagrams per send | B: datagrams per read |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, f in (("GSO (default)", g), ("`--no-udp-gso`", n)):
        w(f"| {label} | {fmt(f['delivered'])} | {f['goodput_mb_s']:.2f} MB/s | {f['relay_us_per_datagram']:.2f} µs | "
          f"{f['tunnel_a_us_per_datagram']:.2f} µs | {f['tunnel_b_us_per_datagram']:.2f} µs | "
          f"{f['tunnel_a_datagrams_per_send']:.1f} | {f['tunnel_b_datagrams_per_read']:.1f} |")
    ratio = lambda k: n[k] / g[k] if g[k] else float("nan")
    w(f"\n- Without / with the client's GSO, CPU per datagram: relay **{ratio('relay_us_per_datagram'):.2f}×**, "
      f"tunnel A {ratio('tunnel_a_us_per_datagram'):.2f}×, tunnel B {ratio('tunnel_b_us_per_datagram'):.2f}× (per round, "
      "relay: " + ", ".join(f"{b['relay_us'] / a['relay_us']:.2f}" for a, b in zip(g["rounds"], n["rounds"])) + ").")
    w("- Without the client's GSO B still reads a few datagrams per read: the relay itself coalesces "
      "consecutive forwards to one address (its own GSO, docs/notes-udp-relay.md §7.1) and B reads with GRO. "
      "The burst size is the load's: at this rate about one millisecond's datagrams; a tunnel at a low rate "
      "sends datagram by datagram, as before.\n")


def reading():
    w("## Reading these numbers\n")
    for n, by in ((1, s1), (2, s2)):
        if not by:
            continue
        cores = {s: med(by[s], "server", "cores") for s in order(by)}
        loss = {s: (sum_of(by[s], "packets", "lost") or 0, sum_of(by[s], "packets", "sent") or 0) for s in order(by)}
        w(f"- **Scenario {n} is capacity, closed loop.** Loss over all rounds: "
          + ", ".join(f"{NAMES[s]} {fmt(l)} of {fmt(t)} ({pct(l, t)})" for s, (l, t) in loss.items())
          + ". Median server cores: " + ", ".join(f"{NAMES[s]} {fmt(c, 2)}" for s, c in cores.items()) + ".")
        span = float(knobs.get("warmup", 0)) + float(knobs.get("run_seconds", 0))
        gen = {s: med([r for r in by[s] if get(r, "client", "cpu_seconds")], "client", "cpu_seconds") for s in order(by)}
        gen = {s: g / span for s, g in gen.items() if g and span}
        if gen:
            w("  Load generator (ferry-loadtest; its CPU time over the whole run, connecting and drain included, "
              "divided by warm-up + measured time, so an upper bound): "
              + ", ".join(f"{fmt(g, 2)} cores against {NAMES[s]}" for s, g in gen.items()) + ".")
        near = [s for s, g in gen.items() if g >= 0.9 and (cores.get(s) or 0) >= 0.9]
        if near:
            w(f"  Against {', '.join(NAMES[s] for s in near)} both the relay and the load generator were near a full "
              "core, so that relay's figure may be somewhat limited by the generator as well (its capacity is at "
              "least this).")
        idle = [NAMES[s] for s, c in cores.items() if c is not None and c < 0.9]
        if idle:
            busy_gen = [s for s, g in gen.items() if g >= 0.9]
            w(f"  {', '.join(idle)} used less than 0.9 of {'its' if len(idle) == 1 else 'their'} core: not saturated, so "
              f"*delivered packets/s* is what the closed loop ({knobs.get('window', '?')} packets in flight per sender, "
              "8 senders) reached on this machine, a lower bound of capacity, and *per server CPU-second* is the "
              "figure that compares relays. "
              + ("The load generator's core was the limit in some runs (" + ", ".join(NAMES[s] for s in busy_gen) + ")."
                 if busy_gen else
                 "The load generator was not saturated either: the loop's round trip (wake-ups across the two "
                 "CPUs, loopback TCP, TLS at both ends) set the pace."))
    if m.get("other_cpu"):
        w(f"- **Other processes on the machine:** niced processes (other builds) used {m['other_cpu']}. "
          "Closed-loop figures (scenarios 1-3) are the most sensitive to them: every packet's progress waits "
          "for a wake-up, and a woken process may wait for a running one's time slice.")
    w("- **The load generator shares the machine.** Servers are pinned to CPU 0 and the generator to CPU 1; "
      "server CPU comes from /proc (utime+stime), so *per server CPU-second* does not depend on how much CPU "
      "the generator left over. On loopback part of the kernel's TCP work for one side runs in the other's "
      "context (softirq), so neither side's CPU time is exactly its own.")
    if s7:
        w("- **Overload (scenario 7) is not capacity.** Open-loop floods offer more than a relay forwards; "
          "goodput under overload measures how a relay shares one core between reading (and maybe dropping) "
          "and writing to receivers, so its ratios say how a relay degrades under overload, not how fast it "
          "forwards. It is reported to show that and that the drops are counted.")
    if os.path.exists(os.path.join(OUT, "rate3.txt")) and s1 and "derper" in s1:
        w(f"- **Scenario 3's rate** is derived from derper's median closed-loop capacity in scenario 1 of this "
          f"run ({fmt(med(s1['derper'], 'packets', 'delivered_per_second'))} packets/s): a quarter of it is sent, "
          "and every packet is echoed, so each relay carries half of it.")
        relayed = 2 * int(open(os.path.join(OUT, "rate3.txt")).read().strip())
        over = [(s, med(s1[s], "packets", "delivered_per_second")) for s in order(s1)]
        over = [(s, c) for s, c in over if c and c < relayed]
        if over:
            w("  " + ", ".join(f"{NAMES[s]} ({fmt(c)} packets/s in scenario 1)" for s, c in over)
              + f": below the {fmt(relayed)} packets/s of scenario 3, so {'it' if len(over) == 1 else 'they'} ran "
              "overloaded there, and those latencies are mostly queueing.")
    w("- **iroh-relay** is driven by `bench/iroh-load` (its own client library, the same closed loop with "
      "`--window`), whose end of run is not an exact drain: its `sent`/`received`/`lost` are approximate. "
      "Its protocol is different (WebSocket framing, ed25519 keys), so the comparison is of relays that do "
      "the same job, not of the same wire protocol.\n")


if s1 or s2 or s7:
    reading()

if goals:
    summary = ["## Goals, as measured\n", "| goal | measured | |", "| --- | --- | --- |"]
    summary += [f"| {g} | {v} | {ok} |" for g, v, ok in goals]
    summary.append("\nGoals not met are reported as measured; see \"Reading these numbers\" below, the profiles after it "
                   "(\"Where the time goes\") and the STUN appendix for what bounds each part.\n")
    # After the "How it was run" section.
    idx = next(i for i, l in enumerate(doc) if re.match(r"## \d+\. ", l))
    doc[idx:idx] = summary

if REPORT_NAME == "benchmarks.md":
    notes = os.path.join(os.path.dirname(__file__), "notes.md")
    if os.path.exists(notes):
        w(open(notes).read())
    appendix = os.path.join(os.path.dirname(__file__), "stun-only-2026-11-24.md")
    if os.path.exists(appendix):
        w(open(appendix).read())

open(os.path.join(DOCS, REPORT_NAME), "w").write("\n".join(doc) + "\n")
print(f"wrote {os.path.join(DOCS, REPORT_NAME)}")
