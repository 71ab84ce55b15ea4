//! Direct paths on loopback: disco (call-me-maybe, ping/pong) finds them, data moves off the
//! relay, and a cut direct path falls back to the relay without losing the conversation.

mod common;

use std::time::Duration;

use common::*;
use ferry_client::{DirectOptions, Endpoint, EndpointConfig, Path};
use ferry_relay::server::Server;
use tokio::time::timeout;

const FORWARDED: &str = "ferry_relay_packets_forwarded_total";

fn direct_config(map: ferry_client::RelayMap) -> EndpointConfig {
    let mut c = ep_config(map);
    c.direct = DirectOptions {
        enabled: true,
        // Long enough that a loaded CI machine does not lose a healthy path; short enough
        // that the fallback test does not take long.
        trust: Duration::from_secs(3),
        heartbeat: Duration::from_millis(250),
        probe_interval: Duration::from_millis(500),
        active_timeout: Duration::from_secs(60),
        udp_relay: true,
    };
    c
}

fn is_direct(p: &Path) -> bool {
    matches!(p, Path::Direct(_))
}

/// Sends `n` numbered packets from `from` to `to` and checks all arrive, in order.
async fn exchange(from: &Endpoint, to: &Endpoint, n: u32, tag: u8) {
    for i in 0..n {
        let mut p = vec![tag];
        p.extend_from_slice(&i.to_be_bytes());
        from.send(to.public_key(), p).await.unwrap();
    }
    for i in 0..n {
        let (src, d) = timeout(T, to.recv())
            .await
            .expect("a packet in time")
            .unwrap();
        assert_eq!(src, from.public_key());
        assert_eq!(d[0], tag);
        assert_eq!(&d[1..], &i.to_be_bytes(), "packet {i} (tag {tag})");
    }
}

fn forwarded(relay: &Server) -> f64 {
    relay.metrics().sample(FORWARDED, "")
}

#[tokio::test]
async fn disco_finds_the_direct_path_and_falls_back_to_the_relay_when_it_is_cut() {
    let relay = plain_relay(true).await;
    let map = map_for(&relay);
    let a = Endpoint::bind(direct_config(map.clone())).await.unwrap();
    let b = Endpoint::bind(direct_config(map)).await.unwrap();
    let (ak, bk) = (a.public_key(), b.public_key());
    let mut ea = a.path_events();
    let mut eb = b.path_events();

    // First contact goes through the relay (no waiting for hole punching) and starts disco.
    a.send(bk, b"hello".to_vec()).await.unwrap();
    let (from, d) = timeout(T, b.recv()).await.unwrap().unwrap();
    assert_eq!((from, &d[..]), (ak, &b"hello"[..]));

    // Call-me-maybe + pings: both sides switch to the other's socket address.
    let pa = wait_path(&mut ea, bk, is_direct, "a → b direct").await;
    let pb = wait_path(&mut eb, ak, is_direct, "b → a direct").await;
    assert_eq!(pa, Path::Direct(b.local_addrs()[0]));
    assert_eq!(pb, Path::Direct(a.local_addrs()[0]));

    // Data flows directly: the relay forwards (next to) none of it.
    let before = forwarded(&relay);
    exchange(&a, &b, 200, 1).await;
    exchange(&b, &a, 200, 2).await;
    let pong = timeout(T, a.ping(bk)).await.unwrap().unwrap();
    assert_eq!(pong.path, pa);
    let relayed = forwarded(&relay) - before;
    eprintln!("relay forwarded {relayed} packets in the direct phase");
    assert!(
        relayed < 100.0,
        "the relay forwarded {relayed} packets while 400 data packets went direct"
    );

    // Cut the direct path (a drops every direct datagram both ways): both fall back.
    a.set_direct_blackhole(true);
    let pa = wait_path(&mut ea, bk, |p| !is_direct(p), "a falls back").await;
    let pb = wait_path(&mut eb, ak, |p| !is_direct(p), "b falls back").await;
    assert_eq!((pa, pb), (Path::Relay(900), Path::Relay(900)));
    let before = forwarded(&relay);
    exchange(&a, &b, 100, 3).await;
    exchange(&b, &a, 100, 4).await;
    let relayed = forwarded(&relay) - before;
    assert!(relayed >= 200.0, "only {relayed} packets relayed");
    assert_eq!(a.path(&bk), Some(Path::Relay(900)));

    // The path heals: periodic probing finds it again.
    a.set_direct_blackhole(false);
    wait_path(&mut ea, bk, is_direct, "a direct again").await;
    wait_path(&mut eb, ak, is_direct, "b direct again").await;
    exchange(&a, &b, 50, 5).await;
}

