//! NAT lab acceptance tests (issue 4): the `ferry` CLI on two homes behind Linux NAT routers
//! in network namespaces, a `ferry-relay` in a "public" namespace. Needs root and iptables
//! (skips otherwise, fails under CI); see tests/natlab/mod.rs and docs/nat-traversal.md.
//!
//! `NATLAB_TRIALS` sets the number of trials per pair (default 5; the report uses 20).

mod natlab;

use std::time::Duration;

use natlab::{keygen, median, netns_list, Lab, Nat};

fn trials() -> usize {
    std::env::var("NATLAB_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5)
}

/// The outcome of one trial: seconds from the first ping to the direct path (as `ferry ping`
/// reports it), or `None` if it stayed on the relay (or took longer than the limit); and
/// the pinger's output.
struct Trial {
    to_direct: Option<f64>,
    lines: Vec<String>,
}

/// Home 2 listens, home 1 pings it every 100 ms until its path is direct (or `limit`).
fn trial(lab: &Lab, i: usize, limit: Duration) -> Trial {
    let (bkey, bpub) = keygen(lab.dir.path(), &format!("b{i}.key"));
    let map = lab.map_file.to_str().expect("utf-8 path");
    let mut b = lab.ferry(
        2,
        &[
            "ping",
            "--listen",
            "--key-file",
            bkey.to_str().unwrap(),
            "--relay-map",
            map,
        ],
    );
    assert!(
        b.wait_for("listening as", Duration::from_secs(10))
            .is_some(),
        "listener did not connect to the relay: {:?}",
        b.seen
    );
    let count = (limit.as_millis() / 100 + 10).to_string();
    let mut a = lab.ferry(
        1,
        &[
            "ping",
            &bpub,
            "--relay-map",
            map,
            "--count",
            &count,
            "--interval",
            "0.1",
            "--timeout",
            "2",
        ],
    );
    let mut to_direct = None;
    // `ferry ping` prints each path change with the seconds since its first ping (which
    // goes via the relay and starts the CallMeMaybe exchange). Allow for connecting to the
    // relay first.
    if let Some((_, line)) = a.wait_for(
        &format!("path to {bpub}: direct "),
        limit + Duration::from_secs(5),
    ) {
        // "path to nodekey:…: direct 203.0.113.6:41641 (after 0.412 s)"
        let secs = line
            .rsplit_once("(after ")
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("unparsable path line: {line}"));
        // And pings are then answered on it.
        // Through the NATs: to the address home 2's router maps it to, not its LAN address.
        assert!(
            line.contains(": direct 203.0.113.6:"),
            "direct path not via home 2's router: {line}"
        );
        let pong = a.wait_for(" via direct ", Duration::from_secs(3));
        assert!(pong.is_some(), "no pong on the direct path: {:?}", a.seen);
        if secs <= limit.as_secs_f64() {
            to_direct = Some(secs);
        }
    }
    a.kill();
    b.kill();
    Trial {
        to_direct,
        lines: a.seen.clone(),
    }
}

/// Acceptance 1: easy ↔ easy (both homes behind `MASQUERADE`) reaches the direct path in
/// every trial.
#[test]
fn natlab_easy_easy_direct_every_time() {
    if !natlab::available("natlab_easy_easy_direct_every_time") {
        return;
    }
    let n = trials();
    let lab = Lab::new(&[Nat::Easy, Nat::Easy]);
    let limit = Duration::from_secs(5);
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for i in 0..n {
        let t = trial(&lab, i, limit);
        match t.to_direct {
            Some(s) => times.push(s),
            None => failures.push((i, t.lines)),
        }
    }
    let ok = times.len();
    let med = median(&mut times.clone());
    let max = times
        .iter()
        .copied()
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    println!(
        "NAT lab easy<->easy: {ok}/{n} trials direct within {} s; time to direct median {} s, max {} s",
        limit.as_secs(),
        med.map_or("-".into(), |m| format!("{m:.3}")),
        max.map_or("-".into(), |m| format!("{m:.3}")),
    );
    assert!(
        failures.is_empty(),
        "{} of {n} trials stayed on the relay; first: {:?}",
        failures.len(),
        failures.first()
    );
}

/// The lab's namespaces are gone after a test panics, and namespaces left by a dead process
/// are removed by the next lab.
#[test]
fn natlab_cleans_up_after_a_panic_and_leftovers() {
    if !natlab::available("natlab_cleans_up_after_a_panic_and_leftovers") {
        return;
    }
    // PID 0 is never a process: this looks like a leftover of a dead run (our PID in the
    // lab-number place keeps parallel runs apart).
    let stale = format!("ferrylab-0-{}-pub", std::process::id());
    let status = std::process::Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(status.success());
    let names = std::thread::spawn(|| {
        let lab = Lab::new(&[Nat::Hard, Nat::UdpBlocked]);
        let names = lab.namespaces();
        assert!(names.iter().all(|n| netns_list().contains(n)), "{names:?}");
        // Unwinds like a failed assertion (Drop runs), without printing a panic message.
        std::panic::resume_unwind(Box::new(names));
    })
    .join()
    .expect_err("the thread panics");
    let names = names.downcast::<Vec<String>>().unwrap();
    assert_eq!(names.len(), 5, "{names:?}");
    let left = netns_list();
    assert!(
        !left.iter().any(|n| names.contains(n)),
        "left behind: {left:?}"
    );
    assert!(!left.contains(&stale), "leftover not removed: {left:?}");
}
