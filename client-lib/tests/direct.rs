//! Direct paths on loopback: disco (call-me-maybe, ping/pong) finds them, data moves off the
//! relay, and a cut direct path falls back to the relay without losing the conversation.

mod common;

use std::time::Duration;

use common::*;
use ferry_client::{DirectOptions, Endpoint, EndpointConfig, Path, PathEvent, PublicKey};
use ferry_relay::server::Server;
use tokio::sync::broadcast;
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
    };
    c
}

/// Waits for a path event for `peer` whose new path matches.
async fn wait_path(
    events: &mut broadcast::Receiver<PathEvent>,
    peer: PublicKey,
    want: impl Fn(&Path) -> bool,
    what: &str,
) -> Path {
    timeout(T, async {
        loop {
            match events.recv().await {
                Ok(ev) if ev.peer == peer && want(&ev.new) => return ev.new,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("path events closed: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no path event: {what}"))
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
