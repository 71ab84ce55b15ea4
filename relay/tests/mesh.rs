//! Mesh: relays of one region forward to each other (ferry with ferry, and ferry with
//! Tailscale's own `derper`), over TLS with certificate verification, and forget a dead peer's
//! clients at once.

mod common;

use std::time::Duration;

use common::{
    eventually, free_port, require, start_derper, upgrade, BoxIo, Derper, RawClient, RegionCert,
    Relay, T,
};
use ferry_relay::proto::{ClientInfo, PublicKey, SecretKey, ServerFrame};
use ferry_relay::server::{Config, MeshConfig, MeshDns, MeshTls, Server, TlsConfig};
use tokio::net::TcpStream;

async fn meshed_relay(rc: &RegionCert, port: u16, peers: Vec<String>) -> Relay {
    meshed_relay_dns(rc, port, peers, None).await
}

async fn meshed_relay_dns(
    rc: &RegionCert,
    port: u16,
    peers: Vec<String>,
    dns: Option<MeshDns>,
) -> Relay {
    meshed_relay_full(rc, port, peers, dns, SecretKey::generate()).await
}

/// A meshed relay with a given server key (a restart keeps its key).
async fn meshed_relay_full(
    rc: &RegionCert,
    port: u16,
    peers: Vec<String>,
    dns: Option<MeshDns>,
    server_key: SecretKey,
) -> Relay {
    let cfg = Config {
        server_key,
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        tls: Some(TlsConfig::Manual {
            cert_path: rc.cert(),
            key_path: rc.key(),
        }),
        mesh_key: Some(rc.mesh_key),
        mesh: Some(MeshConfig {
            peers,
            dns,
            tls: MeshTls::Verify {
                ca_file: Some(rc.cert()),
                name: None,
            },
        }),
        hostname: Some("localhost".into()),
        ..Config::dev_loopback()
    };
    Relay::from_server(Server::spawn(cfg).await.unwrap()).trusting(rc.der.clone())
}

async fn connect_with(relay: &Relay, secret: SecretKey) -> RawClient {
    RawClient::handshake_with(upgrade(relay).await, secret).await
}

