//! Manual certificate files that change on disk (cert-manager renewing a Secret that Kubernetes
//! updates in place) are picked up without SIGHUP or restart; open connections stay.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{client_tls, Relay, T};
use ferry_relay::server::{Limits, TlsConfig};
use tokio::io::AsyncWriteExt;

/// Writes a new pair the way the kubelet updates a Secret volume: a new directory, then the
/// `..data` symlink renamed over the old one. `tls.crt`/`tls.key` link into `..data`.
fn k8s_secret(dir: &Path, generation: u32, name: &str) -> Vec<u8> {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), name.to_string()])
        .unwrap();
    let ts = dir.join(format!("..gen_{generation}"));
    std::fs::create_dir(&ts).unwrap();
    std::fs::write(ts.join("tls.crt"), c.cert.pem()).unwrap();
    std::fs::write(ts.join("tls.key"), c.key_pair.serialize_pem()).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(ts.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        if std::fs::symlink_metadata(dir.join(f)).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), dir.join(f)).unwrap();
        }
    }
    c.cert.der().to_vec()
}

async fn tls_connect(
    relay: &Relay,
    der: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(relay.addr()).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(T, client_tls(der).connect(name, tcp))
        .await
        .expect("TLS handshake in time")
}

#[tokio::test]
async fn a_swapped_secret_is_served_without_sighup_and_old_connections_stay() {
    let dir = tempfile::tempdir().unwrap();
    let first = k8s_secret(dir.path(), 1, "one.test");
    let relay = common::Options::plain()
        .limits(Limits {
            cert_reload_interval: Duration::from_millis(20),
            ..common::test_limits()
        })
        .start_with(|c| {
            c.tls = Some(TlsConfig::Manual {
                cert_path: dir.path().join("tls.crt"),
                key_path: dir.path().join("tls.key"),
            })
        })
        .await;
    let mut old = tls_connect(&relay, &first)
        .await
        .expect("first cert served");

    let second = k8s_secret(dir.path(), 2, "two.test");
    let deadline = Instant::now() + T;
    while tls_connect(&relay, &second).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        tls_connect(&relay, &first).await.is_err(),
        "old one retired"
    );
    assert_eq!(relay.server.cert_der(), Some(second));

    old.write_all(b"GET /derp/probe HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let head = common::read_head(&mut old).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}
