//! The client half of the UDP relay path (issue 15) against a real ferry relay: ferry's own
//! `RelayClient` allocates a session over DERP, both sides bind from real UDP sockets with the
//! sans-IO `Binding`, and packets go both ways through the relay, unchanged; before both sides
//! have bound nothing is forwarded.

mod common;

use std::net::SocketAddr;

use common::*;
use ferry_client::relay::{RelayClient, RelayOptions};
use ferry_client::udprelay::{unwrap, BindState, Binding, PROTO_FERRY_E2E};
use ferry_client::SecretKey;
use ferry_relay::server::UdpRelayConfig;
use ferry_relay::testing::Options;
use tokio::net::UdpSocket;
use tokio::time::timeout;

/// Runs the bind handshake of `b` from `sock` (Bind, Challenge, Answer).
async fn bind(sock: &UdpSocket, b: &mut Binding) {
    let relay = b.relay();
    sock.send_to(&b.bind(), relay).await.unwrap();
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = timeout(T, sock.recv_from(&mut buf)).await.unwrap().unwrap();
        if let Some(answer) = b.on_datagram(from, &buf[..n]) {
            sock.send_to(&answer, relay).await.unwrap();
            assert_eq!(b.state(), BindState::Answered);
            return;
        }
    }
}

#[tokio::test]
async fn two_ferry_clients_bind_a_session_and_exchange_packets_through_the_udp_relay() {
    let relay = Options::plain()
        .start_with(|c| {
            c.udp_relay = Some(UdpRelayConfig::new("127.0.0.1:0".parse().unwrap()));
        })
        .await;
    let map = map_for(&relay);
    let region = map.region(900).unwrap();
    let (ka, kb) = (SecretKey::generate(), SecretKey::generate());
    let (a, _ea) = RelayClient::connect(region, ka.clone(), RelayOptions::default())
        .await
        .unwrap();
    let ep = a
        .allocate_udp_relay([ka.public(), kb.public()])
        .await
        .expect("the relay grants a session");
    // The answer carries the port; the address is the DERP node's (127.0.0.1 here).
    let relay_udp = SocketAddr::from(([127, 0, 0, 1], ep.port));
    assert_eq!(Some(relay_udp), relay.udp_relay_addr());

    let (ua, ub) = (
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    let mut ba = Binding::new(ka.clone(), ep.clone(), relay_udp, kb.public());
    let mut bb = Binding::new(kb.clone(), ep.clone(), relay_udp, ka.public());
    bind(&ua, &mut ba).await;
    // Only A has bound: its packet goes nowhere (counted by the relay).
    ua.send_to(&ba.wrap(PROTO_FERRY_E2E, b"early"), relay_udp)
        .await
        .unwrap();
    bind(&ub, &mut bb).await;

    let mut buf = vec![0u8; 2048];
    for (from, bfrom, to, text) in [
        (&ua, &ba, &ub, &b"ciphertext a->b"[..]),
        (&ub, &bb, &ua, &b"ciphertext b->a"[..]),
    ] {
        // The relay processes the Answer before this (one socket, in order).
        from.send_to(&bfrom.wrap(PROTO_FERRY_E2E, text), relay_udp)
            .await
            .unwrap();
        let (n, src) = timeout(T, to.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(src, relay_udp);
        let (h, payload) = unwrap(&buf[..n]).expect("Geneve");
        assert_eq!(
            (h.vni, h.protocol, payload),
            (ep.vni, PROTO_FERRY_E2E, text)
        );
    }
    let m = relay.metrics();
    assert_eq!(
        m.sample(
            "ferry_relay_udp_relay_dropped_total",
            "reason=\"not_bound\""
        ),
        1.0,
        "A's packet before B had bound"
    );
    assert_eq!(
        m.sample("ferry_relay_udp_relay_forwarded_packets_total", ""),
        2.0
    );
}

// ----- the endpoint on the UDP relay path -----

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_client::{DirectOptions, Endpoint, EndpointConfig, Path};

/// Loopback endpoints with direct paths and the UDP relay on, short timers (as tests/direct.rs).
fn udp_relay_config(map: ferry_client::RelayMap) -> EndpointConfig {
    let mut c = ep_config(map);
    c.direct = DirectOptions {
        enabled: true,
        trust: Duration::from_secs(3),
        heartbeat: Duration::from_millis(250),
        probe_interval: Duration::from_millis(500),
        active_timeout: Duration::from_secs(60),
        udp_relay: true,
    };
    c
}

fn udp_relay_relay() -> Options {
    Options::plain()
}

/// A says hello to B with its direct path blackholed and waits until its path to B is the UDP
/// relay (`what` names the wait in a failure).
async fn onto_the_udp_relay(a: &Endpoint, b: &Endpoint, what: &str) {
    let bk = b.public_key();
    let mut ea = a.path_events();
    a.set_direct_blackhole(true);
    a.send(bk, b"hello".to_vec()).await.unwrap();
    timeout(T, b.recv()).await.unwrap().unwrap();
    wait_path(&mut ea, bk, |p| matches!(p, Path::UdpRelay(_)), what).await;
}

/// Acceptance 2 of issue 15, at the endpoint: 10,000 numbered datagrams from A to B while the
/// path goes DERP → UDP relay (A drops direct datagrams) → direct (A stops dropping) → cut (A
/// drops them again) → UDP relay; every one arrives exactly once.
#[tokio::test]
async fn ten_thousand_datagrams_cross_derp_udp_relay_direct_and_back_exactly_once() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let relay = udp_relay_relay()
        .start_with(|c| {
            c.udp_relay = Some(UdpRelayConfig::new("127.0.0.1:0".parse().unwrap()));
        })
        .await;
    let map = map_for(&relay);
    let a = Arc::new(Endpoint::bind(udp_relay_config(map.clone())).await.unwrap());
    let b = Arc::new(Endpoint::bind(udp_relay_config(map)).await.unwrap());
    let (ak, bk) = (a.public_key(), b.public_key());
    let mut ea = a.path_events();
    a.set_direct_blackhole(true);

    const N: u32 = 10_000;
    let sent = Arc::new(AtomicU32::new(0));
    let receiver = {
        let b = Arc::clone(&b);
        tokio::spawn(async move {
            let mut seen: HashMap<u32, u32> = HashMap::new();
            while seen.len() < N as usize {
                let Ok(Ok((from, d))) = timeout(Duration::from_secs(10), b.recv()).await else {
                    break;
                };
                assert_eq!(from, ak);
                let i = u32::from_be_bytes(d[..4].try_into().unwrap());
                *seen.entry(i).or_default() += 1;
            }
            // Late duplicates would show here.
            while let Ok(Ok((_, d))) = timeout(Duration::from_millis(500), b.recv()).await {
                let i = u32::from_be_bytes(d[..4].try_into().unwrap());
                *seen.entry(i).or_default() += 1;
            }
            seen
        })
    };
    let sender = {
        let (a, sent) = (Arc::clone(&a), Arc::clone(&sent));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1500));
            for i in 0..N {
                tick.tick().await;
                let mut p = i.to_be_bytes().to_vec();
                p.resize(200, 0xAB);
                a.send(bk, p).await.unwrap();
                sent.store(i + 1, Ordering::Relaxed);
            }
        })
    };

    let t0 = Instant::now();
    let p = wait_path(
        &mut ea,
        bk,
        |p| matches!(p, Path::UdpRelay(_)),
        "A on the UDP relay",
    )
    .await;
    assert_eq!(p, Path::UdpRelay(900));
    let up = t0.elapsed();
    let at_udp = sent.load(Ordering::Relaxed);
    a.set_direct_blackhole(false);
    wait_path(&mut ea, bk, |p| matches!(p, Path::Direct(_)), "A direct").await;
    let at_direct = sent.load(Ordering::Relaxed);
    a.set_direct_blackhole(true);
    wait_path(
        &mut ea,
        bk,
        |p| matches!(p, Path::UdpRelay(_)),
        "A back on the UDP relay",
    )
    .await;
    let at_back = sent.load(Ordering::Relaxed);
    eprintln!(
        "UDP relay after {up:?} (packet {at_udp}), direct at packet {at_direct}, back on the UDP relay at packet {at_back}; stats A {:?}",
        a.stats()
    );
    assert!(
        at_back < N - 500,
        "the last phase began at packet {at_back}: too late to carry data"
    );
    sender.await.unwrap();
    let seen = receiver.await.unwrap();
    let missing: Vec<u32> = (0..N).filter(|i| !seen.contains_key(i)).collect();
    let dups: Vec<(u32, u32)> = seen
        .iter()
        .filter(|(_, n)| **n != 1)
        .map(|(i, n)| (*i, *n))
        .collect();
    assert!(
        missing.is_empty() && dups.is_empty(),
        "{} missing (first {:?}), {} duplicated (e.g. {:?})",
        missing.len(),
        &missing[..missing.len().min(10)],
        dups.len(),
        &dups[..dups.len().min(10)]
    );
    let stats = a.stats();
    assert!(stats.sent_udp_relay > 500, "{stats:?}");
    assert!(stats.sent_direct > 500, "{stats:?}");
    let m = relay.metrics();
    let fwd = m.sample("ferry_relay_udp_relay_forwarded_packets_total", "");
    assert!(
        fwd >= stats.sent_udp_relay as f64,
        "relay forwarded {fwd}, {stats:?}"
    );
    // And the pong of an end-to-end ping says which path it came on.
    let pong = timeout(T, a.ping(bk)).await.unwrap().unwrap();
    assert_eq!(pong.path, Path::UdpRelay(900));
}

