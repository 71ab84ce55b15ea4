//! The server over real UDP and TCP sockets on loopback.

mod common;

use std::net::SocketAddr;

use common::*;
use ferry_stun::proto::{self, attr};
use ferry_stun::{Rfc5780Config, StunConfig, StunError, StunServer};
use stun_codec::rfc5389::attributes::{
    ErrorCode, Fingerprint, UnknownAttributes, XorMappedAddress,
};
use stun_codec::rfc5780::attributes::{OtherAddress, ResponseOrigin};
use stun_codec::MessageClass;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};

fn unknown_attr_request(t: [u8; 12]) -> Vec<u8> {
    let mut m = proto::binding_request(t, None, false);
    m.extend_from_slice(&[0x7F, 0x7F, 0, 0]);
    m[3] = 4;
    m
}

async fn udp_roundtrip(server: SocketAddr, client_bind: &str) {
    let sock = UdpSocket::bind(client_bind).await.unwrap();
    let me = sock.local_addr().unwrap();

    let (reply, from) =
        udp_exchange(&sock, server, &proto::binding_request(txid(1), None, false)).await;
    assert_eq!(from, server);
    let m = decode(&reply);
    assert_eq!(m.class(), MessageClass::SuccessResponse);
    assert_eq!(m.transaction_id().as_bytes(), &txid(1));
    assert_eq!(m.get_attribute::<XorMappedAddress>().unwrap().address(), me);

    // Tailscale style: SOFTWARE "tailnode" + FINGERPRINT.
    let req = proto::binding_request(txid(2), Some("tailnode"), true);
    let (reply, _) = udp_exchange(&sock, server, &req).await;
    let m = decode(&reply);
    assert_eq!(m.get_attribute::<XorMappedAddress>().unwrap().address(), me);
    assert!(m.get_attribute::<Fingerprint>().is_some());
}

#[tokio::test]
async fn udp_ipv4_answers_plain_and_tailscale_requests() {
    let h = Harness::start(config(&["127.0.0.1:0"], &[])).await;
    udp_roundtrip(h.udp(), "127.0.0.1:0").await;
    assert_eq!(h.count("udp", "success"), 2);
    h.server.shutdown().await;
}

#[tokio::test]
async fn udp_ipv6_answers() {
    if !ipv6_available("udp_ipv6_answers") {
        return;
    }
    let h = Harness::start(config(&["[::1]:0"], &[])).await;
    udp_roundtrip(h.udp(), "[::1]:0").await;
    h.server.shutdown().await;
}

/// Each result label, over UDP. Everything comes from one client socket and the last datagram
/// is answered, so when its reply arrives every earlier datagram has been handled and counted
/// (counters are updated before a batch's replies are sent).
#[tokio::test]
async fn udp_results_are_counted() {
    let h = Harness::start(config(&["127.0.0.1:0"], &[])).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server = h.udp();

    let mut bad_fp = proto::binding_request(txid(3), Some("tailnode"), true);
    *bad_fp.last_mut().unwrap() ^= 1;
    let mut indication = proto::binding_request(txid(4), None, false);
    indication[1] = 0x11;
    let classic = {
        let mut m = proto::binding_request(txid(5), None, false);
        m[4..8].copy_from_slice(&[9, 9, 9, 9]);
        m
    };
    for dgram in [
        &b"not stun at all"[..],
        &[0xFF; 20][..],
        &bad_fp,
        &indication,
    ] {
        sock.send_to(dgram, server).await.unwrap();
    }
    let (reply, _) = udp_exchange(&sock, server, &unknown_attr_request(txid(6))).await;
    let m = decode(&reply);
    assert_eq!(m.get_attribute::<ErrorCode>().unwrap().code(), 420);
    assert_eq!(
        m.get_attribute::<UnknownAttributes>().unwrap().unknowns()[0].as_u16(),
        0x7F7F
    );
    // RFC 3489 request: MAPPED-ADDRESS and the 16-byte id.
    let (reply, _) = udp_exchange(&sock, server, &classic).await;
    assert_eq!(&reply[4..20], &classic[4..20]);
    let parsed = proto::Message::parse(&reply).unwrap();
    assert_eq!(
        parsed.address(attr::MAPPED_ADDRESS),
        Some(sock.local_addr().unwrap())
    );
    assert_eq!(parsed.attribute(attr::XOR_MAPPED_ADDRESS), None);
    let (reply, _) =
        udp_exchange(&sock, server, &proto::binding_request(txid(7), None, false)).await;
    decode(&reply);

    assert_eq!(h.count("udp", "malformed"), 2);
    assert_eq!(h.count("udp", "bad_fingerprint"), 1);
    assert_eq!(h.count("udp", "ignored"), 1);
    assert_eq!(h.count("udp", "error_response"), 1);
    assert_eq!(h.count("udp", "success"), 2);
    assert_eq!(h.count("tcp", "success"), 0);
    h.server.shutdown().await;
}

