//! Issue 15 (a benchmark, not a test: `#[ignore]`d, run by `bench/run.sh` scenario 11 or by
//! hand): what the client's UDP GSO saves on the UDP relay path. Two real `ferry tunnel`s
//! between two hard-NAT homes (no direct path, so the pair uses the relay's UDP relay), the
//! lab's real `ferry-relay`; A-app sends 1,200-byte datagrams at `GSO_BENCH_MBPS` (40) MB/s,
//! paced per millisecond, for `GSO_BENCH_SECONDS` (5); B-app counts what arrives. Once as
//! shipped (bursts leave tunnel A as UDP GSO runs) and once with `--no-udp-gso` on both
//! tunnels, alternating, `GSO_BENCH_ROUNDS` (3) rounds each.
//!
//! Per round: CPU time (utime + stime from /proc, so the kernel's share is in) of the relay, of
//! tunnel A and of tunnel B per datagram delivered, the goodput, and how tunnel A's datagrams
//! left and tunnel B's arrived (their summary lines: datagrams in sends, datagrams in reads). The relay's figure includes the NAT routers'
//! softirq work done in its context, the same in both arms. Medians and the ratios go to stdout
//! and, with `GSO_BENCH_JSON=FILE`, to a JSON file. Needs root (skips otherwise):
//!
//! ```text
//! cargo test --release -p ferry-client --test nat_lab_gso_bench -- --ignored --nocapture
//! ```

mod natlab;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use natlab::{env_or, start_tunnels, stop_tunnel, Lab, Nat};

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// From a tunnel's summary line (`UDP out: N datagrams in M sends, in: N datagrams in M
/// reads`): the figures after `key` (`"UDP out: "` or `", in: "`), as (datagrams, messages).
fn udp_counts(summary: &str, key: &str) -> (f64, f64) {
    let after = summary.split(key).nth(1).unwrap_or("");
    let mut w = after.split_whitespace();
    let d = w.next().and_then(|x| x.parse().ok()).unwrap_or(f64::NAN);
    let m = w
        .nth(2)
        .and_then(|x| x.trim_end_matches(',').parse().ok())
        .unwrap_or(f64::NAN);
    (d, m)
}

