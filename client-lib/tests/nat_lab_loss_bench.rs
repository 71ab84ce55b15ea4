//! Issue 15, acceptance 3 (a benchmark, not a test: `#[ignore]`d, run by `bench/run.sh`
//! scenario 10 or by hand): the UDP relay path against DERP under random loss at a real round
//! trip. Two `ferry tunnel`s between two hard-NAT homes (no direct path): once with the UDP
//! relay (the default), once with `--no-udp-relay` (DERP over TCP). Router 1 is a slow, lossy
//! link ([`natlab::impair`]: this kernel has no `netem`): every packet it forwards, either way,
//! waits `DELAY_MS` (default 20) ms and `LOSS_PERCENT` (default 1) % of them are dropped at
//! random, per packet on the wire. Every packet to or from home 1 crosses it — the UDP relay's
//! datagrams and DERP's TCP segments alike — so the pair's round trip grows by 2 × `DELAY_MS`.
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
//!
//! `the_lab_link_delays_and_drops_as_told` (not ignored) checks the link itself.

mod natlab;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use natlab::impair::{ImpairStats, Impairment};
use natlab::{env_or, in_netns, start_tunnels, stop_tunnel, Lab, Nat, Tunnels};

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
    /// What router 1's emulated link did while this transport ran.
    link: ImpairStats,
}

impl Figures {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path, "pings": self.pings, "replies": self.replies,
            "rtt_p50_ms": self.rtt_p50_ms, "rtt_p99_ms": self.rtt_p99_ms, "rtt_max_ms": self.rtt_max_ms,
            "bulk_offered_bytes_per_s": self.bulk_offered_bytes_per_s,
            "bulk_goodput_bytes_per_s": self.bulk_goodput_bytes_per_s,
            "link_packets": self.link.packets, "link_dropped": self.link.dropped,
            "link_late_max_ms": self.link.late_max.as_secs_f64() * 1e3,
            "link_max_held": self.link.max_held,
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
        link: ImpairStats::default(),
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
    let delay_ms = env_or("DELAY_MS", 20.0);
    let lab = Lab::new(&[Nat::Hard, Nat::Hard]);
    // TCP's congestion control decides how DERP fares under loss (BBR slows down far less for
    // random loss, CUBIC and Reno halve their windows), and it is per namespace: `TCP_CC`
    // sets it in every namespace of the lab (the relay's sockets are accepted after this, so
    // they take it too); without it, the lab keeps what the host has.
    if let Ok(cc) = std::env::var("TCP_CC") {
        for ns in lab.namespaces() {
            Lab::exec(
                &ns,
                &[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.tcp_congestion_control={cc}"),
                ],
            )
            .unwrap_or_else(|e| panic!("TCP_CC={cc}: {e}"));
        }
    }
    let tcp_cc = Lab::exec(
        &lab.ns("pub"),
        &["sysctl", "-n", "net.ipv4.tcp_congestion_control"],
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .trim()
    .to_string();
    let mut rows = Vec::new();
    for (name, extra) in [("udp-relay", &[][..]), ("derp", &["--no-udp-relay"][..])] {
        let link = Impairment::start(
            &lab.ns("r1"),
            Duration::from_secs_f64(delay_ms / 1e3),
            loss / 100.0,
        )
        .unwrap_or_else(|e| panic!("router 1's link: {e}"));
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
        f.link = link
            .stop()
            .unwrap_or_else(|e| panic!("router 1's link: {e}"));
        println!(
            "{name}: path {}, pings {}/{} answered, rtt p50 {:.2} ms p99 {:.2} ms max {:.2} ms; bulk offered {:.2} MB/s, goodput {:.2} MB/s ({:.1} %); link: {:?}; tunnel A: {summary}",
            f.path,
            f.replies,
            f.pings,
            f.rtt_p50_ms,
            f.rtt_p99_ms,
            f.rtt_max_ms,
            f.bulk_offered_bytes_per_s / 1e6,
            f.bulk_goodput_bytes_per_s / 1e6,
            100.0 * f.bulk_goodput_bytes_per_s / f.bulk_offered_bytes_per_s,
            f.link,
        );
        assert_eq!(
            (f.link.kernel_queue_dropped, f.link.kernel_user_dropped),
            (0, 0),
            "the emulated link lost packets it was not told to: {:?}",
            f.link
        );
        rows.push((name, f));
    }
    let (u, d) = (&rows[0].1, &rows[1].1);
    println!(
        "UDP relay / DERP under {loss} % loss and {delay_ms} ms each way, TCP {tcp_cc}: rtt p99 {:.2}x (goal <= 0.5x), goodput {:.2}x (goal >= 1x)",
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
            "loss_percent": loss, "delay_ms": delay_ms, "tcp_cc": tcp_cc, "ping_seconds": ping_secs, "bulk_seconds": bulk_secs,
            "bulk_mbps": bulk_mbps, "udp_relay": u.json(), "derp": d.json(),
        });
        std::fs::write(&path, j.to_string()).expect("write the JSON");
    }
}

