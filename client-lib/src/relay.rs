//! DERP v2 relay client: one region, kept connected.
//!
//! (Over 800 lines, about 20 of them tests: one connection's whole life, dial, TLS, upgrade
//! (DERP or WebSocket), handshake and the supervisor that redials, reads as one story; the
//! parts that are not I/O already live in `ferry_proto::derp::client`.)
//!
//! [`RelayClient::connect`] makes the first connection before it returns (so a wrong pin or an
//! unreachable relay is an error the caller sees at once), then a background task keeps the
//! connection up: it answers server Pings with Pongs, treats a silent relay (no frame, not even
//! the KeepAlive the relay sends every minute) as dead, reconnects with jittered exponential
//! backoff, and honours the Restarting frame (reconnect after the relay's delay). Packets sent
//! while reconnecting wait in a bounded queue and go out on the new connection. Sending never
//! waits: when the queue is full (a relay that stopped reading, or unreachable for long) the
//! oldest packets are dropped and counted, as Tailscale's magicsock does, so one dead region
//! never holds up the caller's other paths.
//!
//! The connection is `GET /derp` with `Upgrade: DERP` over TLS (plain HTTP for a test node);
//! if the relay (or a proxy in front of it) answers that with anything but 101, the client
//! falls back to DERP over WebSocket (`Sec-WebSocket-Protocol: derp`) and stays on it. The
//! protocol itself is `ferry_proto::derp`, shared with the relay.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_proto::derp::client::{ClientHandshake, HandshakeError, HttpUpgrade, Step, Upgrade};
use ferry_proto::derp::{
    self as proto, frame_type as ft, ClientInfo, FrameDecoder, PeerGoneReason, PublicKey,
    SecretKey, ServerFrame,
};
use ferry_proto::queue::{Cost, DropOldest, QueueLimits, QUEUED_OVERHEAD};
use ferry_proto::udprelay::{AllocRequest, Endpoint as UdpRelayEndpoint, FRAME_ALLOCATE};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

use crate::relaymap::{Node, Region};
use crate::tls::TlsOptions;

/// Everything from TCP connect to ServerInfo must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// No frame from the relay for this long (it sends KeepAlive every 60 s) ends the connection.
pub const READ_IDLE_TIMEOUT: Duration = Duration::from_secs(150);
/// A write that does not finish within this ends the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Packets queued for sending (also while reconnecting) at most; beyond it [`RelayClient::send`]
/// drops the oldest.
pub const SEND_QUEUE: usize = 1024;
/// ... and bytes (payload + 64 per packet): beyond it the oldest go too, down to 32 packets.
pub const SEND_QUEUE_BYTES: usize = 4 << 20;

/// The limits of every relay send queue (the client's, and the endpoint's for a region still
/// connecting).
pub const SEND_QUEUE_LIMITS: QueueLimits = QueueLimits {
    min_packets: 32,
    max_packets: SEND_QUEUE,
    max_bytes: SEND_QUEUE_BYTES,
};

/// How to reach the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// DERP upgrade; WebSocket if the upgrade is refused (the default).
    #[default]
    Auto,
    /// Only the DERP upgrade.
    Derp,
    /// Only WebSocket.
    WebSocket,
}

/// Reconnect backoff: `initial`, doubling to `max`, each wait plus up to 50 % random jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First wait after a failure.
    pub initial: Duration,
    /// Largest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The wait before attempt `n` (0-based) after a failure, with jitter.
    pub fn delay(&self, n: u32) -> Duration {
        let base = self.initial.saturating_mul(1 << n.min(20)).min(self.max);
        base + base.mul_f64(rand::random::<f64>() * 0.5)
    }
}

/// Options for a relay connection.
#[derive(Debug, Clone, Default)]
pub struct RelayOptions {
    /// Trust anchors for nodes without a pin.
    pub tls: TlsOptions,
    /// DERP upgrade, WebSocket, or both.
    pub transport: Transport,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// Tell the relay it is our home (NotePreferred), now and after every reconnect.
    pub preferred: bool,
}

