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

/// `UDP_SEGMENT` on `sock`: every send larger than `size` goes out as `size`-byte datagrams
/// (UDP GSO), as WireGuard's Linux clients send bursts.
fn gso(sock: &UdpSocket, size: usize) {
    use std::os::fd::AsRawFd;
    assert!(
        ferry_stun::mmsg::set_int_opt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            size as libc::c_int
        ),
        "UDP_SEGMENT (Linux 4.18+)"
    );
}

/// A burst sent as one GSO send reaches the relay as one coalesced read (GRO): the relay still
/// decides datagram by datagram. The session's datagrams go out unchanged and in order (as
/// one GSO send again), one with another session's VNI in the middle of the burst is dropped
/// and counted, and the same burst from a stranger is dropped whole.
#[tokio::test]
async fn a_gso_burst_is_checked_datagram_by_datagram_and_forwarded_unchanged() {
    let relay = Options::plain()
        .start_with(|c| {
            c.udp_relay = Some(UdpRelayConfig::new("127.0.0.1:0".parse().unwrap()));
        })
        .await;
    let uaddr = relay.udp_relay_addr().unwrap();
    let m = relay.metrics();
    let mut a = RawClient::connect(&relay).await;
    let b = RawClient::connect(&relay).await;
    let keys = [a.key(), b.key()];
    let ep = allocate(&mut a, 1, keys).await.unwrap();
    let (ua, ub) = (
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    bind(&ua, uaddr, &a.secret, &ep, b.key()).await;
    bind(&ub, uaddr, &b.secret, &ep, a.key()).await;
    eventually("both bound", || {
        m.sample("ferry_relay_udp_relay_binds_total", "") == 2.0
    })
    .await;

    // 40 datagrams of 300 bytes, the 21st with a VNI no session has.
    const N: usize = 40;
    const SIZE: usize = 300;
    let burst: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            let vni = if i == 20 { ep.vni ^ 0x80_0000 } else { ep.vni };
            let mut d = data(vni, &[i as u8; SIZE - 8]);
            d[8..16].copy_from_slice(&(i as u64).to_be_bytes());
            d
        })
        .collect();
    gso(&ua, SIZE);
    ua.send_to(&burst.concat(), uaddr).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    for (i, want) in burst.iter().enumerate().filter(|(i, _)| *i != 20) {
        let (n, src) = timeout(T, ub.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!((&buf[..n], src), (&want[..], uaddr), "datagram {i}");
    }
    eventually("the foreign datagram dropped", || {
        m.sample(
            "ferry_relay_udp_relay_dropped_total",
            "reason=\"unknown_session\"",
        ) == 1.0
    })
    .await;
    assert_eq!(
        m.sample("ferry_relay_udp_relay_forwarded_packets_total", ""),
        (N - 1) as f64
    );

    // The same burst from a stranger's socket: every datagram dropped, nothing answered.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    gso(&stranger, SIZE);
    stranger.send_to(&burst.concat(), uaddr).await.unwrap();
    eventually("the stranger's burst dropped", || {
        m.sample(
            "ferry_relay_udp_relay_dropped_total",
            "reason=\"unknown_source\"",
        ) == (N - 1) as f64
    })
    .await;
    assert_eq!(
        m.sample("ferry_relay_udp_relay_forwarded_packets_total", ""),
        (N - 1) as f64
    );
    // Nothing else reached B, and the stranger got nothing back.
    ua.send_to(&data(ep.vni, b"last"), uaddr).await.unwrap();
    let (n, _) = timeout(T, ub.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[n - 4..n], b"last");
    assert!(stranger.try_recv_from(&mut buf).is_err());
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

/// Issue 15, acceptance 5 at the relay as a whole: with an allowlist, a stranger that pipelines
/// an allocation right behind its ClientInfo (before the relay has decided) is closed without
/// an answer and gets no session; the listed pair allocates and binds, and while a flood of
/// junk hits the UDP relay port (garbage, the session's VNI from a stranger's address, Binds
/// sealed by nobody the relay knows), every one of the pair's 2,000 datagrams arrives, and the
/// junk is dropped and counted, never answered with more bytes than it had.
#[tokio::test]
async fn strangers_cannot_allocate_and_a_flood_leaves_an_honest_session_whole() {
    use ferry_relay::proto::{self, frame_type as ft, ClientInfo};
    use ferry_relay::server::AdmissionConfig;
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().unwrap();
    let (ka, kb) = (SecretKey::generate(), SecretKey::generate());
    let list = dir.path().join("keys.txt");
    std::fs::write(
        &list,
        format!(
            "nodekey:{}\nnodekey:{}\n",
            ka.public().to_hex(),
            kb.public().to_hex()
        ),
    )
    .unwrap();
    let relay = Options::plain()
        .start_with(|c| {
            c.udp_relay = Some(UdpRelayConfig::new("127.0.0.1:0".parse().unwrap()));
            c.admission = Some(AdmissionConfig {
                allowlist_file: Some(list.clone()),
                ..Default::default()
            });
        })
        .await;
    let uaddr = relay.udp_relay_addr().unwrap();
    let m = relay.metrics();

    // The stranger: ServerKey, then ClientInfo and an allocation in one write.
    let stranger = SecretKey::generate();
    let mut s = RawClient::from_parts(upgrade(&relay).await, stranger, PublicKey([0; 32]));
    let f = s.frame().await.expect("ServerKey");
    assert_eq!(f.frame_type, ft::SERVER_KEY);
    s.server_key = proto::parse_server_key(&f.payload).unwrap();
    let info = proto::client_info_payload(
        &s.secret,
        &s.server_key,
        &ClientInfo {
            version: 2,
            ..Default::default()
        },
    );
    let mut out = Vec::new();
    proto::put_frame(&mut out, ft::CLIENT_INFO, &[&info]);
    let req = AllocRequest {
        id: 1,
        keys: [s.key(), ka.public()],
    };
    proto::put_frame(&mut out, FRAME_ALLOCATE, &[&req.encode()]);
    s.io.write_all(&out).await.unwrap();
    s.io.flush().await.unwrap();
    while let Some(f) = timeout(T, s.frame()).await.expect("closed in time") {
        assert_ne!(
            f.frame_type,
            ferry_proto::udprelay::FRAME_ENDPOINT,
            "a stranger got an allocation answer"
        );
    }
    let allocations = |result: &str| {
        m.sample(
            "ferry_relay_udp_relay_allocations_total",
            &format!("result=\"{result}\""),
        )
    };
    assert_eq!(allocations("granted"), 0.0);

    // The listed pair.
    let mut a = RawClient::handshake_with(upgrade(&relay).await, ka.clone()).await;
    let b = RawClient::handshake_with(upgrade(&relay).await, kb.clone()).await;
    let ep = allocate(&mut a, 2, [ka.public(), kb.public()])
        .await
        .expect("granted");
    assert_eq!(allocations("granted"), 1.0);
    let (ua, ub) = (
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    bind(&ua, uaddr, &a.secret, &ep, kb.public()).await;
    bind(&ub, uaddr, &b.secret, &ep, ka.public()).await;
    eventually("both bound", || {
        m.sample("ferry_relay_udp_relay_binds_total", "") == 2.0
    })
    .await;

    // The flood, from its own socket, in bursts.
    let junk = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let junk_addr = junk.local_addr().unwrap();
    let nobody = SecretKey::generate();
    let flood = tokio::spawn(async move {
        let bogus_bind = BindMsg {
            kind: BindKind::Bind,
            vni: ep.vni,
            generation: 9,
            remote_key: nobody.public(),
            challenge: [0; 32],
        }
        .seal(&nobody, &SecretKey::generate().public());
        let mut sent = 0u64;
        for burst in 0..100u32 {
            for i in 0..100u32 {
                let d = match i % 3 {
                    0 => vec![(burst ^ i) as u8; 1 + (i as usize * 7) % 1400],
                    1 => data(ep.vni, b"not from a bound address"),
                    _ => bogus_bind.clone(),
                };
                junk.send_to(&d, uaddr).await.unwrap();
                sent += 1;
            }
            tokio::task::yield_now().await;
        }
        (junk, sent)
    });
    // Meanwhile A sends B 2,000 numbered datagrams, at most 64 unanswered.
    const N: u32 = 2000;
    let mut got = vec![false; N as usize];
    let mut buf = vec![0u8; 2048];
    let (mut next, mut received) = (0u32, 0u32);
    while received < N {
        while next < N && next - received < 64 {
            ua.send_to(&data(ep.vni, &next.to_be_bytes()), uaddr)
                .await
                .unwrap();
            next += 1;
        }
        let (n, src) = timeout(T, ub.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("B stalled at {received} of {N}"))
            .unwrap();
        assert_eq!(src, uaddr);
        let i = u32::from_be_bytes(buf[n - 4..n].try_into().unwrap());
        assert!(!got[i as usize], "datagram {i} twice");
        got[i as usize] = true;
        received += 1;
    }
    let (junk, sent) = flood.await.unwrap();
    // Nothing came back to the flooder: no answer to garbage, to a stranger's data, or to a
    // Bind sealed to another server key.
    let mut one = [0u8; 2048];
    assert!(
        timeout(
            std::time::Duration::from_millis(200),
            junk.recv_from(&mut one)
        )
        .await
        .is_err(),
        "the relay answered the flood ({junk_addr})"
    );
    eventually("the flood counted", || {
        let dropped: f64 = [
            "short",
            "unknown_session",
            "bad_control",
            "bad_challenge",
            "not_bound",
            "unknown_source",
        ]
        .iter()
        .map(|r| {
            m.sample(
                "ferry_relay_udp_relay_dropped_total",
                &format!("reason=\"{r}\""),
            )
        })
        .sum();
        dropped >= sent as f64
    })
    .await;
    assert_eq!(
        m.sample("ferry_relay_udp_relay_forwarded_packets_total", ""),
        N as f64,
        "only the pair's datagrams were forwarded"
    );
}