/// The next packet, skipping PeerGone/PeerPresent notes.
async fn recv_packet(c: &mut RawClient) -> (PublicKey, Vec<u8>) {
    loop {
        match c.next().await.expect("connection open") {
            ServerFrame::RecvPacket { src, packet } => return (src, packet.to_vec()),
            ServerFrame::PeerGone { .. } | ServerFrame::PeerPresent { .. } => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_meshed_relays_deliver_across_and_forget_a_dead_peers_clients() {
    let rc = RegionCert::new();
    let ports = [free_port(), free_port(), free_port()];
    // Every relay gets the full list, itself included: it must recognise and skip itself.
    let all: Vec<String> = ports.iter().map(|p| format!("localhost:{p}")).collect();
    let mut relays = Vec::new();
    for p in ports {
        relays.push(meshed_relay(&rc, p, all.clone()).await);
    }
    let mut clients = Vec::new();
    for r in &relays {
        clients.push(RawClient::connect(r).await);
    }
    let keys: Vec<PublicKey> = clients.iter().map(|c| c.key()).collect();
    // Each relay learns the clients of the other two through its mesh links.
    for (i, r) in relays.iter().enumerate() {
        for (j, k) in keys.iter().enumerate() {
            if i != j {
                eventually("mesh learns the peer's client", || r.server.mesh_knows(k)).await;
            }
        }
        assert!(
            !r.server.mesh_knows(&keys[i]),
            "a local client is not remote"
        );
    }
    // Every ordered pair exchanges a packet, with the sender's key as the source.
    for i in 0..3 {
        for j in 0..3 {
            if i == j {
                continue;
            }
            let msg = format!("{i}->{j}").into_bytes();
            clients[i].send(keys[j], &msg).await;
            let got = recv_packet(&mut clients[j]).await;
            assert_eq!(got, (keys[i], msg));
        }
    }
    for r in &relays {
        assert!(
            r.server
                .metrics()
                .sample("ferry_relay_mesh_forwarded_packets_total", "")
                >= 2.0
        );
        assert_eq!(r.server.metrics().sample("ferry_relay_mesh_links", ""), 2.0);
    }

    // Relay 2 dies: the others drop its client's key at once (no forwarding into the void).
    let dead = relays.pop().unwrap();
    let c2_secret = clients.pop().unwrap().secret;
    dead.server.shutdown().await;
    for r in &relays {
        eventually("dead peer's client forgotten", || {
            !r.server.mesh_knows(&keys[2])
        })
        .await;
    }
    let before = relays[0].server.metrics().sample(
        "ferry_relay_packets_dropped_total",
        "reason=\"unknown_dest\"",
    );
    clients[0].send(keys[2], b"into the void?").await;
    eventually("counted as unknown destination, not forwarded", || {
        relays[0].server.metrics().sample(
            "ferry_relay_packets_dropped_total",
            "reason=\"unknown_dest\"",
        ) > before
    })
    .await;

    // The client comes back on relay 1: traffic resumes through the mesh, and the first packet
    // it sees is the new one (the one sent while it was away was dropped, not held or misrouted).
    let mut back = connect_with(&relays[1], c2_secret).await;
    eventually("mesh learns the returning client", || {
        relays[0].server.mesh_knows(&keys[2])
    })
    .await;
    clients[0].send(keys[2], b"welcome back").await;
    assert_eq!(
        recv_packet(&mut back).await,
        (keys[0], b"welcome back".to_vec())
    );
}

/// Peers from DNS: "localhost" on relay A's port leads B to A. (A mesh link forwards one way,
/// from the relay that dialled; a real region gives every relay the same name and port, so each
/// dials all the others. Loopback relays need distinct ports, so this checks the one direction.)
/// TLS for DNS peers is checked against this relay's own hostname. A relay whose DNS name leads
/// to itself skips it and keeps no link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovered_peers_mesh_and_self_is_skipped() {
    let rc = RegionCert::new();
    let a = meshed_relay(&rc, free_port(), vec![]).await;
    let dns = |port| MeshDns {
        name: "localhost".into(),
        port,
        interval: Duration::from_secs(1),
    };
    let b = meshed_relay_dns(&rc, free_port(), vec![], Some(dns(a.addr().port()))).await;
    let mut on_a = RawClient::connect(&a).await;
    let mut on_b = RawClient::connect(&b).await;
    eventually("b finds a through DNS", || b.server.mesh_knows(&on_a.key())).await;
    on_b.send(on_a.key(), b"via dns").await;
    assert_eq!(
        recv_packet(&mut on_a).await,
        (on_b.key(), b"via dns".to_vec())
    );
    assert_eq!(b.server.metrics().sample("ferry_relay_mesh_links", ""), 1.0);

    let c_port = free_port();
    let c = meshed_relay_dns(&rc, c_port, vec![], Some(dns(c_port))).await;
    // c dials its own address, sees its own server key in the ServerKey frame and hangs up
    // before ClientInfo (counted by c's server side as a handshake cut short); no link stays.
    eventually("c dialled itself and hung up", || {
        c.server
            .metrics()
            .sample("ferry_relay_handshake_failures_total", "reason=\"io\"")
            >= 1.0
    })
    .await;
    assert_eq!(c.server.metrics().sample("ferry_relay_mesh_links", ""), 0.0);
    assert_eq!(c.server.client_count(), 0);
}

/// A raw DERP client on derper (TLS, upgrade, handshake).
async fn derper_client(d: &Derper, rc: &RegionCert) -> RawClient {
    let tcp = TcpStream::connect(("127.0.0.1", d.port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let io: BoxIo = Box::new(
        common::client_tls(&rc.der)
            .connect(name, tcp)
            .await
            .unwrap(),
    );
    RawClient::over(
        io,
        "localhost",
        ClientInfo {
            version: 2,
            ..Default::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_and_tailscale_derper_in_one_mesh_exchange_packets() {
    let Some(bin) = require("derper", "scripts/test-deps.sh") else {
        return;
    };
    let rc = RegionCert::new();
    let key_file = rc.dir.path().join("mesh.key");
    std::fs::write(&key_file, format!("{}\n", hex::encode(rc.mesh_key))).unwrap();
    // ferry first (its link retries within a second), so derper's first dial finds it up
    // (derper waits 5 s between attempts).
    let (ferry_port, derper_port) = (free_port(), free_port());
    let ferry = meshed_relay(&rc, ferry_port, vec![format!("localhost:{derper_port}")]).await;
    let derper = start_derper(
        &bin,
        derper_port,
        &rc,
        &key_file,
        &format!("localhost:{ferry_port}"),
    );

    let mut on_ferry = RawClient::connect(&ferry).await;
    let mut on_derper = derper_client(&derper, &rc).await;
    // ferry learns derper's client through its WatchConns link.
    eventually("ferry learns derper's client", || {
        ferry.server.mesh_knows(&on_derper.key())
    })
    .await;
    on_ferry.send(on_derper.key(), b"ferry -> derper").await;
    assert_eq!(
        recv_packet(&mut on_derper).await,
        (on_ferry.key(), b"ferry -> derper".to_vec())
    );
    // derper learns ferry's client through its own link to ferry (derper retries every 5 s);
    // its table cannot be read, so probe until one packet gets through, then check it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let got = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "derper never forwarded to ferry"
        );
        on_derper.send(on_ferry.key(), b"derper -> ferry").await;
        if let Ok(got) =
            tokio::time::timeout(Duration::from_millis(250), recv_packet(&mut on_ferry)).await
        {
            break got;
        }
    };
    assert_eq!(got, (on_derper.key(), b"derper -> ferry".to_vec()));
    // derper's link to ferry is a mesh client of ferry's: it watched and got ForwardPackets in.
    assert!(
        ferry
            .server
            .metrics()
            .sample("ferry_relay_packets_forwarded_total", "")
            >= 1.0
    );
}

/// A relay that restarts learns every client of its peer, however many: the snapshot a watcher
/// gets when it subscribes is whole (it was cut at 64 entries once), and a client on the
/// restarted relay reaches each of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_learns_all_2000_clients_of_its_peer() {
    const N: usize = 2000;
    let rc = RegionCert::new();
    let (pa, pb) = (free_port(), free_port());
    let all = vec![format!("localhost:{pa}"), format!("localhost:{pb}")];
    let a = meshed_relay(&rc, pa, all.clone()).await;
    let b_key = SecretKey::generate();
    let b = meshed_relay_full(&rc, pb, all.clone(), None, b_key.clone()).await;
    // N clients on A, connected in parallel batches.
    let mut clients: Vec<RawClient> = Vec::with_capacity(N);
    while clients.len() < N {
        let batch = (N - clients.len()).min(100);
        let more = futures_util::future::join_all((0..batch).map(|_| RawClient::connect(&a))).await;
        clients.extend(more);
    }
    eventually("b learns every client of a", || {
        b.server.mesh_remote_keys() == N
    })
    .await;

    // B restarts, as in a rolling upgrade: same port, same key, a fresh process state.
    b.server.shutdown().await;
    let b = meshed_relay_full(&rc, pb, all.clone(), None, b_key).await;
    let deadline = tokio::time::Instant::now() + T;
    while b.server.mesh_remote_keys() < N && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        b.server.mesh_remote_keys(),
        N,
        "the restarted relay learned only part of its peer's clients"
    );
    assert_eq!(
        b.server
            .metrics()
            .sample("ferry_relay_mesh_remote_keys", ""),
        N as f64
    );
    // A client on B reaches every one of them, with its own key as the source.
    let mut on_b = RawClient::connect(&b).await;
    let me = on_b.key();
    for c in &clients {
        on_b.send(c.key(), b"hello from b").await;
    }
    for c in &mut clients {
        assert_eq!(recv_packet(c).await, (me, b"hello from b".to_vec()));
    }
    drop(a);
}

/// A watcher (a mesh peer) that stops reading is cut off once it falls `watcher_backlog`
/// changes behind, and counted, instead of its backlog growing with every join and leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_stops_reading_is_cut_off_and_counted() {
    let mesh_key = [7u8; 32];
    let relay = common::Options::plain()
        .limits(ferry_relay::server::Limits {
            watcher_backlog: 50,
            ..common::test_limits()
        })
        .start_with(|c| c.mesh_key = Some(mesh_key))
        .await;
    let m = relay.server.metrics().clone();
    // The watcher: mesh key, WatchConns, then it never reads again. A small receive buffer,
    // so its socket fills soon.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let io: BoxIo = Box::new(sock.connect(relay.addr()).await.unwrap());
    let mut watcher = RawClient::over(
        io,
        "x",
        ClientInfo {
            version: 2,
            mesh_key: Some(mesh_key),
            can_ack_pings: true,
            ..Default::default()
        },
    )
    .await;
    watcher
        .send_frame(ferry_relay::proto::frame_type::WATCH_CONNS, &[])
        .await;
    // Fill its socket: large packets to its key until the relay's writer for it is stuck.
    let mut filler = RawClient::connect(&relay).await;
    let big = vec![0u8; 60_000];
    for _ in 0..200 {
        filler.send(watcher.key(), &big).await;
    }
    // Joins and leaves: more than its backlog of 50.
    for _ in 0..200 {
        if m.sample(
            "ferry_relay_connections_closed_total",
            "reason=\"watcher_overflow\"",
        ) >= 1.0
        {
            break;
        }
        drop(RawClient::connect(&relay).await);
    }
    eventually("the stalled watcher is cut off, counted", || {
        m.sample(
            "ferry_relay_connections_closed_total",
            "reason=\"watcher_overflow\"",
        ) == 1.0
    })
    .await;
    // Everyone else is fine.
    let mut a = RawClient::connect(&relay).await;
    filler.send(a.key(), b"still here").await;
    assert_eq!(
        recv_packet(&mut a).await,
        (filler.key(), b"still here".to_vec())
    );
    drop(watcher);
}
