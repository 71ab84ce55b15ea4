//! The client against a relay nobody here wrote: Tailscale's own `derper` (Go, v1.102.5 from
//! `scripts/test-deps.sh`, in `<repo>/.tools/bin` or PATH; skipped without it, required under
//! `CI`). Two endpoints reach each other through it over TLS (a pinned self-signed
//! certificate), end to end encrypted, then find the direct path with disco through it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use ferry_client::{Endpoint, Path as EpPath, RelayMap};
use ferry_relay::server::cert_name_pin;
use tokio::time::timeout;

/// `derper` from `<repo>/.tools/bin` or PATH; `None` (skip) unless `CI` is set.
fn derper_bin() -> Option<PathBuf> {
    ferry_relay::testing::require("derper", "scripts/test-deps.sh")
}

struct Derper {
    child: Child,
    _dir: tempfile::TempDir,
    map: RelayMap,
}

impl Drop for Derper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// derper on 127.0.0.1 with a self-signed certificate for `localhost` (manual cert mode wants
/// `<certdir>/<hostname>.crt` and `.key`), no STUN; and a DERP map that pins the certificate.
fn start_derper(bin: &Path) -> Derper {
    start_derper_stun(bin, None)
}

/// The same, with derper's STUN server on `stun_port` when given.
fn start_derper_stun(bin: &Path, stun_port: Option<u16>) -> Derper {
    let dir = tempfile::tempdir().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("localhost.crt"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("localhost.key"), key.serialize_pem()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["-a", &format!("127.0.0.1:{port}"), "-hostname", "localhost"])
        .args(["-certmode", "manual", "-certdir"])
        .arg(dir.path())
        .args(["-http-port", "-1"])
        .args(match stun_port {
            Some(p) => vec!["-stun-port".to_string(), p.to_string()],
            None => vec!["-stun=false".to_string()],
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + T;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "derper never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SNI must be derper's -hostname; the connection goes to IPv4; the pin verifies the leaf.
    let node = serde_json::json!({
        "Name": "900a", "RegionID": 900, "HostName": "localhost", "IPv4": "127.0.0.1",
        "IPv6": "none", "DERPPort": port, "STUNPort": stun_port.map_or(-1, i32::from),
        "CertName": cert_name_pin(cert.der()),
    });
    Derper {
        child,
        _dir: dir,
        map: map(&[(900, node)]),
    }
}

#[tokio::test]
async fn endpoints_talk_through_tailscales_derper_and_go_direct() {
    let Some(bin) = derper_bin() else {
        return;
    };
    let d = start_derper(&bin);
    let mut ca = ep_config(d.map.clone());
    let mut cb = ep_config(d.map.clone());
    ca.direct.enabled = true;
    cb.direct.enabled = true;
    // Disco runs from the start; the relay carries the first packets (before any pong).
    let a = Endpoint::bind(ca).await.unwrap();
    let b = Endpoint::bind(cb).await.unwrap();
    let (ak, bk) = (a.public_key(), b.public_key());
    let mut ea = a.path_events();

    // The first packets go through derper (E2E handshake included).
    for i in 0u32..50 {
        a.send(bk, i.to_be_bytes().to_vec()).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 50 {
        let (from, data) = timeout(T, b.recv())
            .await
            .expect("packets in time")
            .unwrap();
        assert_eq!(from, ak);
        got.push(u32::from_be_bytes(data[..4].try_into().unwrap()));
    }
    got.sort_unstable();
    assert_eq!(got, (0..50).collect::<Vec<_>>(), "every packet once");
    let first = timeout(T, ea.recv()).await.unwrap().unwrap();
    assert_eq!(first.new, EpPath::Relay(900), "first contact via derper");

    // Disco through derper (CallMeMaybe) finds the direct loopback path.
    let direct = timeout(T, async {
        loop {
            let ev = ea.recv().await.unwrap();
            if matches!(ev.new, EpPath::Direct(_)) {
                return ev.new;
            }
        }
    })
    .await
    .expect("a direct path within the test timeout");
    assert_eq!(direct, EpPath::Direct(b.local_addrs()[0]));
    // And an E2E ping both ways.
    let pong = timeout(T, a.ping(bk)).await.unwrap().unwrap();
    assert_eq!(pong.path, direct);
    let pong = timeout(T, b.ping(ak)).await.unwrap().unwrap();
    assert!(matches!(pong.path, EpPath::Direct(_)), "{pong:?}");
}

/// netcheck against derper's STUN server: derper answers only Tailscale-style requests
/// (SOFTWARE "tailnode" + FINGERPRINT), so a ferry node whose region has derper nodes must send
/// exactly those, or it concludes that UDP is blocked. (It sent SOFTWARE "ferry" once, and
/// derper never answered.)
#[tokio::test]
async fn netcheck_gets_answers_from_derpers_stun_server() {
    let Some(bin) = derper_bin() else {
        return;
    };
    let stun_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = start_derper_stun(&bin, Some(stun_port));
    let sockets = ferry_client::udp::Sockets::bind("127.0.0.1:0".parse().unwrap(), None, None)
        .await
        .unwrap();
    let local = sockets.v4.local_addr().unwrap();
    let opts = ferry_client::netcheck::NetcheckOptions {
        timeout: Duration::from_secs(2),
        ..Default::default()
    };
    // derper binds its STUN port a moment after its TCP listener: retry the first seconds.
    let deadline = std::time::Instant::now() + T;
    let report = loop {
        let r = ferry_client::netcheck::run(&d.map, &sockets, None, opts).await;
        if r.udp || std::time::Instant::now() > deadline {
            break r;
        }
    };
    assert!(
        report.udp,
        "derper's STUN server never answered: {report:?}"
    );
    assert_eq!(report.global_v4, Some(local), "{report:?}");
    assert!(report.region_latency.contains_key(&900), "{report:?}");
}