#[derive(Debug, Clone, Copy)]
struct Round {
    delivered: f64,
    goodput_mb_s: f64,
    relay_us: f64,
    a_us: f64,
    b_us: f64,
    a_datagrams: f64,
    a_sends: f64,
    b_datagrams: f64,
    b_reads: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn one_round(lab: &Lab, tag: &str, extra: &[&str], mbps: f64, secs: f64) -> Round {
    let mut t = start_tunnels(lab, tag, extra).unwrap_or_else(|e| panic!("{e}"));
    let (a_app, b_app) = (
        t.a_app.try_clone().expect("clone"),
        t.b_app.try_clone().expect("clone"),
    );
    b_app
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    // Warm: until tunnel A says it is on the UDP relay.
    let want = format!("path to {}: udp-relay", t.bpub);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut on_udp_relay = false;
    while Instant::now() < deadline && !on_udp_relay {
        let _ = a_app.send_to(&[b'W'; 10], t.a_addr);
        on_udp_relay = t.a.wait_for(&want, Duration::from_millis(50)).is_some();
    }
    assert!(on_udp_relay, "{tag}: tunnel A never reached the UDP relay");
    // Settle: the path's first pings and acks.
    std::thread::sleep(Duration::from_millis(500));
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let counter = {
        let (stop, got) = (Arc::clone(&stop), Arc::clone(&got));
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = b_app.recv(&mut buf) {
                    if n == 1200 && buf[0] == b'B' {
                        got.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let relay_pid = lab.relay_pid().expect("the lab's relay");
    let (a_pid, b_pid) = (t.a.child.id(), t.b.child.id());
    let cpu0 = [
        cpu_seconds(relay_pid),
        cpu_seconds(a_pid),
        cpu_seconds(b_pid),
    ];
    let per_ms = mbps * 1e6 / 1200.0 / 1000.0;
    let mut chunk = [0u8; 1200];
    chunk[0] = b'B';
    let (mut owed, start) = (0.0, Instant::now());
    let mut next = start;
    while start.elapsed().as_secs_f64() < secs {
        owed += per_ms;
        while owed >= 1.0 {
            let _ = a_app.send_to(&chunk, t.a_addr);
            owed -= 1.0;
        }
        next += Duration::from_millis(1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let sent_for = start.elapsed().as_secs_f64();
    // What is still queued arrives; then the CPU is read, before the tunnels stop.
    std::thread::sleep(Duration::from_secs(1));
    let cpu1 = [
        cpu_seconds(relay_pid),
        cpu_seconds(a_pid),
        cpu_seconds(b_pid),
    ];
    stop.store(true, Ordering::Relaxed);
    counter.join().expect("B-app");
    let delivered = got.load(Ordering::Relaxed) as f64;
    let summary = stop_tunnel(&mut t.a);
    let b_summary = stop_tunnel(&mut t.b);
    let (a_datagrams, a_sends) = udp_counts(&summary, "UDP out: ");
    let (b_datagrams, b_reads) = udp_counts(&b_summary, ", in: ");
    let per = |i: usize| (cpu1[i] - cpu0[i]) / delivered * 1e6;
    Round {
        delivered,
        goodput_mb_s: delivered * 1200.0 / sent_for / 1e6,
        relay_us: per(0),
        a_us: per(1),
        b_us: per(2),
        a_datagrams,
        a_sends,
        b_datagrams,
        b_reads,
    }
}

#[test]
#[ignore = "a benchmark (a minute, root): bench/run.sh scenario 11, or --ignored"]
fn client_gso_on_the_udp_relay_path() {
    if !natlab::available("client_gso_on_the_udp_relay_path") {
        return;
    }
    let mbps = env_or("GSO_BENCH_MBPS", 40.0);
    let secs = env_or("GSO_BENCH_SECONDS", 5.0);
    let rounds = env_or("GSO_BENCH_ROUNDS", 3.0) as usize;
    let lab = Lab::new(&[Nat::Hard, Nat::Hard]);
    let arms: [(&str, &[&str]); 2] = [("gso", &[]), ("no-gso", &["--no-udp-gso"])];
    let mut rows: Vec<Vec<Round>> = vec![Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (k, (name, extra)) in arms.iter().enumerate() {
            let r = one_round(&lab, &format!("{name}{round}"), extra, mbps, secs);
            println!(
                "round {round} {name}: delivered {:.0} ({:.2} MB/s of {mbps} offered); CPU µs per datagram: relay {:.2}, tunnel A {:.2}, tunnel B {:.2}; tunnel A's UDP: {:.0} datagrams in {:.0} sends; tunnel B's: {:.0} datagrams in {:.0} reads",
                r.delivered, r.goodput_mb_s, r.relay_us, r.a_us, r.b_us, r.a_datagrams, r.a_sends, r.b_datagrams, r.b_reads
            );
            rows[k].push(r);
        }
    }
    let med = |k: usize, f: fn(&Round) -> f64| median(rows[k].iter().map(f).collect());
    let fig = |k: usize| {
        serde_json::json!({
            "delivered": med(k, |r| r.delivered),
            "goodput_mb_s": med(k, |r| r.goodput_mb_s),
            "relay_us_per_datagram": med(k, |r| r.relay_us),
            "tunnel_a_us_per_datagram": med(k, |r| r.a_us),
            "tunnel_b_us_per_datagram": med(k, |r| r.b_us),
            "tunnel_a_datagrams_per_send": med(k, |r| r.a_datagrams / r.a_sends),
            "tunnel_b_datagrams_per_read": med(k, |r| r.b_datagrams / r.b_reads),
            "rounds": rows[k].iter().map(|r| serde_json::json!({
                "delivered": r.delivered, "goodput_mb_s": r.goodput_mb_s,
                "relay_us": r.relay_us, "a_us": r.a_us, "b_us": r.b_us,
                "a_datagrams": r.a_datagrams, "a_sends": r.a_sends,
                "b_datagrams": r.b_datagrams, "b_reads": r.b_reads,
            })).collect::<Vec<_>>(),
        })
    };
    let (g, n) = (fig(0), fig(1));
    let ratio =
        |key: &str| n[key].as_f64().unwrap_or(f64::NAN) / g[key].as_f64().unwrap_or(f64::NAN);
    println!(
        "medians of {rounds}: relay CPU per datagram without / with client GSO {:.2}x; tunnel A {:.2}x; tunnel B {:.2}x; tunnel A datagrams per send with GSO {:.1}, tunnel B per read {:.1}; goodput with / without {:.3}x",
        ratio("relay_us_per_datagram"),
        ratio("tunnel_a_us_per_datagram"),
        ratio("tunnel_b_us_per_datagram"),
        g["tunnel_a_datagrams_per_send"].as_f64().unwrap_or(f64::NAN),
        g["tunnel_b_datagrams_per_read"].as_f64().unwrap_or(f64::NAN),
        g["goodput_mb_s"].as_f64().unwrap_or(f64::NAN) / n["goodput_mb_s"].as_f64().unwrap_or(f64::NAN),
    );
    // Sanity, not a goal: both arms carried the load, and only the GSO arm coalesced.
    for k in 0..2 {
        assert!(
            rows[k]
                .iter()
                .all(|r| r.delivered > 0.5 * mbps * 1e6 / 1200.0 * secs),
            "{}: too little arrived: {:?}",
            arms[k].0,
            rows[k]
        );
    }
    assert!(
        rows[1].iter().all(|r| r.a_datagrams == r.a_sends),
        "{:?}",
        rows[1]
    );
    if let Ok(path) = std::env::var("GSO_BENCH_JSON") {
        let j = serde_json::json!({
            "mbps": mbps, "seconds": secs, "rounds": rounds, "size": 1200,
            "gso": g, "no_gso": n,
        });
        std::fs::write(&path, j.to_string()).expect("write the JSON");
    }
}