/// A burst sent with `send_batch` on a direct path leaves as UDP GSO messages (one pass
/// through the kernel per run, not per datagram) and arrives whole and in order; with
/// `udp_gso` off the same bursts go one message per datagram (what the first half asserts
/// could fail).
#[tokio::test]
async fn a_burst_on_the_direct_path_leaves_in_gso_runs_and_arrives_in_order() {
    let relay = plain_relay(true).await;
    let map = map_for(&relay);
    for gso in [true, false] {
        let mut ca = direct_config(map.clone());
        ca.udp_gso = gso;
        let a = Endpoint::bind(ca).await.unwrap();
        let b = Endpoint::bind(direct_config(map.clone())).await.unwrap();
        let bk = b.public_key();
        let mut ea = a.path_events();
        a.send(bk, b"hello".to_vec()).await.unwrap();
        timeout(T, b.recv()).await.unwrap().unwrap();
        wait_path(&mut ea, bk, is_direct, "a → b direct").await;
        let relayed = forwarded(&relay);
        let ((datagrams, messages), (b_datagrams, b_reads)) =
            burst_exchange(&a, &b, 20, 1000).await;
        eprintln!("gso {gso}: {datagrams} datagrams as {messages} messages; B read {b_datagrams} in {b_reads}");
        assert!(datagrams >= 20 * 64, "{datagrams}");
        assert!(b_datagrams >= 20 * 64, "{b_datagrams}");
        if gso {
            // 64 datagrams of ~1,050 bytes are two GSO messages; pings and pongs add a few.
            // B reads with GRO: the same runs.
            assert!(messages * 8 < datagrams, "{messages} of {datagrams}");
            assert!(b_reads * 8 < b_datagrams, "{b_reads} of {b_datagrams}");
        } else {
            assert_eq!(messages, datagrams);
            assert_eq!(b_reads, b_datagrams, "nothing to coalesce on loopback");
        }
        // Data stayed off the relay (B's own CallMeMaybes may still cross it).
        let via_relay = forwarded(&relay) - relayed;
        assert!(via_relay < 100.0, "{via_relay} packets via the relay");
    }
}

#[tokio::test]
async fn relay_only_endpoints_never_go_direct() {
    let relay = plain_relay(true).await;
    let map = map_for(&relay);
    let mut cfg = direct_config(map.clone());
    cfg.direct.enabled = false;
    let a = Endpoint::bind(cfg).await.unwrap();
    let b = Endpoint::bind(direct_config(map)).await.unwrap();
    let mut ea = a.path_events();
    exchange(&a, &b, 20, 1).await;
    exchange(&b, &a, 20, 2).await;
    let ev = timeout(T, ea.recv()).await.unwrap().unwrap();
    assert_eq!(ev.new, Path::Relay(900));
    // b may ask (call-me-maybe), a ignores disco: a's path stays the relay.
    let pong = timeout(T, a.ping(b.public_key())).await.unwrap().unwrap();
    assert_eq!(pong.path, Path::Relay(900));
    assert_eq!(a.path(&b.public_key()), Some(Path::Relay(900)));
}

#[tokio::test]
async fn wildcard_sockets_find_the_direct_path_too() {
    let relay = plain_relay(true).await;
    let map = map_for(&relay);
    let mut ca = direct_config(map.clone());
    ca.bind_v4 = "0.0.0.0:0".parse().unwrap();
    let mut cb = direct_config(map);
    cb.bind_v4 = "0.0.0.0:0".parse().unwrap();
    let a = Endpoint::bind(ca).await.unwrap();
    let b = Endpoint::bind(cb).await.unwrap();
    let mut ea = a.path_events();
    exchange(&a, &b, 5, 1).await;
    let p = wait_path(&mut ea, b.public_key(), is_direct, "a → b direct").await;
    eprintln!("wildcard: {p}");
    let Path::Direct(addr) = p else {
        unreachable!()
    };
    assert_eq!(addr.port(), b.local_addrs()[0].port());
    exchange(&a, &b, 5, 2).await;
}

