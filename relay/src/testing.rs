//! A relay for a test, in one call (feature `testing`): the relay's own integration tests, the
//! client library's and the load tester's all start their relays here.
//!
//! ```no_run
//! # async fn demo() {
//! use ferry_relay::testing::Options;
//! let relay = Options::tls().stun(true).start().await;
//! let url = relay.url(); // https://127.0.0.1:<port>/derp
//! let pin = relay.pin(); // Some("sha256-raw:…"), the DERP map's CertName
//! # }
//! ```

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::proto::SecretKey;
pub use crate::server::tls::ClientSealer;
use crate::server::{cert_name_pin, Config, Limits, Server, SpawnError, StunConfig, TlsConfig};

/// Limits for tests: handshakes and shutdowns bounded at 5 s, Restarting clients back within
/// 100 ms. Suites override fields with `..limits()`.
pub fn limits() -> Limits {
    Limits {
        handshake_timeout: Duration::from_secs(5),
        shutdown_timeout: Duration::from_secs(5),
        restart_reconnect_spread: Duration::from_millis(100),
        ..Limits::default()
    }
}

/// What relay to start.
#[derive(Debug, Clone)]
pub struct Options {
    listen: SocketAddr,
    tls: bool,
    stun: bool,
    server_key: Option<SecretKey>,
    dir: Option<PathBuf>,
    limits: Limits,
}

impl Options {
    /// Plain HTTP (what `ferry-relay --dev` serves) on 127.0.0.1:0, no STUN.
    pub fn plain() -> Self {
        Options {
            listen: "127.0.0.1:0".parse().expect("literal"),
            tls: false,
            stun: false,
            server_key: None,
            dir: None,
            limits: limits(),
        }
    }

    /// TLS with a self-signed certificate for `localhost` and `127.0.0.1`.
    pub fn tls() -> Self {
        Options {
            tls: true,
            ..Options::plain()
        }
    }

    /// STUN on 127.0.0.1:0 (UDP only).
    pub fn stun(mut self, on: bool) -> Self {
        self.stun = on;
        self
    }

    /// These limits instead of [`limits`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// This address instead of 127.0.0.1:0 (a restart on the same port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// This server key instead of a fresh one (a restart keeps its key).
    pub fn key(mut self, key: SecretKey) -> Self {
        self.server_key = Some(key);
        self
    }

    /// Keep the certificate in `dir` (a restart keeps its certificate and pin); default: a
    /// fresh temporary directory the relay owns.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// The server configuration these options make, with files in `dir`.
    pub fn config(&self, dir: &Path) -> Config {
        Config {
            listen: self.listen,
            tls: self.tls.then(|| TlsConfig::SelfSigned {
                names: vec!["localhost".into(), "127.0.0.1".into()],
                dir: dir.into(),
            }),
            stun: self.stun.then(|| StunConfig {
                udp_addrs: vec!["127.0.0.1:0".parse().expect("literal")],
                tcp_addrs: vec![],
                ..StunConfig::default()
            }),
            server_key: self.server_key.clone().unwrap_or_else(SecretKey::generate),
            limits: self.limits.clone(),
            ..Config::dev_loopback()
        }
    }

    /// Starts the relay; panics (with the whole error chain) if it cannot.
    pub async fn start(self) -> TestRelay {
        self.start_with(|_| {}).await
    }

    /// Starts the relay after `edit` changed its configuration (admission, mesh, manual TLS...).
    pub async fn start_with(self, edit: impl FnOnce(&mut Config)) -> TestRelay {
        match self.try_start_with(edit).await {
            Ok(r) => r,
            Err(e) => panic!("the test relay did not start: {}", error_chain(&e)),
        }
    }

    /// [`Options::start_with`], returning the error.
    pub async fn try_start_with(
        self,
        edit: impl FnOnce(&mut Config),
    ) -> Result<TestRelay, SpawnError> {
        let dir = match &self.dir {
            Some(d) => Dir::Given(d.clone()),
            None => Dir::Owned(tempfile::tempdir().expect("a temporary directory")),
        };
        let mut cfg = self.config(dir.path());
        edit(&mut cfg);
        Ok(TestRelay {
            server: Server::spawn(cfg).await?,
            dir,
            trust: None,
        })
    }
}

#[derive(Debug)]
enum Dir {
    Owned(tempfile::TempDir),
    Given(PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Dir::Owned(d) => d.path(),
            Dir::Given(p) => p,
        }
    }
}

/// A running test relay. Derefs to its [`Server`].
#[derive(Debug)]
pub struct TestRelay {
    /// The server.
    pub server: Server,
    dir: Dir,
    /// The certificate clients trust instead of the served leaf (a CA-issued one).
    trust: Option<Vec<u8>>,
}

impl Deref for TestRelay {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

impl TestRelay {
    /// A server started by hand (a configuration [`Options`] cannot make).
    pub fn from_server(server: Server) -> Self {
        TestRelay {
            server,
            dir: Dir::Given(PathBuf::new()),
            trust: None,
        }
    }

    /// Clients trust `der` (a CA certificate) rather than the leaf the relay serves.
    pub fn trusting(mut self, der: Vec<u8>) -> Self {
        self.trust = Some(der);
        self
    }

    /// The DERP listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.server.listen_addr()
    }

    /// `http(s)://127.0.0.1:<port>/derp`.
    pub fn url(&self) -> String {
        let scheme = if self.is_tls() { "https" } else { "http" };
        format!("{scheme}://{}/derp", self.addr())
    }

    /// Whether the relay speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.server.tls_enabled()
    }

    /// The served leaf's `sha256-raw:` pin (a DERP map's CertName), with TLS.
    pub fn pin(&self) -> Option<String> {
        self.server.cert_der().map(|d| cert_name_pin(&d))
    }

    /// The STUN server's first UDP address, with STUN.
    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.server.stun_udp_addrs().first().copied()
    }

    /// Where the relay keeps its files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A TLS connector that trusts this relay (its CA, or its own leaf), with TLS.
    pub fn tls_connector(&self) -> Option<tokio_rustls::TlsConnector> {
        self.trust
            .clone()
            .or_else(|| self.server.cert_der())
            .map(|der| trust_only(&der))
    }

    /// Drains and stops the relay.
    pub async fn shutdown(self) -> usize {
        self.server.shutdown().await
    }
}

/// A rustls client (ring provider) that trusts exactly this certificate.
pub fn trust_only(cert_der: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_der.to_vec()))
        .expect("a DER certificate");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A foreign tool from `<repo>/.tools/bin` (put there by `scripts/test-deps.sh`) or PATH.
pub fn tool(name: &str) -> Option<PathBuf> {
    let local = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.tools/bin")
        .join(name);
    if local.exists() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    })
}

/// The tool, or `None` after printing why the test is skipped; under CI (`CI` set) a missing
/// tool is a failure.
pub fn require(name: &str, install: &str) -> Option<PathBuf> {
    let t = tool(name);
    if t.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required under CI: {install}"
        );
        eprintln!("SKIPPED: {name} not found; run {install}");
    }
    t
}

/// An error and its sources, `: `-separated.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::error_chain(e)
}
