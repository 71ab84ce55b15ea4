//! Shared test support: an in-process relay on 127.0.0.1:0, TLS trust for its self-signed
//! certificate, a minimal DERP client built on ferry's own `proto` (for the tests that must send
//! bad input on purpose), and Tailscale's `ts_derp` client (the foreign one).
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::time::Duration;

use bytes::BytesMut;
use ferry_relay::proto::client::{ClientHandshake, HandshakeError, HttpUpgrade, Step, Upgrade};
use ferry_relay::proto::{
    self, frame_type as ft, ClientInfo, FrameDecoder, PublicKey, RawFrame, SecretKey, ServerFrame,
};
use ferry_relay::server::Limits;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bounds every await in tests, so a bug shows as a failure, not a hang.
pub const T: Duration = Duration::from_secs(10);

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<X: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for X {}
pub type BoxIo = Box<dyn Io>;

/// A relay for a test (`ferry_relay::testing`).
#[allow(unused_imports)]
pub use ferry_relay::testing::{
    require, tool, trust_only as client_tls, Options, TestRelay as Relay,
};

/// The relay tests' limits: a 2 s handshake bound (slowloris tests wait for it).
pub fn test_limits() -> Limits {
    Limits {
        handshake_timeout: Duration::from_secs(2),
        ..ferry_relay::testing::limits()
    }
}

/// A relay over TLS with a self-signed certificate for localhost/127.0.0.1.
pub async fn relay_tls(limits: Limits) -> Relay {
    Options::tls().limits(limits).start().await
}

/// A plain-HTTP relay (what `--dev` runs).
pub async fn relay_plain(limits: Limits) -> Relay {
    Options::plain().limits(limits).start().await
}

/// TCP (+ TLS if the relay has it) to the relay.
pub async fn dial(relay: &Relay) -> BoxIo {
    let tcp = TcpStream::connect(relay.addr()).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    match relay.tls_connector() {
        Some(connector) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            Box::new(
                tokio::time::timeout(T, connector.connect(name, tcp))
                    .await
                    .unwrap()
                    .unwrap(),
            )
        }
        None => Box::new(tcp),
    }
}

/// Reads an HTTP response head byte by byte (so no DERP byte after it is consumed).
pub async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = tokio::time::timeout(T, io.read_u8())
            .await
            .expect("response head in time")
            .expect("response head");
        head.push(b);
    }
    String::from_utf8(head).unwrap()
}

/// Does the DERP upgrade the way Tailscale's Rust client does (POST, absolute-form target).
pub async fn upgrade(relay: &Relay) -> BoxIo {
    let mut io = dial(relay).await;
    let req = format!(
        "POST {}://127.0.0.1:{}/derp HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: DERP\r\nconnection: Upgrade\r\n\r\n",
        if relay.is_tls() { "https" } else { "http" },
        relay.addr().port()
    );
    io.write_all(req.as_bytes()).await.unwrap();
    io.flush().await.unwrap();
    let head = read_head(&mut io).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.contains(&format!(
            "Derp-Public-Key: {}",
            relay.server.public_key().to_hex()
        )),
        "{head}"
    );
    io
}

/// A ts_derp client (Tailscale's Rust DERP client) connected to the relay.
pub struct TsClient {
    pub kp: ts_keys::NodeKeyPair,
    pub client: ts_derp::Client<BoxIo>,
}

pub fn ts_pub(k: &ts_keys::NodePublicKey) -> PublicKey {
    use ts_keys::ExportableKey;
    PublicKey(*k.export().as_bytes())
}

pub fn ts_key(k: &PublicKey) -> ts_keys::NodePublicKey {
    ts_keys::NodePublicKey::from_bytes(k.0)
}

pub async fn ts_connect(relay: &Relay) -> TsClient {
    ts_connect_kp(relay, ts_keys::NodeKeyPair::random()).await
}

/// A ts_derp client with a given key (allowlist tests).
pub async fn ts_connect_kp(relay: &Relay, kp: ts_keys::NodeKeyPair) -> TsClient {
    let io = upgrade(relay).await;
    let client = tokio::time::timeout(T, ts_derp::Client::handshake(io, &kp))
        .await
        .unwrap()
        .unwrap();
    TsClient { kp, client }
}

