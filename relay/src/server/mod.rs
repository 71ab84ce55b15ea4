//! The relay server: listeners, TLS, HTTP upgrade, per-client tasks, registry, STUN beside it.
//!
//! [`Server::spawn`] binds everything before it returns, so callers (and tests on port 0) can ask
//! the handle for the bound addresses. Every task hangs off the handle; [`Server::shutdown`]
//! drains gracefully and dropping the handle aborts.

pub mod admission;
mod client;
mod config;
mod conn;
mod http;
pub mod keyfile;
pub mod mesh;
pub mod metrics;
mod queue;
mod ratelimit;
mod registry;
pub mod tls;
pub mod udprelay;
mod watch;
pub mod ws;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

pub use self::admission::{
    AdmissionConfig, AdmissionError, AllowlistLineError, VerifyFail, VerifyUrlError,
};
pub use self::config::{Config, ConfigError, Limits, TlsRecords, UdpRelayConfig};
pub use self::mesh::{MeshConfig, MeshDns, MeshTls, PeerAddrError};
pub use self::metrics::RelayMetrics;
use self::tls::acme;
pub use self::tls::{
    cert_name_pin, AcmeConfig, AcmeConfigError, TlsConfig, TlsError, LETS_ENCRYPT_DIRECTORY,
};
use crate::proto::{PublicKey, SecretKey};
use conn::Listener;
pub use ferry_stun::{Rfc5780Config, StunConfig, StunServer};

