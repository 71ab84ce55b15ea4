//! Endpoints and the relay client against real in-process ferry relays.

mod common;

use std::time::Instant;

use bytes::Bytes;
use common::*;
use ferry_client::e2e::Sessions;
use ferry_client::relay::{RelayClient, RelayError, RelayEvent, RelayOptions, Transport};
use ferry_client::{Endpoint, EndpointError, Path, SecretKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

async fn recv(ep: &Endpoint) -> (ferry_client::PublicKey, Bytes) {
    timeout(T, ep.recv())
        .await
        .expect("a packet in time")
        .unwrap()
}

#[tokio::test]
async fn two_endpoints_exchange_e2e_data_through_a_pinned_tls_relay() {
    let dir = tempfile::tempdir().unwrap();
    let relay = tls_relay(
        "127.0.0.1:0".parse().unwrap(),
        dir.path(),
        SecretKey::generate(),
        true,
    )
    .await;
    let map = map_for(&relay);
    let a = Endpoint::bind(ep_config(map.clone())).await.unwrap();
    let b = Endpoint::bind(ep_config(map)).await.unwrap();
    assert_eq!(a.home_region(), Some(900));
    // The bind-time netcheck may finish after bind (it runs beside the relay connection).
    let report = timeout(T, async {
        loop {
            if let Some(r) = a.netcheck_report() {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a netcheck report");
    assert!(report.udp, "STUN to the relay's STUN server answered");
    let mut events = a.path_events();

    a.send(b.public_key(), b"hello from a".to_vec())
        .await
        .unwrap();
    let (from, data) = recv(&b).await;
    assert_eq!(from, a.public_key());
    assert_eq!(&data[..], b"hello from a");
    assert_eq!(b.path(&a.public_key()), Some(Path::Relay(900)));

    b.send(a.public_key(), b"hello from b".to_vec())
        .await
        .unwrap();
    let (from, data) = recv(&a).await;
    assert_eq!((from, &data[..]), (b.public_key(), &b"hello from b"[..]));

    let ev = timeout(T, events.recv()).await.unwrap().unwrap();
    assert_eq!(ev.peer, b.public_key());
    assert_eq!((ev.old, ev.new), (None, Path::Relay(900)));
    assert_eq!(a.path(&b.public_key()), Some(Path::Relay(900)));

    // In-band ping, answered by B's endpoint by itself.
    let pong = timeout(T, a.ping(b.public_key())).await.unwrap().unwrap();
    assert_eq!(pong.path, Path::Relay(900));

    // Many packets, in order, none lost.
    for i in 0..200u32 {
        a.send(b.public_key(), i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    for i in 0..200u32 {
        let (_, d) = recv(&b).await;
        assert_eq!(&d[..], &i.to_be_bytes());
    }
    assert!(relay.client_count() >= 2);
}

#[tokio::test]
async fn relay_restart_client_reconnects_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let relay = tls_relay(
        "127.0.0.1:0".parse().unwrap(),
        dir.path(),
        key.clone(),
        false,
    )
    .await;
    let addr = relay.listen_addr();
    let map = map_for(&relay);
    let a = Endpoint::bind(ep_config(map.clone())).await.unwrap();
    let b = Endpoint::bind(ep_config(map)).await.unwrap();
    a.send(b.public_key(), b"before".to_vec()).await.unwrap();
    assert_eq!(&recv(&b).await.1[..], b"before");

    let mut sa = a.relay_status(900).unwrap();
    let mut sb = b.relay_status(900).unwrap();
    assert_eq!(sa.borrow().generation, 1);
    // Graceful shutdown sends Restarting to clients that can ack pings (ours do).
    relay.shutdown().await;
    // Same address, same key, same certificate directory (so the pin still holds).
    let relay2 = tls_relay(addr, dir.path(), key, false).await;
    for s in [&mut sa, &mut sb] {
        timeout(T, s.wait_for(|st| st.connected && st.generation >= 2))
            .await
            .expect("reconnected in time")
            .unwrap();
    }
    // The E2E session survives the relay restart: no new handshake is needed.
    a.send(b.public_key(), b"after".to_vec()).await.unwrap();
    assert_eq!(&recv(&b).await.1[..], b"after");
    b.send(a.public_key(), b"back".to_vec()).await.unwrap();
    assert_eq!(&recv(&a).await.1[..], b"back");
    assert_eq!(relay2.client_count(), 2);
}

#[tokio::test]
async fn wrong_pin_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let relay = tls_relay(
        "127.0.0.1:0".parse().unwrap(),
        dir.path(),
        SecretKey::generate(),
        false,
    )
    .await;
    let wrong = format!("sha256-raw:{}", "ab".repeat(32));
    let m = map(&[(
        900,
        node_json(900, relay.listen_addr().port(), None, true, Some(&wrong)),
    )]);
    let err = Endpoint::bind(ep_config(m.clone())).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EndpointError::NoRelay(_)), "{msg}");
    assert!(msg.contains("pin mismatch"), "{msg}");
    assert!(msg.contains(&wrong), "names the expected pin: {msg}");
    assert!(msg.contains(&pin(&relay)), "names the presented pin: {msg}");

    let err = RelayClient::connect(
        m.region(900).unwrap(),
        SecretKey::generate(),
        RelayOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RelayError::Tls { .. }), "{err}");
    assert_eq!(relay.client_count(), 0);
}

#[tokio::test]
async fn unreachable_relay_is_a_clear_error() {
    // A port nobody listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let m = map(&[(900, node_json(900, port, None, false, None))]);
    let msg = Endpoint::bind(ep_config(m)).await.unwrap_err().to_string();
    assert!(msg.contains("cannot reach relay 900a"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
}

/// The relay's view: what it forwards to the receiver's key is all the receiver's connection
/// gets. The receiver here is a bare DERP client (ferry's `RelayClient`) that records every
/// forwarded byte and runs the E2E state by hand, so the test can prove both that the capture
/// holds the data (it decrypts to the plaintext) and that the plaintext is not in it.
#[tokio::test]
async fn relay_forwards_only_ciphertext() {
    let dir = tempfile::tempdir().unwrap();
    let relay = tls_relay(
        "127.0.0.1:0".parse().unwrap(),
        dir.path(),
        SecretKey::generate(),
        false,
    )
    .await;
    let m = map_for(&relay);
    let a = Endpoint::bind(ep_config(m.clone())).await.unwrap();
    let b_secret = SecretKey::generate();
    let (b_relay, mut b_events) = RelayClient::connect(
        m.region(900).unwrap(),
        b_secret.clone(),
        RelayOptions::default(),
    )
    .await
    .unwrap();
    let mut b_e2e = Sessions::new(b_secret.clone());
    let secret_text: Vec<u8> = b"PLAINTEXT-MARKER: the relay must never see this line".to_vec();
    for _ in 0..3 {
        a.send(b_secret.public(), secret_text.clone())
            .await
            .unwrap();
    }
    let mut capture: Vec<Vec<u8>> = Vec::new();
    let mut decrypted = Vec::new();
    while decrypted.len() < 3 {
        let ev = timeout(T, b_events.recv()).await.unwrap().unwrap();
        let RelayEvent::Packet { src, data } = ev else {
            continue;
        };
        assert_eq!(src, a.public_key());
        capture.push(data.to_vec());
        let o = b_e2e.open(&src, &data, Instant::now()).unwrap();
        for r in o.replies {
            b_relay.send(src, r.into()).unwrap();
        }
        decrypted.extend(o.plaintext);
    }
    // Inner message type 0x00 (data) + the application bytes.
    for d in &decrypted {
        assert_eq!(&d[1..], &secret_text[..]);
    }
    let needle = &secret_text[..16];
    for pkt in &capture {
        assert!(
            !pkt.windows(needle.len()).any(|w| w == needle),
            "plaintext seen by the relay"
        );
    }
    assert!(capture.len() >= 4, "handshake + 3 data packets captured");
}

/// A front that refuses `Upgrade: DERP` (as some proxies do) but passes everything else,
/// e.g. WebSocket, through to the relay.
async fn refusing_proxy(relay: std::net::SocketAddr) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    if c.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if text.contains("upgrade: derp") {
                    let _ = c
                        .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let mut up = tokio::net::TcpStream::connect(relay).await.unwrap();
                up.write_all(&head).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn websocket_fallback_when_the_derp_upgrade_is_refused() {
    let relay = plain_relay(false).await;
    let front = refusing_proxy(relay.listen_addr()).await;
    let m = map(&[(900, node_json(900, front.port(), None, false, None))]);
    // The bare client reports which transport it ended up on.
    let (_c, mut ev) = RelayClient::connect(
        m.region(900).unwrap(),
        SecretKey::generate(),
        RelayOptions::default(),
    )
    .await
    .unwrap();
    match timeout(T, ev.recv()).await.unwrap().unwrap() {
        RelayEvent::Connected { websocket, .. } => assert!(websocket),
        other => panic!("expected Connected, got {other:?}"),
    }
    // DERP-only transport gives a clear refusal instead.
    let err = RelayClient::connect(
        m.region(900).unwrap(),
        SecretKey::generate(),
        RelayOptions {
            transport: Transport::Derp,
            ..RelayOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("403 Forbidden"), "{err}");
    // Two endpoints over the WebSocket path exchange data.
    let a = Endpoint::bind(ep_config(m.clone())).await.unwrap();
    let b = Endpoint::bind(ep_config(m)).await.unwrap();
    a.send(b.public_key(), b"over websocket".to_vec())
        .await
        .unwrap();
    assert_eq!(&recv(&b).await.1[..], b"over websocket");
}

/// `recv_batch`: the next packet and what has already arrived, never more than asked for,
/// in order, nothing lost between batches.
#[tokio::test]
async fn recv_batch_takes_what_has_arrived_in_order() {
    let relay = plain_relay(false).await;
    let map = map_for(&relay);
    let a = Endpoint::bind(ep_config(map.clone())).await.unwrap();
    let b = Endpoint::bind(ep_config(map)).await.unwrap();
    let bk = b.public_key();
    // The first packet sets up the E2E session; wait for it alone.
    a.send(bk, vec![0]).await.unwrap();
    assert_eq!(&recv(&b).await.1[..], &[0]);
    for i in 1..=20u8 {
        a.send(bk, vec![i]).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 20 {
        let batch = timeout(T, b.recv_batch(3)).await.expect("in time").unwrap();
        assert!((1..=3).contains(&batch.len()), "{} packets", batch.len());
        for (from, d) in batch {
            assert_eq!(from, a.public_key());
            got.push(d[0]);
        }
    }
    assert_eq!(got, (1..=20).collect::<Vec<u8>>());
}