/// Bursts sent with `send_batch` on the UDP relay path leave as UDP GSO messages, the relay
/// reads them with GRO and forwards them, and they arrive whole and in order.
#[tokio::test]
async fn a_burst_crosses_the_udp_relay_in_gso_runs_and_arrives_in_order() {
    let relay = udp_relay_relay()
        .start_with(|c| {
            c.udp_relay = Some(UdpRelayConfig::new("127.0.0.1:0".parse().unwrap()));
        })
        .await;
    let map = map_for(&relay);
    let a = Endpoint::bind(udp_relay_config(map.clone())).await.unwrap();
    let b = Endpoint::bind(udp_relay_config(map)).await.unwrap();
    onto_the_udp_relay(&a, &b, "A on the UDP relay").await;
    let m = relay.metrics();
    let fwd0 = m.sample("ferry_relay_udp_relay_forwarded_packets_total", "");
    let ((datagrams, messages), (b_datagrams, b_reads)) = burst_exchange(&a, &b, 20, 1000).await;
    eprintln!(
        "{datagrams} datagrams as {messages} messages; B read {b_datagrams} in {b_reads}; stats A {:?}",
        a.stats()
    );
    assert!(datagrams >= 20 * 64, "{datagrams}");
    assert!(messages * 8 < datagrams, "{messages} of {datagrams}");
    // The relay read the runs with GRO and forwarded them as GSO runs; B reads them with GRO.
    assert!(b_reads * 8 < b_datagrams, "{b_reads} of {b_datagrams}");
    let fwd = relay
        .metrics()
        .sample("ferry_relay_udp_relay_forwarded_packets_total", "")
        - fwd0;
    assert!(fwd >= (20 * 64) as f64, "relay forwarded {fwd}");
}

