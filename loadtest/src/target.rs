//! The DERP server under test: its URL, how to reach it (TCP from spread source addresses, TLS)
//! and the client side of the DERP upgrade and handshake, with errors that name the problem.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ferry_proto::derp::client::{
    ClientHandshake, HandshakeError, HttpUpgrade, Stage, Step, Upgrade,
};
use ferry_proto::derp::{self as proto, ClientInfo, FrameDecoder, PublicKey, SecretKey};
use ferry_proto::pin::tls::PinVerifier;
use ferry_proto::pin::CertPin;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::cli::TargetArgs;

/// Any byte stream a DERP connection runs over (TCP or TLS over TCP).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<X: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for X {}
/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// Bound on each stage of a connection (TCP, TLS, upgrade, handshake).
pub const STAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the target's description cannot be used (before any traffic).
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "`{0}` is not a DERP URL; expected https://host[:port]/derp or http://host[:port]/derp"
    )]
    BadUrl(String),
    #[error("cannot resolve `{host}`: {error}")]
    Resolve { host: String, error: io::Error },
    #[error("cannot read CA file {path}: {error}")]
    CaFile { path: String, error: io::Error },
    #[error("CA file {0} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    CaEmpty(String),
    #[error("--pin must be `sha256-raw:` followed by 64 hex characters (the CertName of a DERP map), got `{0}`")]
    BadPin(String),
    #[error("--ca-file, --pin and --insecure are alternatives: give at most one")]
    TlsConflict,
    #[error("`{0}` is not a valid TLS server name")]
    BadName(String),
    #[error("TLS setup failed")]
    Tls(#[from] rustls::Error),
}

/// Why one connection failed. The messages are meant for the person running the test.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused by {addr}: nothing listens there (is the relay running? is the port right?)")]
    Refused { addr: SocketAddr },
    #[error("open-files limit reached ({error}); the limit is {limit} (`ulimit -n`): raise the hard limit or use fewer clients")]
    FdLimit { limit: u64, error: io::Error },
    #[error("out of local addresses/ports connecting from {src} ({error}): use more --source-ips (loopback targets) or fewer connections; closed connections hold their port in TIME_WAIT for 60 s")]
    AddrNotAvail { src: String, error: io::Error },
    #[error("{stage} with {addr} timed out after {secs} s")]
    Timeout {
        stage: &'static str,
        addr: SocketAddr,
        secs: u64,
    },
    #[error("TCP connect to {addr}: {error}")]
    Tcp { addr: SocketAddr, error: io::Error },
    #[error("TLS handshake with {addr} failed: {error} (trust the server with --ca-file, --pin or --insecure; or is it plain http://?)")]
    Tls { addr: SocketAddr, error: io::Error },
    #[error("{url} is not a DERP server: {detail}")]
    NotDerp { url: String, detail: String },
    #[error("connection to {addr} failed during the {stage}: {error}")]
    Io {
        stage: &'static str,
        addr: SocketAddr,
        error: io::Error,
    },
}

impl ConnectError {
    /// A short, stable label for counting failures by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Refused { .. } => "refused",
            ConnectError::FdLimit { .. } => "fd_limit",
            ConnectError::AddrNotAvail { .. } => "addr_not_avail",
            ConnectError::Timeout { .. } => "timeout",
            ConnectError::Tcp { .. } => "tcp",
            ConnectError::Tls { .. } => "tls",
            ConnectError::NotDerp { .. } => "not_derp",
            ConnectError::Io { .. } => "io",
        }
    }

    /// Whether retrying cannot help (a wrong target, not a busy one).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ConnectError::Refused { .. } | ConnectError::Tls { .. } | ConnectError::NotDerp { .. }
        )
    }
}

/// A resolved DERP target.
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// The address connections go to.
    pub addr: SocketAddr,
    host_header: String,
    path: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    sources: Vec<IpAddr>,
    next_source: AtomicUsize,
    nofile_limit: u64,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.url)
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .field("sources", &self.sources.len())
            .finish()
    }
}

