//! Issue 15, acceptance 3 (a benchmark, not a test: `#[ignore]`d, run by `bench/run.sh`
//! scenario 10 or by hand): the UDP relay path against DERP under random loss. Two `ferry
//! tunnel`s between two hard-NAT homes (no direct path): once with the UDP relay (the default),
//! once with `--no-udp-relay` (DERP over TCP). Router 1 drops `LOSS_PERCENT` (default 1) % of
//! the datagrams and segments it forwards, at random, both ways (`iptables -m statistic`: this
//! kernel has no `netem`), so every packet to or from home 1 crosses one lossy hop — the UDP
//! relay's datagrams and DERP's TCP segments alike.
//!
//! - **Ping stream**: A-app sends a 100-byte datagram every 10 ms for `PING_SECONDS` (15); B-app
//!   echoes it; A-app records each round trip (p50, p99, max) and the replies that never came.
//! - **Bulk**: A-app sends 1,200-byte datagrams at `BULK_MBPS` (4) MB/s for `BULK_SECONDS` (10);
//!   B-app counts what arrives (goodput: delivered bytes per second, and the share of offered).
//!
//! Needs root (skips otherwise). `LOSS_BENCH_JSON=FILE` writes the figures as JSON (bench/run.sh
//! scenario 10; bench/report.py renders them). Run by hand:
//!
//! ```text
//! cargo test --release -p ferry-client --test nat_lab_loss_bench -- --ignored --nocapture
//! ```

mod natlab;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use natlab::{env_or, start_tunnels, stop_tunnel, Lab, Nat, Tunnels};

/// The two rules in router 1 that drop `percent` % of what it forwards, each way.
fn loss_rules(lab: &Lab, op: &str, percent: f64) -> Result<(), String> {
    let p = format!("{}", percent / 100.0);
    for dir in ["lan", "wan"] {
        Lab::exec(
            &lab.ns("r1"),
            &[
                "iptables",
                op,
                "FORWARD",
                "-i",
                dir,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-m",
                "comment",
                "--comment",
                "ferry-loss-bench",
                "-j",
                "DROP",
            ],
        )?;
    }
    Ok(())
}

/// What one transport measured.
#[derive(Debug, Default, Clone)]
struct Figures {
    path: String,
    pings: u64,
    replies: u64,
    rtt_p50_ms: f64,
    rtt_p99_ms: f64,
    rtt_max_ms: f64,
    bulk_offered_bytes_per_s: f64,
    bulk_goodput_bytes_per_s: f64,
}

impl Figures {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path, "pings": self.pings, "replies": self.replies,
            "rtt_p50_ms": self.rtt_p50_ms, "rtt_p99_ms": self.rtt_p99_ms, "rtt_max_ms": self.rtt_max_ms,
            "bulk_offered_bytes_per_s": self.bulk_offered_bytes_per_s,
            "bulk_goodput_bytes_per_s": self.bulk_goodput_bytes_per_s,
        })
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Runs the ping stream and the bulk transfer through `t`.
fn measure(t: &Tunnels, ping_secs: f64, bulk_secs: f64, bulk_mbps: f64) -> Figures {
    let (a_app, b_app) = (
        t.a_app.try_clone().expect("clone"),
        t.b_app.try_clone().expect("clone"),
    );
    let (a_addr, b_addr) = (t.a_addr, t.b_addr);
    b_app
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    a_app
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let bulk_bytes = Arc::new(AtomicU64::new(0));
    // B-app: echoes pings ('P'), counts bulk ('B').
    let b = {
        let (stop, bulk_bytes) = (Arc::clone(&stop), Arc::clone(&bulk_bytes));
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = b_app.recv_from(&mut buf) else {
                    continue;
                };
                match buf.first() {
                    Some(b'P') if from == b_addr => {
                        let _ = b_app.send_to(&buf[..n], b_addr);
                    }
                    Some(b'B') => {
                        bulk_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        })
    };
    // A-app's receiver: round trips by sequence number.
    let epoch = Instant::now();
    let rtts = {
        let (stop, a_app) = (Arc::clone(&stop), a_app.try_clone().expect("clone"));
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let Ok(n) = a_app.recv(&mut buf) else {
                    continue;
                };
                if n >= 13 && buf[0] == b'P' {
                    let sent = u64::from_be_bytes(buf[5..13].try_into().expect("8"));
                    let now = epoch.elapsed().as_nanos() as u64;
                    v.push(now.saturating_sub(sent) as f64 / 1e6);
                }
            }
            v
        })
    };
    // Warm the path (the first packets set up the E2E session and the path).
    let mut pings = 0u64;
    let mut d = [0u8; 100];
    d[0] = b'P';
    let warm_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < warm_until {
        let _ = a_app.send_to(&[b'W'; 10], a_addr);
        std::thread::sleep(Duration::from_millis(20));
    }
    // The ping stream.
    let start = Instant::now();
    let mut next = start;
    while start.elapsed().as_secs_f64() < ping_secs {
        d[1..5].copy_from_slice(&(pings as u32).to_be_bytes());
        d[5..13].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_be_bytes());
        let _ = a_app.send_to(&d, a_addr);
        pings += 1;
        next += Duration::from_millis(10);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    std::thread::sleep(Duration::from_secs(2)); // late replies
                                                // The bulk transfer: paced per millisecond.
    let per_ms = bulk_mbps * 1e6 / 1200.0 / 1000.0;
    let mut owed = 0.0;
    let mut offered = 0u64;
    let mut chunk = [0u8; 1200];
    chunk[0] = b'B';
    let before = bulk_bytes.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut next = start;
    while start.elapsed().as_secs_f64() < bulk_secs {
        owed += per_ms;
        while owed >= 1.0 {
            let _ = a_app.send_to(&chunk, a_addr);
            offered += chunk.len() as u64;
            owed -= 1.0;
        }
        next += Duration::from_millis(1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let sent_for = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2)); // what is still queued arrives
    let got = bulk_bytes.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    b.join().expect("B-app");
    let mut rtts = rtts.join().expect("A-app");
    rtts.sort_by(|a, b| a.total_cmp(b));
    Figures {
        path: String::new(),
        pings,
        replies: rtts.len() as u64,
        rtt_p50_ms: percentile(&rtts, 0.50),
        rtt_p99_ms: percentile(&rtts, 0.99),
        rtt_max_ms: rtts.last().copied().unwrap_or(f64::NAN),
        bulk_offered_bytes_per_s: offered as f64 / sent_for,
        bulk_goodput_bytes_per_s: got as f64 / sent_for,
    }
}

