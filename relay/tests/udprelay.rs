//! The UDP relay path (issue 15) through a real relay: allocation over a DERP connection, the
//! bind handshake over real UDP sockets, forwarding both ways, and a stranger's datagrams
//! dropped and counted — never forwarded, never answered.

mod common;

use std::net::SocketAddr;

use common::*;
use ferry_proto::udprelay::{
    AllocRequest, BindKind, BindMsg, Endpoint, Geneve, FRAME_ALLOCATE, PROTO_WIREGUARD,
};
use ferry_relay::proto::{PublicKey, SecretKey, ServerFrame};
use ferry_relay::server::UdpRelayConfig;
use tokio::net::UdpSocket;
use tokio::time::timeout;

async fn allocate(c: &mut RawClient, id: u32, keys: [PublicKey; 2]) -> Result<Endpoint, String> {
    c.send_frame(FRAME_ALLOCATE, &[&AllocRequest { id, keys }.encode()])
        .await;
    loop {
        match timeout(T, c.next()).await.expect("an answer in time") {
            Some(ServerFrame::UdpRelayEndpoint(r)) => {
                assert_eq!(r.id, id);
                return r.result;
            }
            Some(_) => continue,
            None => panic!("the relay closed the connection"),
        }
    }
}

/// Bind → Challenge → Answer from `sock`, as the side holding `key`.
async fn bind(
    sock: &UdpSocket,
    relay: SocketAddr,
    key: &SecretKey,
    ep: &Endpoint,
    other: PublicKey,
) {
    let bind = BindMsg {
        kind: BindKind::Bind,
        vni: ep.vni,
        generation: 1,
        remote_key: other,
        challenge: [0; 32],
    };
    let d = bind.seal(key, &ep.server_key);
    sock.send_to(&d, relay).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, from) = timeout(T, sock.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(from, relay);
    assert_eq!(
        n,
        d.len(),
        "the challenge is as large as the bind, no larger"
    );
    let ch = BindMsg::open(key, &ep.server_key, &buf[..n]).unwrap();
    assert_eq!(ch.kind, BindKind::Challenge);
    let answer = BindMsg {
        kind: BindKind::Answer,
        challenge: ch.challenge,
        ..bind
    };
    sock.send_to(&answer.seal(key, &ep.server_key), relay)
        .await
        .unwrap();
}

fn data(vni: u32, payload: &[u8]) -> Vec<u8> {
    let mut d = Geneve {
        control: false,
        protocol: PROTO_WIREGUARD,
        vni,
    }
    .encode()
    .to_vec();
    d.extend_from_slice(payload);
    d
}

#[tokio::test]
async fn two_clients_allocate_over_derp_bind_and_exchange_datagrams() {
    let relay = Options::plain()
        .start_with(|c| {
            c.udp_relay = Some(UdpRelayConfig::new("127.0.0.1:0".parse().unwrap()));
        })
        .await;
    let uaddr = relay.udp_relay_addr().expect("the UDP relay is on");
    let mut a = RawClient::connect(&relay).await;
    let b = RawClient::connect(&relay).await;
    let (ak, bk) = (a.key(), b.key());

    let ep = allocate(&mut a, 7, [ak, bk]).await.expect("granted");
    assert_eq!(ep.port, uaddr.port());
    let mut sorted = [ak, bk];
    sorted.sort_by(|x, y| x.as_bytes().cmp(y.as_bytes()));
    assert_eq!(ep.keys, sorted);
    // The same pair again: the same session.
    assert_eq!(allocate(&mut a, 8, [bk, ak]).await.unwrap().vni, ep.vni);
    // A pair with the same key twice is refused, with a reason.
    let why = allocate(&mut a, 9, [ak, ak]).await.unwrap_err();
    assert!(why.contains("two distinct"), "{why}");
    // Only for itself and a peer: not for two other nodes.
    let other = SecretKey::generate().public();
    let why = allocate(&mut a, 10, [bk, other]).await.unwrap_err();
    assert!(why.contains("only for itself"), "{why}");

    let ua = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ub = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let m = relay.metrics();
    bind(&ua, uaddr, &a.secret, &ep, bk).await;
    bind(&ub, uaddr, &b.secret, &ep, ak).await;
    eventually("both sides bound", || {
        m.sample("ferry_relay_udp_relay_binds_total", "") == 2.0
    })
    .await;

    // A ↔ B, unchanged, header included.
    let mut buf = vec![0u8; 2048];
    for (from, to, text) in [(&ua, &ub, &b"a to b"[..]), (&ub, &ua, &b"b to a"[..])] {
        let d = data(ep.vni, text);
        from.send_to(&d, uaddr).await.unwrap();
        let (n, src) = timeout(T, to.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!((&buf[..n], src), (&d[..], uaddr));
    }
    // A stranger with the session's VNI: dropped and counted, nothing sent anywhere.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stranger
        .send_to(&data(ep.vni, b"spoof"), uaddr)
        .await
        .unwrap();
    eventually("the stranger's datagram dropped", || {
        m.sample(
            "ferry_relay_udp_relay_dropped_total",
            "reason=\"unknown_source\"",
        ) == 1.0
    })
    .await;
    assert_eq!(
        m.sample("ferry_relay_udp_relay_forwarded_packets_total", ""),
        2.0
    );
    assert_eq!(
        m.sample(
            "ferry_relay_udp_relay_allocations_total",
            "result=\"granted\""
        ),
        2.0
    );
    assert_eq!(
        m.sample(
            "ferry_relay_udp_relay_allocations_total",
            "result=\"refused_bad_pair\""
        ),
        1.0
    );
    assert_eq!(
        m.sample(
            "ferry_relay_udp_relay_allocations_total",
            "result=\"refused_not_member\""
        ),
        1.0
    );
    // Still only A ↔ B: the next datagram B gets is A's.
    ua.send_to(&data(ep.vni, b"again"), uaddr).await.unwrap();
    let (n, _) = timeout(T, ub.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[n - 5..n], b"again");
}

/// With the UDP relay off, the allocation frame is skipped like any unknown frame (as derper
/// does): no answer, the connection stays up.
#[tokio::test]
async fn without_the_udp_relay_an_allocation_is_skipped() {
    let relay = Options::plain().start().await;
    assert_eq!(relay.udp_relay_addr(), None);
    let mut a = RawClient::connect(&relay).await;
    let b = RawClient::connect(&relay).await;
    a.send_frame(
        FRAME_ALLOCATE,
        &[&AllocRequest {
            id: 1,
            keys: [a.key(), b.key()],
        }
        .encode()],
    )
    .await;
    let m = relay.metrics();
    eventually("the frame skipped", || {
        m.sample("ferry_relay_frames_ignored_total", "") == 1.0
    })
    .await;
    // The connection still works.
    let mut b = b;
    a.send(b.key(), b"still here").await;
    let (src, d) = timeout(T, b.recv()).await.unwrap();
    assert_eq!((src, &d[..]), (a.key(), &b"still here"[..]));
}
