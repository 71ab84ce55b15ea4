//! Issue 14.1: one unreachable relay region must not stall the endpoint. A and B talk direct;
//! C is homed on a second region whose relay then disappears without a word (iptables DROP both
//! ways, in a network namespace of the test's own: needs root, skipped otherwise, run by CI).
//! The application keeps sending to C. A's pings to B must go on as before: the relay queue
//! for the dead region drops its oldest packets (counted) instead of making the endpoint wait.

mod common;
mod natlab;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_client::{DirectOptions, Endpoint, EndpointConfig, Path};
use natlab::{netns_available, NetNs};
use tokio::time::timeout;

/// How long the application floods the dead region while A pings B.
const FLOOD: Duration = Duration::from_secs(4);
/// A ping A → B every this often.
const PING_EVERY: Duration = Duration::from_millis(20);
/// The bound: no ping to B, before or during the flood, takes longer than this. A's direct
/// round trip to B on loopback is well under 5 ms, a loaded 2-core CI machine adds spikes of
/// tens of ms; a stalled endpoint waits for the dead relay's write timeout (10 s) and more.
const BOUND: Duration = Duration::from_millis(300);

fn config(map: ferry_client::RelayMap, home: u32, direct: bool) -> EndpointConfig {
    let mut c = ep_config(map);
    c.home_region = Some(home);
    c.direct = DirectOptions {
        enabled: direct,
        trust: Duration::from_secs(3),
        heartbeat: Duration::from_millis(250),
        probe_interval: Duration::from_millis(500),
        active_timeout: Duration::from_secs(60),
        udp_relay: true,
    };
    c
}

#[test]
fn a_blackholed_relay_region_does_not_stall_the_endpoint() {
    if !netns_available("a_blackholed_relay_region_does_not_stall_the_endpoint") {
        return;
    }
    let ns = Arc::new(NetNs::new("stall"));
    let ns2 = Arc::clone(&ns);
    ns.block_on(async move { body(&ns2).await });
}

async fn body(ns: &NetNs) {
    let home = plain_relay(true).await;
    let far = plain_relay(false).await;
    let stun = home.stun_udp_addrs().first().map(|a| a.port());
    let far_port = far.listen_addr().port();
    let map = map(&[
        (
            900,
            node_json(900, home.listen_addr().port(), stun, false, None),
        ),
        (901, node_json(901, far_port, None, false, None)),
    ]);
    let a = Arc::new(
        Endpoint::bind(config(map.clone(), 900, true))
            .await
            .unwrap(),
    );
    let b = Endpoint::bind(config(map.clone(), 900, true))
        .await
        .unwrap();
    // C answers only via its relay (no direct path): A reaches it through region 901.
    let c = Endpoint::bind(config(map, 901, false)).await.unwrap();
    let (bk, ck) = (b.public_key(), c.public_key());

    // A ↔ B direct.
    let mut ea = a.path_events();
    a.send(bk, b"hi".to_vec()).await.unwrap();
    timeout(T, b.recv()).await.unwrap().unwrap();
    timeout(T, async {
        while !matches!(a.path(&bk), Some(Path::Direct(_))) {
            let _ = ea.recv().await;
        }
    })
    .await
    .expect("A → B goes direct");
    // A ↔ C through region 901, so that A holds a connection to it.
    a.set_peer_region(ck, 901).await;
    a.send(ck, b"hi".to_vec()).await.unwrap();
    timeout(T, c.recv()).await.unwrap().unwrap();
    let pong = timeout(T, a.ping(ck)).await.unwrap().unwrap();
    assert_eq!(pong.path, Path::Relay(901));

    // Pings to B every PING_EVERY for `d`; (answered ones, unanswered within 1 s).
    let pings = |d: Duration| {
        let a = Arc::clone(&a);
        async move {
            let mut rtts = Vec::new();
            let mut lost = 0;
            let end = Instant::now() + d;
            while Instant::now() < end {
                let t = Instant::now();
                match timeout(Duration::from_secs(1), a.ping(bk)).await {
                    Ok(Ok(p)) => rtts.push((p.rtt, p.path)),
                    _ => lost += 1,
                }
                tokio::time::sleep_until((t + PING_EVERY).into()).await;
            }
            (rtts, lost)
        }
    };
    let (before, lost_before) = pings(Duration::from_secs(1)).await;

    // Region 901's relay vanishes: every TCP segment to or from it is dropped.
    let port = far_port.to_string();
    for rule in [
        [
            "iptables", "-I", "INPUT", "-p", "tcp", "--dport", &port, "-j", "DROP",
        ],
        [
            "iptables", "-I", "OUTPUT", "-p", "tcp", "--sport", &port, "-j", "DROP",
        ],
    ] {
        ns.exec(&rule).expect("iptables");
    }

    // The application floods C (1,200-byte datagrams, ~20,000 a second) while A pings B.
    let flood = {
        let a = Arc::clone(&a);
        tokio::spawn(async move {
            let start = Instant::now();
            let mut sent = 0u64;
            let mut slow = Duration::ZERO;
            while start.elapsed() < FLOOD {
                for _ in 0..100 {
                    let t = Instant::now();
                    a.send(ck, vec![7; 1200]).await.unwrap();
                    slow = slow.max(t.elapsed());
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (sent, slow)
        })
    };
    let (during, lost_during) = pings(FLOOD).await;
    // The flood stops by itself after FLOOD; a stalled endpoint never lets it.
    let flood = timeout(Duration::from_secs(5), flood).await;
    let stats = a.stats();

    let max = |v: &[(Duration, Path)]| v.iter().map(|r| r.0).max().unwrap_or_default();
    let median = |v: &[(Duration, Path)]| {
        let mut d: Vec<Duration> = v.iter().map(|r| r.0).collect();
        d.sort();
        d.get(d.len() / 2).copied().unwrap_or_default()
    };
    eprintln!(
        "before: {} pings, {lost_before} lost, median {:?}, max {:?}",
        before.len(),
        median(&before),
        max(&before)
    );
    eprintln!(
        "during the flood: {} pings, {lost_during} lost, median {:?}, max {:?}; {stats:?}",
        during.len(),
        median(&during),
        max(&during)
    );
    assert_eq!(lost_before, 0, "pings lost before the flood");
    assert_eq!(
        lost_during, 0,
        "pings to B lost while the app sent to the dead region: the endpoint stalled"
    );
    assert!(
        max(&during) <= BOUND,
        "a ping to B took {:?} while the app sent to the dead region (bound {BOUND:?})",
        max(&during)
    );
    let Ok(flood) = flood else {
        panic!("the application's sends to C were still blocked 5 s after the flood's end")
    };
    let (sent, slowest_send) = flood.unwrap();
    eprintln!("{sent} sends to C, the slowest took {slowest_send:?}");
    assert!(
        slowest_send <= BOUND,
        "a send to C waited {slowest_send:?} (bound {BOUND:?})"
    );
    assert!(
        during.iter().all(|(_, p)| matches!(p, Path::Direct(_))),
        "A ↔ B left the direct path"
    );
    // The dead region's queue overflowed, and said so.
    assert!(
        stats.relay_dropped > 0,
        "{sent} packets to a dead region and none dropped: {stats:?}"
    );
}