/// A relay without the UDP relay (the allocation goes unanswered, as with derper): the pair
/// stays on DERP, data flows, nothing breaks.
#[tokio::test]
async fn without_a_udp_relay_on_the_relay_the_pair_stays_on_derp() {
    let relay = udp_relay_relay().start_with(|c| c.udp_relay = None).await;
    let map = map_for(&relay);
    let a = Endpoint::bind(udp_relay_config(map.clone())).await.unwrap();
    let b = Endpoint::bind(udp_relay_config(map)).await.unwrap();
    a.set_direct_blackhole(true);
    let bk = b.public_key();
    for i in 0..30u32 {
        a.send(bk, i.to_be_bytes().to_vec()).await.unwrap();
        let (_, d) = timeout(T, b.recv()).await.unwrap().unwrap();
        assert_eq!(&d[..], &i.to_be_bytes());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.path(&bk), Some(Path::Relay(900)));
    assert_eq!(a.stats().sent_udp_relay, 0);
}

/// The relay restarts while a pair talks over its UDP relay (off the happy path of issue 15):
/// its sessions die with it. The pair must not stay on the dead session: once both are back on
/// the restarted relay, packets flow again (over DERP at first), a new session is allocated and
/// bound, and the pair is back on the UDP relay path.
#[tokio::test]
async fn after_a_relay_restart_the_pair_gets_a_new_udp_relay_session() {
    let key = ferry_relay::proto::SecretKey::generate();
    let udp = |c: &mut ferry_relay::server::Config| {
        c.udp_relay = Some(UdpRelayConfig::new("127.0.0.1:0".parse().unwrap()));
    };
    let relay = udp_relay_relay().key(key.clone()).start_with(udp).await;
    let addr = relay.addr();
    let map = map_for(&relay);
    let a = Endpoint::bind(udp_relay_config(map.clone())).await.unwrap();
    let b = Endpoint::bind(udp_relay_config(map)).await.unwrap();
    let (ak, bk) = (a.public_key(), b.public_key());
    let mut ea = a.path_events();
    a.set_direct_blackhole(true);
    a.send(bk, b"first".to_vec()).await.unwrap();
    assert_eq!(
        &timeout(T, b.recv()).await.unwrap().unwrap().1[..],
        b"first"
    );
    let udp_path = |p: &Path| matches!(p, Path::UdpRelay(_));
    wait_path(&mut ea, bk, udp_path, "A on the UDP relay").await;
    let (mut sa, mut sb) = (a.relay_status(900).unwrap(), b.relay_status(900).unwrap());

    relay.shutdown().await;
    let relay2 = udp_relay_relay()
        .key(key)
        .listen(addr)
        .start_with(udp)
        .await;
    for s in [&mut sa, &mut sb] {
        timeout(T, s.wait_for(|st| st.connected && st.generation >= 2))
            .await
            .expect("both reconnected to the restarted relay in time")
            .unwrap();
    }
    // Numbered packets from A every 20 ms; B keeps reading (the highest number it has seen).
    let t0 = Instant::now();
    let sent = Arc::new(AtomicU32::new(0));
    let sender = {
        let sent = Arc::clone(&sent);
        tokio::spawn(async move {
            for i in 1u32..=5_000 {
                if a.send(bk, i.to_be_bytes().to_vec()).await.is_err() {
                    break;
                }
                sent.store(i, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            a
        })
    };
    let seen = Arc::new(AtomicU32::new(0));
    let receiver = {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok(Ok((from, d))) = timeout(T, b.recv()).await {
                assert_eq!(from, ak);
                let i = u32::from_be_bytes(d[..4].try_into().unwrap());
                seen.fetch_max(i, Ordering::Relaxed);
            }
        })
    };
    let mut events = Vec::new();
    let back = timeout(T, async {
        loop {
            if let Ok(ev) = ea.recv().await {
                events.push((t0.elapsed(), ev.new));
                if ev.peer == bk && udp_path(&ev.new) {
                    return ev.new;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("A not back on the UDP relay; path events: {events:?}"));
    let took = t0.elapsed();
    // 20 packets sent after the pair is back on the UDP relay reach B.
    let k = sent.load(Ordering::Relaxed) + 20;
    timeout(T, async {
        while seen.load(Ordering::Relaxed) < k {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("packets sent on the new session arrive");
    sender.abort();
    receiver.abort();
    let m = relay2.metrics();
    let fwd = m.sample("ferry_relay_udp_relay_forwarded_packets_total", "");
    eprintln!(
        "back on {back:?} {took:?} after both reconnected (path events {events:?}); \
         the new relay forwarded {fwd} over its UDP relay"
    );
    assert!(
        fwd >= 20.0,
        "the restarted relay forwarded {fwd} over its UDP relay"
    );
    // The dead session is not kept until it would time out (15 s without pongs): a reconnected
    // relay's sessions are given up at once, and a new one is asked for when the rules allow
    // (1 s for the side that asks first, 6 s for the other).
    assert!(
        took < Duration::from_secs(8),
        "back on the UDP relay only {took:?} after both reconnected"
    );
}

/// A relay that advertises an address its clients cannot use (here a dead IPv4 address listed
/// first, as a dual-stack relay whose IPv4 is firewalled would): the clients' Binds there go
/// unanswered, so each moves on to the next address (IPv6) and the pair gets onto the UDP
/// relay path anyway.
#[tokio::test]
async fn a_dead_advertised_address_is_skipped_for_the_next_one() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!(
            "a_dead_advertised_address_is_skipped_for_the_next_one: SKIPPED: no IPv6 loopback"
        );
        return;
    }
    // A port for the relay's dual-stack socket, known before it starts (it goes into the
    // advertised addresses).
    let port = std::net::UdpSocket::bind("[::]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let relay = udp_relay_relay()
        .start_with(move |c| {
            let mut u = UdpRelayConfig::new(format!("[::]:{port}").parse().unwrap());
            u.advertise = vec![
                "127.0.0.2:9".parse().unwrap(),
                format!("[::1]:{port}").parse().unwrap(),
            ];
            c.udp_relay = Some(u);
        })
        .await;
    let map = map_for(&relay);
    // With an IPv6 socket too (the tests' endpoints have none by default).
    let config = || {
        let mut c = udp_relay_config(map.clone());
        c.bind_v6 = Some("[::1]:0".parse().unwrap());
        c
    };
    let a = Endpoint::bind(config()).await.unwrap();
    let b = Endpoint::bind(config()).await.unwrap();
    let bk = b.public_key();
    b.set_direct_blackhole(true);
    onto_the_udp_relay(&a, &b, "A on the UDP relay via its IPv6 address").await;
    a.send(bk, b"through".to_vec()).await.unwrap();
    let (_, d) = timeout(T, b.recv()).await.unwrap().unwrap();
    assert_eq!(&d[..], b"through");
    assert!(a.stats().sent_udp_relay >= 1, "{:?}", a.stats());
    let m = relay.metrics();
    assert!(
        m.sample("ferry_relay_udp_relay_binds_total", "") >= 2.0,
        "both sides bound"
    );
}

/// A relay whose advertised addresses are all dead: moving from one to the next must not
/// keep the session alive. It is given up after `UDP_RELAY_GIVE_UP` (15 s) like any session
/// that never answers, and a new allocation follows (the pair stays on DERP meanwhile).
#[tokio::test]
async fn a_session_at_dead_addresses_only_is_given_up_and_asked_for_again() {
    let relay = udp_relay_relay()
        .start_with(|c| {
            let mut u = UdpRelayConfig::new("127.0.0.1:0".parse().unwrap());
            u.advertise = vec![
                "127.0.0.2:9".parse().unwrap(),
                "127.0.0.3:9".parse().unwrap(),
            ];
            c.udp_relay = Some(u);
        })
        .await;
    let map = map_for(&relay);
    let a = Endpoint::bind(udp_relay_config(map.clone())).await.unwrap();
    let b = Endpoint::bind(udp_relay_config(map)).await.unwrap();
    a.set_direct_blackhole(true);
    b.set_direct_blackhole(true);
    let bk = b.public_key();
    let granted = || {
        relay.metrics().sample(
            "ferry_relay_udp_relay_allocations_total",
            "result=\"granted\"",
        )
    };
    let start = Instant::now();
    // Keep the peer active (allocation needs traffic) until a second allocation is granted.
    while granted() < 2.0 {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "no new allocation after the dead session ({} granted)",
            granted()
        );
        a.send(bk, b"x".to_vec()).await.unwrap();
        timeout(T, b.recv()).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        a.path(&bk),
        Some(Path::Relay(900)),
        "still on DERP meanwhile"
    );
    eprintln!("second allocation after {:?}", start.elapsed());
}
