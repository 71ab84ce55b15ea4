//! The relay's own TLS record layer (`relay/src/server/tls/records/`): a real TLS handshake
//! with an in-process relay (TLS 1.3, or 1.2), then a fuzzed sequence of records, each either
//! raw bytes or a record sealed with the client's own keys, so that it opens, with a fuzzed
//! content type and content: what a hostile client can send after its handshake (padding,
//! alerts, KeyUpdates and other handshake messages, empty records, oversized plaintext, and
//! the HTTP head and DERP frames the relay parses next). Then the write side is closed.
//! Oracles: no task panics (a panic aborts the process, so libFuzzer reports it), the relay
//! closes the connection once the client's stream has ended (the read below is bounded), and
//! every 1,000 inputs a fresh client still completes a TLS handshake and gets an answer.
#![no_main]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use ferry_relay::testing::{ClientSealer, Options, TestRelay};
use libfuzzer_sys::fuzz_target;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio_rustls::TlsConnector;

struct World {
    rt: Runtime,
    relay: TestRelay,
    tls13: TlsConnector,
    tls12: TlsConnector,
}

fn connector(cert: &[u8], version: &'static rustls::SupportedProtocolVersion) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert.to_vec())).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.enable_secret_extraction = true;
    TlsConnector::from(Arc::new(cfg))
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = ferry_fuzz::relay_runtime();
        let relay = rt.block_on(Options::tls().start());
        let cert = relay.cert_der().expect("a TLS relay");
        World {
            tls13: connector(&cert, &rustls::version::TLS13),
            tls12: connector(&cert, &rustls::version::TLS12),
            rt,
            relay,
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Record<'a> {
    /// Bytes straight onto the TCP stream (a forged or broken record).
    Raw(&'a [u8]),
    /// A record the relay can open: this content type (TLS 1.3: the inner one) and content.
    Sealed { typ: u8, plain: &'a [u8] },
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    tls12: bool,
    records: Vec<Record<'a>>,
}

async fn session(w: &World, input: &Input<'_>) {
    let tcp = TcpStream::connect(w.relay.addr()).await.unwrap();
    let connector = if input.tls12 { &w.tls12 } else { &w.tls13 };
    let name = ServerName::try_from("localhost").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .expect("the relay's handshake");
    let (mut tcp, conn) = tls.into_inner();
    let secrets = conn.dangerous_extract_secrets().unwrap();
    let mut sealer = ClientSealer::new(secrets.tx, input.tls12).unwrap();
    let mut out = Vec::new();
    for r in input.records.iter().take(64) {
        match r {
            Record::Raw(b) => out.extend_from_slice(b),
            Record::Sealed { typ, plain } => {
                // One byte over the limit at most: the oversized case, not a huge record.
                let plain = &plain[..plain.len().min((1 << 14) + 1)];
                sealer.seal(*typ, plain, &mut out).unwrap();
            }
        }
    }
    // The relay may close before reading it all: a failed write is fine.
    let _ = tcp.write_all(&out).await;
    let _ = tcp.shutdown().await;
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    assert!(
        ended.is_ok(),
        "the relay kept the connection open after the client's end"
    );
}

/// A fresh client's handshake and a health check over TLS.
async fn still_serves(w: &World) {
    let tcp = TcpStream::connect(w.relay.addr()).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = w
        .tls13
        .connect(name, tcp)
        .await
        .expect("a handshake after the fuzzing");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp).await;
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&resp)
    );
}

fuzz_target!(|input: Input<'_>| {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let w = world();
    w.rt.block_on(session(w, &input));
    if RUNS.fetch_add(1, Ordering::Relaxed) % 1000 == 0 {
        w.rt.block_on(still_serves(w));
    }
});
