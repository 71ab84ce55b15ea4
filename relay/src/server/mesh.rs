//! Mesh: the relays of one region forward to each other, exactly as derper's mesh does.
//!
//! (Just over 800 lines: a link's dial, watch and forward loops share their state and are
//! easier to check side by side than split across files.)
//!
//! Each relay dials every peer as a DERP client, with its own server key and the shared mesh key,
//! and sends WatchConns. The peer then reports who is connected to it (PeerPresent) and who
//! leaves (PeerGone). A SendPacket for a key that is not local but present on a peer goes out on
//! that peer's link as ForwardPacket; the peer delivers it to its local client and never forwards
//! it again (one hop). When a link breaks, every key learned on it is dropped at once, so nothing
//! is sent into the void; the keys come back when the link (or the client, elsewhere) does.
//!
//! Peers come from a static list (`host:port`) and/or from DNS (every A/AAAA record of a name,
//! e.g. a Kubernetes headless Service, re-resolved periodically). A peer whose server key is our
//! own is ourselves (a DNS list includes this relay) and is skipped, as derper does.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::metrics::DropReason;
use super::queue::{Cost, DropOldest, QueueLimits, QUEUED_OVERHEAD};
use super::Shared;
use crate::proto::client::{
    host_header, ClientHandshake, HandshakeError, HttpUpgrade, Stage, Step, Upgrade,
};
use crate::proto::{
    self, frame_type as ft, present_flags, ClientInfo, FrameDecoder, PublicKey, ServerFrame,
};

/// Where the mesh peers are and how to reach them.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Static peers, `host:port` (derper's `--mesh-with`). This relay itself may be listed: it
    /// recognises its own server key and skips itself.
    pub peers: Vec<String>,
    /// Peers from DNS: every address `name` resolves to, on `port`, re-resolved every `interval`.
    pub dns: Option<MeshDns>,
    /// How links are secured.
    pub tls: MeshTls,
}

/// Peers discovered through DNS (a headless Kubernetes Service, a round-robin name).
#[derive(Debug, Clone)]
pub struct MeshDns {
    /// The name to resolve.
    pub name: String,
    /// The peers' DERP port.
    pub port: u16,
    /// How often to resolve it again.
    pub interval: Duration,
}

/// Transport security of mesh links.
#[derive(Debug, Clone)]
pub enum MeshTls {
    /// Plain TCP: only for relays without TLS (`--dev`, tests).
    Plain,
    /// TLS, verifying the peer's certificate against webpki roots plus `ca_file`, for the name
    /// `name` (default: a static peer's host name; for DNS peers this relay's own hostname).
    Verify {
        /// Extra trust anchors (PEM), e.g. a private CA or the region's self-signed certificate.
        ca_file: Option<PathBuf>,
        /// The name the certificates must carry.
        name: Option<String>,
    },
}

/// Forwarded packets waiting per link; beyond this (or beyond `mesh_queue_bytes`, once over 32)
/// the oldest is dropped (and counted).
const LINK_QUEUE: usize = 8192;
/// No frame at all from a peer for this long (it sends KeepAlive every 60 s) ends the link.
const READ_IDLE: Duration = Duration::from_secs(150);
/// A write to a peer that makes no progress for this long ends the link (derper: 30 s for mesh).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After a graceful end, how long a link waits for the peer to close its side.
const LINK_LINGER: Duration = Duration::from_secs(2);

/// A packet on its way to a peer relay's client.
#[derive(Debug)]
struct Forwarded {
    src: PublicKey,
    dst: PublicKey,
    data: Bytes,
}

impl Cost for Forwarded {
    fn cost(&self) -> usize {
        self.data.len() + QUEUED_OVERHEAD
    }
}

#[derive(Debug, Default)]
struct LinkQueue {
    packets: DropOldest<Forwarded>,
    pongs: Vec<[u8; 8]>,
    /// Set when the link ends: a packet forwarded after that is counted, not queued forever.
    closed: bool,
}