/// Why the server could not start. Each says what went wrong; advice (which flag to change,
/// what else may hold a port) is the binary's.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("STUN")]
    Stun(#[from] ferry_stun::StunError),
    #[error("admission")]
    Admission(#[from] AdmissionError),
    #[error("mesh ca_file")]
    MeshCaFile(#[source] TlsError),
    /// [`Config::validate`] refused the config.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// State shared by every task of one server.
pub(crate) struct Shared {
    pub(crate) secret: SecretKey,
    pub(crate) public: PublicKey,
    pub(crate) mesh_key: Option<[u8; 32]>,
    pub(crate) hostname: Option<String>,
    pub(crate) limits: Limits,
    /// `None`: every client is admitted.
    pub(crate) admission: Option<Arc<admission::Admission>>,
    pub(crate) registry: registry::Registry,
    pub(crate) metrics: RelayMetrics,
    pub(crate) tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Who seals and opens records after the TLS handshake.
    pub(crate) tls_records: TlsRecords,
    /// HTTP-01 challenges the port-80 listener answers (ACME mode).
    pub(crate) acme_challenges: Arc<acme::Challenges>,
    ready: AtomicBool,
    /// The UDP relay path, if on.
    pub(crate) udp_relay: Option<Arc<udprelay::UdpRelay>>,
    /// Cancelled at shutdown: writers flush, send Restarting where understood, and close.
    pub(crate) drain: CancellationToken,
    /// Parent of every connection's token: cancelled when draining times out.
    pub(crate) conns_cancel: CancellationToken,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("public", &self.public)
            .field("clients", &self.registry.len())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Gauges that are sampled rather than kept up to date on the hot path.
    fn sample_gauges(&self) {
        let m = &self.metrics;
        m.watchers.set(self.registry.watcher_count() as f64);
        let (packets, bytes) = self.registry.queued();
        m.queued_packets.set(packets as f64);
        m.queued_bytes.set(bytes as f64);
        m.upkeep();
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// (reconnect-in, try-for) in ms for a Restarting frame; the delay is random per client.
    pub(crate) fn restart_hint(&self) -> (u32, u32) {
        let spread = self
            .limits
            .restart_reconnect_spread
            .as_millis()
            .min(u32::MAX as u128) as u32;
        let reconnect = if spread == 0 {
            0
        } else {
            rand::random::<u32>() % spread
        };
        (
            reconnect,
            self.limits
                .restart_try_for
                .as_millis()
                .min(u32::MAX as u128) as u32,
        )
    }
}

/// A running relay. Dropping it aborts every task; call [`Server::shutdown`] to drain.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    cert: Option<Arc<tls::ReloadableCert>>,
    listen_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    stun: Option<StunServer>,
    udp_relay_addr: Option<SocketAddr>,
    accept_cancel: CancellationToken,
    /// Mesh links stay up while connections drain (their clients' packets still go out), and
    /// stop after.
    mesh_cancel: CancellationToken,
    tracker: TaskTracker,
    conn_tracker: TaskTracker,
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, SpawnError> {
    // std's listener sets SO_REUSEADDR on Unix, so a restart does not wait out TIME_WAIT.
    TcpListener::bind(addr)
        .await
        .map_err(|source| SpawnError::Bind { addr, what, source })
}

impl Server {
    /// Binds every listener, starts STUN and the accept loops, and returns the handle.
    pub async fn spawn(config: Config) -> Result<Server, SpawnError> {
        config.validate()?;
        let (metrics, recorder) = RelayMetrics::new();
        if config.install_global_recorder {
            if ::metrics::set_global_recorder(recorder).is_err() {
                warn!("a global metrics recorder is already installed; STUN metrics go there, not to this server's /metrics");
            }
            // After installing: descriptions go to the global recorder.
            ferry_stun::describe_metrics();
        }
        let mesh = match (config.mesh.clone(), config.mesh_key) {
            (Some(m), Some(key)) => Some(
                mesh::prepare(m, key, config.hostname.as_deref())
                    .map_err(SpawnError::MeshCaFile)?,
            ),
            _ => None,
        };
        let admission = match &config.admission {
            Some(a) if a.allowlist_file.is_some() || a.verify_url.is_some() => {
                Some(Arc::new(admission::Admission::new(a)?))
            }
            _ => None,
        };
        let cert = match config.tls.clone() {
            Some(t) => Some(Arc::new(tls::load(t)?)),
            None => None,
        };
        let tls_acceptor = cert
            .as_ref()
            .map(|c| tokio_rustls::TlsAcceptor::from(c.server_config()));

        let derp = bind(config.listen, "DERP").await?;
        let http = match config.http_listen {
            Some(a) => Some(bind(a, "HTTP port 80").await?),
            None => None,
        };
        let metrics_l = match config.metrics_listen {
            Some(a) => Some(bind(a, "metrics").await?),
            None => None,
        };
        let stun = match config.stun.clone() {
            Some(s) => Some(StunServer::spawn(s).await?),
            None => None,
        };
        let udp_relay = match &config.udp_relay {
            Some(u) => {
                let sock = udprelay::bind_socket(u.listen).map_err(|source| SpawnError::Bind {
                    addr: u.listen,
                    what: "UDP relay",
                    source,
                })?;
                let port = sock.local_addr().map_or(u.listen.port(), |a| a.port());
                let relay = Arc::new(udprelay::UdpRelay {
                    sessions: parking_lot::Mutex::new(udprelay::Sessions::new(
                        u.limits,
                        std::time::Instant::now(),
                    )),
                    port,
                    advertise: u.advertise.clone(),
                    metrics: metrics.udp_relay.clone(),
                    gso: u.gso,
                });
                Some((relay, sock))
            }
            None => None,
        };

        let watcher_backlog = config.limits.watcher_backlog;
        let shared = Arc::new(Shared {
            public: config.server_key.public(),
            secret: config.server_key,
            mesh_key: config.mesh_key,
            hostname: config.hostname,
            limits: config.limits,
            admission,
            registry: registry::Registry::new(watcher_backlog),
            metrics,
            tls_acceptor,
            tls_records: config.tls_records,
            acme_challenges: Arc::default(),
            udp_relay: udp_relay.as_ref().map(|(r, _)| Arc::clone(r)),
            ready: AtomicBool::new(false),
            drain: CancellationToken::new(),
            conns_cancel: CancellationToken::new(),
        });
        let listen_addr = derp.local_addr().expect("bound socket has an address");
        let http_addr = http.as_ref().map(|l| l.local_addr().expect("bound"));
        let metrics_addr = metrics_l.as_ref().map(|l| l.local_addr().expect("bound"));
        let accept_cancel = CancellationToken::new();
        let mesh_cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let conn_tracker = TaskTracker::new();
        let sem = Arc::new(tokio::sync::Semaphore::new(shared.limits.max_connections));
        tracker.spawn(accept_loop(
            derp,
            Listener::Derp,
            Arc::clone(&shared),
            accept_cancel.clone(),
            conn_tracker.clone(),
            Some(sem),
        ));
        if let Some(l) = http {
            tracker.spawn(accept_loop(
                l,
                Listener::Port80,
                Arc::clone(&shared),
                accept_cancel.clone(),
                tracker.clone(),
                None,
            ));
        }
        if let Some(l) = metrics_l {
            tracker.spawn(accept_loop(
                l,
                Listener::Metrics,
                Arc::clone(&shared),
                accept_cancel.clone(),
                tracker.clone(),
                None,
            ));
        }
        {
            let shared = Arc::clone(&shared);
            let cancel = accept_cancel.clone();
            tracker.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tick.tick() => shared.sample_gauges(),
                    }
                }
            });
        }
        if let Some(a) = &shared.admission {
            tracker.spawn(Arc::clone(a).watch(accept_cancel.clone()));
        }
        let udp_relay_addr = match udp_relay {
            Some((relay, sock)) => {
                let addr = sock.local_addr().ok();
                tracker.spawn(udprelay::serve(
                    Arc::clone(&relay),
                    sock,
                    mesh_cancel.clone(),
                ));
                tracker.spawn(udprelay::sweeper(relay, mesh_cancel.clone()));
                addr
            }
            None => None,
        };
        if let Some(c) = &cert {
            if let TlsConfig::Manual {
                cert_path,
                key_path,
            } = c.source()
            {
                tracker.spawn(tls::watch_manual(
                    Arc::clone(c),
                    vec![cert_path.clone(), key_path.clone()],
                    shared.limits.cert_reload_interval,
                    accept_cancel.clone(),
                ));
            }
            if let TlsConfig::Acme(acme) = c.source() {
                if c.leaf_der().is_none() {
                    info!(hostname = %acme.hostname, "no cached ACME certificate yet: TLS handshakes fail until the CA issues one");
                }
                tracker.spawn(acme::run(
                    acme.clone(),
                    Arc::clone(c),
                    Arc::clone(&shared.acme_challenges),
                    accept_cancel.clone(),
                ));
            }
        }
        if let Some(mesh) = mesh {
            mesh::start(mesh, Arc::clone(&shared), &tracker, mesh_cancel.clone());
        }
        shared.ready.store(true, Ordering::Relaxed);
        info!(
            listen = %listen_addr,
            tls = cert.is_some(),
            stun = ?stun.as_ref().map(|s| s.udp_addrs()),
            udp_relay = ?udp_relay_addr,
            metrics = ?metrics_addr,
            server_key = %shared.public,
            "relay ready"
        );
        Ok(Server {
            shared,
            cert,
            listen_addr,
            http_addr,
            metrics_addr,
            stun,
            udp_relay_addr,
            accept_cancel,
            mesh_cancel,
            tracker,
            conn_tracker,
        })
    }

    /// The bound DERP listener address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }
    /// The UDP relay's bound address, if on.
    pub fn udp_relay_addr(&self) -> Option<SocketAddr> {
        self.udp_relay_addr
    }
    /// The bound port-80 listener, if any.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }
    /// The bound metrics listener, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    /// The STUN server's bound UDP addresses (empty without STUN).
    pub fn stun_udp_addrs(&self) -> Vec<SocketAddr> {
        self.stun
            .as_ref()
            .map(|s| s.udp_addrs())
            .unwrap_or_default()
    }
    /// The STUN server's bound TCP addresses.
    pub fn stun_tcp_addrs(&self) -> Vec<SocketAddr> {
        self.stun
            .as_ref()
            .map(|s| s.tcp_addrs())
            .unwrap_or_default()
    }
    /// The server's public key (what `Derp-Public-Key` and ServerKey announce).
    pub fn public_key(&self) -> PublicKey {
        self.shared.public
    }
    /// Clients known to be connected to mesh peers (not here).
    pub fn mesh_remote_keys(&self) -> usize {
        self.shared.registry.remote_len()
    }
    /// Whether a mesh peer has reported `key` as connected to it.
    pub fn mesh_knows(&self, key: &PublicKey) -> bool {
        self.shared.registry.get_remote(key).is_some()
    }
    /// Whether the DERP listener speaks TLS.
    pub fn tls_enabled(&self) -> bool {
        self.cert.is_some()
    }
    /// The leaf certificate in use (DER); `None` without TLS, or in ACME mode before the
    /// first certificate is issued.
    pub fn cert_der(&self) -> Option<Vec<u8>> {
        self.cert.as_ref().and_then(|c| c.leaf_der())
    }
    /// This server's metrics.
    pub fn metrics(&self) -> &RelayMetrics {
        &self.shared.metrics
    }
    /// Number of distinct client keys connected now.
    pub fn client_count(&self) -> usize {
        self.shared.registry.len()
    }

    /// Packets waiting in receivers' queues now, and the bytes the queue budget counts for
    /// them (payload + 64 each). Walks every connection.
    pub fn queued(&self) -> (usize, usize) {
        self.shared.registry.queued()
    }

    /// Re-reads manual certificate files (SIGHUP). Established connections keep going; on error
    /// the old certificate stays in use.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.cert {
            Some(c) => c.reload(),
            None => Ok(()),
        }
    }

    /// Graceful shutdown: report not-ready, stop accepting on every listener, let every DERP
    /// connection flush its queue and (if its client understands it) send Restarting, then end
    /// its stream; the relay reads on until each client has left, so what clients sent in the
    /// meantime is still forwarded or counted. HTTP keep-alive connections (port 80, metrics)
    /// answer their current request with `Connection: close` and idle ones are closed. Mesh
    /// links stop once the DERP connections are gone. Whatever is still open after
    /// `limits.shutdown_timeout` is closed hard, and this returns at most [`SHUTDOWN_MARGIN`]
    /// after that, whatever is connected. Returns how many DERP connections were closed hard.
    pub async fn shutdown(mut self) -> usize {
        let deadline = tokio::time::Instant::now() + self.shared.limits.shutdown_timeout;
        self.shared.ready.store(false, Ordering::Relaxed);
        self.accept_cancel.cancel();
        self.tracker.close();
        self.conn_tracker.close();
        self.shared.drain.cancel();
        let mut hard_closed = 0;
        if tokio::time::timeout_at(deadline, self.conn_tracker.wait())
            .await
            .is_err()
        {
            hard_closed = self.conn_tracker.len();
            warn!(remaining = hard_closed, "drain timed out; closing the rest");
        }
        // Mesh links, HTTP connections finishing a request, background tasks: until the
        // deadline, then everything is cut.
        self.mesh_cancel.cancel();
        let _ = tokio::time::timeout_at(deadline, self.tracker.wait()).await;
        self.shared.conns_cancel.cancel();
        for c in self.shared.registry.all() {
            c.close(metrics::CloseReason::Shutdown);
        }
        let stun = self.stun.take();
        let rest = async {
            self.conn_tracker.wait().await;
            self.tracker.wait().await;
            if let Some(s) = stun {
                s.shutdown().await;
            }
        };
        if tokio::time::timeout(SHUTDOWN_MARGIN, rest).await.is_err() {
            warn!(
                tasks = self.tracker.len() + self.conn_tracker.len(),
                "tasks still running {SHUTDOWN_MARGIN:?} after the shutdown deadline; leaving them to the runtime"
            );
        }
        hard_closed
    }
}