impl TsClient {
    pub fn key(&self) -> PublicKey {
        ts_pub(&self.kp.public)
    }
    pub async fn send(&self, to: PublicKey, data: &[u8]) {
        tokio::time::timeout(T, self.client.send_one(ts_key(&to), data))
            .await
            .unwrap()
            .unwrap();
    }
    pub async fn recv(&self) -> (PublicKey, Vec<u8>) {
        let (k, p) = tokio::time::timeout(T, self.client.recv_one())
            .await
            .expect("a packet in time")
            .expect("recv");
        (ts_pub(&k), p.as_ref().to_vec())
    }
}

/// ferry's own minimal DERP client over any stream: for tests that speak the protocol wrongly on
/// purpose, and for frames ts_derp does not accept (Restarting, PeerGone details).
pub struct RawClient {
    pub io: BoxIo,
    pub secret: SecretKey,
    pub server_key: PublicKey,
    /// The server's ServerInfo, when this client did the handshake.
    pub server_info: Option<ferry_relay::proto::ServerInfo>,
    buf: BytesMut,
    dec: FrameDecoder,
}

impl RawClient {
    pub fn from_parts(io: BoxIo, secret: SecretKey, server_key: PublicKey) -> RawClient {
        RawClient {
            io,
            secret,
            server_key,
            server_info: None,
            buf: BytesMut::new(),
            dec: FrameDecoder::new(),
        }
    }

    /// Handshake on an upgraded stream with a fresh key.
    pub async fn handshake(io: BoxIo, info: ClientInfo) -> RawClient {
        Self::handshake_full(io, SecretKey::generate(), info).await
    }

    /// Handshake with a given key (two connections with one key: duplicate-key tests).
    pub async fn handshake_with(io: BoxIo, secret: SecretKey) -> RawClient {
        Self::handshake_full(
            io,
            secret,
            ClientInfo {
                version: 2,
                ..Default::default()
            },
        )
        .await
    }

    async fn handshake_full(io: BoxIo, secret: SecretKey, info: ClientInfo) -> RawClient {
        let c = Self::try_over(io, secret, info, Upgrade::AlreadyUpgraded)
            .await
            .expect("DERP handshake");
        assert_eq!(c.server_info.as_ref().map(|i| i.version), Some(2));
        c
    }

    /// Upgrade (unless done already) and handshake with ferry-proto's client machine; the
    /// error if the server refuses or hangs up.
    pub async fn try_over(
        mut io: BoxIo,
        secret: SecretKey,
        info: ClientInfo,
        upgrade: Upgrade,
    ) -> Result<RawClient, HandshakeError> {
        let (mut hs, first) = ClientHandshake::new(secret.clone(), info, upgrade);
        if !first.is_empty() {
            io.write_all(&first).await.unwrap();
            io.flush().await.unwrap();
        }
        let mut buf = BytesMut::new();
        let est = loop {
            match hs.feed(&mut buf)? {
                Step::NeedMore => {
                    buf.reserve(hs.bytes_needed(&buf));
                    let n = tokio::time::timeout(T, io.read_buf(&mut buf))
                        .await
                        .expect("the handshake went on in time")
                        .unwrap_or(0);
                    if n == 0 {
                        return Err(hs.closed());
                    }
                }
                Step::ServerKey { client_info, .. } => {
                    io.write_all(&client_info).await.unwrap();
                    io.flush().await.unwrap();
                }
                Step::Established(e) => break e,
            }
        };
        let mut c = Self::from_parts(io, secret, est.server_key);
        c.buf = buf;
        c.server_info = Some(est.server_info);
        Ok(c)
    }

    /// `GET /derp` with `Upgrade: DERP` on a fresh stream, then the handshake.
    pub async fn over(io: BoxIo, host: &str, info: ClientInfo) -> RawClient {
        let up = Upgrade::Http(HttpUpgrade::new(host, "ferry-test/1"));
        Self::try_over(io, SecretKey::generate(), info, up)
            .await
            .expect("DERP upgrade and handshake")
    }

    pub async fn connect(relay: &Relay) -> RawClient {
        Self::handshake(
            upgrade(relay).await,
            ClientInfo {
                version: 2,
                ..Default::default()
            },
        )
        .await
    }

    pub fn key(&self) -> PublicKey {
        self.secret.public()
    }