/// A burst larger than one recvmmsg batch, from several sockets: every request answered once,
/// to the right socket, with the right transaction id.
#[tokio::test]
async fn udp_burst_is_fully_answered() {
    let h = Harness::start(config(&["127.0.0.1:0"], &[])).await;
    let server = h.udp();
    let mut socks = Vec::new();
    for _ in 0..4 {
        socks.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    const PER_SOCKET: u32 = 100;
    for (s, sock) in socks.iter().enumerate() {
        for i in 0..PER_SOCKET {
            let req = proto::binding_request(txid(s as u32 * 1000 + i), None, false);
            sock.send_to(&req, server).await.unwrap();
        }
    }
    for (s, sock) in socks.iter().enumerate() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..PER_SOCKET {
            let (reply, _) = recv(sock).await;
            let m = decode(&reply);
            assert_eq!(
                m.get_attribute::<XorMappedAddress>().unwrap().address(),
                sock.local_addr().unwrap()
            );
            let id = m.transaction_id().as_bytes().to_vec();
            assert_eq!(
                u32::from_be_bytes(id[8..12].try_into().unwrap()) / 1000,
                s as u32
            );
            assert!(seen.insert(id), "duplicate reply");
        }
    }
    assert_eq!(h.count("udp", "success"), 4 * u64::from(PER_SOCKET));
    h.server.shutdown().await;
}

#[tokio::test]
async fn udp_workers_share_the_port() {
    let cfg = StunConfig {
        udp_workers: 3,
        ..config(&["127.0.0.1:0"], &[])
    };
    let h = Harness::start(cfg).await;
    assert_eq!(h.server.udp_addrs().len(), 1);
    for i in 0..8 {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (reply, _) = udp_exchange(
            &sock,
            h.udp(),
            &proto::binding_request(txid(i), None, false),
        )
        .await;
        decode(&reply);
    }
    assert_eq!(h.count("udp", "success"), 8);
    h.server.shutdown().await;
}

async fn tcp_session(server: SocketAddr) {
    let mut s = TcpStream::connect(server).await.unwrap();
    let me = s.local_addr().unwrap();
    // Three pipelined requests in one write.
    let mut burst = proto::binding_request(txid(10), None, false);
    burst.extend(proto::binding_request(txid(11), Some("tailnode"), true));
    burst.extend(unknown_attr_request(txid(12)));
    s.write_all(&burst).await.unwrap();
    for (i, want) in [
        (10, MessageClass::SuccessResponse),
        (11, MessageClass::SuccessResponse),
        (12, MessageClass::ErrorResponse),
    ] {
        let m = decode(&read_stun(&mut s).await);
        assert_eq!(m.transaction_id().as_bytes(), &txid(i));
        assert_eq!(m.class(), want);
        if want == MessageClass::SuccessResponse {
            assert_eq!(m.get_attribute::<XorMappedAddress>().unwrap().address(), me);
        }
    }
    // One request split over two writes (the server must wait for the rest).
    let req = proto::binding_request(txid(13), Some("split"), true);
    s.write_all(&req[..7]).await.unwrap();
    s.flush().await.unwrap();
    tokio::task::yield_now().await;
    s.write_all(&req[7..]).await.unwrap();
    let m = decode(&read_stun(&mut s).await);
    assert_eq!(m.transaction_id().as_bytes(), &txid(13));
    // Garbage closes the connection.
    s.write_all(&[0xC0, 0, 0, 0]).await.unwrap();
    expect_closed(&mut s).await;
}

#[tokio::test]
async fn tcp_ipv4_pipelining_split_reads_and_garbage() {
    let h = Harness::start(config(&[], &["127.0.0.1:0"])).await;
    tcp_session(h.tcp()).await;
    assert_eq!(h.count("tcp", "success"), 3);
    assert_eq!(h.count("tcp", "error_response"), 1);
    assert_eq!(h.count("tcp", "malformed"), 1);
    h.server.shutdown().await;
}

#[tokio::test]
async fn tcp_ipv6() {
    if !ipv6_available("tcp_ipv6") {
        return;
    }
    let h = Harness::start(config(&[], &["[::1]:0"])).await;
    tcp_session(h.tcp()).await;
    h.server.shutdown().await;
}