#[test]
#[ignore = "a benchmark (minutes, root): bench/run.sh scenario 10, or --ignored"]
fn udp_relay_vs_derp_under_random_loss() {
    if !natlab::available("udp_relay_vs_derp_under_random_loss") {
        return;
    }
    let loss = env_or("LOSS_PERCENT", 1.0);
    let ping_secs = env_or("PING_SECONDS", 15.0);
    let bulk_secs = env_or("BULK_SECONDS", 10.0);
    let bulk_mbps = env_or("BULK_MBPS", 4.0);
    let lab = Lab::new(&[Nat::Hard, Nat::Hard]);
    loss_rules(&lab, "-I", loss).expect("loss rules");
    let mut rows = Vec::new();
    for (name, extra) in [("udp-relay", &[][..]), ("derp", &["--no-udp-relay"][..])] {
        let mut t = start_tunnels(&lab, name, extra).unwrap_or_else(|e| panic!("{e}"));
        let mut f = measure(&t, ping_secs, bulk_secs, bulk_mbps);
        // The path tunnel A reported last.
        while let Ok((_, l)) = t.a.lines.try_recv() {
            t.a.seen.push(l);
        }
        f.path =
            t.a.seen
                .iter()
                .rev()
                .find_map(|l| {
                    l.strip_prefix(&format!("path to {}: ", t.bpub))
                        .map(|r| r.split(" (after").next().unwrap_or(r).to_string())
                })
                .unwrap_or_default();
        let summary = stop_tunnel(&mut t.a);
        stop_tunnel(&mut t.b);
        println!(
            "{name}: path {}, pings {}/{} answered, rtt p50 {:.2} ms p99 {:.2} ms max {:.2} ms; bulk offered {:.2} MB/s, goodput {:.2} MB/s ({:.1} %); tunnel A: {summary}",
            f.path,
            f.replies,
            f.pings,
            f.rtt_p50_ms,
            f.rtt_p99_ms,
            f.rtt_max_ms,
            f.bulk_offered_bytes_per_s / 1e6,
            f.bulk_goodput_bytes_per_s / 1e6,
            100.0 * f.bulk_goodput_bytes_per_s / f.bulk_offered_bytes_per_s
        );
        rows.push((name, f));
    }
    let _ = loss_rules(&lab, "-D", loss);
    let (u, d) = (&rows[0].1, &rows[1].1);
    println!(
        "UDP relay / DERP under {loss} % loss: rtt p99 {:.2}x (goal <= 0.5x), goodput {:.2}x (goal >= 1x)",
        u.rtt_p99_ms / d.rtt_p99_ms,
        u.bulk_goodput_bytes_per_s / d.bulk_goodput_bytes_per_s
    );
    assert!(
        u.path.starts_with("udp-relay"),
        "not on the UDP relay: {u:?}"
    );
    assert!(d.path.starts_with("relay"), "not on DERP: {d:?}");
    if let Ok(path) = std::env::var("LOSS_BENCH_JSON") {
        let j = serde_json::json!({
            "loss_percent": loss, "ping_seconds": ping_secs, "bulk_seconds": bulk_secs,
            "bulk_mbps": bulk_mbps, "udp_relay": u.json(), "derp": d.json(),
        });
        std::fs::write(&path, j.to_string()).expect("write the JSON");
    }
}
