//! iroh-load: the bench's load generator for iroh-relay, whose protocol is not DERP.
//!
//! It mirrors ferry-loadtest's `derp`, `connect` and `idle` modes and prints the subset of
//! ferry-loadtest's JSON report (`ferry-loadtest/v1`) that bench/report.py reads. One
//! difference: the end of a run is not an exact drain (iroh's protocol has no per-connection
//! ordering guarantee we could use), so `sent`/`received` are approximate; rates, latencies,
//! CPU and memory are measured the same way.
//!
//! `derp --window N` is ferry-loadtest's closed loop: each sender keeps at most N packets in
//! flight (sent, not yet read by its receiver, which shares the count and wakes the sender); a
//! full window without progress for --window-timeout is written off and opened again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use iroh_base::{PublicKey, RelayUrl, SecretKey};
use iroh_relay::client::{Client, ClientBuilder};
use iroh_relay::protos::relay::{ClientToRelayMsg, Datagrams, RelayToClientMsg};
use serde_json::{json, Value};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, clap::Args)]
struct Common {
    /// Relay URL, e.g. https://127.0.0.1:8443
    url: String,
    /// CA certificate (PEM) to trust.
    #[arg(long)]
    ca_file: String,
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(Subcommand)]
enum Cmd {
    Derp {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value_t = 1200)]
        size: usize,
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long)]
        echo: bool,
        /// Closed loop: at most N packets in flight per sender.
        #[arg(long, conflicts_with = "rate")]
        window: Option<u64>,
        /// Seconds a full window may see no progress before it is written off.
        #[arg(long, default_value_t = 0.2)]
        window_timeout: f64,
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    Connect {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    Idle {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 5.0)]
        hold: f64,
    },
}

const MAGIC: [u8; 4] = *b"fLT1";
const HDR: usize = 24;

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f.get(11).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0))
        / ticks
}

fn status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let v = l.strip_prefix(field)?.strip_prefix(':')?;
            v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        })
        .unwrap_or(0)
        * 1024
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).unwrap()
}

fn hist_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let curve: Vec<Value> = [0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999, 100.0]
        .iter()
        .map(|p| json!([p, us(p / 100.0)]))
        .collect();
    json!({
        "count": h.len(), "min_us": h.min() as f64 / 1000.0, "mean_us": h.mean() / 1000.0,
        "p50_us": us(0.5), "p90_us": us(0.9), "p99_us": us(0.99), "p999_us": us(0.999),
        "max_us": h.max() as f64 / 1000.0, "percentiles": curve,
    })
}

struct Target {
    url: RelayUrl,
    tls: rustls::ClientConfig,
}

impl Target {
    fn new(c: &Common) -> Result<Target> {
        let pem = std::fs::read(&c.ca_file).with_context(|| c.ca_file.clone())?;
        let roots: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<_, _>>()?;
        let tls = iroh_relay::tls::CaTlsConfig::custom_roots(roots)
            .client_config(Arc::new(rustls::crypto::ring::default_provider()))?;
        Ok(Target {
            url: c.url.parse().context("relay URL")?,
            tls,
        })
    }

    async fn connect(&self, key: SecretKey) -> Result<Client> {
        // The URL's host is an IP address: no DNS query is made. The resolver points at
        // loopback anyway, so nothing could leave this machine.
        let dns = iroh_dns::dns::DnsResolver::with_nameserver("127.0.0.1:53".parse().unwrap());
        let c = ClientBuilder::new(self.url.clone(), key, dns)
            .tls_client_config(self.tls.clone())
            .connect()
            .await?;
        Ok(c)
    }
}

fn packet(kind: u8, seq: u64, ts: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size);
    b.put_slice(&MAGIC);
    b.put_u8(kind);
    b.put_bytes(0, 3);
    b.put_u64(seq);
    b.put_u64(ts);
    b.put_bytes(0, size - HDR);
    b.freeze()
}

fn report(mode: &str, url: &str) -> Value {
    json!({ "schema": "ferry-loadtest/v1", "mode": mode, "target": url, "tool": "iroh-load",
            "packets": null, "handshakes": null, "idle": null, "server": null,
            "latency": {"one_way": null, "round_trip": null, "handshake": null, "stun": null},
            "warnings": ["iroh-load: sent/received are not drained exactly at the end"] })
}