struct Url {
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

fn parse_url(url: &str) -> Result<Url, TargetError> {
    let bad = || TargetError::BadUrl(url.to_string());
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad());
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/derp"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad());
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => default_port,
            None => return Err(bad()),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
            None => (authority.to_string(), default_port),
        }
    };
    Ok(Url {
        tls,
        host,
        port,
        path: if path.is_empty() {
            "/derp".into()
        } else {
            path.into()
        },
    })
}

/// Parses `sha256-raw:<64 hex>`.
pub fn parse_pin(pin: &str) -> Result<CertPin, TargetError> {
    pin.parse()
        .map_err(|_| TargetError::BadPin(pin.to_string()))
}

/// The ring provider, named explicitly (nothing else in the process picks one).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_ca(path: &Path) -> Result<rustls::RootCertStore, TargetError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|error| TargetError::CaFile {
        path: shown.clone(),
        error,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|error| TargetError::CaFile {
            path: shown.clone(),
            error,
        })?;
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(TargetError::CaEmpty(shown));
    }
    Ok(roots)
}

fn tls_config(args: &TargetArgs) -> Result<rustls::ClientConfig, TargetError> {
    let chosen = [args.ca_file.is_some(), args.pin.is_some(), args.insecure];
    if chosen.iter().filter(|c| **c).count() > 1 {
        return Err(TargetError::TlsConflict);
    }
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let cfg = if let Some(pin) = &args.pin {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier::new(
                parse_pin(pin)?,
                provider,
                "--pin",
                "",
            )))
            .with_no_client_auth()
    } else if args.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier::any_leaf(provider)))
            .with_no_client_auth()
    } else if let Some(ca) = &args.ca_file {
        builder
            .with_root_certificates(load_ca(ca)?)
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(cfg)
}