/// One established link to a peer relay: the way packets for its clients go out.
#[derive(Debug)]
pub(crate) struct MeshLink {
    pub(crate) id: u64,
    queue: Mutex<LinkQueue>,
    limits: QueueLimits,
    notify: Notify,
}

static NEXT_LINK_ID: AtomicU64 = AtomicU64::new(1);

impl MeshLink {
    fn new(max_bytes: usize) -> Self {
        MeshLink {
            id: NEXT_LINK_ID.fetch_add(1, Ordering::Relaxed),
            queue: Mutex::new(LinkQueue::default()),
            limits: QueueLimits {
                min_packets: 32,
                max_packets: LINK_QUEUE,
                max_bytes,
            },
            notify: Notify::new(),
        }
    }

    /// Queues a packet from local `src` to `dst` on the peer. Never blocks; drops the oldest when
    /// the queue is over its limits, and counts a packet for a link that has just ended. `buf`:
    /// the read buffer `data` is a slice of ([`super::queue::detach`]).
    pub(crate) fn forward(
        &self,
        src: PublicKey,
        dst: PublicKey,
        data: Bytes,
        buf: super::queue::SourceBuf,
        shared: &Shared,
    ) {
        let (dropped, reason) = {
            let mut q = self.queue.lock();
            if q.closed {
                (1, DropReason::UnknownDest)
            } else {
                let data = super::queue::detach(&q.packets, data, buf);
                let p = Forwarded { src, dst, data };
                (q.packets.push(p, self.limits), DropReason::MeshQueue)
            }
        };
        shared.metrics.drop_n(reason, dropped);
        self.notify.notify_one();
    }

    /// Ends the link for senders: returns how many packets were still queued (never sent).
    /// The writer then finishes the batch it is writing and half-closes the connection.
    fn close(&self) -> u64 {
        let dropped = {
            let mut q = self.queue.lock();
            q.closed = true;
            q.packets.drain().count() as u64
        };
        self.notify.notify_one();
        dropped
    }

    fn pong(&self, data: [u8; 8]) {
        self.queue.lock().pongs.push(data);
        self.notify.notify_one();
    }
}

/// A peer to keep a link to.
#[derive(Debug, Clone)]
struct Target {
    /// What to connect to: `host:port` (resolved at each dial) or an address from DNS.
    dial: String,
    /// Host header and, unless configured otherwise, the TLS name.
    host: String,
    tls_name: Option<String>,
}

/// A checked mesh configuration, ready to start.
pub(crate) struct Prepared {
    targets: Vec<Target>,
    dns: Option<(MeshDns, Option<String>)>,
    mesh_key: [u8; 32],
    connector: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("targets", &self.targets)
            .field("dns", &self.dns)
            .finish_non_exhaustive()
    }
}

/// Prepares the links of a mesh [`super::Config::validate`] accepted: targets, TLS names and the
/// connector (which reads `ca_file`).
pub(crate) fn prepare(
    cfg: MeshConfig,
    mesh_key: [u8; 32],
    own_hostname: Option<&str>,
) -> Result<Prepared, super::TlsError> {
    let (connector, name_override) = match &cfg.tls {
        MeshTls::Plain => (None, None),
        MeshTls::Verify { ca_file, name } => (Some(tls_connector(ca_file.as_ref())?), name.clone()),
    };
    let mut targets = Vec::new();
    for p in &cfg.peers {
        // Checked by Config::validate; a peer that still does not split is skipped.
        let Ok((host, _port)) = split_host_port(p) else {
            continue;
        };
        targets.push(Target {
            dial: p.clone(),
            host: host.to_string(),
            tls_name: name_override.clone().or_else(|| Some(host.to_string())),
        });
    }
    let dns = cfg.dns.map(|d| {
        let tls_name = name_override
            .or_else(|| own_hostname.map(str::to_string))
            .or_else(|| Some(d.name.clone()));
        (d, tls_name)
    });
    Ok(Prepared {
        targets,
        dns,
        mesh_key,
        connector,
    })
}