fn server_json(pid: Option<u32>, cpu0: f64, secs: f64, count: f64) -> Value {
    match pid {
        None => Value::Null,
        Some(p) => {
            let cpu = cpu_seconds(p) - cpu0;
            json!({"pid": p, "cpu_seconds": cpu, "cores": cpu / secs,
                   "rss_bytes": status_bytes(p, "VmRSS"), "peak_rss_bytes": status_bytes(p, "VmHWM"),
                   "per_cpu_second": if cpu > 0.0 { Value::from(count / cpu) } else { Value::Null }})
        }
    }
}

/// Closed-loop state shared by a sender and its receiver.
#[derive(Default)]
struct Window {
    /// One past the highest sequence number the receiver read.
    read_to: AtomicU64,
    notify: tokio::sync::Notify,
}

#[allow(clippy::too_many_arguments)]
async fn derp(c: Common, clients: usize, size: usize, rate: u64, echo: bool, window: Option<u64>, window_timeout: f64, warmup: f64, duration: f64) -> Result<Value> {
    anyhow::ensure!(clients >= 2 && clients % 2 == 0 && size >= HDR);
    let t = Arc::new(Target::new(&c)?);
    let keys: Vec<SecretKey> = (0..clients).map(|_| SecretKey::generate()).collect();
    let mut conns = Vec::new();
    for k in &keys {
        conns.push(t.connect(k.clone()).await.context("connecting to iroh-relay")?);
    }
    let epoch = Instant::now();
    let from = epoch + Duration::from_secs_f64(warmup);
    let stop = from + Duration::from_secs_f64(duration);
    let per_sender = rate as f64 / (clients / 2) as f64;
    let sent_w = Arc::new(AtomicU64::new(0));
    let sent_all = Arc::new(AtomicU64::new(0));
    let timeouts = Arc::new(AtomicU64::new(0));
    let written_off_all = Arc::new(AtomicU64::new(0));
    let wtimeout = Duration::from_secs_f64(window_timeout);
    let windows: Vec<Arc<Window>> = (0..clients / 2).map(|_| Arc::new(Window::default())).collect();
    let mut tasks = Vec::new();
    let mut readers = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let (mut stream, mut sink) = conn.split();
        let is_sender = i % 2 == 0;
        let mut echo_sink = None;
        let peer: PublicKey = keys[if is_sender { i + 1 } else { i - 1 }].public();
        let win = Arc::clone(&windows[i / 2]);
        let win_tx = Arc::clone(&win);
        if is_sender {
            let (sent_w, sent_all) = (Arc::clone(&sent_w), Arc::clone(&sent_all));
            let (timeouts, written_off_all) = (Arc::clone(&timeouts), Arc::clone(&written_off_all));
            tasks.push(tokio::spawn(async move {
                let mut seq = 0u64;
                let batch = (65536 / (size + 40)).max(1) as u64;
                // Window: written off below this; base last seen and since when no progress.
                let (mut off_to, mut base, mut since) = (0u64, 0u64, Instant::now());
                loop {
                    let now = Instant::now();
                    if now >= stop {
                        break;
                    }
                    let n = if let Some(wn) = window {
                        let b = win_tx.read_to.load(Ordering::Acquire).max(off_to).min(seq);
                        if b != base {
                            base = b;
                            since = now;
                        }
                        let in_flight = seq - base;
                        if in_flight < wn {
                            since = now;
                            (wn - in_flight).min(batch)
                        } else if now >= since + wtimeout {
                            timeouts.fetch_add(1, Ordering::Relaxed);
                            written_off_all.fetch_add(in_flight, Ordering::Relaxed);
                            off_to = seq;
                            base = seq;
                            since = now;
                            wn.min(batch)
                        } else {
                            tokio::select! {
                                _ = win_tx.notify.notified() => {}
                                _ = tokio::time::sleep_until((since + wtimeout).min(stop).into()) => {}
                            }
                            continue;
                        }
                    } else if per_sender > 0.0 {
                        let due = (now.duration_since(epoch).as_secs_f64() * per_sender) as u64;
                        if due <= seq {
                            let next = epoch + Duration::from_secs_f64((seq + 1) as f64 / per_sender);
                            tokio::time::sleep_until(next.min(stop).into()).await;
                            continue;
                        }
                        (due - seq).min(batch)
                    } else {
                        batch
                    };
                    let ts = now.duration_since(epoch).as_nanos() as u64;
                    for _ in 0..n {
                        let m = ClientToRelayMsg::Datagrams { dst_endpoint_id: peer, datagrams: Datagrams::from(packet(0, seq, ts, size)) };
                        if sink.feed(m).await.is_err() {
                            return;
                        }
                        seq += 1;
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                    sent_all.fetch_add(n, Ordering::Relaxed);
                    if now >= from {
                        sent_w.fetch_add(n, Ordering::Relaxed);
                    }
                }
                // Keep the connection until the readers are done.
                tokio::time::sleep(Duration::from_secs(2)).await;
                drop(sink);
            }));
        } else {
            echo_sink = Some(sink);
        }
        // Reader (receivers echo with --echo).
        readers.push(tokio::spawn(async move {
            let (mut recv_w, mut recv_all, mut echo_sent) = (0u64, 0u64, 0u64);
            let (mut one_way, mut rtt) = (hist(), hist());
            let drain_until = stop + Duration::from_secs(1);
            loop {
                let msg = tokio::select! {
                    m = stream.next() => m,
                    _ = tokio::time::sleep_until(drain_until.into()) => break,
                };
                let Some(Ok(msg)) = msg else { break };
                let RelayToClientMsg::Datagrams { remote_endpoint_id, datagrams } = msg else { continue };
                let p = &datagrams.contents;
                if p.len() < HDR || p[..4] != MAGIC {
                    continue;
                }
                let now = Instant::now();
                let ts = u64::from_be_bytes(p[16..24].try_into().unwrap());
                let age = now.saturating_duration_since(epoch + Duration::from_nanos(ts));
                let ns = (age.as_nanos() as u64).max(1);
                recv_all += 1;
                let in_w = now >= from && now < stop;
                if in_w {
                    recv_w += 1;
                }
                match p[4] {
                    0 => {
                        if window.is_some() {
                            let seq = u64::from_be_bytes(p[8..16].try_into().unwrap());
                            if win.read_to.fetch_max(seq + 1, Ordering::Release) <= seq {
                                win.notify.notify_one();
                            }
                        }
                        if in_w {
                            let _ = one_way.record(ns);
                        }
                        if let (true, Some(s)) = (echo, echo_sink.as_mut()) {
                            let mut e = BytesMut::from(&p[..]);
                            e[4] = 1;
                            let m = ClientToRelayMsg::Datagrams { dst_endpoint_id: remote_endpoint_id, datagrams: Datagrams::from(e.freeze()) };
                            if s.send(m).await.is_err() {
                                break;
                            }
                            echo_sent += 1;
                        }
                    }
                    1 => {
                        if in_w {
                            let _ = rtt.record(ns);
                        }
                    }
                    _ => {}
                }
            }
            (recv_w, recv_all, echo_sent, one_way, rtt)
        }));
    }
    tokio::time::sleep_until(from.into()).await;
    let cpu0 = c.server_pid.map(cpu_seconds).unwrap_or(0.0);
    tokio::time::sleep_until(stop.into()).await;
    let mut rep = report("derp", &c.url);
    let mut server = server_json(c.server_pid, cpu0, duration, 0.0);
    let (mut rw, mut ra, mut es) = (0, 0, 0);
    let (mut ow, mut rt) = (hist(), hist());
    for r in readers {
        let (a, b, e, o, t2) = r.await?;
        rw += a;
        ra += b;
        es += e;
        ow.add(&o)?;
        rt.add(&t2)?;
    }
    for t2 in tasks {
        let _ = t2.await;
    }
    let sent = sent_all.load(Ordering::Relaxed) + es;
    if let Some(cpu) = server.get("cpu_seconds").and_then(|v| v.as_f64()) {
        server["per_cpu_second"] = if cpu > 0.0 { Value::from(rw as f64 / cpu) } else { Value::Null };
    }
    rep["packets"] = json!({
        "sent": sent, "received": ra, "lost": sent.saturating_sub(ra),
        "sent_per_second": sent_w.load(Ordering::Relaxed) as f64 / duration,
        "delivered_in_window": rw, "delivered_per_second": rw as f64 / duration,
        "delivered_bytes_per_second": rw as f64 * size as f64 / duration, "drain_complete": false,
        "window_timeouts": window.map(|_| timeouts.load(Ordering::Relaxed)),
        "written_off": window.map(|_| written_off_all.load(Ordering::Relaxed)),
    });
    rep["settings"] = json!({"clients": clients, "packet_size": size, "rate": rate, "echo": echo,
        "send_mode": if window.is_some() { "window" } else if rate > 0 { "rate" } else { "flood" },
        "window": window, "window_timeout_seconds": window.map(|_| window_timeout),
        "warmup_seconds": warmup, "duration_seconds": duration});
    rep["latency"]["one_way"] = hist_json(&ow);
    rep["latency"]["round_trip"] = hist_json(&rt);
    rep["server"] = server;
    rep["measured_seconds"] = duration.into();
    Ok(rep)
}