impl Target {
    /// Parses the URL, resolves the host, builds the TLS client and picks source addresses.
    pub async fn resolve(args: &TargetArgs) -> Result<Target, TargetError> {
        let u = parse_url(&args.url)?;
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((u.host.as_str(), u.port))
            .await
            .map_err(|error| TargetError::Resolve {
                host: u.host.clone(),
                error,
            })?
            .collect();
        // Prefer IPv4: `localhost` often resolves to ::1 first while relays bind 127.0.0.1.
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| TargetError::Resolve {
                host: u.host.clone(),
                error: io::Error::other("no addresses"),
            })?;
        let tls = if u.tls {
            let name = args.tls_name.clone().unwrap_or_else(|| u.host.clone());
            let server_name = ServerName::try_from(name.clone())
                .map_err(|_| TargetError::BadName(name.clone()))?;
            Some((
                tokio_rustls::TlsConnector::from(Arc::new(tls_config(args)?)),
                server_name,
            ))
        } else {
            if args.ca_file.is_some() || args.pin.is_some() || args.insecure {
                return Err(TargetError::BadUrl(format!(
                    "{} (TLS options given for a plain http:// URL; use https://)",
                    args.url
                )));
            }
            None
        };
        let first = args.source_first;
        if u16::from(first) + u16::from(args.source_ips.max(1)) - 1 > 254 {
            return Err(TargetError::BadUrl(format!(
                "--source-first {first} with --source-ips {} runs past 127.0.0.254",
                args.source_ips
            )));
        }
        let sources = match addr.ip() {
            IpAddr::V4(v4) if v4.is_loopback() && (args.source_ips > 1 || first > 1) => {
                (0..args.source_ips.max(1))
                    .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, first + i)))
                    .collect()
            }
            _ => Vec::new(),
        };
        let host_header = if u.host.contains(':') {
            format!("[{}]:{}", u.host, u.port)
        } else {
            format!("{}:{}", u.host, u.port)
        };
        Ok(Target {
            url: args.url.clone(),
            addr,
            host_header,
            path: u.path,
            tls,
            sources,
            next_source: AtomicUsize::new(0),
            nofile_limit: crate::limits::nofile_soft(),
        })
    }

    /// How many distinct source addresses connections are spread over (1 = the kernel picks).
    pub fn source_count(&self) -> usize {
        self.sources.len().max(1)
    }

    fn classify_tcp(&self, e: io::Error, src: Option<IpAddr>) -> ConnectError {
        match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => ConnectError::FdLimit {
                limit: self.nofile_limit,
                error: e,
            },
            Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => ConnectError::AddrNotAvail {
                src: src.map_or("the default address".into(), |s| s.to_string()),
                error: e,
            },
            Some(libc::ECONNREFUSED) => ConnectError::Refused { addr: self.addr },
            _ => ConnectError::Tcp {
                addr: self.addr,
                error: e,
            },
        }
    }

    /// TCP (from the next source address) and TLS if the URL is https.
    pub async fn dial(&self) -> Result<BoxIo, ConnectError> {
        let tcp = self.dial_tcp().await?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some((connector, name)) => {
                let tls = tokio::time::timeout(STAGE_TIMEOUT, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| self.timeout("TLS handshake"))?
                    .map_err(|error| ConnectError::Tls {
                        addr: self.addr,
                        error,
                    })?;
                Ok(Box::new(tls))
            }
        }
    }

    /// TCP alone, from the next source address (`--source-first`, `--source-ips`).
    pub async fn dial_tcp(&self) -> Result<TcpStream, ConnectError> {
        let src = (!self.sources.is_empty()).then(|| {
            self.sources[self.next_source.fetch_add(1, Ordering::Relaxed) % self.sources.len()]
        });
        let sock = if self.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| self.classify_tcp(e, src))?;
        if let Some(src) = src {
            // Let connect() pick the port for the whole 4-tuple, so one source address serves
            // many connections to different servers (IP_BIND_ADDRESS_NO_PORT).
            set_bind_no_port(&sock);
            sock.bind(SocketAddr::new(src, 0))
                .map_err(|e| self.classify_tcp(e, Some(src)))?;
        }
        let tcp: TcpStream = tokio::time::timeout(STAGE_TIMEOUT, sock.connect(self.addr))
            .await
            .map_err(|_| self.timeout("TCP connect"))?
            .map_err(|e| self.classify_tcp(e, src))?;
        tcp.set_nodelay(true)
            .map_err(|e| self.classify_tcp(e, src))?;
        Ok(tcp)
    }

    fn timeout(&self, stage: &'static str) -> ConnectError {
        ConnectError::Timeout {
            stage,
            addr: self.addr,
            secs: STAGE_TIMEOUT.as_secs(),
        }
    }

    fn not_derp(&self, detail: impl Into<String>) -> ConnectError {
        ConnectError::NotDerp {
            url: self.url.clone(),
            detail: detail.into(),
        }
    }

    fn io(&self, stage: &'static str, error: io::Error) -> ConnectError {
        ConnectError::Io {
            stage,
            addr: self.addr,
            error,
        }
    }

    /// Dials, upgrades to DERP and completes the handshake with a fresh key.
    pub async fn connect(&self) -> Result<DerpConn, ConnectError> {
        let mut io = self.dial().await?;
        let secret = SecretKey::generate();
        // No CanAckPings: a load generator wants packets, not Health/Restarting/PeerPresent.
        let info = ClientInfo {
            version: proto::PROTOCOL_VERSION,
            ..Default::default()
        };
        let upgrade = HttpUpgrade {
            host: self.host_header.clone(),
            path: self.path.clone(),
            user_agent: format!("ferry-loadtest/{}", env!("CARGO_PKG_VERSION")),
        };
        let (mut hs, first) = ClientHandshake::new(secret.clone(), info, Upgrade::Http(upgrade));
        self.write(&mut io, &first, "upgrade request").await?;
        let mut buf = BytesMut::with_capacity(4096);
        let est = loop {
            match hs.feed(&mut buf).map_err(|e| self.handshake_error(e))? {
                Step::NeedMore => {
                    let stage = hs.stage();
                    buf.reserve(hs.bytes_needed(&buf));
                    let n = tokio::time::timeout(STAGE_TIMEOUT, io.read_buf(&mut buf))
                        .await
                        .map_err(|_| match stage {
                            Stage::HttpResponse => {
                                self.not_derp("no HTTP response to the upgrade request within 10 s")
                            }
                            _ => self.timeout("DERP handshake"),
                        })?
                        .map_err(|e| self.io(stage_name(stage), e))?;
                    if n == 0 {
                        return Err(self.not_derp(match stage {
                            Stage::HttpResponse => "the connection closed before an HTTP response (a TLS server reached over http://?)",
                            Stage::ServerKey => "the connection closed before the ServerKey frame",
                            _ => "the server closed the connection after ClientInfo (it refused us)",
                        }));
                    }
                }
                Step::ServerKey { client_info, .. } => {
                    self.write(&mut io, &client_info, "DERP handshake").await?
                }
                Step::Established(e) => break e,
            }
        };
        Ok(DerpConn {
            io,
            buf,
            dec: FrameDecoder::new(),
            secret,
            server_key: est.server_key,
        })
    }

    async fn write(
        &self,
        io: &mut BoxIo,
        bytes: &[u8],
        stage: &'static str,
    ) -> Result<(), ConnectError> {
        tokio::time::timeout(STAGE_TIMEOUT, async {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await
        .map_err(|_| self.timeout(stage))?
        .map_err(|e| self.io(stage, e))
    }

    /// A handshake failure, worded for the person running the test.
    fn handshake_error(&self, e: HandshakeError) -> ConnectError {
        match e {
            HandshakeError::UnexpectedFrame {
                expected: Stage::ServerKey,
                got,
            } => self.not_derp(format!(
                "the first frame is of type {got:#04x}, not ServerKey (0x01)"
            )),
            HandshakeError::UnexpectedFrame { got, .. } => self.not_derp(format!(
                "expected ServerInfo (0x03) after ClientInfo, got type {got:#04x}"
            )),
            other => self.not_derp(ferry_proto::error_chain(&other)),
        }
    }
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::HttpResponse => "HTTP upgrade",
        _ => "DERP handshake",
    }
}