/// Starts the mesh: one task per static peer and, with DNS, a resolver task that starts and
/// stops peer tasks as the records change. Everything stops when `cancel` fires.
pub(crate) fn start(
    p: Prepared,
    shared: Arc<Shared>,
    tracker: &tokio_util::task::TaskTracker,
    cancel: CancellationToken,
) {
    let ctx = Arc::new(LinkCtx {
        shared,
        mesh_key: p.mesh_key,
        connector: p.connector,
    });
    for target in p.targets {
        tracker.spawn(peer_loop(target, Arc::clone(&ctx), cancel.clone()));
    }
    if let Some((dns, tls_name)) = p.dns {
        tracker.spawn(dns_loop(
            dns,
            tls_name,
            ctx,
            tracker.clone(),
            cancel.clone(),
        ));
    }
}

/// Why a mesh peer is not `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerAddrError {
    /// No `:port` at the end.
    #[error("no port")]
    NoPort,
    /// The part after the last `:` is not a port number.
    #[error("the port is not a number from 0 to 65535")]
    BadPort(#[source] std::num::ParseIntError),
    /// Nothing before the port.
    #[error("no host")]
    EmptyHost,
}

pub(crate) fn split_host_port(p: &str) -> Result<(&str, u16), PeerAddrError> {
    let (host, port) = p.rsplit_once(':').ok_or(PeerAddrError::NoPort)?;
    let port: u16 = port.parse().map_err(PeerAddrError::BadPort)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(PeerAddrError::EmptyHost);
    }
    Ok((host, port))
}

fn tls_connector(ca_file: Option<&PathBuf>) -> Result<tokio_rustls::TlsConnector, super::TlsError> {
    let cfg = super::tls::client_config(ca_file.map(PathBuf::as_path))?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

struct LinkCtx {
    shared: Arc<Shared>,
    mesh_key: [u8; 32],
    connector: Option<tokio_rustls::TlsConnector>,
}

/// Resolves the DNS name periodically; keeps one peer task per address.
async fn dns_loop(
    dns: MeshDns,
    tls_name: Option<String>,
    ctx: Arc<LinkCtx>,
    tracker: tokio_util::task::TaskTracker,
    cancel: CancellationToken,
) {
    let mut running: HashMap<SocketAddr, CancellationToken> = HashMap::new();
    let mut tick = tokio::time::interval(dns.interval.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let addrs: HashSet<SocketAddr> =
            match tokio::net::lookup_host((dns.name.as_str(), dns.port)).await {
                Ok(a) => a.collect(),
                Err(e) => {
                    // Keep the links we have: a DNS hiccup is not a peer going away.
                    warn!(name = %dns.name, "mesh DNS lookup failed: {e}; keeping current peers");
                    continue;
                }
            };
        running.retain(|addr, token| {
            if addrs.contains(addr) {
                return true;
            }
            info!(peer = %addr, "mesh peer left DNS; closing its link");
            token.cancel();
            false
        });
        for addr in addrs {
            if running.contains_key(&addr) {
                continue;
            }
            let token = cancel.child_token();
            running.insert(addr, token.clone());
            let target = Target {
                dial: addr.to_string(),
                host: tls_name.clone().unwrap_or_else(|| addr.ip().to_string()),
                tls_name: tls_name.clone(),
            };
            tracker.spawn(peer_loop(target, Arc::clone(&ctx), token));
        }
    }
}

/// First wait before dialling a peer again, and the most it grows to. A peer that is back but
/// not linked is a peer whose clients the rest of the region cannot reach, so the ceiling is
/// derper's fixed retry interval (5 s), not the longer backoff of a client.
const MESH_RETRY_FIRST: Duration = Duration::from_millis(200);
const MESH_RETRY_MAX: Duration = Duration::from_secs(5);

/// Keeps a link to one peer: connect, watch, forward; reconnect with backoff. Returns when
/// cancelled, or when the peer turns out to be this relay.
async fn peer_loop(target: Target, ctx: Arc<LinkCtx>, cancel: CancellationToken) {
    let m = &ctx.shared.metrics;
    let mut backoff = MESH_RETRY_FIRST;
    let mut was_up = false;
    loop {
        // run_link watches `cancel` itself, so its cleanup always runs.
        let outcome = run_link(&target, &ctx, &cancel, &mut was_up).await;
        let wait = match outcome {
            LinkEnd::SelfConnect => {
                info!(peer = %target.dial, "mesh peer is this relay itself; skipping it");
                // Stay "running" so a DNS loop does not start it again.
                cancel.cancelled().await;
                return;
            }
            LinkEnd::Cancelled => return,
            LinkEnd::Failed(e) => {
                m.mesh_connect_failures.increment(1);
                let e = crate::error_chain(&e);
                warn!(peer = %target.dial, retry_in = ?backoff, "mesh link failed: {e}");
                let w = backoff;
                backoff = (backoff * 2).min(MESH_RETRY_MAX);
                w
            }
            LinkEnd::Lost(e, was_up_for) => {
                let e = crate::error_chain(&e);
                warn!(peer = %target.dial, "mesh link lost: {e}; reconnecting");
                if was_up_for > Duration::from_secs(10) {
                    backoff = MESH_RETRY_FIRST;
                }
                let w = backoff;
                backoff = (backoff * 2).min(MESH_RETRY_MAX);
                w
            }
            // The Restarting hint spreads a herd of clients over seconds; a region has a few
            // peers, and every one of them should see the restarted relay's clients as soon as
            // it is back: dial again soon, then back off while it is still down.
            LinkEnd::Restarting => {
                backoff = MESH_RETRY_FIRST;
                MESH_RETRY_FIRST
            }
        };
        let jitter = wait.mul_f64(rand::random::<f64>() * 0.2);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait + jitter) => {}
        }
    }
}

