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