async fn connect(c: Common, concurrency: usize, warmup: f64, duration: f64) -> Result<Value> {
    let t = Arc::new(Target::new(&c)?);
    drop(t.connect(SecretKey::generate()).await.context("first connection to iroh-relay")?);
    let epoch = Instant::now();
    let from = epoch + Duration::from_secs_f64(warmup);
    let stop = from + Duration::from_secs_f64(duration);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let t = Arc::clone(&t);
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut h) = (0u64, 0u64, hist());
            while Instant::now() < stop {
                let t0 = Instant::now();
                match t.connect(SecretKey::generate()).await {
                    Ok(cl) => {
                        if t0 >= from {
                            ok += 1;
                            let _ = h.record((t0.elapsed().as_nanos() as u64).max(1));
                        }
                        let (_, mut sink) = cl.split();
                        let _ = sink.close().await;
                    }
                    Err(_) => failed += 1,
                }
            }
            (ok, failed, h)
        }));
    }
    tokio::time::sleep_until(from.into()).await;
    let cpu0 = c.server_pid.map(cpu_seconds).unwrap_or(0.0);
    tokio::time::sleep_until(stop.into()).await;
    let cpu_end = c.server_pid.map(cpu_seconds);
    let (mut ok, mut failed, mut h) = (0, 0, hist());
    for t2 in tasks {
        let (a, b, hh) = t2.await?;
        ok += a;
        failed += b;
        h.add(&hh)?;
    }
    let mut rep = report("connect", &c.url);
    rep["handshakes"] = json!({"completed": ok, "failed": failed, "per_second": ok as f64 / duration});
    rep["latency"]["handshake"] = hist_json(&h);
    if let (Some(p), Some(c1)) = (c.server_pid, cpu_end) {
        let cpu = c1 - cpu0;
        rep["server"] = json!({"pid": p, "cpu_seconds": cpu, "cores": cpu / duration,
            "rss_bytes": status_bytes(p, "VmRSS"), "peak_rss_bytes": status_bytes(p, "VmHWM"),
            "per_cpu_second": if cpu > 0.0 { Value::from(ok as f64 / cpu) } else { Value::Null }});
    }
    rep["measured_seconds"] = duration.into();
    Ok(rep)
}