/// What happened on a relay connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// A packet from `src` (authenticated by the relay, not end to end).
    Packet {
        /// The sender's node key.
        src: PublicKey,
        /// The payload.
        data: Bytes,
    },
    /// A peer left the relay, or was never there (our packet to it was dropped).
    PeerGone {
        /// The peer.
        peer: PublicKey,
        /// Why.
        reason: PeerGoneReason,
    },
    /// Connected (again): `generation` counts connections, starting at 1.
    Connected {
        /// Connection number.
        generation: u64,
        /// Over WebSocket rather than the DERP upgrade.
        websocket: bool,
    },
    /// The connection ended; the client reconnects by itself after `retry_in`.
    Disconnected {
        /// Why it ended.
        error: String,
        /// When the next attempt is.
        retry_in: Duration,
    },
    /// The relay's health message (empty: healthy again).
    Health(String),
}

/// Why a relay connection failed. Each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The region has no relay node.
    #[error("relay region {0} has no relay node (all nodes are STUNOnly)")]
    NoNodes(String),
    /// DNS or TCP failed.
    #[error("cannot reach relay {node} ({url}): {why}. Is the relay running, and are HostName/IPv4/DERPPort in the relay map right?")]
    Unreachable {
        /// Node name.
        node: String,
        /// Its URL.
        url: String,
        /// The underlying error.
        why: String,
    },
    /// TLS failed (certificate, pin, protocol).
    #[error("TLS with relay {node} ({url}) failed: {why}")]
    Tls {
        /// Node name.
        node: String,
        /// Its URL.
        url: String,
        /// The underlying error (a pin mismatch names both pins).
        why: String,
    },
    /// TLS setup (CA file, names).
    #[error(transparent)]
    TlsSetup(#[from] crate::tls::TlsSetupError),
    /// The relay answered the upgrade with something else.
    #[error("relay {node} ({url}) refused the DERP connection: {status}")]
    Refused {
        /// Node name.
        node: String,
        /// Its URL.
        url: String,
        /// The HTTP status line (or WebSocket error).
        status: String,
    },
    /// The DERP handshake failed.
    #[error("DERP handshake with relay {node} ({url}) failed: {why}")]
    Handshake {
        /// Node name.
        node: String,
        /// Its URL.
        url: String,
        /// What went wrong.
        why: String,
    },
    /// Took longer than [`CONNECT_TIMEOUT`].
    #[error("relay {node} ({url}) did not complete the connection within {CONNECT_TIMEOUT:?}")]
    Timeout {
        /// Node name.
        node: String,
        /// Its URL.
        url: String,
    },
    /// The client was closed.
    #[error("the relay client is closed")]
    Closed,
    /// A packet over DERP's size limit.
    #[error("packet of {0} bytes is over the {max}-byte DERP limit", max = proto::MAX_PACKET_SIZE)]
    TooBig(usize),
    /// A UDP relay allocation failed.
    #[error("UDP relay allocation: {0}")]
    UdpRelay(String),
}

impl RelayError {
    fn is_refused(&self) -> bool {
        matches!(self, RelayError::Refused { .. })
    }
}

/// A packet waiting for the connection.
#[derive(Debug)]
pub(crate) struct Queued {
    /// The addressee.
    pub(crate) dst: PublicKey,
    /// The packet.
    pub(crate) data: Bytes,
}

impl Cost for Queued {
    fn cost(&self) -> usize {
        self.data.len() + QUEUED_OVERHEAD
    }
}

/// The send queue, shared by the handle (pushes) and the connection task (takes).
#[derive(Debug, Default)]
struct SendQueue {
    packets: Mutex<DropOldest<Queued>>,
    /// UDP relay allocation requests waiting for the connection (few; see `allocate_udp_relay`).
    allocs: Mutex<Vec<AllocRequest>>,
    /// Their answers, by request id.
    pending: Mutex<
        std::collections::HashMap<
            u32,
            tokio::sync::oneshot::Sender<Result<UdpRelayEndpoint, String>>,
        >,
    >,
    next_id: AtomicU64,
    ready: Notify,
    dropped: AtomicU64,
}

/// How long [`RelayClient::allocate_udp_relay`] waits for the relay's answer (a relay without
/// the UDP relay, derper included, never answers).
pub const ALLOCATE_TIMEOUT: Duration = Duration::from_secs(5);
/// Allocation requests in flight per connection at most.
const MAX_PENDING_ALLOCS: usize = 64;

/// The connection state, for waiting on (re)connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStatus {
    /// Connected right now.
    pub connected: bool,
    /// Connections made so far.
    pub generation: u64,
}