enum LinkEnd {
    SelfConnect,
    Cancelled,
    /// Never got to the watch stage.
    Failed(LinkError),
    /// Was up (for this long), then broke.
    Lost(LinkError, Duration),
    /// The peer said it is restarting.
    Restarting,
}

/// Why a mesh link could not be set up, or broke (logged; the link is retried).
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("connect")]
    Connect(#[source] std::io::Error),
    #[error("TLS name {name:?}")]
    TlsName {
        name: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("TLS handshake timed out")]
    TlsTimeout,
    /// Often the peer's certificate is not valid for `name`, or not signed by a trusted CA (the
    /// source says which); docs/operating.md names the settings.
    #[error("TLS with {name:?}")]
    Tls {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no DERP connection within {0:?}")]
    EstablishTimeout(Duration),
    #[error("write")]
    Write(#[source] std::io::Error),
    #[error("write failed or timed out")]
    Writer,
    #[error("read")]
    Read(#[source] std::io::Error),
    /// The upgrade's status line (data from the peer).
    #[error("upgrade refused: {0}")]
    Refused(String),
    #[error("handshake")]
    Handshake(#[source] HandshakeError),
    /// The peer closed during the handshake; `hint`: what a close at this stage usually means.
    /// (The close itself is the source, not repeated here: chains printed it twice.)
    #[error("handshake{hint}")]
    Closed {
        #[source]
        source: HandshakeError,
        hint: &'static str,
    },
    #[error("nothing from the peer for {0:?}")]
    Idle(Duration),
    #[error("peer closed the connection")]
    PeerClosed,
    #[error("bad frame")]
    Frame(#[source] proto::ProtoError),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<X: AsyncRead + AsyncWrite + Unpin + Send> Io for X {}

/// TCP, and TLS when the mesh uses it.
async fn connect(target: &Target, ctx: &LinkCtx) -> Result<Box<dyn Io>, LinkError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target.dial.as_str()))
        .await
        .map_err(|_| LinkError::ConnectTimeout)?
        .map_err(LinkError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = match &ctx.connector {
        None => Box::new(tcp),
        Some(c) => {
            let name = target
                .tls_name
                .clone()
                .unwrap_or_else(|| target.host.clone());
            let sn = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|source| {
                LinkError::TlsName {
                    name: name.clone(),
                    source,
                }
            })?;
            let tls = tokio::time::timeout(CONNECT_TIMEOUT, c.connect(sn, tcp))
                .await
                .map_err(|_| LinkError::TlsTimeout)?
                .map_err(|source| LinkError::Tls { name, source })?;
            Box::new(tls)
        }
    };
    Ok(io)
}

/// Reads one frame, with the idle bound.
async fn next_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    dec: &mut FrameDecoder,
    idle: Duration,
) -> Result<proto::RawFrame, LinkError> {
    loop {
        if let Some(f) = dec.decode(buf).map_err(LinkError::Frame)? {
            return Ok(f);
        }
        buf.reserve(dec.bytes_needed(buf).max(16 << 10));
        let n = tokio::time::timeout(idle, r.read_buf(buf))
            .await
            .map_err(|_| LinkError::Idle(idle))?
            .map_err(LinkError::Read)?;
        if n == 0 {
            return Err(LinkError::PeerClosed);
        }
    }
}

type Halves = (
    tokio::io::ReadHalf<Box<dyn Io>>,
    tokio::io::WriteHalf<Box<dyn Io>>,
    BytesMut,
    FrameDecoder,
    PublicKey,
);

/// Connects, upgrades and handshakes as a client with our own server key and the mesh key, then
/// asks to watch connections. The whole of it is bounded by [`CONNECT_TIMEOUT`] (a peer that
/// trickles bytes cannot hold it).
async fn establish(target: &Target, ctx: &LinkCtx) -> Result<Halves, LinkEnd> {
    tokio::time::timeout(CONNECT_TIMEOUT, establish_inner(target, ctx))
        .await
        .unwrap_or_else(|_| {
            Err(LinkEnd::Failed(LinkError::EstablishTimeout(
                CONNECT_TIMEOUT,
            )))
        })
}

async fn establish_inner(target: &Target, ctx: &LinkCtx) -> Result<Halves, LinkEnd> {
    let shared = &ctx.shared;
    let failed = LinkEnd::Failed;
    let io = connect(target, ctx).await.map_err(failed)?;
    let (mut r, mut w) = tokio::io::split(io);
    let port = split_host_port(&target.dial).map(|(_, p)| p).unwrap_or(443);
    let upgrade = HttpUpgrade::new(
        host_header(&target.host, port),
        format!("ferry-relay/{} mesh", env!("CARGO_PKG_VERSION")),
    );
    let info = ClientInfo {
        version: proto::PROTOCOL_VERSION,
        mesh_key: Some(ctx.mesh_key),
        can_ack_pings: true,
        is_prober: false,
    };
    let (mut hs, first) = ClientHandshake::new(shared.secret.clone(), info, Upgrade::Http(upgrade));
    write_flush(&mut w, &first)
        .await
        .map_err(|e| failed(LinkError::Write(e)))?;
    let mut buf = BytesMut::with_capacity(4096);
    let peer_key = loop {
        let step = hs.feed(&mut buf).map_err(|e| {
            failed(match e {
                HandshakeError::Refused(r) => LinkError::Refused(r.status_line().to_string()),
                other => LinkError::Handshake(other),
            })
        })?;
        match step {
            Step::NeedMore => {
                buf.reserve(hs.bytes_needed(&buf));
                let n = r
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| failed(LinkError::Read(e)))?;
                if n == 0 {
                    let hint = if hs.stage() == Stage::ServerInfo {
                        " (a peer closes the connection here when the mesh keys differ)"
                    } else {
                        ""
                    };
                    return Err(failed(LinkError::Closed {
                        source: hs.closed(),
                        hint,
                    }));
                }
            }
            Step::ServerKey { key, .. } if key == shared.public => {
                return Err(LinkEnd::SelfConnect)
            }
            Step::ServerKey {
                mut client_info, ..
            } => {
                // Subscribe at once, pipelined behind ClientInfo.
                proto::put_frame(&mut client_info, ft::WATCH_CONNS, &[]);
                write_flush(&mut w, &client_info)
                    .await
                    .map_err(|e| failed(LinkError::Write(e)))?;
            }
            Step::Established(e) => break e.server_key,
        }
    };
    Ok((r, w, buf, FrameDecoder::new(), peer_key))
}

async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// The keys learned over one link. Dropping it (however the link ends, even if its task is
/// aborted) removes them from the registry, so nothing is forwarded into a dead link.
struct Learned<'a> {
    shared: &'a Shared,
    link: Arc<MeshLink>,
    keys: HashSet<PublicKey>,
}

