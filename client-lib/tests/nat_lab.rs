//! NAT lab acceptance tests (issue 4): the `ferry` CLI on two homes behind Linux NAT routers
//! in network namespaces, a `ferry-relay` in a "public" namespace. Needs root and iptables
//! (skips otherwise, fails under CI); see tests/natlab/mod.rs and docs/nat-traversal.md.
//!
//! `NATLAB_TRIALS` sets the number of trials per pair (default 5 for test 1, 3 for test 3;
//! the report uses 20).

mod natlab;

use std::path::Path;
use std::time::Duration;

use natlab::{keygen, median, netns_list, trials_or, Lab, Nat, Proc};

fn trials() -> usize {
    trials_or(5)
}

/// `ferry ping --listen` on home `home` with the key file `key`, once it is connected to the
/// relay.
fn listener(lab: &Lab, home: usize, key: &Path) -> Result<Proc, String> {
    let map = lab.map_file.to_str().expect("utf-8 path");
    let key = key.to_str().unwrap();
    let mut b = lab.ferry(
        home,
        &["ping", "--listen", "--key-file", key, "--relay-map", map],
    );
    if b.wait_for("listening as", Duration::from_secs(10))
        .is_none()
    {
        return Err(format!(
            "listener did not connect to the relay: {:?}",
            b.seen
        ));
    }
    Ok(b)
}

/// `ferry ping <peer>` from home `home`: `count` pings `interval` s apart (2 s timeout each),
/// then `extra` arguments.
fn pinger(
    lab: &Lab,
    home: usize,
    peer: &str,
    count: usize,
    interval: &str,
    extra: &[&str],
) -> Proc {
    let map = lab.map_file.to_str().expect("utf-8 path");
    let count = count.to_string();
    let mut args = vec![
        "ping",
        peer,
        "--relay-map",
        map,
        "--count",
        &count,
        "--interval",
        interval,
        "--timeout",
        "2",
    ];
    args.extend_from_slice(extra);
    lab.ferry(home, &args)
}

/// The outcome of one trial: seconds from the first ping to the direct path (as `ferry ping`
/// reports it), or `None` if it stayed on the relay (or took longer than the limit); and
/// the pinger's output.
struct Trial {
    to_direct: Option<f64>,
    lines: Vec<String>,
}

/// The WAN address of home `n`'s router (what peers see as its address).
fn wan_ip(n: usize) -> String {
    format!("203.0.113.{}", 4 * (n - 1) + 2)
}

