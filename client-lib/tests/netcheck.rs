//! netcheck against real ferry STUN servers on loopback.

mod common;

use std::time::Duration;

use common::*;
use ferry_client::netcheck::{self, NetcheckOptions};
use ferry_client::udp::Sockets;

#[tokio::test]
async fn two_stun_servers_give_both_latencies_and_easy_nat_on_loopback() {
    let r1 = plain_relay(true).await;
    let r2 = plain_relay(true).await;
    // A third region whose STUN port is a UDP port nobody answers on.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let stun_port = |s: &ferry_relay::server::Server| s.stun_udp_addrs()[0].port();
    let m = map(&[
        (
            900,
            node_json(
                900,
                r1.listen_addr().port(),
                Some(stun_port(&r1)),
                false,
                None,
            ),
        ),
        (
            901,
            node_json(
                901,
                r2.listen_addr().port(),
                Some(stun_port(&r2)),
                false,
                None,
            ),
        ),
        (902, node_json(902, 1, Some(silent_port), false, None)),
    ]);
    let sockets = Sockets::bind("127.0.0.1:0".parse().unwrap(), None, None)
        .await
        .unwrap();
    let local = sockets.v4.local_addr().unwrap();
    let opts = NetcheckOptions {
        timeout: Duration::from_secs(1),
        ..NetcheckOptions::default()
    };
    let report = netcheck::run(&m, &sockets, None, opts).await;
    assert!(report.udp && report.ipv4 && !report.ipv6, "{report:?}");
    assert!(report.region_latency.contains_key(&900), "{report:?}");
    assert!(report.region_latency.contains_key(&901), "{report:?}");
    assert!(!report.region_latency.contains_key(&902), "{report:?}");
    // On loopback there is no NAT: both servers see the socket's own address.
    assert_eq!(report.global_v4, Some(local));
    assert_eq!(report.mapping_varies_by_dest_ip, Some(false));
    for p in report.probes.iter().filter(|p| p.region != 902) {
        assert_eq!(p.mapped, Some(local), "{p:?}");
    }
    let home = report.preferred_region.unwrap();
    assert!(home == 900 || home == 901);
    // With the previous home among the answering regions, loopback latencies are within the
    // hysteresis, so the home stays put.
    let again = netcheck::run(&m, &sockets, Some(901), opts).await;
    let lat = &again.region_latency;
    if lat[&900] + netcheck::HOME_HYSTERESIS > lat[&901] {
        assert_eq!(again.preferred_region, Some(901));
    }
    let text = report.to_text(&m);
    assert!(text.contains("MappingVariesByDestIP: no"), "{text}");
    assert!(
        text.contains("902 (r902)") && text.contains("no answer"),
        "{text}"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert!(
        json["region_latency_ms"]["900"].as_f64().is_some(),
        "{json}"
    );
    drop(silent);
}

#[tokio::test]
async fn one_stun_server_cannot_tell_the_nat_type() {
    let r1 = plain_relay(true).await;
    let m = map(&[(
        900,
        node_json(
            900,
            r1.listen_addr().port(),
            Some(r1.stun_udp_addrs()[0].port()),
            false,
            None,
        ),
    )]);
    let sockets = Sockets::bind("127.0.0.1:0".parse().unwrap(), None, None)
        .await
        .unwrap();
    let report = netcheck::run(&m, &sockets, None, NetcheckOptions::default()).await;
    assert!(report.udp);
    assert_eq!(report.mapping_varies_by_dest_ip, None);
    assert_eq!(report.preferred_region, Some(900));
}