impl Drop for Learned<'_> {
    fn drop(&mut self) {
        let m = &self.shared.metrics;
        for key in &self.keys {
            self.shared.registry.remove_remote(key, self.link.id, m);
        }
        m.mesh_links.decrement(1.0);
        m.drop_n(DropReason::MeshQueue, self.link.close());
    }
}

/// One link's life: connect, subscribe, learn and forward until it ends. `was_up` is set once a
/// link to this peer has been up: every later link is a resync (a fresh snapshot).
async fn run_link(
    target: &Target,
    ctx: &Arc<LinkCtx>,
    cancel: &CancellationToken,
    was_up: &mut bool,
) -> LinkEnd {
    let shared = &ctx.shared;
    let (mut r, w, mut buf, mut dec, peer_key) = tokio::select! {
        _ = cancel.cancelled() => return LinkEnd::Cancelled,
        est = establish(target, ctx) => match est {
            Ok(x) => x,
            Err(end) => return end,
        },
    };
    let m = &shared.metrics;
    m.mesh_links.increment(1.0);
    if std::mem::replace(was_up, true) {
        m.mesh_resyncs.increment(1);
    }
    let mut learned = Learned {
        shared,
        link: Arc::new(MeshLink::new(shared.limits.mesh_queue_bytes)),
        keys: HashSet::new(),
    };
    let link = Arc::clone(&learned.link);
    let up_since = tokio::time::Instant::now();
    info!(peer = %target.dial, peer_key = %peer_key.short(), "mesh link up");
    // Stops the writer at once: a failed write, or a link that will not close gracefully.
    let stop_writer = CancellationToken::new();
    let _stop_writer = stop_writer.clone().drop_guard();
    let writer = tokio::spawn(link_writer(
        w,
        Arc::clone(&link),
        stop_writer.clone(),
        Arc::clone(&ctx.shared),
    ));
    let end = loop {
        let f = tokio::select! {
            _ = cancel.cancelled() => break LinkEnd::Cancelled,
            _ = stop_writer.cancelled() => {
                break LinkEnd::Lost(LinkError::Writer, up_since.elapsed())
            }
            f = next_frame(&mut r, &mut buf, &mut dec, READ_IDLE) => f,
        };
        let f = match f.and_then(|f| ServerFrame::parse(f).map_err(LinkError::Frame)) {
            Ok(f) => f,
            Err(e) => break LinkEnd::Lost(e, up_since.elapsed()),
        };
        match f {
            // Other relays' own mesh connections are not clients: nobody sends to a relay's
            // key, and counting them would make mesh_remote_keys wrong.
            ServerFrame::PeerPresent { flags, .. } if flags & present_flags::MESH_PEER != 0 => {}
            ServerFrame::PeerPresent { key, .. } => {
                if key != shared.public && learned.keys.insert(key) {
                    shared.registry.add_remote(key, Arc::clone(&link), m);
                }
            }
            ServerFrame::PeerGone { key, .. } => {
                if learned.keys.remove(&key) {
                    shared.registry.remove_remote(&key, link.id, m);
                }
            }
            ServerFrame::Ping(d) => link.pong(d),
            ServerFrame::Restarting { .. } => break LinkEnd::Restarting,
            ServerFrame::RecvPacket { .. } => {
                // Nobody sends to a relay's own key; nothing to deliver it to.
                m.drop(DropReason::UnknownDest);
            }
            ServerFrame::KeepAlive
            | ServerFrame::Pong(_)
            | ServerFrame::Health(_)
            | ServerFrame::UdpRelayEndpoint(_)
            | ServerFrame::Other(_) => {}
        }
    };
    debug!(peer = %target.dial, keys = learned.keys.len(), "mesh link down; its keys dropped");
    // Forget the keys; what is still queued is counted, and the writer half-closes after the
    // batch it is writing.
    drop(learned);
    if matches!(end, LinkEnd::Cancelled | LinkEnd::Restarting) {
        // A graceful end (this relay stopping, or the peer restarting): read on until the peer
        // closes too. Closing a socket with unread bytes in it (the peer's latest presence
        // notes) would send a reset, and a reset throws away the packets this side still had
        // in flight to the peer: lost, and counted by nobody.
        let _ = tokio::time::timeout(LINK_LINGER, async {
            let _ = writer.await;
            loop {
                buf.clear();
                buf.reserve(16 << 10);
                match r.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    end
}

/// Sends queued ForwardPackets (and pongs) to the peer, one flush per batch. A batch that cannot
/// be written is counted as `write_error`. Once the link is closed it finishes its batch and
/// half-closes the connection.
async fn link_writer<W: AsyncWrite + Unpin>(
    mut w: W,
    link: Arc<MeshLink>,
    stop: CancellationToken,
    shared: Arc<Shared>,
) {
    let mut batch = LinkQueue::default();
    let mut out: Vec<u8> = Vec::with_capacity(64 << 10);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = link.notify.notified() => {}
        }
        let closed = {
            let mut q = link.queue.lock();
            q.packets.swap(&mut batch.packets);
            std::mem::swap(&mut q.pongs, &mut batch.pongs);
            q.closed
        };
        for d in batch.pongs.drain(..) {
            proto::put_frame(&mut out, ft::PONG, &[&d]);
        }
        let batch_packets = batch.packets.len() as u64;
        for p in batch.packets.drain() {
            proto::put_forward_packet(&mut out, &p.src, &p.dst, &p.data);
        }
        if !out.is_empty() {
            let res = tokio::time::timeout(WRITE_TIMEOUT, write_flush(&mut w, &out)).await;
            if !matches!(res, Ok(Ok(()))) {
                shared.metrics.drop_n(DropReason::WriteError, batch_packets);
                stop.cancel();
                return;
            }
            out.clear();
            if out.capacity() > 1 << 20 {
                out = Vec::with_capacity(64 << 10);
            }
        }
        if closed {
            let _ = tokio::time::timeout(WRITE_TIMEOUT, w.shutdown()).await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_parse_or_say_what_is_wrong() {
        assert_eq!(
            split_host_port("a.example:443").unwrap(),
            ("a.example", 443)
        );
        assert_eq!(
            split_host_port("[2001:db8::1]:8443").unwrap(),
            ("2001:db8::1", 8443)
        );
        assert_eq!(split_host_port("a.example"), Err(PeerAddrError::NoPort));
        assert_eq!(split_host_port(":443"), Err(PeerAddrError::EmptyHost));
        for bad in ["a.example:https", "a:70000"] {
            let e = split_host_port(bad).unwrap_err();
            assert!(matches!(e, PeerAddrError::BadPort(_)), "{bad}: {e}");
        }
    }
}
