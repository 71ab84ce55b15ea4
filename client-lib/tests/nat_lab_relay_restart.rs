//! NAT lab acceptance test 5 (issue 4): the relay restarts mid-transfer. An established
//! direct path keeps carrying traffic while the relay is down, and the relay path comes back
//! by itself afterwards. Needs root and iptables (skips otherwise, fails under CI); see
//! tests/natlab/mod.rs and docs/nat-traversal.md.
//!
//! `NATLAB_TRIALS` sets the number of trials (default 1: a trial takes about 15 s). Trials
//! alternate how the relay stops: even ones (the first) with SIGTERM (a graceful restart: the
//! relay sends its clients Restarting and drains), odd ones with SIGKILL (a crash).

mod natlab;

use std::time::{Duration, Instant};

use natlab::{keygen, netns_list, tail, Lab, Nat};

/// How long the relay stays down while the direct path must keep answering.
const DOWNTIME: Duration = Duration::from_secs(3);
/// The longest allowed time without a direct reply while the relay is down (pings go out
/// every 100 ms).
const MAX_GAP: Duration = Duration::from_secs(1);
/// Both nodes must be connected to the restarted relay within this.
const RECONNECT_LIMIT: Duration = Duration::from_secs(20);
/// After the direct path is cut, replies must come via the relay within this (the direct
/// path's trust is 6.5 s).
const RELAY_LIMIT: Duration = Duration::from_secs(15);
/// The comment on the router rule that cuts the direct path (to delete exactly it).
const CUT_TAG: &str = "ferry-relay-restart-cut";

fn trials() -> usize {
    natlab::trials_or(1)
}

/// TCP connections established to the relay's DERP port, as `ss` in `pub` sees them.
fn relay_connections(lab: &Lab) -> usize {
    let filter = format!("( sport = :{} )", natlab::RELAY_PORT);
    Lab::exec(
        &lab.ns("pub"),
        &["ss", "-tnH", "state", "established", &filter],
    )
    .map(|out| out.lines().filter(|l| !l.trim().is_empty()).count())
    .unwrap_or(0)
}

/// The rule in router 1 that drops all forwarded UDP (the direct path; the relay is TCP).
fn cut_rule(op: &str) -> Vec<&str> {
    natlab::udp_cut_rule(op, CUT_TAG)
}

/// What one trial measured.
struct Trial {
    graceful: bool,
    /// Direct replies while the relay was down, and the longest time without one (from
    /// the stop to the end of the downtime, edges included).
    downtime_replies: usize,
    longest_gap: Duration,
    /// From the relay's restart until both nodes had a connection to it.
    reconnect: Duration,
    /// From cutting the direct path until the first reply via the relay.
    relay_resumed: Duration,
    /// `no reply` lines after the cut (pings lost while switching).
    lost_after_cut: usize,
}