/// How long [`Server::shutdown`] may run past `shutdown_timeout` (tasks that were cut at the
/// deadline finishing up).
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(1);

impl Drop for Server {
    fn drop(&mut self) {
        self.accept_cancel.cancel();
        self.mesh_cancel.cancel();
        self.shared.conns_cancel.cancel();
        for c in self.shared.registry.all() {
            c.cancel.cancel();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    kind: Listener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    sem: Option<Arc<tokio::sync::Semaphore>>,
) {
    let mut backoff = Duration::from_millis(5);
    // DERP listener only (the one with a connection cap): accept rate and per-IP cap. Owned by
    // this task, so no lock.
    let l = &shared.limits;
    let mut accept_bucket = (sem.is_some() && l.accept_rate > 0.0).then(|| {
        let burst = if l.accept_burst > 0 {
            l.accept_burst as f64
        } else {
            l.accept_rate.ceil().max(1.0)
        };
        ratelimit::TokenBucket::new(l.accept_rate, burst, std::time::Instant::now())
    });
    let per_ip_cap = if sem.is_some() {
        l.max_connections_per_ip
    } else {
        0
    };
    let per_ip = Arc::new(ratelimit::PerIp::default());
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, remote)) => {
                backoff = Duration::from_millis(5);
                let permit = match &sem {
                    Some(s) => {
                        shared.metrics.accepts.increment(1);
                        if let Some(b) = &mut accept_bucket {
                            if !b.try_take_one(std::time::Instant::now()) {
                                // As derper: accept and close at once rather than leave
                                // connections piling up in the kernel's backlog.
                                shared.metrics.rejected_accept_rate.increment(1);
                                drop(tcp);
                                continue;
                            }
                        }
                        match Arc::clone(s).try_acquire_owned() {
                            Ok(p) => Some(p),
                            Err(_) => {
                                shared.metrics.rejected_capacity.increment(1);
                                drop(tcp);
                                continue;
                            }
                        }
                    }
                    None => None,
                };
                let ip_slot = if per_ip_cap > 0 {
                    match per_ip.acquire(remote.ip(), per_ip_cap) {
                        Some(slot) => Some(slot),
                        None => {
                            shared.metrics.rejected_per_ip.increment(1);
                            drop(tcp);
                            continue;
                        }
                    }
                } else {
                    None
                };
                let shared = Arc::clone(&shared);
                let conn_cancel = shared.conns_cancel.clone();
                let span = tracing::debug_span!("conn", %remote);
                tracker.spawn(
                    async move {
                        let _permit = permit;
                        let _ip_slot = ip_slot;
                        tokio::select! {
                            _ = conn_cancel.cancelled() => {}
                            _ = conn::handle_tcp(tcp, remote, kind, shared) => {}
                        }
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, listener = ?kind, "accept failed; backing off {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