/// A connection to one relay region, kept up in the background. Dropping it closes it.
#[derive(Debug)]
pub struct RelayClient {
    region: u32,
    server_key: PublicKey,
    queue: Arc<SendQueue>,
    preferred: watch::Sender<bool>,
    status: watch::Receiver<RelayStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RelayClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The stream of [`RelayEvent`]s of one [`RelayClient`].
#[derive(Debug)]
pub struct RelayEvents(mpsc::Receiver<RelayEvent>);

impl RelayEvents {
    /// The next event; `None` once the client is dropped.
    pub async fn recv(&mut self) -> Option<RelayEvent> {
        self.0.recv().await
    }
}

impl RelayClient {
    /// Connects to the first reachable relay node of `region` and keeps the connection up.
    pub async fn connect(
        region: &Region,
        secret: SecretKey,
        opts: RelayOptions,
    ) -> Result<(RelayClient, RelayEvents), RelayError> {
        let nodes: Vec<Node> = region.relay_nodes().cloned().collect();
        if nodes.is_empty() {
            return Err(RelayError::NoNodes(region.label()));
        }
        let mut ws = opts.transport == Transport::WebSocket;
        let mut first_err = None;
        let mut conn = None;
        for node in &nodes {
            match dial(node, &opts, &secret, &mut ws).await {
                Ok(c) => {
                    conn = Some((c, node.clone()));
                    break;
                }
                Err(e) => {
                    debug!(node = %node.name, "relay dial failed: {e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        let Some((conn, _node)) = conn else {
            return Err(first_err.expect("at least one node was tried"));
        };
        let server_key = conn.server_key;
        let queue = Arc::new(SendQueue::default());
        let (preferred, preferred_rx) = watch::channel(opts.preferred);
        let (ev_tx, ev_rx) = mpsc::channel(1024);
        let (st_tx, st_rx) = watch::channel(RelayStatus {
            connected: true,
            generation: 1,
        });
        let _ = ev_tx.try_send(RelayEvent::Connected {
            generation: 1,
            websocket: conn.websocket,
        });
        let sup = Supervisor {
            region: region.id,
            nodes,
            secret,
            opts,
            websocket: ws,
            queue: Arc::clone(&queue),
            preferred: preferred_rx,
            events: ev_tx,
            status: st_tx,
        };
        let task = tokio::spawn(sup.run(conn));
        let client = RelayClient {
            region: region.id,
            server_key,
            queue,
            preferred,
            status: st_rx,
            task,
        };
        Ok((client, RelayEvents(ev_rx)))
    }

    /// The region this client is connected to.
    pub fn region(&self) -> u32 {
        self.region
    }

    /// The relay's public key (from the first connection).
    pub fn server_key(&self) -> PublicKey {
        self.server_key
    }

    /// Queues `data` for `dst`; never waits. When the queue is over [`SEND_QUEUE_LIMITS`] the
    /// oldest packets are dropped: `Ok(n)` says how many this call dropped (also added to
    /// [`RelayClient::dropped`]).
    pub fn send(&self, dst: PublicKey, data: Bytes) -> Result<u64, RelayError> {
        if data.len() > proto::MAX_PACKET_SIZE {
            return Err(RelayError::TooBig(data.len()));
        }
        if self.task.is_finished() {
            return Err(RelayError::Closed);
        }
        let dropped = self
            .queue
            .packets
            .lock()
            .expect("lock")
            .push(Queued { dst, data }, SEND_QUEUE_LIMITS);
        self.queue.ready.notify_one();
        if dropped > 0 {
            self.queue.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        Ok(dropped)
    }

    /// Asks the relay for a UDP relay session for the two disco keys (issue 15; ferry's DERP
    /// frame `0xF0`, over this authenticated connection). `Err` with the relay's reason if it
    /// refuses, [`RelayError::UdpRelay`] if it does not answer within [`ALLOCATE_TIMEOUT`] (a
    /// relay without the UDP relay, such as derper, skips the frame) or too many are pending.
    ///
    /// The answer's addresses are never empty: a relay that advertises none serves the session
    /// at the IP this connection reached. The future owns what it needs (no borrow of `self`),
    /// so it can be spawned.
    pub fn allocate_udp_relay(
        &self,
        keys: [PublicKey; 2],
    ) -> impl std::future::Future<Output = Result<UdpRelayEndpoint, RelayError>> + Send + 'static
    {
        let queue = Arc::clone(&self.queue);
        async move {
            let id = queue.next_id.fetch_add(1, Ordering::Relaxed) as u32;
            // Whatever ends this call (answer, timeout, the caller dropping it) forgets the id;
            // a request still queued then is not sent (`take_queued`).
            struct Forget(Arc<SendQueue>, u32);
            impl Drop for Forget {
                fn drop(&mut self) {
                    self.0.pending.lock().expect("lock").remove(&self.1);
                }
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            {
                let mut pending = queue.pending.lock().expect("lock");
                if pending.len() >= MAX_PENDING_ALLOCS {
                    return Err(RelayError::UdpRelay(format!(
                        "{MAX_PENDING_ALLOCS} allocations already pending"
                    )));
                }
                pending.insert(id, tx);
            }
            let _forget = Forget(Arc::clone(&queue), id);
            queue
                .allocs
                .lock()
                .expect("lock")
                .push(AllocRequest { id, keys });
            queue.ready.notify_one();
            let r = tokio::time::timeout(ALLOCATE_TIMEOUT, rx).await;
            match r {
                Ok(Ok(Ok(ep))) => Ok(ep),
                Ok(Ok(Err(why))) => Err(RelayError::UdpRelay(format!("refused: {why}"))),
                Ok(Err(_)) => Err(RelayError::Closed),
                Err(_) => Err(RelayError::UdpRelay(format!(
                    "no answer within {ALLOCATE_TIMEOUT:?} (does this relay run the UDP relay?)"
                ))),
            }
        }
    }

    /// Packets dropped so far because the send queue was full.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// Tells the relay whether it is our home region (now, and after every reconnect).
    pub fn note_preferred(&self, preferred: bool) {
        self.preferred.send_replace(preferred);
    }

    /// The connection state; `changed()` on it waits for reconnects.
    pub fn status(&self) -> watch::Receiver<RelayStatus> {
        self.status.clone()
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<X: AsyncRead + AsyncWrite + Unpin + Send> Io for X {}
type BoxIo = Box<dyn Io>;

enum Reader {
    Io(tokio::io::ReadHalf<BoxIo>),
    Ws(futures_util::stream::SplitStream<WebSocketStream<BoxIo>>),
}

enum Writer {
    Io(tokio::io::WriteHalf<BoxIo>),
    Ws(futures_util::stream::SplitSink<WebSocketStream<BoxIo>, Message>),
}

impl Reader {
    /// Appends what arrives to `buf`; `Ok(0)` at the end of the stream. Cancel-safe.
    async fn read_more(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Reader::Io(r) => r.read_buf(buf).await,
            Reader::Ws(s) => loop {
                match s.next().await {
                    None | Some(Ok(Message::Close(_))) => return Ok(0),
                    Some(Err(e)) => return Err(std::io::Error::other(e)),
                    Some(Ok(Message::Binary(b))) => {
                        buf.extend_from_slice(&b);
                        return Ok(b.len());
                    }
                    Some(Ok(_)) => continue,
                }
            },
        }
    }
}

impl Writer {
    async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Io(w) => {
                w.write_all(data).await?;
                w.flush().await
            }
            Writer::Ws(s) => s
                .send(Message::Binary(Bytes::copy_from_slice(data)))
                .await
                .map_err(std::io::Error::other),
        }
    }
}

/// An established DERP connection (after ServerInfo).
struct Conn {
    reader: Reader,
    writer: Writer,
    buf: BytesMut,
    server_key: PublicKey,
    websocket: bool,
    /// The TCP address connected to (UDP relay sessions without advertised addresses are at
    /// its IP).
    remote: SocketAddr,
}

/// Dials `node`: DERP upgrade, or WebSocket when `*ws` (set when the upgrade is refused).
async fn dial(
    node: &Node,
    opts: &RelayOptions,
    secret: &SecretKey,
    ws: &mut bool,
) -> Result<Conn, RelayError> {
    let timeout = |node: &Node| RelayError::Timeout {
        node: node.name.clone(),
        url: node.url(),
    };
    if !*ws {
        let r = tokio::time::timeout(CONNECT_TIMEOUT, dial_once(node, opts, secret, false))
            .await
            .map_err(|_| timeout(node))?;
        match r {
            Err(e) if e.is_refused() && opts.transport == Transport::Auto => {
                info!(node = %node.name, "DERP upgrade refused ({e}); trying WebSocket");
                *ws = true;
            }
            other => return other,
        }
    }
    tokio::time::timeout(CONNECT_TIMEOUT, dial_once(node, opts, secret, true))
        .await
        .map_err(|_| timeout(node))?
}

async fn dial_once(
    node: &Node,
    opts: &RelayOptions,
    secret: &SecretKey,
    websocket: bool,
) -> Result<Conn, RelayError> {
    let unreachable = |why: String| RelayError::Unreachable {
        node: node.name.clone(),
        url: node.url(),
        why,
    };
    let addrs = node
        .derp_addrs()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if addrs.is_empty() {
        return Err(unreachable(
            "no address (IPv4 and IPv6 are both \"none\")".into(),
        ));
    }
    let mut tcp = None;
    let mut last = String::new();
    for a in &addrs {
        match TcpStream::connect(a).await {
            Ok(s) => {
                tcp = Some((s, *a));
                break;
            }
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    let Some((tcp, addr)) = tcp else {
        return Err(unreachable(last));
    };
    let _ = tcp.set_nodelay(true);
    let io: BoxIo = if node.uses_tls() {
        let (connector, sni) = crate::tls::connector(&opts.tls, node)?;
        let tls = connector
            .connect(sni, tcp)
            .await
            .map_err(|e| RelayError::Tls {
                node: node.name.clone(),
                url: node.url(),
                why: e.to_string(),
            })?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let (reader, writer, upgrade) = if websocket {
        let (r, w) = upgrade_ws(node, io).await?;
        (r, w, Upgrade::AlreadyUpgraded)
    } else {
        let (r, w) = tokio::io::split(io);
        let up = HttpUpgrade::new(
            node.host_port(),
            format!("ferry-client/{}", env!("CARGO_PKG_VERSION")),
        );
        (Reader::Io(r), Writer::Io(w), Upgrade::Http(up))
    };
    let conn = handshake(reader, writer, upgrade, secret, websocket, addr)
        .await
        .map_err(|e| match e {
            HandshakeFailure::Protocol(HandshakeError::Refused(r)) => RelayError::Refused {
                node: node.name.clone(),
                url: node.url(),
                status: r.status_line(),
            },
            other => RelayError::Handshake {
                node: node.name.clone(),
                url: node.url(),
                why: ferry_proto::error_chain(&other),
            },
        })?;
    debug!(node = %node.name, %addr, websocket, "connected to relay");
    Ok(conn)
}

async fn upgrade_ws(node: &Node, io: BoxIo) -> Result<(Reader, Writer), RelayError> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let scheme = if node.uses_tls() { "wss" } else { "ws" };
    let url = format!("{scheme}://{}/derp", node.host_port());
    let refused = |status: String| RelayError::Refused {
        node: node.name.clone(),
        url: node.url(),
        status,
    };
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| refused(format!("bad WebSocket URL {url}: {e}")))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static("derp"),
    );
    let (ws, _resp) = tokio_tungstenite::client_async_with_config(req, io, None)
        .await
        .map_err(|e| refused(format!("WebSocket upgrade: {e}")))?;
    let (w, r) = ws.split();
    Ok((Reader::Ws(r), Writer::Ws(w)))
}

/// Why the DERP handshake failed.
#[derive(Debug, thiserror::Error)]
enum HandshakeFailure {
    #[error(transparent)]
    Protocol(#[from] HandshakeError),
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
}

/// The upgrade (unless a WebSocket did it) and the DERP handshake, on ferry-proto's sans-IO
/// machine.
async fn handshake(
    mut reader: Reader,
    mut writer: Writer,
    upgrade: Upgrade,
    secret: &SecretKey,
    websocket: bool,
    remote: SocketAddr,
) -> Result<Conn, HandshakeFailure> {
    let info = ClientInfo {
        version: proto::PROTOCOL_VERSION,
        can_ack_pings: true,
        ..Default::default()
    };
    let (mut hs, first) = ClientHandshake::new(secret.clone(), info, upgrade);
    if !first.is_empty() {
        writer
            .write(&first)
            .await
            .map_err(|e| HandshakeFailure::Io("writing the upgrade request", e))?;
    }
    let mut buf = BytesMut::with_capacity(4096);
    let est = loop {
        match hs.feed(&mut buf)? {
            Step::NeedMore => {
                buf.reserve(hs.bytes_needed(&buf));
                let n = reader
                    .read_more(&mut buf)
                    .await
                    .map_err(|e| HandshakeFailure::Io("reading", e))?;
                if n == 0 {
                    return Err(hs.closed().into());
                }
            }
            Step::ServerKey { client_info, .. } => writer
                .write(&client_info)
                .await
                .map_err(|e| HandshakeFailure::Io("writing ClientInfo", e))?,
            Step::Established(e) => break e,
        }
    };
    Ok(Conn {
        reader,
        writer,
        buf,
        server_key: est.server_key,
        websocket,
        remote,
    })
}

struct Supervisor {
    region: u32,
    nodes: Vec<Node>,
    secret: SecretKey,
    opts: RelayOptions,
    websocket: bool,
    queue: Arc<SendQueue>,
    /// Whether this is the home region; the sender is the handle (gone: closed).
    preferred: watch::Receiver<bool>,
    events: mpsc::Sender<RelayEvent>,
    status: watch::Sender<RelayStatus>,
}

enum End {
    /// The connection broke.
    Lost(String),
    /// The relay said it is restarting: come back after this, keep trying for that long.
    Restarting(Duration, Duration),
    /// Every handle is gone.
    Closed,
}

impl Supervisor {
    async fn run(mut self, first: Conn) {
        let mut conn = first;
        let mut generation = 1u64;
        loop {
            let end = self.serve(&mut conn).await;
            self.status.send_modify(|s| s.connected = false);
            let (mut error, mut wait, mut restart_deadline) = match end {
                End::Closed => return,
                End::Lost(e) => (e, self.opts.backoff.delay(0), None),
                End::Restarting(after, try_for) => (
                    "the relay is restarting".to_string(),
                    after,
                    Some(tokio::time::Instant::now() + after + try_for),
                ),
            };
            let mut attempt = 0u32;
            conn = loop {
                warn!(region = self.region, retry_in = ?wait, "relay connection lost: {error}");
                if self
                    .events
                    .send(RelayEvent::Disconnected {
                        error: error.clone(),
                        retry_in: wait,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(wait).await;
                if self.preferred.has_changed().is_err() && self.events.is_closed() {
                    return;
                }
                match self.dial_any().await {
                    Ok(c) => break c,
                    Err(e) => {
                        error = e.to_string();
                        attempt += 1;
                        wait = match restart_deadline {
                            // While the relay restarts, retry quickly (it said when to come).
                            Some(d) if tokio::time::Instant::now() < d => self.opts.backoff.initial,
                            _ => {
                                restart_deadline = None;
                                self.opts.backoff.delay(attempt)
                            }
                        };
                    }
                }
            };
            generation += 1;
            info!(region = self.region, generation, "relay reconnected");
            self.status.send_replace(RelayStatus {
                connected: true,
                generation,
            });
            if self
                .events
                .send(RelayEvent::Connected {
                    generation,
                    websocket: conn.websocket,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }

    async fn dial_any(&mut self) -> Result<Conn, RelayError> {
        let mut first = None;
        for node in &self.nodes {
            match dial(node, &self.opts, &self.secret, &mut self.websocket).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Err(first.unwrap_or(RelayError::Closed))
    }

    /// Runs one connection until it ends.
    async fn serve(&mut self, conn: &mut Conn) -> End {
        let mut dec = FrameDecoder::new();
        let mut out: Vec<u8> = Vec::with_capacity(64 << 10);
        let mut restarting: Option<(Duration, Duration)> = None;
        if *self.preferred.borrow_and_update() {
            proto::put_frame(&mut out, ft::NOTE_PREFERRED, &[&[1]]);
        }
        let idle = tokio::time::sleep(READ_IDLE_TIMEOUT);
        tokio::pin!(idle);
        loop {
            if !out.is_empty() {
                match tokio::time::timeout(WRITE_TIMEOUT, conn.writer.write(&out)).await {
                    Ok(Ok(())) => out.clear(),
                    Ok(Err(e)) => return End::Lost(format!("write: {e}")),
                    Err(_) => return End::Lost(format!("write stalled for {WRITE_TIMEOUT:?}")),
                }
            }
            // Frames already buffered (e.g. right after the handshake) first.
            loop {
                let f = match dec.decode(&mut conn.buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return End::Lost(format!("bad frame from the relay: {e}")),
                };
                let frame = match ServerFrame::parse(f) {
                    Ok(f) => f,
                    Err(e) => return End::Lost(format!("bad frame from the relay: {e}")),
                };
                let ev = match frame {
                    ServerFrame::RecvPacket { src, packet } => {
                        RelayEvent::Packet { src, data: packet }
                    }
                    ServerFrame::PeerGone { key, reason } => {
                        RelayEvent::PeerGone { peer: key, reason }
                    }
                    ServerFrame::Ping(d) => {
                        proto::put_frame(&mut out, ft::PONG, &[&d]);
                        continue;
                    }
                    ServerFrame::Health(h) => RelayEvent::Health(h),
                    ServerFrame::UdpRelayEndpoint(mut r) => {
                        // A relay that advertises no address serves the session at the IP
                        // this connection reached: the caller always gets addresses.
                        if let Ok(ep) = &mut r.result {
                            if ep.addrs.is_empty() {
                                ep.addrs.push(SocketAddr::new(conn.remote.ip(), ep.port));
                            }
                        }
                        let tx = self.queue.pending.lock().expect("lock").remove(&r.id);
                        if let Some(tx) = tx {
                            let _ = tx.send(r.result);
                        }
                        continue;
                    }
                    ServerFrame::Restarting {
                        reconnect_in_ms,
                        try_for_ms,
                    } => {
                        restarting = Some((
                            Duration::from_millis(reconnect_in_ms.into()),
                            Duration::from_millis(try_for_ms.into()),
                        ));
                        continue;
                    }
                    ServerFrame::KeepAlive
                    | ServerFrame::Pong(_)
                    | ServerFrame::PeerPresent { .. }
                    | ServerFrame::Other(_) => continue,
                };
                if self.events.send(ev).await.is_err() {
                    return End::Closed;
                }
            }
            if !out.is_empty() {
                continue;
            }
            // Queued packets, batched into one write.
            self.take_queued(&mut out);
            if !out.is_empty() {
                continue;
            }
            tokio::select! {
                biased;
                r = conn.reader.read_more(&mut conn.buf) => match r {
                    Ok(0) | Err(_) if restarting.is_some() => {
                        let (a, b) = restarting.expect("checked");
                        return End::Restarting(a, b);
                    }
                    Ok(0) => return End::Lost("the relay closed the connection".into()),
                    Err(e) => return End::Lost(format!("read: {e}")),
                    Ok(_) => idle.as_mut().reset(tokio::time::Instant::now() + READ_IDLE_TIMEOUT),
                },
                // A push after take_queued left a permit: this completes at once.
                () = self.queue.ready.notified() => {}
                r = self.preferred.changed() => {
                    if r.is_err() {
                        return End::Closed;
                    }
                    let p = *self.preferred.borrow_and_update();
                    proto::put_frame(&mut out, ft::NOTE_PREFERRED, &[&[u8::from(p)]]);
                }
                _ = &mut idle => {
                    return End::Lost(format!("no frame from the relay for {READ_IDLE_TIMEOUT:?}"));
                }
            }
        }
    }

    /// Frames queued allocation requests and packets into `out`, oldest first, up to ~60 KiB
    /// (one write).
    fn take_queued(&mut self, out: &mut Vec<u8>) {
        let allocs: Vec<AllocRequest> = self.queue.allocs.lock().expect("lock").drain(..).collect();
        if !allocs.is_empty() {
            let pending = self.queue.pending.lock().expect("lock");
            // Only requests someone still waits for.
            for r in allocs.iter().filter(|r| pending.contains_key(&r.id)) {
                proto::put_frame(out, FRAME_ALLOCATE, &[&r.encode()]);
            }
        }
        let mut q = self.queue.packets.lock().expect("lock");
        while out.len() < 60 << 10 {
            let Some(p) = q.pop_front() else { break };
            proto::put_send_packet(out, &p.dst, &p.data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for n in 0..30 {
            let base = Duration::from_millis(100)
                .saturating_mul(1 << n.min(20))
                .min(Duration::from_secs(2));
            let d = b.delay(n);
            assert!(d >= base && d <= base.mul_f64(1.5), "n={n} d={d:?}");
        }
    }
}