/// Home 2 listens, home 1 pings it every 100 ms; direct path, relay restart, cut.
fn trial(lab: &mut Lab, i: usize) -> Result<Trial, String> {
    let graceful = i.is_multiple_of(2);
    let map = lab.map_file.to_str().expect("utf-8 path").to_string();
    let (bkey, bpub) = keygen(lab.dir.path(), &format!("b{i}.key"));
    let alog = lab.dir.path().join(format!("a{i}.log"));
    let blog = lab.dir.path().join(format!("b{i}.log"));
    let logs = |why: String| {
        format!(
            "{why}\n--- A's log (tail):\n{}\n--- B's log (tail):\n{}",
            tail(&alog, 40),
            tail(&blog, 40)
        )
    };
    let mut b = lab.ferry_logged(
        2,
        &blog,
        &[
            "ping",
            "--listen",
            "--key-file",
            bkey.to_str().unwrap(),
            "--relay-map",
            &map,
        ],
    );
    if b.wait_for("listening as", Duration::from_secs(10))
        .is_none()
    {
        return Err(logs(format!("listener did not start: {:?}", b.seen)));
    }
    let mut a = lab.ferry_logged(
        1,
        &alog,
        &[
            "ping",
            &bpub,
            "--relay-map",
            &map,
            "--count",
            "0",
            "--interval",
            "0.1",
            "--timeout",
            "1",
        ],
    );
    // 1. The direct path, and a reply on it.
    if a.wait_for(&format!("path to {bpub}: direct "), Duration::from_secs(10))
        .is_none()
    {
        return Err(logs(format!("never went direct: {:?}", a.seen)));
    }
    if a.wait_for(" via direct ", Duration::from_secs(3)).is_none() {
        return Err(logs(format!("no reply via direct: {:?}", a.seen)));
    }
    if relay_connections(lab) != 2 {
        return Err(format!(
            "expected 2 connections to the relay before the restart, found {}",
            relay_connections(lab)
        ));
    }

    // 2. The relay goes away; the direct path answers every ping meanwhile.
    let stop_start = Instant::now();
    lab.stop_relay(graceful);
    let stopped = Instant::now();
    let mut last = stop_start;
    let mut longest_gap = Duration::ZERO;
    let mut downtime_replies = 0;
    let end = stopped + DOWNTIME;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Ok((t, line)) = a.lines.recv_timeout(left) else {
            break;
        };
        a.seen.push(line.clone());
        if line.starts_with("pong from ") && line.contains(" via direct ") {
            downtime_replies += 1;
            longest_gap = longest_gap.max(t - last);
            last = t;
        } else if line.starts_with("pong from ")
            || line.starts_with("no reply ")
            || line.starts_with("path to ")
        {
            return Err(logs(format!(
                "while the relay was down (stop took {:?}): {line:?}; {:?}",
                stopped - stop_start,
                a.seen
            )));
        }
    }
    longest_gap = longest_gap.max(end - last);
    if longest_gap > MAX_GAP {
        return Err(logs(format!(
            "{downtime_replies} direct replies while the relay was down, but a gap of \
             {longest_gap:?}; {:?}",
            a.seen
        )));
    }
    if relay_connections(lab) != 0 {
        return Err("connections to the relay while it is stopped".into());
    }

    // 3. The relay comes back (same address and ports); both nodes reconnect by themselves.
    lab.start_relay()?;
    let restarted = Instant::now();
    loop {
        if relay_connections(lab) >= 2 {
            break;
        }
        if restarted.elapsed() > RECONNECT_LIMIT {
            return Err(logs(format!(
                "{} of 2 nodes reconnected to the restarted relay within {RECONNECT_LIMIT:?}",
                relay_connections(lab)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let reconnect = restarted.elapsed();

    // 4. Cut the direct path: replies must resume via the relay.
    let r1 = lab.ns("r1");
    Lab::exec(&r1, &cut_rule("-I")).map_err(|e| format!("cut rule: {e}"))?;
    let cut = Instant::now();
    let before = a.seen.len();
    let resumed = a.wait_for(" via relay 900: ", RELAY_LIMIT);
    let _ = Lab::exec(&r1, &cut_rule("-D"));
    let lost_after_cut = a.seen[before..]
        .iter()
        .filter(|l| l.starts_with("no reply "))
        .count();
    let Some((t, _)) = resumed else {
        return Err(logs(format!(
            "no reply via the relay within {RELAY_LIMIT:?} of cutting the direct path \
             (relay restarted {:?} before the cut); pinger since the cut: {:?}",
            cut - restarted,
            &a.seen[before..]
        )));
    };
    a.kill();
    b.kill();
    Ok(Trial {
        graceful,
        downtime_replies,
        longest_gap,
        reconnect,
        relay_resumed: t - cut,
        lost_after_cut,
    })
}

/// Acceptance 5: the relay restarts mid-transfer (easy ↔ easy, direct): the direct path keeps
/// answering every ping while the relay is down, both nodes reconnect to the restarted relay
/// by themselves, and once the direct path is cut, replies come via the relay.
#[test]
fn natlab_relay_restart_keeps_direct_and_relay_comes_back() {
    if !natlab::available("natlab_relay_restart_keeps_direct_and_relay_comes_back") {
        return;
    }
    let n = trials();
    let mut lab = Lab::new(&[Nat::Easy, Nat::Easy]);
    let names = lab.namespaces();
    let mut ok = Vec::new();
    let mut failures = Vec::new();
    for i in 0..n {
        match trial(&mut lab, i) {
            Ok(t) => {
                println!(
                    "trial {i} ({}): {} direct replies in {} s of relay downtime, longest gap \
                     {:.3} s; both nodes reconnected {:.3} s after the restart; replies via the \
                     relay {:.3} s after the direct path was cut ({} pings unanswered meanwhile)",
                    if t.graceful { "SIGTERM" } else { "SIGKILL" },
                    t.downtime_replies,
                    DOWNTIME.as_secs(),
                    t.longest_gap.as_secs_f64(),
                    t.reconnect.as_secs_f64(),
                    t.relay_resumed.as_secs_f64(),
                    t.lost_after_cut,
                );
                ok.push(t);
            }
            Err(why) => {
                println!("trial {i}: FAILED: {why}");
                failures.push((i, why));
                // A failed trial may have left the relay stopped or the cut in place.
                let _ = Lab::exec(&lab.ns("r1"), &cut_rule("-D"));
                lab.stop_relay(false);
                lab.start_relay()
                    .expect("restarting the relay after a failed trial");
            }
        }
    }
    let max = |f: fn(&Trial) -> f64| ok.iter().map(f).fold(0.0, f64::max);
    let min_replies = ok.iter().map(|t| t.downtime_replies).min().unwrap_or(0);
    println!(
        "NAT lab relay restart (easy<->easy): {}/{n} trials passed; direct replies during {} s \
         downtime min {min_replies}, longest gap max {:.3} s; reconnect max {:.3} s; relay \
         replies after the cut max {:.3} s",
        ok.len(),
        DOWNTIME.as_secs(),
        max(|t| t.longest_gap.as_secs_f64()),
        max(|t| t.reconnect.as_secs_f64()),
        max(|t| t.relay_resumed.as_secs_f64()),
    );
    drop(lab);
    let left = netns_list();
    assert!(
        !left.iter().any(|n| names.contains(n)),
        "left behind: {left:?}"
    );
    assert!(
        failures.is_empty(),
        "{} of {n} trials failed; first: trial {}: {}",
        failures.len(),
        failures[0].0,
        failures[0].1
    );
}