async fn idle(c: Common, clients: usize, concurrency: usize, hold: f64) -> Result<Value> {
    let t = Arc::new(Target::new(&c)?);
    let before = c.server_pid.map(|p| status_bytes(p, "VmRSS"));
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut opening = Vec::new();
    for _ in 0..clients {
        let (t, sem) = (Arc::clone(&t), Arc::clone(&sem));
        opening.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.unwrap();
            t.connect(SecretKey::generate()).await
        }));
    }
    let mut held = Vec::new();
    for o in opening {
        let cl = o.await?.context("opening an idle connection to iroh-relay")?;
        let (mut stream, sink) = cl.split();
        held.push(tokio::spawn(async move {
            let _sink = sink;
            while let Some(Ok(_)) = stream.next().await {}
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    let open = held.iter().filter(|h| !h.is_finished()).count();
    let after = c.server_pid.map(|p| status_bytes(p, "VmRSS"));
    let mut rep = report("idle", &c.url);
    rep["idle"] = json!({"connections": open, "server_rss_before_bytes": before, "server_rss_after_bytes": after,
        "server_rss_per_connection_bytes": match (before, after) { (Some(b), Some(a)) if open > 0 => Value::from((a as f64 - b as f64) / open as f64), _ => Value::Null }});
    if let Some(p) = c.server_pid {
        rep["server"] = json!({"pid": p, "rss_bytes": status_bytes(p, "VmRSS"), "peak_rss_bytes": status_bytes(p, "VmHWM")});
    }
    for h in held {
        h.abort();
    }
    Ok(rep)
}

#[tokio::main]
async fn main() -> Result<()> {
    // Many connections from one process.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    let rep = match Cli::parse().cmd {
        Cmd::Derp { c, clients, size, rate, echo, window, window_timeout, warmup, duration } => {
            derp(c, clients, size, rate, echo, window, window_timeout, warmup, duration).await?
        }
        Cmd::Connect { c, concurrency, warmup, duration } => connect(c, concurrency, warmup, duration).await?,
        Cmd::Idle { c, clients, concurrency, hold } => idle(c, clients, concurrency, hold).await?,
    };
    println!("{}", serde_json::to_string_pretty(&rep)?);
    Ok(())
}