/// Home `to` listens, home `from` pings it every 100 ms until its path is direct (or `limit`).
fn trial(lab: &Lab, i: usize, limit: Duration, from: usize, to: usize) -> Trial {
    let (bkey, bpub) = keygen(lab.dir.path(), &format!("b{i}.key"));
    let mut b = listener(lab, to, &bkey).unwrap_or_else(|e| panic!("{e}"));
    let count = (limit.as_millis() / 100 + 10) as usize;
    let mut a = pinger(lab, from, &bpub, count, "0.1", &[]);
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
        // Through the NATs: to the address the peer's router maps it to, not its LAN address.
        assert!(
            line.contains(&format!(": direct {}:", wan_ip(to))),
            "direct path not via home {to}'s router: {line}"
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
        let t = trial(&lab, i, limit, 1, 2);
        // Issue 15: a working direct path is never passed over for the UDP relay.
        let udp_relay = t.lines.iter().any(|l| l.contains(": udp-relay "));
        match t.to_direct {
            Some(s) if !udp_relay => times.push(s),
            _ => failures.push((i, t.lines)),
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

/// Acceptance 2: easy ↔ hard (`MASQUERADE` facing `MASQUERADE --random-fully`): birthday
/// probing (the hard side opens 256 mappings, the easy side probes 1024 random ports) finds
/// the direct path in most trials; the goal is ≥ 90 % within 5 s of the first ping. Trials
/// alternate which side pings. Every ping is answered, via the relay until the path is
/// direct. CI runs 10 trials and requires 8 (the per-trial odds are about 98 %, so a real
/// regression fails and chance does not); docs/nat-traversal.md reports 20.
#[test]
fn natlab_easy_hard_direct_by_birthday_probing() {
    if !natlab::available("natlab_easy_hard_direct_by_birthday_probing") {
        return;
    }
    let n = trials_or(10);
    let lab = Lab::new(&[Nat::Easy, Nat::Hard]);
    let limit = Duration::from_secs(5);
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for i in 0..n {
        let (from, to) = if i % 2 == 0 { (1, 2) } else { (2, 1) };
        let t = trial(&lab, i, limit, from, to);
        let lost: Vec<&String> = t
            .lines
            .iter()
            .filter(|l| l.starts_with("no reply "))
            .collect();
        assert!(
            lost.is_empty(),
            "trial {i}: pings unanswered: {lost:?}; {:?}",
            t.lines
        );
        match t.to_direct {
            Some(s) => times.push(s),
            None => failures.push((i, t.lines)),
        }
    }
    let ok = times.len();
    let med = median(&mut times.clone());
    let max = times.iter().copied().fold(0.0f64, f64::max);
    println!(
        "NAT lab easy<->hard: {ok}/{n} trials ({:.0} %) direct within {} s; time to direct median {} s, max {max:.3} s",
        100.0 * ok as f64 / n as f64,
        limit.as_secs(),
        med.map_or("-".into(), |m| format!("{m:.3}")),
    );
    for (i, lines) in &failures {
        println!("trial {i} stayed on the relay: {lines:?}");
    }
    assert!(
        ok * 10 >= n * 8,
        "only {ok} of {n} easy<->hard trials went direct within {} s",
        limit.as_secs()
    );
}

/// Issue 14.2: two easy (MASQUERADE) routers whose WAN sides share one segment, so that a punch
/// with TTL 2 reaches the peer's router (it is two hops away, and a router does not check the
/// TTL of a packet for itself). The goal is ≥ 95 % direct within 5 s; CI runs 10 trials and
/// requires 9 (the report in docs/nat-traversal.md runs more with NATLAB_TRIALS).
#[test]
fn natlab_neighbouring_easy_nats_go_direct() {
    if !natlab::available("natlab_neighbouring_easy_nats_go_direct") {
        return;
    }
    let n = trials_or(10);
    let lab = Lab::shared_wan(&[Nat::Easy, Nat::Easy]);
    let limit = Duration::from_secs(5);
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for i in 0..n {
        let (from, to) = if i % 2 == 0 { (1, 2) } else { (2, 1) };
        let t = trial(&lab, i, limit, from, to);
        match t.to_direct {
            Some(s) => times.push(s),
            None => failures.push((i, t.lines)),
        }
    }
    let ok = times.len();
    let med = median(&mut times.clone());
    let max = times.iter().copied().fold(0.0f64, f64::max);
    println!(
        "NAT lab neighbouring easy<->easy (one WAN segment): {ok}/{n} trials direct within {} s; time to direct median {} s, max {max:.3} s",
        limit.as_secs(),
        med.map_or("-".into(), |m| format!("{m:.3}")),
    );
    for (i, lines) in &failures {
        println!("trial {i} stayed on the relay: {lines:?}");
    }
    assert!(
        ok * 10 >= n * 9,
        "only {ok} of {n} neighbouring easy<->easy trials went direct within {} s",
        limit.as_secs()
    );
}

/// One trial of a pair that cannot go direct: home `listen_home` listens, home `ping_home`
/// sends `PINGS` pings (`INTERVAL` s apart). Returns `Err(why)` if a path went direct, the
/// first reply was not `seq=1` via the relay (DERP), or a ping went unanswered; otherwise
/// `Ok(pongs that came through the UDP relay)` (issue 15: later pongs may).
fn relay_trial(
    lab: &Lab,
    tag: &str,
    ping_home: usize,
    listen_home: usize,
) -> Result<usize, String> {
    const PINGS: u32 = 8;
    let (bkey, bpub) = keygen(lab.dir.path(), &format!("{tag}.key"));
    let mut b = listener(lab, listen_home, &bkey)?;
    let mut a = pinger(lab, ping_home, &bpub, PINGS as usize, "0.25", &[]);
    // The summary line ends the run: 8 × 0.25 s, plus connecting, plus slack.
    let done = a.wait_for(" pings, ", Duration::from_secs(15));
    a.kill();
    b.kill();
    let lines = a.seen.clone();
    let Some((_, summary)) = done else {
        return Err(format!("pinger did not finish: {lines:?}"));
    };
    if let Some(l) = lines.iter().find(|l| l.contains(": direct ")) {
        return Err(format!("went direct: {l}; {lines:?}"));
    }
    // The first answer (or timeout) line is the first ping's: answered via the relay, not
    // after waiting for hole punching (which would show as "no reply" or a later seq).
    let first = lines
        .iter()
        .find(|l| l.starts_with("pong from ") || l.starts_with("no reply "))
        .cloned()
        .unwrap_or_default();
    if !(first.contains(" via relay 900: seq=1 ")) {
        return Err(format!(
            "first reply not seq=1 via relay: {first:?}; {lines:?}"
        ));
    }
    let pongs = lines.iter().filter(|l| l.starts_with("pong from ")).count();
    let via_derp = lines
        .iter()
        .filter(|l| l.contains(" via relay 900: "))
        .count();
    let via_udp_relay = lines
        .iter()
        .filter(|l| l.contains(" via udp-relay 900: "))
        .count();
    if pongs != PINGS as usize || via_derp + via_udp_relay != pongs {
        return Err(format!(
            "{pongs}/{PINGS} pongs, {via_derp} via DERP, {via_udp_relay} via the UDP relay ({summary}); {lines:?}"
        ));
    }
    Ok(via_udp_relay)
}

/// Acceptance 3: hard ↔ hard (both `MASQUERADE --random-fully`), and UDP blocked on one side
/// (the other easy), never go direct, and the first ping is answered via the relay (DERP) at
/// once (no waiting for hole punching or a UDP relay session). Later pongs of hard ↔ hard may
/// come through the UDP relay (issue 15); with UDP blocked none can. Trials alternate which
/// side pings.
#[test]
fn natlab_hard_hard_and_udp_blocked_use_the_relay_at_once() {
    if !natlab::available("natlab_hard_hard_and_udp_blocked_use_the_relay_at_once") {
        return;
    }
    let n = trials_or(3);
    // Homes: 1, 2 hard; 3 easy; 4 UDP blocked.
    let lab = Lab::new(&[Nat::Hard, Nat::Hard, Nat::Easy, Nat::UdpBlocked]);
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for (case, pairs) in [
        ("hard<->hard", [(1, 2), (2, 1)]),
        ("easy<->UDP-blocked", [(3, 4), (4, 3)]),
    ] {
        let mut ok = 0;
        for i in 0..n {
            let (pinger, listener) = pairs[i % 2];
            match relay_trial(&lab, &format!("r{pinger}{listener}-{i}"), pinger, listener) {
                Ok(n) if n > 0 && case == "easy<->UDP-blocked" => failures.push(format!(
                    "{case} trial {i}: {n} pongs through a UDP relay with UDP blocked"
                )),
                Ok(_) => ok += 1,
                Err(why) => failures.push(format!("{case} trial {i}: {why}")),
            }
        }
        println!(
            "NAT lab {case}: {ok}/{n} trials relay-only with the first ping answered via the relay"
        );
        report.push((case, ok));
    }
    assert!(
        failures.is_empty(),
        "{} failed trials ({report:?}); first: {}",
        failures.len(),
        failures[0]
    );
}

/// Issue 15, acceptance 1: pairs that cannot go direct — hard ↔ hard, and hard ↔ a home whose
/// firewall lets UDP in only from the relay ([`Nat::InboundUdpBlocked`]) — are on the UDP relay
/// path within 2 s of the first ping in ≥ 95 % of trials (its pongs then come through it), and
/// never go direct. (Easy pairs going direct without it: `natlab_easy_easy_direct_every_time`
/// checks no UDP relay path appears.) Trials alternate which side pings.
#[test]
fn natlab_pairs_that_cannot_go_direct_use_the_udp_relay_within_2s() {
    if !natlab::available("natlab_pairs_that_cannot_go_direct_use_the_udp_relay_within_2s") {
        return;
    }
    const LIMIT: f64 = 2.0;
    let n = trials();
    let lab = Lab::new(&[Nat::Hard, Nat::Hard, Nat::InboundUdpBlocked]);
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for (case, pairs) in [
        ("hard<->hard", [(1, 2), (2, 1)]),
        ("hard<->inbound-UDP-blocked", [(1, 3), (3, 1)]),
    ] {
        let mut times = Vec::new();
        for i in 0..n {
            let (from, to) = pairs[i % 2];
            let (bkey, bpub) = keygen(lab.dir.path(), &format!("u{from}{to}-{i}.key"));
            let mut b = listener(&lab, to, &bkey).unwrap_or_else(|e| panic!("{e}"));
            let mut a = pinger(&lab, from, &bpub, 40, "0.1", &[]);
            let line = a.wait_for(
                &format!("path to {bpub}: udp-relay 900 "),
                Duration::from_secs(10),
            );
            // Pongs then come through it.
            let pong = line
                .as_ref()
                .and_then(|_| a.wait_for(" via udp-relay 900: ", Duration::from_secs(3)));
            a.kill();
            b.kill();
            if let Some(l) = a.seen.iter().find(|l| l.contains(": direct ")) {
                failures.push(format!("{case} trial {i}: went direct: {l}"));
                continue;
            }
            let secs = line.as_ref().and_then(|(_, l)| {
                l.rsplit_once("(after ")
                    .and_then(|(_, r)| r.split_whitespace().next())
                    .and_then(|s| s.parse::<f64>().ok())
            });
            match (secs, pong) {
                (Some(s), Some(_)) if s <= LIMIT => times.push(s),
                (s, p) => failures.push(format!(
                    "{case} trial {i}: UDP relay path after {s:?} s, pong through it: {}; {:?}",
                    p.is_some(),
                    a.seen
                )),
            }
        }
        let ok = times.len();
        println!(
            "NAT lab {case}: {ok}/{n} trials on the UDP relay within {LIMIT} s (median {:.3} s, max {:.3} s)",
            median(&mut times.clone()).unwrap_or_default(),
            times.iter().copied().fold(0.0f64, f64::max),
        );
        report.push((case, ok, n));
    }
    for (case, ok, n) in &report {
        assert!(
            ok * 100 >= 95 * n,
            "{case}: {ok}/{n} on the UDP relay within {LIMIT} s (goal 95 %); failures: {failures:?}"
        );
    }
}

/// Issue 14.4: a node whose UDP is blocked gets its first ping answered within 0.5 s of its
/// start (process start to the first pong line), not after netcheck's 3 s deadline. The peer
/// listens behind an easy NAT; the pinger's router drops all its UDP.
#[test]
fn natlab_udp_blocked_first_ping_is_answered_at_once() {
    if !natlab::available("natlab_udp_blocked_first_ping_is_answered_at_once") {
        return;
    }
    const GOAL: Duration = Duration::from_millis(500);
    let n = trials_or(5);
    let lab = Lab::new(&[Nat::Easy, Nat::UdpBlocked]);
    let mut times = Vec::new();
    for i in 0..n {
        let (bkey, bpub) = keygen(lab.dir.path(), &format!("u{i}.key"));
        let mut b = listener(&lab, 1, &bkey).unwrap_or_else(|e| panic!("{e}"));
        let start = std::time::Instant::now();
        let mut a = pinger(&lab, 2, &bpub, 1, "0.1", &[]);
        let pong = a.wait_for("pong from ", Duration::from_secs(10));
        let Some((at, line)) = pong else {
            panic!("trial {i}: no pong: {:?}", a.seen)
        };
        assert!(line.contains(" via relay 900: seq=1 "), "trial {i}: {line}");
        times.push(at.duration_since(start).as_secs_f64());
        a.kill();
        b.kill();
    }
    let max = times.iter().copied().fold(0.0f64, f64::max);
    println!(
        "NAT lab UDP-blocked first ping: answered {:?} s after the pinger started (median {:.3} s, max {max:.3} s; goal {GOAL:?})",
        times.iter().map(|t| format!("{t:.3}")).collect::<Vec<_>>(),
        median(&mut times.clone()).unwrap_or_default(),
    );
    assert!(
        max <= GOAL.as_secs_f64(),
        "the UDP-blocked node's first ping took {max:.3} s (goal {GOAL:?})"
    );
}

/// The packet counter of the rule tagged `/* tag */` in `chain` of the public namespace.
fn rule_packets(lab: &Lab, chain: &str, tag: &str) -> u64 {
    let out = Lab::exec(&lab.ns("pub"), &["iptables", "-nvxL", chain]).expect("iptables -L");
    let line = out
        .lines()
        .find(|l| l.contains(&format!("/* {tag} */")))
        .unwrap_or_else(|| panic!("no rule {tag} in {chain}: {out}"));
    line.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unparsable counter: {line}"))
}

/// Acceptance 6: what the relay receives and forwards contains no plaintext of the
/// application's packets. Hard ↔ hard (so everything goes via the relay, which the lab's map
/// dials over plain HTTP: no TLS hides anything); `ferry ping --payload <canary>` sends an
/// application message before every ping. Counting iptables rules in the public namespace
/// (`-m string`, on INPUT = to the relay, OUTPUT = from it, FORWARD = between the routers)
/// must see the canary in no packet, while control rules matching the listener's raw public
/// key (in DERP frames to or from it) and the plaintext `Upgrade: DERP` of the clients' HTTP
/// requests prove the rules see the relay's traffic and find plaintext in it.
///
/// Issue 15, acceptance 6: the pair moves to the UDP relay path after the first pings, so the
/// later messages cross the relay as UDP relay datagrams; a control rule matching the Geneve
/// header of ferry's end-to-end packets (protocol 0x7A1E at the start of the UDP payload)
/// proves the rules saw those too; pongs that came through the UDP relay (as `ferry ping`
/// reports each pong's arrival path) show the pinger's messages went that way too (its path
/// event to `udp-relay` precedes them; each message goes out just before its ping).
#[test]
fn natlab_relay_sees_no_plaintext() {
    if !natlab::available("natlab_relay_sees_no_plaintext") {
        return;
    }
    const PINGS: usize = 10;
    let lab = Lab::new(&[Nat::Hard, Nat::Hard]);
    let canary = format!("ferry-canary-plaintext-{}-0123456789", std::process::id());
    let (bkey, bpub) = keygen(lab.dir.path(), "b.key");
    let key_hex = bpub.strip_prefix("nodekey:").expect("nodekey: prefix");
    let public = lab.ns("pub");
    for chain in ["INPUT", "OUTPUT", "FORWARD"] {
        for (tag, kind, pattern) in [
            ("ferry-canary", "--string", canary.clone()),
            ("ferry-control", "--hex-string", format!("|{key_hex}|")),
        ] {
            Lab::exec(
                &public,
                &[
                    "iptables",
                    "-A",
                    chain,
                    "-m",
                    "string",
                    "--algo",
                    "bm",
                    kind,
                    &pattern,
                    "-m",
                    "comment",
                    "--comment",
                    tag,
                ],
            )
            .expect("counting rule");
        }
    }
    // UDP relay datagrams carrying E2E packets: Geneve version 0, no options, protocol 0x7A1E,
    // right after the IP (20 bytes) and UDP (8) headers.
    for chain in ["INPUT", "OUTPUT"] {
        Lab::exec(
            &public,
            &[
                "iptables",
                "-A",
                chain,
                "-p",
                "udp",
                "-m",
                "string",
                "--algo",
                "bm",
                "--from",
                "28",
                "--to",
                "32",
                "--hex-string",
                "|00007a1e|",
                "-m",
                "comment",
                "--comment",
                "ferry-geneve",
            ],
        )
        .expect("counting rule");
    }
    // And the string match does see plaintext in this traffic: the clients' HTTP upgrade.
    Lab::exec(
        &public,
        &[
            "iptables",
            "-A",
            "INPUT",
            "-m",
            "string",
            "--algo",
            "bm",
            "--string",
            "Upgrade: DERP",
            "-m",
            "comment",
            "--comment",
            "ferry-http",
        ],
    )
    .expect("counting rule");
    let mut b = listener(&lab, 2, &bkey).unwrap_or_else(|e| panic!("{e}"));
    let mut a = pinger(&lab, 1, &bpub, PINGS, "0.2", &["--payload", &canary]);
    let done = a.wait_for(" pings, ", Duration::from_secs(15));
    assert!(done.is_some(), "pinger did not finish: {:?}", a.seen);
    let pongs = a
        .seen
        .iter()
        .filter(|l| {
            l.starts_with("pong from ")
                && (l.contains(" via relay 900: ") || l.contains(" via udp-relay 900: "))
        })
        .count();
    assert_eq!(pongs, PINGS, "pongs via the relay: {:?}", a.seen);
    // Each message was sent before its ping's pong: all have arrived, via the relay (DERP or
    // the UDP relay).
    let size = format!(": {} bytes via ", canary.len());
    for _ in 0..PINGS {
        assert!(
            b.wait_for(&size, Duration::from_secs(3)).is_some(),
            "listener missed a message: {:?}",
            b.seen
        );
    }
    a.kill();
    b.kill();
    let via_udp_relay = a
        .seen
        .iter()
        .filter(|l| l.starts_with("pong from ") && l.contains(" via udp-relay 900: "))
        .count();
    assert!(
        via_udp_relay >= PINGS / 2,
        "{via_udp_relay} of {PINGS} pongs came through the UDP relay: {:?}",
        a.seen
    );
    assert!(
        !b.seen
            .iter()
            .chain(&a.seen)
            .any(|l| l.contains(" via direct")),
        "hard <-> hard went direct"
    );
    let http = rule_packets(&lab, "INPUT", "ferry-http");
    let mut report = vec![format!("HTTP upgrades {http}")];
    assert!(
        http >= 2,
        "string match saw no plaintext upgrade: {report:?}"
    );
    for chain in ["INPUT", "OUTPUT", "FORWARD"] {
        let c = rule_packets(&lab, chain, "ferry-canary");
        let k = rule_packets(&lab, chain, "ferry-control");
        report.push(format!("{chain}: canary {c}, key {k}"));
        assert_eq!(c, 0, "plaintext seen in {chain}: {report:?}");
        if chain != "FORWARD" {
            assert!(
                k > 0,
                "control rule saw no relay frames in {chain}: {report:?}"
            );
            let g = rule_packets(&lab, chain, "ferry-geneve");
            report.push(format!("{chain}: UDP relay E2E datagrams {g}"));
            assert!(
                g > 0,
                "control rule saw no UDP relay datagrams in {chain}: {report:?}"
            );
        }
    }
    println!(
        "NAT lab relay capture: {PINGS}/{PINGS} messages delivered via the relay ({via_udp_relay} pongs through the UDP relay), plaintext in 0 packets ({})",
        report.join("; ")
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

/// A direct path that dies and comes back (a network outage on one side, all UDP dropped in
/// its router): both nodes are active and both keep probing every `probe_interval` on the
/// relay, so each receives the other's CallMeMaybe while a probe of its own is out (neither
/// "answers"; both ping at full TTL, see "What the lab found" in docs/nat-traversal.md). The
/// path must go direct again once the network is back, and no ping is lost meanwhile.
#[test]
fn natlab_direct_path_heals_after_an_outage() {
    if !natlab::available("natlab_direct_path_heals_after_an_outage") {
        return;
    }
    const TAG: &str = "ferry-heal-cut";
    let n = trials_or(3);
    let lab = Lab::new(&[Nat::Easy, Nat::Easy]);
    let r1 = lab.ns("r1");
    let mut heal_times = Vec::new();
    for i in 0..n {
        let (bkey, bpub) = keygen(lab.dir.path(), &format!("heal{i}.key"));
        let mut b = listener(&lab, 2, &bkey).unwrap_or_else(|e| panic!("{e}"));
        let mut a = pinger(&lab, 1, &bpub, 0, "0.1", &[]);
        let direct = format!("path to {bpub}: direct ");
        assert!(
            a.wait_for(&direct, Duration::from_secs(10)).is_some(),
            "trial {i}: never direct: {:?}",
            a.seen
        );
        Lab::exec(&r1, &natlab::udp_cut_rule("-I", TAG)).unwrap();
        let relay = format!("path to {bpub}: relay 900");
        let fell_back = a.wait_for(&relay, Duration::from_secs(15));
        // Both sides' paths expire (6.5 s trust); keep the outage a little longer so both
        // have been probing on the relay for a while.
        std::thread::sleep(Duration::from_secs(2));
        Lab::exec(&r1, &natlab::udp_cut_rule("-D", TAG)).unwrap();
        let restored = std::time::Instant::now();
        assert!(
            fell_back.is_some(),
            "trial {i}: no fallback to the relay: {:?}",
            a.seen
        );
        let healed = a.wait_for(&direct, Duration::from_secs(20));
        a.kill();
        b.kill();
        let Some((t, _)) = healed else {
            panic!(
                "trial {i}: not direct again within 20 s of the outage's end: {:?}",
                a.seen
            );
        };
        let lost = a.seen.iter().filter(|l| l.starts_with("no reply ")).count();
        assert_eq!(lost, 0, "trial {i}: pings lost: {:?}", a.seen);
        println!(
            "trial {i}: direct again {:.2} s after the outage ended, 0 pings unanswered",
            t.saturating_duration_since(restored).as_secs_f64()
        );
        heal_times.push(t.saturating_duration_since(restored).as_secs_f64());
    }
    println!(
        "NAT lab easy<->easy outage: {n}/{n} trials direct again; median {:.2} s after the outage ended",
        median(&mut heal_times).unwrap_or(0.0)
    );
}

/// Both nodes start talking at the same moment (each pings the other, started together), so
/// their first CallMeMaybes cross on the relay: the paths must still go direct.
#[test]
fn natlab_simultaneous_start_goes_direct() {
    if !natlab::available("natlab_simultaneous_start_goes_direct") {
        return;
    }
    let n = trials_or(5);
    let lab = Lab::new(&[Nat::Easy, Nat::Easy]);
    let map = lab.map_file.to_str().expect("utf-8 path").to_string();
    let mut times = Vec::new();
    for i in 0..n {
        let (akey, apub) = keygen(lab.dir.path(), &format!("sa{i}.key"));
        let (bkey, bpub) = keygen(lab.dir.path(), &format!("sb{i}.key"));
        let run = |home: usize, key: &Path, peer: &str| {
            lab.ferry(
                home,
                &[
                    "ping",
                    peer,
                    "--key-file",
                    key.to_str().unwrap(),
                    "--relay-map",
                    &map,
                    "--count",
                    "0",
                    "--interval",
                    "0.1",
                    "--timeout",
                    "2",
                ],
            )
        };
        let mut a = run(1, &akey, &bpub);
        let mut b = run(2, &bkey, &apub);
        let da = a.wait_for(&format!("path to {bpub}: direct "), Duration::from_secs(10));
        let db = b.wait_for(&format!("path to {apub}: direct "), Duration::from_secs(10));
        a.kill();
        b.kill();
        let secs = |l: &str| {
            l.rsplit_once("(after ")
                .and_then(|(_, r)| r.split_whitespace().next())
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        match (da, db) {
            (Some((_, la)), Some((_, lb))) => times.push(secs(&la).max(secs(&lb))),
            _ => panic!(
                "trial {i}: not direct both ways: a {:?} b {:?}",
                a.seen, b.seen
            ),
        }
    }
    println!(
        "NAT lab easy<->easy simultaneous start: {n}/{n} direct both ways; median {:.3} s",
        median(&mut times).unwrap_or(f64::NAN)
    );
}

/// netcheck behind real NATs: `ferry netcheck --json` (two STUN servers: the relay's ports
/// 3478 and 3479) sees one mapping behind MASQUERADE (easy), a different one per server behind
/// `--random-fully` (hard), and no UDP at all where UDP is dropped; the text report says so.
#[test]
fn natlab_netcheck_tells_easy_hard_and_udp_blocked_apart() {
    if !natlab::available("natlab_netcheck_tells_easy_hard_and_udp_blocked_apart") {
        return;
    }
    let lab = Lab::new(&[Nat::Easy, Nat::Hard, Nat::UdpBlocked]);
    let map = lab.map_file.to_str().expect("utf-8 path");
    let bin = natlab::ferry_bin();
    let bin = bin.to_str().expect("utf-8 path");
    let netcheck = |home: usize, json: bool| {
        let mut args = vec![bin, "netcheck", "--relay-map", map, "--timeout", "2"];
        if json {
            args.push("--json");
        }
        Lab::exec(&lab.home(home), &args).unwrap_or_else(|e| panic!("home {home}: {e}"))
    };
    let report = |home: usize| -> serde_json::Value {
        serde_json::from_str(&netcheck(home, true)).expect("JSON report")
    };
    let easy = report(1);
    assert_eq!(easy["udp"], true, "{easy}");
    assert_eq!(easy["mapping_varies_by_dest_ip"], false, "{easy}");
    let g = easy["global_v4"].as_str().unwrap_or_default();
    assert!(g.starts_with(&format!("{}:", wan_ip(1))), "{easy}");
    let hard = report(2);
    assert_eq!(hard["udp"], true, "{hard}");
    assert_eq!(hard["mapping_varies_by_dest_ip"], true, "{hard}");
    let mapped: Vec<&str> = hard["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["mapped"].as_str())
        .collect();
    assert_eq!(mapped.len(), 2, "{hard}");
    assert!(mapped
        .iter()
        .all(|m| m.starts_with(&format!("{}:", wan_ip(2)))));
    assert_ne!(mapped[0], mapped[1], "a port per destination: {hard}");
    let blocked = report(3);
    assert_eq!(blocked["udp"], false, "{blocked}");
    assert!(blocked["mapping_varies_by_dest_ip"].is_null(), "{blocked}");
    let text = netcheck(2, false);
    assert!(text.contains("hard NAT"), "{text}");
    println!(
        "NAT lab netcheck: easy {g}, hard {mapped:?}, UDP blocked: no UDP; text: {}",
        text.lines()
            .find(|l| l.contains("hard NAT"))
            .unwrap_or_default()
            .trim()
    );
}