/// Acceptance 4 of the client issue, on loopback: 10,000 numbered packets from a to b while
/// the path moves relay → direct → (cut without warning) → relay. Every packet arrives
/// exactly once: the ones sent direct into the cut are resent via the relay once their ack
/// ping goes unanswered, and the replay window drops any copy that did arrive.
#[tokio::test]
async fn ten_thousand_packets_cross_relay_direct_relay_exactly_once() {
    const N: u32 = 10_000;
    const WINDOW: u32 = 256; // packets in flight at most: no socket buffer ever overflows
    let relay = plain_relay(true).await;
    let map = map_for(&relay);
    let a = std::sync::Arc::new(Endpoint::bind(direct_config(map.clone())).await.unwrap());
    let b = std::sync::Arc::new(Endpoint::bind(direct_config(map)).await.unwrap());
    let (ak, bk) = (a.public_key(), b.public_key());
    let mut ea = a.path_events();

    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0u32);
    let receiver = {
        let b = std::sync::Arc::clone(&b);
        tokio::spawn(async move {
            let mut seen = vec![0u8; N as usize];
            let mut got = 0u32;
            loop {
                let (src, d) = timeout(T, b.recv())
                    .await
                    .expect("the stream stalled")
                    .unwrap();
                assert_eq!(src, ak);
                if &d[..] == b"end" {
                    return seen;
                }
                let i = u32::from_be_bytes(d[..4].try_into().unwrap());
                seen[i as usize] += 1;
                assert_eq!(seen[i as usize], 1, "packet {i} delivered twice");
                got += 1;
                count_tx.send_replace(got);
            }
        })
    };
    let mut phases = Vec::new();
    for i in 0..N {
        count_rx
            .wait_for(|c| c + WINDOW > i)
            .await
            .expect("receiver alive");
        if i == 2_000 {
            // relay → direct: keep sending until a has the direct path.
            wait_path(&mut ea, bk, is_direct, "a → b direct").await;
            phases.push(("direct from", i, a.stats()));
        }
        if i == 6_000 {
            // Cut the direct path mid-stream, without telling anyone.
            a.set_direct_blackhole(true);
            phases.push(("cut at", i, a.stats()));
        }
        if i == 8_000 {
            // By now the relay carries everything; wait until a says so.
            if a.path(&bk).is_some_and(|p| is_direct(&p)) {
                wait_path(&mut ea, bk, |p| !is_direct(p), "a falls back").await;
            }
            phases.push(("relay from", i, a.stats()));
        }
        a.send(bk, i.to_be_bytes().to_vec()).await.unwrap();
    }
    a.send(bk, b"end".to_vec()).await.unwrap();
    let seen = timeout(T * 2, receiver).await.unwrap().unwrap();
    let stats = a.stats();
    for (what, i, s) in &phases {
        eprintln!("{what} packet {i}: {s:?}");
    }
    eprintln!("end: {stats:?}");
    for r in ["queue_head", "queue_tail", "unknown_dest"] {
        let n = relay.metrics().sample(
            "ferry_relay_packets_dropped_total",
            &format!("reason=\"{r}\""),
        );
        eprintln!("relay dropped ({r}): {n}");
    }
    let missing: Vec<usize> = (0..N as usize).filter(|i| seen[*i] == 0).collect();
    assert!(
        missing.is_empty(),
        "{} packets lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(a.path(&bk), Some(Path::Relay(900)));
    // The test really crossed the cut with packets in flight: some were resent.
    assert!(
        stats.resent_via_relay > 0,
        "no packet was resent: the cut did not catch any in flight ({stats:?})"
    );
    let (_, _, at_cut) = phases[1];
    assert!(
        at_cut.sent_direct >= 3_000,
        "the middle phase did not go direct: {at_cut:?}"
    );
}