/// The emulated link itself ([`natlab::impair`]), since the benchmark's figures rest on it: a
/// datagram across router 1 and back waits twice the delay, and of datagrams sent one way the
/// share told is dropped, each one accounted for.
#[test]
fn the_lab_link_delays_and_drops_as_told() {
    use std::net::UdpSocket;
    if !natlab::available("the_lab_link_delays_and_drops_as_told") {
        return;
    }
    let lab = Lab::new(&[Nat::Easy]);
    let bind = |ns: String, addr: &'static str| {
        in_netns(&ns, move || UdpSocket::bind(addr))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .unwrap_or_else(|e| panic!("bind {addr} in {ns}: {e}"))
    };
    let far = bind(lab.ns("pub"), "203.0.113.1:0");
    let near = bind(lab.ns("h1"), "0.0.0.0:0");
    let far_addr = far.local_addr().expect("addr");
    far.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    near.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");

    // Delay: 20 round trips, one at a time, through a 15 ms link.
    let delay = Duration::from_millis(15);
    let link = Impairment::start(&lab.ns("r1"), delay, 0.0).expect("link");
    let mut rtts = Vec::new();
    let mut buf = [0u8; 64];
    for i in 0u8..20 {
        let t0 = Instant::now();
        near.send_to(&[i], far_addr).expect("send");
        let (n, from) = far.recv_from(&mut buf).expect("the datagram crossed");
        far.send_to(&buf[..n], from).expect("echo");
        let n = near.recv(&mut buf).expect("the echo came back");
        assert_eq!(&buf[..n], &[i]);
        rtts.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let stats = link.stop().expect("link");
    let mut sorted = rtts.clone();
    let median = natlab::median(&mut sorted).expect("20 figures");
    println!("round trips through a 15 ms link, ms: {rtts:.1?}; {stats:?}");
    assert!(
        sorted[0] >= 30.0,
        "a round trip shorter than twice the delay: {rtts:?}"
    );
    assert!(median < 45.0, "the link delays far too much: {rtts:?}");
    assert_eq!((stats.packets, stats.dropped), (40, 0), "{stats:?}");

    // Loss: 400 datagrams one way through a link that drops half, no delay.
    let link = Impairment::start(&lab.ns("r1"), Duration::ZERO, 0.5).expect("link");
    for i in 0u16..400 {
        near.send_to(&i.to_be_bytes(), far_addr).expect("send");
        if i % 50 == 49 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    far.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut got = 0u64;
    while far.recv(&mut buf).is_ok() {
        got += 1;
    }
    let stats = link.stop().expect("link");
    println!("400 datagrams through a link that drops half: {got} arrived; {stats:?}");
    assert_eq!(stats.packets, 400, "{stats:?}");
    assert_eq!(got + stats.dropped, 400, "{stats:?}");
    assert!((100..=300).contains(&got), "{got} of 400 arrived");
    assert_eq!(
        (stats.kernel_queue_dropped, stats.kernel_user_dropped),
        (0, 0)
    );

    // The kernel's own drops are seen (the benchmark asserts there are none): a queue of 8
    // packets held 100 ms each overflows under a burst of 100.
    let link = Impairment::start_with_queue(&lab.ns("r1"), Duration::from_millis(100), 0.0, 8)
        .expect("link");
    for i in 0u16..100 {
        near.send_to(&i.to_be_bytes(), far_addr).expect("send");
    }
    let mut got = 0u64;
    while far.recv(&mut buf).is_ok() {
        got += 1;
    }
    let stats = link.stop().expect("link");
    println!("100 datagrams into a queue of 8: {got} arrived; {stats:?}");
    assert!(stats.kernel_queue_dropped > 0, "{stats:?}");
    assert_eq!(got + stats.kernel_queue_dropped, 100, "{stats:?}");
}