#[tokio::test]
async fn tcp_bad_fingerprint_closes_the_connection() {
    let h = Harness::start(config(&[], &["127.0.0.1:0"])).await;
    let mut s = TcpStream::connect(h.tcp()).await.unwrap();
    let mut req = proto::binding_request(txid(1), None, true);
    *req.last_mut().unwrap() ^= 0xFF;
    s.write_all(&req).await.unwrap();
    expect_closed(&mut s).await;
    assert_eq!(h.count("tcp", "bad_fingerprint"), 1);
    h.server.shutdown().await;
}

#[tokio::test]
async fn tcp_idle_connection_is_closed() {
    let cfg = StunConfig {
        tcp_idle_timeout: std::time::Duration::from_millis(200),
        ..config(&[], &["127.0.0.1:0"])
    };
    let h = Harness::start(cfg).await;
    let mut s = TcpStream::connect(h.tcp()).await.unwrap();
    s.write_all(&proto::binding_request(txid(1), None, false))
        .await
        .unwrap();
    decode(&read_stun(&mut s).await);
    let since = std::time::Instant::now();
    expect_closed(&mut s).await;
    assert!(since.elapsed() >= std::time::Duration::from_millis(150));
    h.server.shutdown().await;
}

#[tokio::test]
async fn tcp_connection_cap_closes_extra_connections() {
    let cfg = StunConfig {
        tcp_max_connections: 1,
        ..config(&[], &["127.0.0.1:0"])
    };
    let h = Harness::start(cfg).await;
    let mut first = TcpStream::connect(h.tcp()).await.unwrap();
    // A round trip proves the first connection has been accepted and is being served.
    first
        .write_all(&proto::binding_request(txid(1), None, false))
        .await
        .unwrap();
    decode(&read_stun(&mut first).await);
    let mut second = TcpStream::connect(h.tcp()).await.unwrap();
    expect_closed(&mut second).await;
    assert_eq!(h.counter(ferry_stun::TCP_REJECTED_TOTAL, &[]), 1);
    // The first one still works.
    first
        .write_all(&proto::binding_request(txid(2), None, false))
        .await
        .unwrap();
    decode(&read_stun(&mut first).await);
    h.server.shutdown().await;
}

/// IPV6_V6ONLY: after the server takes [::]:P, 0.0.0.0:P is still free (UDP and TCP).
#[tokio::test]
async fn ipv6_wildcard_leaves_ipv4_wildcard_free() {
    if !ipv6_available("ipv6_wildcard_leaves_ipv4_wildcard_free") {
        return;
    }
    let h = Harness::start(config(&["[::]:0"], &["[::]:0"])).await;
    let udp_port = h.udp().port();
    let tcp_port = h.tcp().port();
    std::net::UdpSocket::bind(("0.0.0.0", udp_port)).expect("0.0.0.0 UDP port free");
    std::net::TcpListener::bind(("0.0.0.0", tcp_port)).expect("0.0.0.0 TCP port free");
    h.server.shutdown().await;
}