    /// The stream and the bytes read past the handshake, for a caller with its own loop.
    pub fn into_parts(self) -> (BoxIo, BytesMut) {
        (self.io, self.buf)
    }

    pub async fn send_frame(&mut self, t: u8, parts: &[&[u8]]) {
        let mut out = Vec::new();
        proto::put_frame(&mut out, t, parts);
        self.io.write_all(&out).await.unwrap();
        self.io.flush().await.unwrap();
    }

    pub async fn send(&mut self, to: PublicKey, data: &[u8]) {
        self.send_frame(ft::SEND_PACKET, &[to.as_bytes(), data])
            .await;
    }

    /// The next frame, or None at EOF / error.
    pub async fn frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                return Some(f);
            }
            self.buf.reserve(4096);
            match tokio::time::timeout(T, self.io.read_buf(&mut self.buf))
                .await
                .expect("a frame in time")
            {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next frame other than KeepAlive, parsed.
    pub async fn next(&mut self) -> Option<ServerFrame> {
        loop {
            let f = ServerFrame::parse(self.frame().await?).unwrap();
            if f != ServerFrame::KeepAlive {
                return Some(f);
            }
        }
    }

    pub async fn recv(&mut self) -> (PublicKey, Vec<u8>) {
        match self.next().await {
            Some(ServerFrame::RecvPacket { src, packet }) => (src, packet.to_vec()),
            other => panic!("expected RecvPacket, got {other:?}"),
        }
    }

    /// Waits for the server to close the connection (EOF or reset), skipping frames.
    pub async fn expect_closed(&mut self) {
        while self.frame().await.is_some() {}
    }
}

/// Two ts_derp clients that exchange one packet each way; panics if anything is lost.
pub async fn ping_pong(a: &TsClient, b: &TsClient, tag: &str) {
    a.send(b.key(), format!("{tag} a->b").as_bytes()).await;
    assert_eq!(
        b.recv().await,
        (a.key(), format!("{tag} a->b").into_bytes())
    );
    b.send(a.key(), format!("{tag} b->a").as_bytes()).await;
    assert_eq!(
        a.recv().await,
        (b.key(), format!("{tag} b->a").into_bytes())
    );
}

/// A free loopback port (bound and released): for configs that must name their ports up front
/// (pebble, mesh peers). Another process could take it in between; on loopback in a test that
/// is rare and shows as a bind error, not a wrong result.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `cond` holds, polling a metric or a count (events that have no channel to await).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One certificate for "localhost" that every relay of the test region serves and trusts.
pub struct RegionCert {
    pub dir: tempfile::TempDir,
    pub der: Vec<u8>,
    /// The region's mesh key, random per test: tests run in parallel on loopback, and a relay
    /// of one test must never mesh with a relay of another that happens to reuse a port.
    pub mesh_key: [u8; 32],
}

impl RegionCert {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyCertSign,
        ];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        // derper's manual mode wants <certdir>/<hostname>.crt and .key.
        std::fs::write(dir.path().join("localhost.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("localhost.key"), key.serialize_pem()).unwrap();
        RegionCert {
            der: cert.der().to_vec(),
            dir,
            mesh_key: rand::random(),
        }
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("localhost.crt")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.path().join("localhost.key")
    }
}

pub struct Derper {
    pub child: Child,
    pub port: u16,
}

impl Drop for Derper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tailscale's `derper` on 127.0.0.1:`port` over TLS with the region's certificate, meshed
/// with `mesh_with` (comma-separated host:port); its key file lives in the region's directory.
pub fn start_derper(
    bin: &Path,
    port: u16,
    rc: &RegionCert,
    key_file: &Path,
    mesh_with: &str,
) -> Derper {
    let child = Command::new(bin)
        .args(["-a", &format!("127.0.0.1:{port}"), "-hostname", "localhost"])
        .args(["-certmode", "manual", "-certdir"])
        .arg(rc.dir.path())
        .args(["-http-port", "-1", "-stun=false", "-mesh-psk-file"])
        .arg(key_file)
        // Its server key in the test's directory, not /var/lib/derper.
        .arg("-c")
        .arg(rc.dir.path().join(format!("derper-{port}.json")))
        .args(["-mesh-with", mesh_with])
        // derper dials ferry over TLS and must trust the region's certificate.
        .env("SSL_CERT_FILE", rc.cert())
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
    Derper { child, port }
}
