//! ACME against Let's Encrypt's test CA `pebble` (a real ACME server doing real HTTP-01
//! validation against the relay's port-80 listener), and the port-80 listener itself.
//!
//! pebble comes from `scripts/test-deps.sh` (`.tools/bin/pebble`, its HTTPS certificate and CA
//! in `.tools/pebble/`). Without it the ACME test is skipped, except under CI, where it fails.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, ping_pong, require, ts_connect, Relay, T};
use ferry_relay::server::{AcmeConfig, Config, ConfigError, Server, SpawnError, TlsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Pebble {
    child: Child,
    directory: String,
    management: SocketAddr,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pebble_files() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/pebble")
}

/// Starts pebble on loopback, validating HTTP-01 against `http_port`; waits for its directory.
fn start_pebble(bin: &Path, dir: &Path, http_port: u16) -> Pebble {
    let (acme, mgmt) = (free_port(), free_port());
    let files = pebble_files();
    let config = serde_json::json!({
        "pebble": {
            "listenAddress": format!("127.0.0.1:{acme}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": files.join("cert.pem"),
            "privateKey": files.join("key.pem"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "retryAfter": { "authz": 1, "order": 1 },
            "keyAlgorithm": "ecdsa",
            "profiles": { "default": { "description": "test", "validityPeriod": 7776000 } }
        }
    });
    let cfg_path = dir.join("pebble.json");
    std::fs::write(&cfg_path, config.to_string()).unwrap();
    let mut child = Command::new(bin)
        .arg("-config")
        .arg(&cfg_path)
        // No random sleeps before validation, and no nonces refused at random: deterministic.
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // pebble logs "Listening on: 127.0.0.1:<port>" once its ACME listener is up.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let want = format!("Listening on: 127.0.0.1:{acme}");
    let mut seen = Vec::new();
    loop {
        match lines.next() {
            Some(Ok(l)) => {
                let done = l.contains(&want);
                seen.push(l);
                if done {
                    break;
                }
            }
            _ => panic!("pebble exited before listening:\n{}", seen.join("\n")),
        }
    }
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    // pebble prints that line just *before* it binds: wait until both ports accept.
    for port in [acme, mgmt] {
        let deadline = std::time::Instant::now() + T;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "pebble never listened on {port}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Pebble {
        child,
        directory: format!("https://127.0.0.1:{acme}/dir"),
        management: format!("127.0.0.1:{mgmt}").parse().unwrap(),
    }
}

fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    rustls_pemfile::certs(&mut &pem[..])
        .next()
        .expect("a certificate")
        .unwrap()
        .to_vec()
}

/// One HTTP/1.1 request over `io`; returns the whole response (the server closes).
async fn http_get<S>(mut io: S, host: &str, path: &str, extra: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
    io.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, io.read_to_end(&mut out))
        .await
        .expect("response in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The root pebble signs issued certificates with (it makes a new one at every start).
async fn pebble_root(p: &Pebble) -> Vec<u8> {
    let minica = pem_to_der(&std::fs::read(pebble_files().join("pebble.minica.pem")).unwrap());
    let tcp = TcpStream::connect(p.management).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = common::client_tls(&minica)
        .connect(name, tcp)
        .await
        .unwrap();
    let resp = http_get(tls, "localhost", "/roots/0", "").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
    pem_to_der(body.as_bytes())
}

fn acme_config(p: &Pebble, dir: &Path, http_port: u16) -> Config {
    Config {
        tls: Some(TlsConfig::Acme(AcmeConfig {
            hostname: "localhost".into(),
            email: Some("ops@example.com".into()),
            directory: p.directory.clone(),
            ca_file: Some(pebble_files().join("pebble.minica.pem")),
            dir: dir.into(),
        })),
        http_listen: Some(format!("127.0.0.1:{http_port}").parse().unwrap()),
        ..Config::dev_loopback()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_certificate_from_pebble_over_http01_serves_derp_and_is_cached() {
    let Some(bin) = require("pebble", "scripts/test-deps.sh") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let pebble = start_pebble(&bin, dir.path(), http_port);

    let server = Server::spawn(acme_config(&pebble, dir.path(), http_port))
        .await
        .unwrap();
    assert!(server.tls_enabled());
    // Issuance is an event inside the server with no channel to await: poll for it, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while server.cert_der().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no certificate from pebble within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leaf = server.cert_der().unwrap();
    assert!(
        dir.path().join("acme-localhost-cert.pem").exists()
            && dir.path().join("acme-account.json").exists()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["acme-localhost-key.pem", "acme-account.json"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }
    // The challenge token is withdrawn once the order is done.
    let tcp = TcpStream::connect(("127.0.0.1", http_port)).await.unwrap();
    let r = http_get(tcp, "localhost", "/.well-known/acme-challenge/anything", "").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");

    // Two Tailscale clients relay through it, verifying the chain up to pebble's root.
    let root = pebble_root(&pebble).await;
    let relay = Relay::from_server(server).trusting(root.clone());
    let a = ts_connect(&relay).await;
    let b = ts_connect(&relay).await;
    ping_pong(&a, &b, "acme").await;

    // A restart serves the cached certificate at once, with the CA gone.
    drop(pebble);
    relay.shutdown().await;
    let port = free_port();
    let again = Server::spawn(Config {
        tls: Some(TlsConfig::Acme(AcmeConfig {
            hostname: "localhost".into(),
            email: None,
            directory: "https://127.0.0.1:1/dir".into(),
            ca_file: None,
            dir: dir.path().into(),
        })),
        http_listen: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        ..Config::dev_loopback()
    })
    .await
    .unwrap();
    assert_eq!(again.cert_der(), Some(leaf), "cached certificate served");
    let relay = Relay::from_server(again).trusting(root);
    let a = ts_connect(&relay).await;
    let b = ts_connect(&relay).await;
    ping_pong(&a, &b, "acme cached").await;
}

#[tokio::test]
async fn acme_refuses_configs_that_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let acme = |hostname: &str| AcmeConfig {
        hostname: hostname.into(),
        email: None,
        directory: "https://127.0.0.1:1/dir".into(),
        ca_file: None,
        dir: dir.path().into(),
    };
    let err = Server::spawn(Config {
        tls: Some(TlsConfig::Acme(acme("relay.example.com"))),
        http_listen: None,
        ..Config::dev_loopback()
    })
    .await
    .unwrap_err();
    assert!(
        matches!(err, SpawnError::Invalid(ConfigError::AcmeWithoutHttpListen)),
        "{err}"
    );
    assert!(err.to_string().contains("http_listen"), "{err}");
    let err = Server::spawn(Config {
        tls: Some(TlsConfig::Acme(acme("127.0.0.1"))),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::dev_loopback()
    })
    .await
    .unwrap_err();
    let msg = ferry_relay::testing::error_chain(&err);
    assert!(
        msg.contains("tls.acme.hostname") && msg.contains("DNS name"),
        "{msg}"
    );
}

#[tokio::test]
async fn port_80_listener_serves_captive_check_health_and_redirects() {
    let server = Server::spawn(Config {
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        hostname: Some("relay.example.com".into()),
        ..Config::dev_loopback()
    })
    .await
    .unwrap();
    let http = server.http_addr().unwrap();
    let get = |path: &'static str, extra: &'static str| async move {
        http_get(
            TcpStream::connect(http).await.unwrap(),
            "relay.example.com",
            path,
            extra,
        )
        .await
    };
    // Tailscale's captive-portal check: 204 echoing the challenge.
    let r = get("/generate_204", "X-Tailscale-Challenge: abc123\r\n").await;
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    assert!(
        r.to_ascii_lowercase()
            .contains("x-tailscale-response: response abc123"),
        "{r}"
    );
    let r = get("/healthz", "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Anything else goes to HTTPS on the same name.
    let r = get("/some/page?x=1", "").await;
    assert!(r.starts_with("HTTP/1.1 308"), "{r}");
    assert!(
        r.contains("Location: https://relay.example.com/some/page?x=1"),
        "{r}"
    );
    // No ACME order running: no token is answered.
    let r = get("/.well-known/acme-challenge/tok", "").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    // The metrics listener answers health checks too (probes without TLS).
    let m = server.metrics_addr().unwrap();
    let r = http_get(TcpStream::connect(m).await.unwrap(), "x", "/healthz", "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    server.shutdown().await;
}