/// Both wildcards with the same port in one server.
#[tokio::test]
async fn ipv4_and_ipv6_wildcards_on_one_port() {
    if !ipv6_available("ipv4_and_ipv6_wildcards_on_one_port") {
        return;
    }
    // Find a port free on both families, then hand it to the server.
    let port = {
        let l = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let v4 = format!("0.0.0.0:{port}");
    let v6 = format!("[::]:{port}");
    let h = Harness::start(config(&[&v4, &v6], &[])).await;
    assert_eq!(h.server.udp_addrs().len(), 2);
    for (bind, to) in [
        ("127.0.0.1:0", format!("127.0.0.1:{port}")),
        ("[::1]:0", format!("[::1]:{port}")),
    ] {
        let sock = UdpSocket::bind(bind).await.unwrap();
        let (reply, _) = udp_exchange(
            &sock,
            to.parse().unwrap(),
            &proto::binding_request(txid(1), None, false),
        )
        .await;
        decode(&reply);
    }
    h.server.shutdown().await;
}

#[tokio::test]
async fn port_in_use_error_names_the_address_and_keeps_the_os_error() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = StunServer::spawn(StunConfig {
        udp_addrs: vec![addr],
        tcp_addrs: vec![],
        ..Default::default()
    })
    .await
    .unwrap_err();
    match &err {
        StunError::Bind {
            addr: a, transport, ..
        } => {
            assert_eq!(*a, addr);
            assert_eq!(*transport, "UDP");
        }
        other => panic!("unexpected error {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&addr.to_string()), "{msg}");
    // The OS error is the source; what to do about it is the binary's (tests/cli.rs).
    let source = std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .expect("the OS error is the source");
    assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse, "{source}");
}

#[tokio::test]
async fn bad_configurations_are_explained() {
    let none = StunServer::spawn(config(&[], &[])).await.unwrap_err();
    assert!(none.to_string().contains("at least one"), "{none}");
    let workers = StunServer::spawn(StunConfig {
        udp_workers: 0,
        ..config(&["127.0.0.1:0"], &[])
    })
    .await
    .unwrap_err();
    assert!(workers.to_string().contains("udp_workers"), "{workers}");
    let software = StunServer::spawn(StunConfig {
        software: Some("x".repeat(200)),
        ..config(&["127.0.0.1:0"], &[])
    })
    .await
    .unwrap_err();
    assert!(software.to_string().contains("shorten"), "{software}");
    let wildcard = StunServer::spawn(StunConfig {
        rfc5780: Some(Rfc5780Config {
            primary: "0.0.0.0:0".parse().unwrap(),
            alternate: "127.0.0.2:0".parse().unwrap(),
        }),
        ..config(&[], &[])
    })
    .await
    .unwrap_err();
    assert!(wildcard.to_string().contains("specific IP"), "{wildcard}");
}

#[tokio::test]
async fn shutdown_closes_sockets_and_connections() {
    let h = Harness::start(config(&["127.0.0.1:0"], &["127.0.0.1:0"])).await;
    let (udp, tcp) = (h.udp(), h.tcp());
    let mut conn = TcpStream::connect(tcp).await.unwrap();
    conn.write_all(&proto::binding_request(txid(1), None, false))
        .await
        .unwrap();
    decode(&read_stun(&mut conn).await);
    h.server.shutdown().await;
    expect_closed(&mut conn).await;
    std::net::UdpSocket::bind(udp).expect("UDP port released");
    std::net::TcpListener::bind(tcp).expect("TCP port released");
}

/// RFC 5780 on 127.0.0.1 + 127.0.0.2: the reply comes from the socket CHANGE-REQUEST asks for,
/// and says so in RESPONSE-ORIGIN.
#[tokio::test]
async fn rfc5780_change_request_over_loopback() {
    let cfg = StunConfig {
        rfc5780: Some(Rfc5780Config {
            primary: "127.0.0.1:0".parse().unwrap(),
            alternate: "127.0.0.2:0".parse().unwrap(),
        }),
        ..config(&[], &[])
    };
    let h = Harness::start(cfg).await;
    let grid = h.server.rfc5780_grid().expect("grid bound");
    assert_eq!(h.server.udp_addrs().len(), 4);
    let primary = grid.addr(proto::GridPos::default());
    let alt_both: SocketAddr = SocketAddr::new(grid.ips[1], grid.ports[1]);
    let alt_port: SocketAddr = SocketAddr::new(grid.ips[0], grid.ports[1]);
    let alt_ip: SocketAddr = SocketAddr::new(grid.ips[1], grid.ports[0]);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for (flags, expect_from) in [(0u8, primary), (6, alt_both), (2, alt_port), (4, alt_ip)] {
        let mut req = proto::binding_request(txid(u32::from(flags)), None, false);
        req.extend_from_slice(&[0, 3, 0, 4, 0, 0, 0, flags]);
        req[3] = 8;
        let (reply, from) = udp_exchange(&sock, primary, &req).await;
        assert_eq!(from, expect_from, "flags {flags}");
        let m = decode(&reply);
        assert_eq!(
            m.get_attribute::<ResponseOrigin>().unwrap().address(),
            expect_from
        );
        assert_eq!(
            m.get_attribute::<OtherAddress>().unwrap().address(),
            alt_both
        );
        assert_eq!(
            m.get_attribute::<XorMappedAddress>().unwrap().address(),
            sock.local_addr().unwrap()
        );
    }
    // RESPONSE-PORT sends the reply to another port of our IP.
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = other.local_addr().unwrap().port().to_be_bytes();
    let mut req = proto::binding_request(txid(99), None, false);
    req.extend_from_slice(&[0, 0x27, 0, 4, port[0], port[1], 0, 0]);
    req[3] = 8;
    sock.send_to(&req, primary).await.unwrap();
    let (reply, from) = recv(&other).await;
    assert_eq!(from, primary);
    assert_eq!(
        decode(&reply)
            .get_attribute::<XorMappedAddress>()
            .unwrap()
            .address(),
        sock.local_addr().unwrap()
    );
    h.server.shutdown().await;
}