fn set_bind_no_port(sock: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a valid socket with a pointer to a c_int and its size. Failure is
    // harmless (older kernels): bind then picks a port, as without the option.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// An established DERP connection (handshake done).
pub struct DerpConn {
    /// The stream.
    pub io: BoxIo,
    /// Bytes read but not yet decoded.
    pub buf: BytesMut,
    dec: FrameDecoder,
    /// This client's key.
    pub secret: SecretKey,
    /// The server's key.
    pub server_key: PublicKey,
}

impl DerpConn {
    /// This client's public key.
    pub fn key(&self) -> PublicKey {
        self.secret.public()
    }

    /// The next frame, or `None` at EOF.
    pub async fn read_frame(&mut self) -> io::Result<Option<proto::RawFrame>> {
        loop {
            if let Some(f) = self
                .dec
                .decode(&mut self.buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
            {
                return Ok(Some(f));
            }
            self.buf
                .reserve(self.dec.bytes_needed(&self.buf).max(16 << 10));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("https://relay.example.com/derp").unwrap();
        assert!(u.tls && u.host == "relay.example.com" && u.port == 443 && u.path == "/derp");
        let u = parse_url("http://127.0.0.1:3340").unwrap();
        assert!(!u.tls && u.port == 3340 && u.path == "/derp");
        let u = parse_url("https://[::1]:8443/derp").unwrap();
        assert!(u.host == "::1" && u.port == 8443);
        assert!(parse_url("127.0.0.1:3340").is_err());
        assert!(parse_url("https://host:notaport/derp").is_err());
        assert!(parse_url("https:///derp").is_err());
    }

    #[test]
    fn pins() {
        let hex64 = "ab".repeat(32);
        assert_eq!(
            parse_pin(&format!("sha256-raw:{hex64}")).unwrap(),
            CertPin([0xab; 32])
        );
        assert!(parse_pin(&hex64).is_err());
        assert!(parse_pin("sha256-raw:abcd").is_err());
    }
}
