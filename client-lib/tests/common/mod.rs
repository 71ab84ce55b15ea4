//! Shared test support: in-process ferry relays (TLS with a self-signed certificate and its
//! pin, or plain HTTP), STUN beside them, and DERP maps pointing at them.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ferry_client::{RelayMap, SecretKey};
use ferry_relay::server::{cert_name_pin, Server};

/// Bounds every await in tests, so a bug shows as a failure, not a hang.
pub const T: Duration = Duration::from_secs(20);

use ferry_relay::testing::Options;

/// A TLS relay with a self-signed certificate kept in `dir`, on `listen`, with `key`.
pub async fn tls_relay(listen: SocketAddr, dir: &Path, key: SecretKey, stun: bool) -> Server {
    Options::tls()
        .listen(listen)
        .dir(dir)
        .key(key)
        .stun(stun)
        .start()
        .await
        .server
}

/// A plain-HTTP relay (what `ferry-relay --dev` serves), optionally with STUN.
pub async fn plain_relay(stun: bool) -> Server {
    Options::plain().stun(stun).start().await.server
}

/// The pin of a TLS relay's certificate, as the DERP map's CertName.
pub fn pin(server: &Server) -> String {
    cert_name_pin(&server.cert_der().expect("a TLS relay"))
}

/// One region's node JSON for a relay on loopback.
pub fn node_json(
    region: u32,
    derp_port: u16,
    stun_port: Option<u16>,
    tls: bool,
    cert_name: Option<&str>,
) -> serde_json::Value {
    let mut n = serde_json::json!({
        "Name": format!("{region}a"),
        "RegionID": region,
        "HostName": "127.0.0.1",
        "IPv4": "127.0.0.1",
        "IPv6": "none",
        "DERPPort": derp_port,
        "STUNPort": stun_port.map(i64::from).unwrap_or(-1),
    });
    if !tls {
        n["InsecureForTests"] = true.into();
    }
    if let Some(c) = cert_name {
        n["CertName"] = c.into();
    }
    n
}

/// A DERP map with one region per `(region id, node json)`.
pub fn map(regions: &[(u32, serde_json::Value)]) -> RelayMap {
    let mut rs = serde_json::Map::new();
    for (id, node) in regions {
        rs.insert(
            id.to_string(),
            serde_json::json!({"RegionID": id, "RegionCode": format!("r{id}"), "Nodes": [node]}),
        );
    }
    RelayMap::from_json(&serde_json::json!({ "Regions": rs }).to_string()).unwrap()
}

/// A one-region map for a server (TLS pinned, or plain).
pub fn map_for(server: &Server) -> RelayMap {
    let stun = server.stun_udp_addrs().first().map(|a| a.port());
    let node = match server.cert_der() {
        Some(_) => node_json(
            900,
            server.listen_addr().port(),
            stun,
            true,
            Some(&pin(server)),
        ),
        None => node_json(900, server.listen_addr().port(), stun, false, None),
    };
    map(&[(900, node)])
}

/// Endpoint settings for loopback tests: IPv4 loopback socket, no IPv6, no periodic re-STUN,
/// relay path only (tests of direct paths turn `direct.enabled` back on).
pub fn ep_config(map: RelayMap) -> ferry_client::EndpointConfig {
    let mut c = ferry_client::EndpointConfig::new(SecretKey::generate(), map);
    c.bind_v4 = "127.0.0.1:0".parse().unwrap();
    c.bind_v6 = None;
    c.restun_interval = None;
    c.netcheck.timeout = Duration::from_secs(2);
    c.direct.enabled = false;
    c
}

/// Waits for a path event for `peer` whose new path matches.
pub async fn wait_path(
    events: &mut tokio::sync::broadcast::Receiver<ferry_client::PathEvent>,
    peer: ferry_client::PublicKey,
    want: impl Fn(&ferry_client::Path) -> bool,
    what: &str,
) -> ferry_client::Path {
    tokio::time::timeout(T, async {
        loop {
            match events.recv().await {
                Ok(ev) if ev.peer == peer && want(&ev.new) => return ev.new,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("path events closed: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no path event: {what}"))
}

/// Sends `bursts` bursts of [`ferry_client::MAX_BATCH`] numbered datagrams of `size` bytes from
/// `a` to `b` with `send_batch`, and checks that every one arrives once, in order. Returns
/// what `a`'s main sockets sent meanwhile and what `b`'s read, as (datagrams, messages) each.
/// With GSO a burst's run to one address is one message (or a few: one carries at most
/// 64 KiB), and a GRO reader takes it as one.
pub async fn burst_exchange(
    a: &ferry_client::Endpoint,
    b: &ferry_client::Endpoint,
    bursts: u32,
    size: usize,
) -> ((u64, u64), (u64, u64)) {
    let n = ferry_client::MAX_BATCH as u32;
    let (before, b_before) = (a.stats(), b.stats());
    for k in 0..bursts {
        let burst = (0..n)
            .map(|i| {
                let mut p = (k * n + i).to_be_bytes().to_vec();
                p.resize(size, 0x5A);
                p
            })
            .collect();
        let results = a.send_batch(b.public_key(), burst).await.unwrap();
        assert_eq!(results.len(), n as usize);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        // The whole burst arrives before the next leaves: nothing waits in a full queue.
        for i in 0..n {
            let (from, d) = tokio::time::timeout(T, b.recv())
                .await
                .expect("a datagram in time")
                .unwrap();
            assert_eq!(from, a.public_key());
            assert_eq!(d.len(), size);
            let got = u32::from_be_bytes(d[..4].try_into().unwrap());
            assert_eq!(got, k * n + i, "burst {k}");
        }
    }
    let (after, b_after) = (a.stats(), b.stats());
    (
        (
            after.udp_out_datagrams - before.udp_out_datagrams,
            after.udp_out_messages - before.udp_out_messages,
        ),
        (
            b_after.udp_in_datagrams - b_before.udp_in_datagrams,
            b_after.udp_in_messages - b_before.udp_in_messages,
        ),
    )
}
