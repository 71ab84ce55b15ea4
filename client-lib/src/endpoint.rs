//! [`Endpoint`]: the application API. One node key, one relay map, one UDP socket.
//!
//! ```no_run
//! # async fn demo(map: ferry_client::RelayMap, peer: ferry_client::PublicKey) -> Result<(), Box<dyn std::error::Error>> {
//! use ferry_client::{Endpoint, EndpointConfig, SecretKey};
//! let ep = Endpoint::bind(EndpointConfig::new(SecretKey::generate(), map)).await?;
//! ep.send(peer, b"hello".to_vec()).await?;
//! let (from, data) = ep.recv().await?;
//! println!("{} sent {} bytes via {:?}", from, data.len(), ep.path(&from));
//! # Ok(()) }
//! ```
//!
//! What happens inside:
//!
//! 1. `bind` opens the UDP socket(s), runs [netcheck](crate::netcheck) from them to pick the
//!    home region (lowest STUN latency; if no STUN answers — UDP blocked — the lowest region
//!    id), connects to its relay and sends NotePreferred. If that relay is unreachable the
//!    next-fastest region is tried; only when none works does `bind` fail.
//! 2. `send` encrypts end to end ([e2e](crate::e2e): a Noise IK session with the peer, set up
//!    on first use; data sent meanwhile waits and goes out when the handshake completes) and
//!    hands the ciphertext to the relay of the peer's region: the region the peer was last
//!    heard from, or [`Endpoint::set_peer_region`], or our home region. Other regions'
//!    relays are connected on demand.
//! 3. Relayed packets are decrypted and authenticated; `recv` returns the plaintext. An
//!    in-band ping (`Endpoint::ping`) is answered automatically by the peer's endpoint.
//! 4. Direct paths ([disco](crate::disco)): sending to a peer that has no fresh direct path
//!    *probes* it, at most every [`DirectOptions::probe_interval`]: "punches" (pings with IP
//!    TTL 2: they open our NAT towards the peer but die before its NAT, so they leave no stale
//!    conntrack entry there) to the peer's known candidates, then a CallMeMaybe through the
//!    relay with our candidate endpoints (the STUN-mapped address, the socket's local
//!    addresses, addresses peers observed in pongs), flagged *punched* if it punched
//!    candidates the peer offered lately. A peer receiving a *punched* CallMeMaybe pings every
//!    endpoint in it at full TTL; receiving an unpunched one, it punches the endpoints and
//!    answers with a punched CallMeMaybe. A node pinged from a new address pings that address
//!    back (peer-reflexive): simultaneous open. A pong from the address (and socket) pinged
//!    makes it the peer's direct path. An easy NAT facing a hard one uses birthday probing
//!    (see `Actor::birthday_open`, docs/client.md).
//! 5. Data goes direct only while the last pong on that address is younger than
//!    [`DirectOptions::trust`]; once it is older than two heartbeats, data goes on both paths
//!    (the E2E replay window delivers it once); otherwise via the relay. Active peers' direct
//!    paths are pinged every [`DirectOptions::heartbeat`]. E2E packets are accepted from either
//!    path: over UDP a packet is attributed by the session index it carries (handshake
//!    initiations by the source address a disco message proved), then authenticated.
//!    **No loss on a path change:** packets sent direct-only are kept until a pong acknowledges
//!    them (a pong covers everything sent on that path before its ping; while data flows an
//!    "ack ping" goes out every 100 ms or 128 packets). A ping unanswered for 4 round trips
//!    (0.2–2 s) makes the path suspect: the kept packets go again via the relay (paced, 16 per
//!    2 ms, so the relay's per-client queue does not overflow) and data goes on both paths
//!    until a pong. Packets sent via the relay before a switch to direct arrive late but are
//!    accepted (reordering within the 8,192-packet replay window). The acknowledgement proves
//!    the path, not each packet: loss from congestion is the application's, as with any UDP.
//! 6. The path per peer is `Path::Direct(addr)` or `Path::Relay(region)` (the path data is
//!    sent on); each change is broadcast as a [`PathEvent`]. Netcheck runs again every
//!    20–26 s and moves the home region (with hysteresis).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_proto::{PublicKey, SecretKey};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::disco::{self, Message, TxId};
use crate::e2e::{self, E2eError, Sessions};
use crate::netcheck::{self, NetcheckOptions, Report};
use crate::relay::{
    Backoff, RelayClient, RelayError, RelayEvent, RelayOptions, RelayStatus, Transport,
};
use crate::relaymap::RelayMap;
use crate::tls::TlsOptions;
use crate::udp::{self, Datagram, Sockets};

/// Inner message types (inside the E2E plaintext).
const M_DATA: u8 = 0x00;
const M_PING: u8 = 0x01;
const M_PONG: u8 = 0x02;

/// Largest application payload per `send`.
pub const MAX_PAYLOAD: usize = e2e::MAX_PLAINTEXT - 1;

/// How to build an [`Endpoint`].
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// This node's private key (its public half is the node's address).
    pub secret_key: SecretKey,
    /// The relays.
    pub relay_map: RelayMap,
    /// Trust anchors for relays without a pin.
    pub tls: TlsOptions,
    /// DERP upgrade, WebSocket, or both (default: both).
    pub transport: Transport,
    /// Relay reconnect backoff.
    pub backoff: Backoff,
    /// The IPv4 UDP socket's address (default `0.0.0.0:0`).
    pub bind_v4: SocketAddr,
    /// The IPv6 UDP socket's address (default `[::]:0`; `None`: no IPv6 socket).
    pub bind_v6: Option<SocketAddr>,
    /// Use this home region instead of measuring.
    pub home_region: Option<u32>,
    /// Netcheck tuning.
    pub netcheck: NetcheckOptions,
    /// Re-run netcheck this often (plus up to 30 % jitter); `None`: only at start.
    pub restun_interval: Option<Duration>,
    /// Direct paths (disco).
    pub direct: DirectOptions,
}

/// Direct-path (disco) tuning.
#[derive(Debug, Clone, Copy)]
pub struct DirectOptions {
    /// Look for direct paths at all (`false`: relay only).
    pub enabled: bool,
    /// A direct path carries data while its last pong is younger than this (Tailscale:
    /// 6.5 s, `trustUDPAddrDuration`).
    pub trust: Duration,
    /// Ping an active peer's direct path this often (Tailscale: 3 s).
    pub heartbeat: Duration,
    /// While a peer has no direct path, send CallMeMaybe and ping its candidates this often.
    pub probe_interval: Duration,
    /// A peer is active (heartbeats, probes) this long after the last data to or from it
    /// (Tailscale: 45 s).
    pub active_timeout: Duration,
}

impl Default for DirectOptions {
    fn default() -> Self {
        DirectOptions {
            enabled: true,
            trust: Duration::from_millis(6500),
            heartbeat: Duration::from_secs(2),
            probe_interval: Duration::from_secs(5),
            active_timeout: Duration::from_secs(45),
        }
    }
}

impl EndpointConfig {
    /// Defaults for a node key and a map.
    pub fn new(secret_key: SecretKey, relay_map: RelayMap) -> Self {
        EndpointConfig {
            secret_key,
            relay_map,
            tls: TlsOptions::default(),
            transport: Transport::Auto,
            backoff: Backoff::default(),
            bind_v4: "0.0.0.0:0".parse().expect("literal"),
            bind_v6: Some("[::]:0".parse().expect("literal")),
            home_region: None,
            netcheck: NetcheckOptions::default(),
            restun_interval: Some(Duration::from_secs(20)),
            direct: DirectOptions::default(),
        }
    }
}

/// How packets to a peer travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Through the relay of this region.
    Relay(u32),
    /// Straight over UDP to this address of the peer.
    Direct(SocketAddr),
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Relay(r) => write!(f, "relay {r}"),
            Path::Direct(a) => write!(f, "direct {a}"),
        }
    }
}

/// A peer's path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathEvent {
    /// The peer.
    pub peer: PublicKey,
    /// The path before (`None`: first contact).
    pub old: Option<Path>,
    /// The path now.
    pub new: Path,
}

/// An answered [`Endpoint::ping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingReply {
    /// Round trip, including end-to-end encryption both ways.
    pub rtt: Duration,
    /// The path the reply came on.
    pub path: Path,
}

/// Why an endpoint operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The UDP socket could not be opened.
    #[error("cannot open the UDP socket on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// No relay region could be connected.
    #[error("no relay is reachable: {}", .0.iter().map(|(r, e)| format!("region {r}: {e}")).collect::<Vec<_>>().join("; "))]
    NoRelay(Vec<(u32, RelayError)>),
    /// The relay map has no relay node at all.
    #[error("the relay map has no relay node (only STUNOnly nodes?)")]
    NoRelayInMap,
    /// Encryption refused the packet.
    #[error(transparent)]
    E2e(#[from] E2eError),
    /// Payload too large.
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooBig(usize),
    /// The endpoint is closed.
    #[error("the endpoint is closed")]
    Closed,
}

enum Cmd {
    Send {
        peer: PublicKey,
        plaintext: Vec<u8>,
        done: oneshot::Sender<Result<(), EndpointError>>,
    },
    Ping {
        peer: PublicKey,
        done: oneshot::Sender<PingReply>,
    },
    SetPeerRegion(PublicKey, u32),
    RelayUp(u32, Result<RelayClient, RelayError>),
    Netcheck(Report),
}

/// A node on the ferry network. See the module docs.
#[derive(Debug)]
pub struct Endpoint {
    public: PublicKey,
    cmd: mpsc::Sender<Cmd>,
    recv: tokio::sync::Mutex<mpsc::Receiver<(PublicKey, Bytes)>>,
    shared: Arc<SharedState>,
    events: broadcast::Sender<PathEvent>,
    sockets: Arc<Sockets>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct SharedState {
    paths: Mutex<HashMap<PublicKey, Path>>,
    home: Mutex<Option<u32>>,
    report: Mutex<Option<Report>>,
    relay_status: Mutex<HashMap<u32, watch::Receiver<RelayStatus>>>,
    /// Test hook: drop every direct (UDP, non-STUN) datagram in and out.
    blackhole_direct: AtomicBool,
    sent_direct: AtomicU64,
    sent_relay: AtomicU64,
    resent_via_relay: AtomicU64,
}

/// Counters of end-to-end packets sent (data, pings and handshakes; not disco), since bind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Sent on a direct path.
    pub sent_direct: u64,
    /// Sent via a relay (including packets that went on both paths).
    pub sent_relay: u64,
    /// Sent direct, left unacknowledged when the direct path went quiet, and sent again via
    /// the relay (the peer drops the copies that did arrive).
    pub resent_via_relay: u64,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Endpoint {
    /// Opens the socket, measures, connects the home relay. See the module docs.
    pub async fn bind(cfg: EndpointConfig) -> Result<Endpoint, EndpointError> {
        if cfg
            .relay_map
            .regions()
            .all(|r| r.relay_nodes().next().is_none())
        {
            return Err(EndpointError::NoRelayInMap);
        }
        let (udp_tx, udp_rx) = mpsc::channel(1024);
        let sockets = Arc::new(
            Sockets::bind(cfg.bind_v4, cfg.bind_v6, Some(udp_tx.clone()))
                .await
                .map_err(|source| EndpointError::Bind {
                    addr: cfg.bind_v4,
                    source,
                })?,
        );
        let report = netcheck::run(&cfg.relay_map, &sockets, None, cfg.netcheck).await;
        // Order of regions to try for home: forced, then by latency, then the rest by id.
        let mut order: Vec<u32> = Vec::new();
        order.extend(cfg.home_region);
        order.extend(report.preferred_region);
        let mut by_lat: Vec<(Duration, u32)> = report
            .region_latency
            .iter()
            .map(|(r, d)| (*d, *r))
            .collect();
        by_lat.sort();
        order.extend(by_lat.into_iter().map(|(_, r)| r));
        order.extend(cfg.relay_map.regions().map(|r| r.id));
        let mut seen = std::collections::HashSet::new();
        order.retain(|r| seen.insert(*r));
        let opts = RelayOptions {
            tls: cfg.tls.clone(),
            transport: cfg.transport,
            backoff: cfg.backoff,
            preferred: true,
        };
        let mut errors = Vec::new();
        let mut home = None;
        for id in order {
            let Some(region) = cfg.relay_map.region(id) else {
                continue;
            };
            if region.relay_nodes().next().is_none() {
                continue;
            }
            match RelayClient::connect(region, cfg.secret_key.clone(), opts.clone()).await {
                Ok(c) => {
                    home = Some(c);
                    break;
                }
                Err(e) => {
                    warn!(region = id, "relay unreachable: {e}");
                    errors.push((id, e));
                    if cfg.home_region == Some(id) {
                        // A forced home that fails is an error of its own.
                        break;
                    }
                }
            }
        }
        let Some((home, home_events)) = home else {
            return Err(EndpointError::NoRelay(errors));
        };
        let home_id = home.region();
        info!(region = home_id, "home relay connected");
        let shared = Arc::new(SharedState::default());
        *shared.home.lock().expect("lock") = Some(home_id);
        *shared.report.lock().expect("lock") = Some(report);
        shared
            .relay_status
            .lock()
            .expect("lock")
            .insert(home_id, home.status());
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (recv_tx, recv_rx) = mpsc::channel(1024);
        let (ev_tx, _) = broadcast::channel(256);
        let (relay_tx, relay_rx) = mpsc::channel(1024);
        spawn_forwarder(home_id, home_events, relay_tx.clone());
        let public = cfg.secret_key.public();
        let local_endpoints = local_endpoints(&sockets.local_addrs());
        let actor = Actor {
            peers: HashMap::new(),
            paths: HashMap::new(),
            addr_peer: HashMap::new(),
            local_endpoints,
            observed: HashMap::new(),
            sessions: Sessions::new(cfg.secret_key.clone()),
            cfg,
            relays: HashMap::from([(home_id, home)]),
            connecting: HashMap::new(),
            peer_region: HashMap::new(),
            home: home_id,
            pings: HashMap::new(),
            recv_tx,
            events: ev_tx.clone(),
            shared: Arc::clone(&shared),
            relay_tx,
            resend: HashMap::new(),
            next_resend: None,
            extra: HashMap::new(),
            next_via: udp::MAIN + 1,
            udp_tx,
            birthday: None,
            spray: None,
            last_spray_any: None,
            cmd_tx: cmd_tx.clone(),
            sockets: Arc::clone(&sockets),
        };
        let task = tokio::spawn(actor.run(cmd_rx, relay_rx, udp_rx));
        Ok(Endpoint {
            public,
            cmd: cmd_tx,
            recv: tokio::sync::Mutex::new(recv_rx),
            shared,
            events: ev_tx,
            sockets,
            task,
        })
    }

    /// This node's public key: what peers send to.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Sends `data` to `peer`, end-to-end encrypted. Returns once it is queued to the relay.
    pub async fn send(&self, peer: PublicKey, data: Vec<u8>) -> Result<(), EndpointError> {
        if data.len() > MAX_PAYLOAD {
            return Err(EndpointError::TooBig(data.len()));
        }
        let mut plaintext = Vec::with_capacity(1 + data.len());
        plaintext.push(M_DATA);
        plaintext.extend_from_slice(&data);
        let (done, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Send {
                peer,
                plaintext,
                done,
            })
            .await
            .map_err(|_| EndpointError::Closed)?;
        rx.await.map_err(|_| EndpointError::Closed)?
    }

    /// The next packet from any peer: its sender (proven end to end) and plaintext.
    pub async fn recv(&self) -> Result<(PublicKey, Bytes), EndpointError> {
        self.recv
            .lock()
            .await
            .recv()
            .await
            .ok_or(EndpointError::Closed)
    }

    /// Sends an end-to-end ping to `peer` and waits for the pong (no timeout: wrap it in
    /// `tokio::time::timeout`). The peer's endpoint answers by itself.
    pub async fn ping(&self, peer: PublicKey) -> Result<PingReply, EndpointError> {
        let (done, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Ping { peer, done })
            .await
            .map_err(|_| EndpointError::Closed)?;
        rx.await.map_err(|_| EndpointError::Closed)
    }

    /// Reach `peer` through `region`'s relay (its home), until it is heard from elsewhere.
    pub async fn set_peer_region(&self, peer: PublicKey, region: u32) {
        let _ = self.cmd.send(Cmd::SetPeerRegion(peer, region)).await;
    }

    /// The current path to `peer`, once there was traffic.
    pub fn path(&self, peer: &PublicKey) -> Option<Path> {
        self.shared.paths.lock().expect("lock").get(peer).copied()
    }

    /// Path changes of every peer, from now on.
    pub fn path_events(&self) -> broadcast::Receiver<PathEvent> {
        self.events.subscribe()
    }

    /// The home region.
    pub fn home_region(&self) -> Option<u32> {
        *self.shared.home.lock().expect("lock")
    }

    /// The latest netcheck report.
    pub fn netcheck_report(&self) -> Option<Report> {
        self.shared.report.lock().expect("lock").clone()
    }

    /// The connection state of a region's relay (once connected), to wait for reconnects.
    pub fn relay_status(&self, region: u32) -> Option<watch::Receiver<RelayStatus>> {
        self.shared
            .relay_status
            .lock()
            .expect("lock")
            .get(&region)
            .cloned()
    }

    /// Packet counters.
    pub fn stats(&self) -> EndpointStats {
        let s = &self.shared;
        EndpointStats {
            sent_direct: s.sent_direct.load(Ordering::Relaxed),
            sent_relay: s.sent_relay.load(Ordering::Relaxed),
            resent_via_relay: s.resent_via_relay.load(Ordering::Relaxed),
        }
    }

    /// The UDP sockets' local addresses.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets.local_addrs()
    }

    /// Test hook: while `on`, every direct datagram (disco and data over UDP, not STUN) is
    /// dropped in both directions, as if the direct path were cut.
    #[doc(hidden)]
    pub fn set_direct_blackhole(&self, on: bool) {
        self.shared.blackhole_direct.store(on, Ordering::Relaxed);
    }
}

/// The addresses to offer peers for our sockets: specified local addresses as they are; for
/// a wildcard socket, the source address the OS would pick towards the internet (a routing
/// lookup; `connect` on UDP sends nothing). Listing every interface is not done yet.
fn local_endpoints(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for a in addrs {
        if !a.ip().is_unspecified() {
            out.push(*a);
            continue;
        }
        let (bind, probe): (SocketAddr, SocketAddr) = if a.is_ipv4() {
            (([0, 0, 0, 0], 0).into(), ([192, 0, 2, 1], 9).into())
        } else {
            (
                "[::]:0".parse().expect("literal"),
                "[2001:db8::1]:9".parse().expect("literal"),
            )
        };
        let ip = std::net::UdpSocket::bind(bind)
            .and_then(|s| s.connect(probe).and_then(|()| s.local_addr()))
            .map(|l| l.ip());
        if let Ok(ip) = ip {
            if !ip.is_unspecified() {
                out.push(SocketAddr::new(ip, a.port()));
            }
        }
    }
    out
}

/// Most candidate addresses kept per peer.
const MAX_CANDIDATES: usize = 64;
/// Most UDP source addresses remembered as some peer's.
const MAX_ADDR_PEER: usize = 4096;
/// A peer with no traffic, no probe and no direct path for this long is forgotten (its
/// `Endpoint::path` becomes `None`; its E2E session lives on in `Sessions`).
const PEER_IDLE: Duration = Duration::from_secs(600);
/// How often [`Actor::prune`] runs.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Most of our own addresses learned from pongs.
const MAX_OBSERVED: usize = 8;
/// Candidates and observed addresses not offered or seen again for this long are forgotten.
const ADDR_TTL: Duration = Duration::from_secs(120);
/// IP TTL of hole-punching pings (`Actor::punch`): past our own NAT router (one
/// hop) but not across the Internet to the peer's NAT.
const PUNCH_TTL: u32 = 2;

/// Whether `last` happened less than `window` before `now` (`None`: never). The rate limits
/// and activity checks of the actor.
fn recent(last: Option<Instant>, window: Duration, now: Instant) -> bool {
    last.is_some_and(|t| now.saturating_duration_since(t) < window)
}

/// Records `a` as seen `now`; evicts the stalest entry beyond `max`. True if `a` was new.
fn remember(m: &mut HashMap<SocketAddr, Instant>, a: SocketAddr, now: Instant, max: usize) -> bool {
    let new = m.insert(a, now).is_none();
    if m.len() > max {
        if let Some(oldest) = m.iter().min_by_key(|(_, t)| **t).map(|(a, _)| *a) {
            m.remove(&oldest);
        }
    }
    new
}

/// Most E2E packets kept for a resend (see [`PeerDisco::unacked`]); beyond it packets go on
/// both paths. Well inside the receiver's replay window ([`e2e::REPLAY_WINDOW`]).
const MAX_UNACKED: usize = 4096;
/// Most bytes kept for a resend.
const MAX_UNACKED_BYTES: usize = 4 << 20;
/// While data goes direct, ping the path (an "ack ping") when the oldest unacknowledged
/// packet is this old ...
const ACK_INTERVAL: Duration = Duration::from_millis(100);
/// ... or this many packets are unacknowledged.
const ACK_COUNT: usize = 128;
/// An ack ping unanswered for `ACK_RTTS` round trips (at least `ACK_TIMEOUT_MIN`) makes the
/// direct path suspect.
const ACK_RTTS: u32 = 4;
const ACK_TIMEOUT_MIN: Duration = Duration::from_millis(200);
const ACK_TIMEOUT_MAX: Duration = Duration::from_secs(2);

/// A ping to an address is not repeated for this long (disco answers take one round trip).
const PING_AGAIN_AFTER: Duration = Duration::from_millis(500);

/// Ack pings up to this size are not "padded" (a lost one says nothing about packet sizes).
const SMALL_PING_MAX: usize = 1_280;
/// How long packets of a size the direct path lost go on both paths before it is tried again.
const TOO_BIG_RETRY: Duration = Duration::from_secs(30);

/// At most one answer per peer to its unpunched CallMeMaybes this often (they come at most
/// every `probe_interval` from a well-behaved peer).
const RESPONSE_INTERVAL: Duration = Duration::from_secs(1);

/// Resends via the relay go out at most this many per peer ...
const RESEND_BURST: usize = 16;
/// ... per this long (8,000 packets/s per peer; 4,096 packets in about half a second).
const RESEND_GAP: Duration = Duration::from_millis(2);

/// Completes at `at`; never, with `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Birthday probing (an easy NAT facing a hard one): the hard side opens this many sockets,
/// each punching a mapping towards the easy side's endpoint ...
const BIRTHDAY_SOCKETS: usize = 256;
/// ... and the easy side pings this many random ports of the hard side's address. With 256 of
/// the 64,512 ports 1024–65535 open, 1024 probes hit one with probability
/// 1 − (1 − 256/64512)^1024 ≈ 98 %.
const BIRTHDAY_PROBES: usize = 1024;
/// Probes per second (1024 take about 2 s; about 120 kB/s of disco pings).
const BIRTHDAY_RATE: u64 = 500;
/// The hard side keeps unused birthday sockets this long (the probes follow within ~2 s of
/// its CallMeMaybe; Linux keeps an unanswered UDP mapping for 30 s).
const BIRTHDAY_HOLD: Duration = Duration::from_secs(10);

/// Fewer free descriptors than this for the sockets: no birthday session.
const BIRTHDAY_SOCKETS_MIN: usize = 32;

/// How many birthday sockets to open: [`BIRTHDAY_SOCKETS`], or half of the file descriptors
/// still free under the soft `RLIMIT_NOFILE` if that is less (the relay connections, netcheck
/// and the application need the rest).
fn birthday_socket_budget() -> usize {
    #[cfg(target_os = "linux")]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
        } else {
            1024
        };
        let open = std::fs::read_dir("/proc/self/fd").map_or(soft / 2, |d| d.count());
        BIRTHDAY_SOCKETS.min(soft.saturating_sub(open) / 2)
    }
    #[cfg(not(target_os = "linux"))]
    {
        BIRTHDAY_SOCKETS
    }
}

/// The easy side's probes towards a hard peer.
#[derive(Debug)]
struct Spray {
    peer: PublicKey,
    targets: Vec<SocketAddr>,
    sent: usize,
    started: Instant,
}

/// Whether `a` is a public IPv4 address (a NAT's outside), the only kind birthday probing aims
/// at.
fn is_public_v4(a: &SocketAddr) -> bool {
    match a.ip() {
        std::net::IpAddr::V4(ip) => {
            !(ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || ip.is_multicast())
        }
        std::net::IpAddr::V6(_) => false,
    }
}

/// `n` distinct random ports in 1024–65535 for each of `ips`, skipping `known`, interleaved
/// across the addresses.
fn spray_targets(ips: &[std::net::IpAddr], n: usize, known: &[SocketAddr]) -> Vec<SocketAddr> {
    use rand::seq::SliceRandom;
    let mut per_ip: Vec<Vec<SocketAddr>> = ips
        .iter()
        .map(|ip| {
            let mut ports: Vec<u16> = (1024..=65535)
                .filter(|p| !known.contains(&SocketAddr::new(*ip, *p)))
                .collect();
            ports.shuffle(&mut rand::thread_rng());
            ports
                .into_iter()
                .take(n.div_ceil(ips.len().max(1)))
                .map(|p| SocketAddr::new(*ip, p))
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    while out.len() < n && per_ip.iter().any(|v| !v.is_empty()) {
        for v in &mut per_ip {
            if let Some(a) = v.pop() {
                out.push(a);
            }
        }
    }
    out.truncate(n);
    out
}

/// A disco ping in flight.
#[derive(Debug, Clone, Copy)]
struct PingSent {
    addr: SocketAddr,
    /// The socket it went from ([`udp::MAIN`] or a birthday socket).
    via: u32,
    at: Instant,
    /// [`PeerDisco::next_seq`] when it was sent: its pong acknowledges the direct-only packets
    /// numbered below.
    mark: u64,
}

/// What the endpoint knows about one peer's direct paths.
#[derive(Debug, Default)]
struct PeerDisco {
    /// Addresses to ping: from CallMeMaybe and peer-reflexive (sources of its pings).
    /// Each with when it was last offered or seen; bounded (`MAX_CANDIDATES`, `ADDR_TTL`).
    candidates: HashMap<SocketAddr, Instant>,
    /// Pings in flight (kept for `trust`).
    pings: HashMap<TxId, PingSent>,
    /// The direct path and its last pong.
    best: Option<(SocketAddr, Instant)>,
    /// The socket of the direct path ([`udp::MAIN`], or the birthday socket that found it).
    best_via: u32,
    /// Last birthday session opened for this peer (we are the hard side).
    last_birthday: Option<Instant>,
    /// Last birthday spray towards this peer (we are the easy side).
    last_spray: Option<Instant>,
    /// Whether the peer's last CallMeMaybe said its NAT is hard.
    peer_hard: Option<bool>,
    /// Last CallMeMaybe we sent in answer to an unpunched one.
    last_response: Option<Instant>,
    last_probe: Option<Instant>,
    last_heartbeat: Option<Instant>,
    /// Last data to or from the peer.
    last_active: Option<Instant>,
    /// E2E packets sent on the direct path only and not yet acknowledged, oldest first, with
    /// when they were sent. A pong from the direct path acknowledges every packet sent before
    /// its ping (one path keeps its order); a ping unanswered for the ack timeout resends them
    /// all via the relay (the peer's replay window drops those that did arrive). This is what
    /// makes a direct path that dies without warning lose nothing.
    unacked: VecDeque<(Instant, Bytes)>,
    unacked_bytes: usize,
    /// Number of the next direct-only packet (the front of `unacked` is
    /// `next_seq - unacked.len()`).
    next_seq: u64,
    /// Since when a ping to `best` waits for its pong (`None`: none waits).
    awaiting: Option<Instant>,
    /// An ack ping went unanswered: data goes on both paths until the next pong.
    suspect: bool,
    /// Latest direct round trip.
    rtt: Option<Duration>,
    /// The largest packet kept since the last ping on the direct path: the next ack ping is
    /// padded to it, so a path that loses large datagrams (dropped IP fragments) loses the
    /// ping too, and the packets are resent instead of acknowledged.
    big_since_ping: usize,
    /// Size of the padded ack ping that is awaited (0: none or unpadded).
    awaiting_pad: usize,
    /// A padded ack ping of this size went unanswered (at that time): packets this large go
    /// on both paths for [`TOO_BIG_RETRY`] (or until the direct path changes) — the path
    /// loses them (e.g. it drops IP fragments), and resending each batch after an ack timeout
    /// would be slow. Then large packets are tried direct again (a lost ping may have been
    /// bad luck).
    too_big: Option<(usize, Instant)>,
}

impl PeerDisco {
    /// Whether a ping to `addr` from `via` went out within [`PING_AGAIN_AFTER`] (pings stay
    /// in flight for `trust`, 6.5 s: one sent into an outage must not stop the pings that
    /// heal the path once it is over).
    fn pinged_lately(&self, addr: SocketAddr, via: u32, now: Instant) -> bool {
        self.pings.values().any(|p| {
            p.addr == addr && p.via == via && now.saturating_duration_since(p.at) < PING_AGAIN_AFTER
        })
    }

    fn is_best(&self, addr: SocketAddr, via: u32) -> bool {
        self.best.is_some_and(|(b, _)| b == addr) && self.best_via == via
    }

    /// Keeps `pkt` for a resend; false when the buffer is full (send it on both paths).
    fn keep_unacked(&mut self, pkt: &Bytes, now: Instant) -> bool {
        if self.unacked.len() >= MAX_UNACKED || self.unacked_bytes + pkt.len() > MAX_UNACKED_BYTES {
            return false;
        }
        self.unacked_bytes += pkt.len();
        self.big_since_ping = self.big_since_ping.max(pkt.len());
        self.unacked.push_back((now, pkt.clone()));
        self.next_seq += 1;
        true
    }

    /// Forgets the packets numbered below `mark` (a pong acknowledged them).
    fn ack(&mut self, mark: u64) {
        while !self.unacked.is_empty() && self.next_seq - (self.unacked.len() as u64) < mark {
            if let Some((_, p)) = self.unacked.pop_front() {
                self.unacked_bytes -= p.len();
            }
        }
    }

    /// Takes every unacknowledged packet (to resend them via the relay).
    fn take_unacked(&mut self) -> Vec<Bytes> {
        self.unacked_bytes = 0;
        self.unacked.drain(..).map(|(_, p)| p).collect()
    }

    fn ack_timeout(&self) -> Duration {
        self.rtt
            .map_or(ACK_TIMEOUT_MIN, |r| r * ACK_RTTS)
            .clamp(ACK_TIMEOUT_MIN, ACK_TIMEOUT_MAX)
    }
}

fn spawn_forwarder(
    region: u32,
    mut events: crate::relay::RelayEvents,
    tx: mpsc::Sender<(u32, RelayEvent)>,
) {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if tx.send((region, ev)).await.is_err() {
                return;
            }
        }
    });
}

struct Actor {
    cfg: EndpointConfig,
    peers: HashMap<PublicKey, PeerDisco>,
    /// The path per peer (the actor's copy of `SharedState::paths`, which it alone writes).
    paths: HashMap<PublicKey, Path>,
    /// UDP source address → the peer a disco message from it proved.
    /// Bounded ([`MAX_ADDR_PEER`], [`ADDR_TTL`]). Only a fallback: E2E data names its session.
    addr_peer: HashMap<SocketAddr, (PublicKey, Instant)>,
    /// Our socket addresses as offered to peers.
    local_endpoints: Vec<SocketAddr>,
    /// Our addresses as peers saw them (from pongs).
    /// Bounded (`MAX_OBSERVED`, `ADDR_TTL`): a peer can claim anything in a pong.
    observed: HashMap<SocketAddr, Instant>,
    sessions: Sessions,
    relays: HashMap<u32, RelayClient>,
    /// Packets waiting for a region's relay to connect.
    connecting: HashMap<u32, Vec<(PublicKey, Bytes)>>,
    peer_region: HashMap<PublicKey, u32>,
    home: u32,
    pings: HashMap<u64, (Instant, oneshot::Sender<PingReply>)>,
    recv_tx: mpsc::Sender<(PublicKey, Bytes)>,
    events: broadcast::Sender<PathEvent>,
    shared: Arc<SharedState>,
    relay_tx: mpsc::Sender<(u32, RelayEvent)>,
    /// Packets waiting to go via the relay — unacknowledged direct packets (`true`) and
    /// packets flushed after a handshake — paced
    /// ([`RESEND_BURST`] per [`RESEND_GAP`]): a burst would overflow the relay's per-client
    /// queue (32 packets in derper; in ferry 32 or 128 KiB, whichever holds more) and be
    /// dropped there.
    resend: HashMap<PublicKey, VecDeque<(Bytes, bool)>>,
    next_resend: Option<tokio::time::Instant>,
    /// Birthday sockets by id ([`Datagram::via`]) with their reader tasks.
    extra: HashMap<u32, (Arc<tokio::net::UdpSocket>, tokio::task::JoinHandle<()>)>,
    next_via: u32,
    /// Where the readers of birthday sockets deliver.
    udp_tx: mpsc::Sender<Datagram>,
    /// Hard side: the running birthday session (its sockets stay open until then).
    birthday: Option<(PublicKey, Instant)>,
    /// Easy side: the running spray, and when the last one started.
    spray: Option<Spray>,
    last_spray_any: Option<Instant>,
    cmd_tx: mpsc::Sender<Cmd>,
    sockets: Arc<Sockets>,
}

impl Drop for Actor {
    fn drop(&mut self) {
        for (_, reader) in self.extra.values() {
            reader.abort();
        }
    }
}

impl Actor {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut relay_rx: mpsc::Receiver<(u32, RelayEvent)>,
        mut udp_rx: mpsc::Receiver<Datagram>,
    ) {
        // Often enough to notice an overdue ack ping (ACK_TIMEOUT_MIN) while no data is sent.
        let period = (ACK_TIMEOUT_MIN / 2).min(self.cfg.direct.heartbeat / 2);
        let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_restun = self.restun_at();
        let mut last_prune = Instant::now();
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(c) => self.on_cmd(c).await,
                    None => return,
                },
                Some((region, ev)) = relay_rx.recv() => self.on_relay(region, ev).await,
                Some(d) = udp_rx.recv() => self.on_udp(d).await,
                _ = sleep_until_some(self.next_resend) => self.drain_resends().await,
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.disco_tick(now).await;
                    if now.saturating_duration_since(last_prune) >= PRUNE_EVERY {
                        last_prune = now;
                        self.prune(now);
                    }
                    for (peer, pkt) in self.sessions.poll(now) {
                        self.send_to_peer(peer, pkt.into()).await;
                    }
                    self.pings.retain(|_, (_, tx)| !tx.is_closed());
                    if next_restun.is_some_and(|t| t <= now) {
                        next_restun = self.restun_at();
                        self.spawn_netcheck();
                    }
                }
            }
        }
    }

    fn restun_at(&self) -> Option<Instant> {
        self.cfg
            .restun_interval
            .map(|i| Instant::now() + i + i.mul_f64(rand::random::<f64>() * 0.3))
    }

    fn spawn_netcheck(&self) {
        let map = self.cfg.relay_map.clone();
        let sockets = Arc::clone(&self.sockets);
        let opts = self.cfg.netcheck;
        let prev = Some(self.home);
        let tx = self.cmd_tx.clone();
        tokio::spawn(async move {
            let r = netcheck::run(&map, &sockets, prev, opts).await;
            let _ = tx.send(Cmd::Netcheck(r)).await;
        });
    }

    async fn on_cmd(&mut self, c: Cmd) {
        match c {
            Cmd::Send {
                peer,
                plaintext,
                done,
            } => {
                self.peers.entry(peer).or_default().last_active = Some(Instant::now());
                let r = self.seal_and_send(peer, &plaintext).await;
                let _ = done.send(r);
            }
            Cmd::Ping { peer, done } => {
                self.peers.entry(peer).or_default().last_active = Some(Instant::now());
                let id: u64 = rand::random();
                self.pings.insert(id, (Instant::now(), done));
                let mut m = vec![M_PING];
                m.extend_from_slice(&id.to_be_bytes());
                if let Err(e) = self.seal_and_send(peer, &m).await {
                    debug!("ping to {} not sent: {e}", peer.short());
                    self.pings.remove(&id);
                }
            }
            Cmd::SetPeerRegion(peer, region) => {
                self.peer_region.insert(peer, region);
            }
            Cmd::RelayUp(region, r) => {
                let waiting = self.connecting.remove(&region).unwrap_or_default();
                match r {
                    Ok(client) => {
                        self.shared
                            .relay_status
                            .lock()
                            .expect("lock")
                            .insert(region, client.status());
                        for (peer, pkt) in waiting {
                            let _ = client.send(peer, pkt).await;
                        }
                        self.relays.insert(region, client);
                    }
                    Err(e) => warn!(
                        region,
                        dropped = waiting.len(),
                        "cannot reach the peer's relay region: {e}"
                    ),
                }
            }
            Cmd::Netcheck(report) => {
                let new_home = report.preferred_region;
                *self.shared.report.lock().expect("lock") = Some(report);
                if let Some(h) = new_home.filter(|h| *h != self.home) {
                    self.change_home(h).await;
                }
            }
        }
    }

    async fn change_home(&mut self, new: u32) {
        info!(old = self.home, new, "home relay changes");
        if let Some(old) = self.relays.get(&self.home) {
            let _ = old.note_preferred(false).await;
        }
        self.home = new;
        *self.shared.home.lock().expect("lock") = Some(new);
        match self.relays.get(&new) {
            Some(c) => {
                let _ = c.note_preferred(true).await;
            }
            None => self.connect_region(new, true),
        }
    }

    fn connect_region(&mut self, region: u32, preferred: bool) {
        if self.connecting.contains_key(&region) {
            return;
        }
        self.connecting.insert(region, Vec::new());
        let Some(r) = self.cfg.relay_map.region(region).cloned() else {
            return;
        };
        let opts = RelayOptions {
            tls: self.cfg.tls.clone(),
            transport: self.cfg.transport,
            backoff: self.cfg.backoff,
            preferred,
        };
        let secret = self.cfg.secret_key.clone();
        let cmd_tx = self.cmd_tx.clone();
        let relay_tx = self.relay_tx.clone();
        tokio::spawn(async move {
            let r = match RelayClient::connect(&r, secret, opts).await {
                Ok((client, events)) => {
                    spawn_forwarder(region, events, relay_tx);
                    Ok(client)
                }
                Err(e) => Err(e),
            };
            let _ = cmd_tx.send(Cmd::RelayUp(region, r)).await;
        });
    }

    async fn seal_and_send(
        &mut self,
        peer: PublicKey,
        plaintext: &[u8],
    ) -> Result<(), EndpointError> {
        let pkts = self.sessions.seal(&peer, plaintext, Instant::now())?;
        for p in pkts {
            self.send_to_peer(peer, p.into()).await;
        }
        Ok(())
    }

    fn region_for(&self, peer: &PublicKey) -> u32 {
        self.peer_region.get(peer).copied().unwrap_or(self.home)
    }

    /// The direct address to use for `peer` now, the socket to send from, and whether to send
    /// on the relay too.
    fn direct_for(&self, peer: &PublicKey, now: Instant) -> Option<(SocketAddr, u32, bool)> {
        let d = self.cfg.direct;
        let st = self.peers.get(peer)?;
        let (addr, pong) = st.best?;
        let age = now.saturating_duration_since(pong);
        (age < d.trust).then_some((addr, st.best_via, age > d.heartbeat * 2))
    }

    /// Sends an E2E packet to `peer` on its current path (see the module docs, 5.).
    async fn send_to_peer(&mut self, peer: PublicKey, pkt: Bytes) {
        let now = Instant::now();
        match self.direct_for(&peer, now) {
            Some((addr, via, stale)) => {
                self.set_path(peer, Path::Direct(addr));
                self.send_direct(via, addr, &pkt).await;
                self.shared.sent_direct.fetch_add(1, Ordering::Relaxed);
                let st = self.peers.entry(peer).or_default();
                // Unsure of the path (stale or suspect), a packet the path lost at this size,
                // or no room to keep the packet for a resend: the relay carries it too.
                if st
                    .too_big
                    .is_some_and(|(_, t)| now.saturating_duration_since(t) >= TOO_BIG_RETRY)
                {
                    st.too_big = None;
                }
                let too_big = st.too_big.is_some_and(|(b, _)| pkt.len() >= b);
                if stale || st.suspect || too_big || !st.keep_unacked(&pkt, now) {
                    self.shared.sent_relay.fetch_add(1, Ordering::Relaxed);
                    self.send_relay(peer, pkt).await;
                }
                self.check_acks(peer, addr, via, now).await;
            }
            None => {
                let region = self.region_for(&peer);
                self.set_path(peer, Path::Relay(region));
                self.shared.sent_relay.fetch_add(1, Ordering::Relaxed);
                self.send_relay(peer, pkt).await;
                self.maybe_probe(peer, now).await;
            }
        }
    }

    /// Sends a packet to `peer` through the relay of its region.
    async fn send_relay(&mut self, peer: PublicKey, pkt: Bytes) {
        let region = self.region_for(&peer);
        match self.relays.get(&region) {
            Some(c) => {
                if let Err(e) = c.send(peer, pkt).await {
                    warn!(region, "relay send failed: {e}");
                }
            }
            None => {
                if self.cfg.relay_map.region(region).is_none() {
                    warn!(region, "peer's region is not in the relay map; using home");
                    self.peer_region.remove(&peer);
                    if let Some(c) = self.relays.get(&self.home) {
                        let _ = c.send(peer, pkt).await;
                    }
                    return;
                }
                self.connect_region(region, false);
                if let Some(q) = self.connecting.get_mut(&region) {
                    q.push((peer, pkt));
                }
            }
        }
    }

    /// Sends a datagram straight to `addr` from the data socket (`via` = [`udp::MAIN`]) or
    /// from one of the birthday sockets.
    async fn send_direct(&self, via: u32, addr: SocketAddr, pkt: &[u8]) {
        if self.shared.blackhole_direct.load(Ordering::Relaxed) {
            return;
        }
        let sock = if via == udp::MAIN {
            self.sockets.for_addr(&addr)
        } else {
            self.extra.get(&via).map(|(s, _)| s)
        };
        let Some(sock) = sock else {
            return;
        };
        if let Err(e) = sock.send_to(pkt, addr).await {
            debug!(%addr, "direct send failed: {e}");
        }
    }

    /// Whether netcheck found our NAT hard (mapping varies by destination).
    fn my_nat_hard(&self) -> bool {
        self.shared
            .report
            .lock()
            .expect("lock")
            .as_ref()
            .is_some_and(|r| r.mapping_varies_by_dest_ip == Some(true))
    }

    /// Birthday probing, hard side: opens [`BIRTHDAY_SOCKETS`] sockets and punches (TTL 2,
    /// like [`Actor::punch`]) from each towards the peer's public IPv4 endpoints, so the NAT
    /// holds that many mappings to them; the peer's random-port probes that hit one come in on
    /// that socket, which then carries the path. At most once per `probe_interval` per peer
    /// and one session at a time. Returns whether it opened a session.
    async fn birthday_open(
        &mut self,
        peer: PublicKey,
        endpoints: &[SocketAddr],
        now: Instant,
    ) -> bool {
        let targets: Vec<SocketAddr> = endpoints
            .iter()
            .copied()
            .filter(is_public_v4)
            .take(2)
            .collect();
        if targets.is_empty() || self.birthday.is_some_and(|(p, t)| p != peer && t > now) {
            return false;
        }
        let interval = self.cfg.direct.probe_interval;
        let st = self.peers.entry(peer).or_default();
        if recent(st.last_birthday, interval, now) {
            return false;
        }
        st.last_birthday = Some(now);
        // A new session replaces the last one: close its sockets that found nothing.
        self.birthday = None;
        self.close_unused_sockets(now);
        let want = birthday_socket_budget();
        if want < BIRTHDAY_SOCKETS_MIN {
            warn!(
                sockets = want,
                "birthday probing skipped: too few file descriptors left (raise `ulimit -n`)"
            );
            return false;
        }
        self.birthday = Some((peer, now + BIRTHDAY_HOLD));
        let ip = self
            .sockets
            .v4
            .local_addr()
            .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |a| {
                a.ip()
            });
        let mut opened = 0;
        for _ in 0..want {
            // The socket that is hit carries the path: the data sockets' buffers.
            let sock = match udp::bind_udp(SocketAddr::new(ip, 0)) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    warn!("birthday probing: cannot open more sockets after {opened}: {e}");
                    break;
                }
            };
            let via = self.next_via;
            self.next_via = self.next_via.wrapping_add(1).max(udp::MAIN + 1);
            let reader = udp::spawn_reader(
                Arc::clone(&sock),
                Arc::clone(&self.sockets.stun),
                Some(self.udp_tx.clone()),
                via,
            );
            let msg = Message::Ping {
                txid: disco::new_txid(),
                node_key: self.cfg.secret_key.public(),
            };
            let pkt = disco::seal(&self.cfg.secret_key, &peer, &msg);
            let old = sock.ttl().unwrap_or(64);
            let _ = sock.set_ttl(PUNCH_TTL);
            self.extra.insert(via, (Arc::clone(&sock), reader));
            for t in &targets {
                self.send_direct(via, *t, &pkt).await;
            }
            let _ = sock.set_ttl(old);
            opened += 1;
        }
        info!(peer = %peer.short(), sockets = opened, ?targets, "birthday probing: hard side opened its mappings");
        opened > 0
    }

    /// Birthday probing, easy side: starts pinging random ports of the hard peer's public
    /// IPv4 addresses ([`BIRTHDAY_PROBES`] at [`BIRTHDAY_RATE`], driven by the tick). At most
    /// once per `probe_interval` per peer, one spray at a time.
    fn spray_start(&mut self, peer: PublicKey, endpoints: &[SocketAddr], now: Instant) {
        let mut ips: Vec<std::net::IpAddr> = endpoints
            .iter()
            .filter(|a| is_public_v4(a))
            .map(|a| a.ip())
            .collect();
        ips.sort();
        ips.dedup();
        ips.truncate(2);
        if ips.is_empty() || self.spray.is_some() {
            return;
        }
        // A little under the hard side's once per probe_interval, so timing jitter does not
        // make us skip every other session it opens.
        let interval = self.cfg.direct.probe_interval.mul_f64(0.8);
        let active_timeout = self.cfg.direct.active_timeout;
        // 1,024 pings at an address the peer names: only for an active peer — one we sent to
        // or got authenticated data from lately, or that has proven its key in a Noise
        // handshake (the relay queues disco apart from data, so its CallMeMaybe can overtake
        // its first data) — and at most one spray per 0.8 × probe_interval in all, so a
        // node-key holder cannot make us a steady amplifier against a third party (at worst
        // about 250 pings/s for this whole node).
        let has_session = self.sessions.has_session(&peer);
        let st = self.peers.entry(peer).or_default();
        if recent(st.last_spray, interval, now) {
            return;
        }
        let active = recent(st.last_active, active_timeout, now);
        if !(has_session || active) || recent(self.last_spray_any, interval, now) {
            debug!(peer = %peer.short(), "no birthday spray: peer not active, or a spray ran just now");
            return;
        }
        st.last_spray = Some(now);
        self.last_spray_any = Some(now);
        let targets = spray_targets(&ips, BIRTHDAY_PROBES, endpoints);
        info!(peer = %peer.short(), ?ips, probes = targets.len(), "birthday probing: easy side probes random ports");
        self.spray = Some(Spray {
            peer,
            targets,
            sent: 0,
            started: now,
        });
    }

    /// Sends the spray's probes that are due; ends it when done or when the path is found.
    async fn spray_step(&mut self, now: Instant) {
        let Some(sp) = self.spray.as_mut() else {
            return;
        };
        let peer = sp.peer;
        let found = self.peers.get(&peer).is_none_or(|st| st.best.is_some());
        if found || sp.sent >= sp.targets.len() {
            debug!(peer = %peer.short(), sent = sp.sent, found, "birthday spray ends");
            self.spray = None;
            return;
        }
        let elapsed = now.saturating_duration_since(sp.started);
        let due = ((elapsed.as_millis() as u64 * BIRTHDAY_RATE / 1000) as usize + 1)
            .min(sp.targets.len());
        let batch: Vec<SocketAddr> = sp.targets[sp.sent..due.max(sp.sent)].to_vec();
        sp.sent = due.max(sp.sent);
        for a in batch {
            self.ping_addr(peer, a, udp::MAIN, now).await;
        }
    }

    /// Closes birthday sockets that no peer's direct path uses, once their session is over.
    fn close_unused_sockets(&mut self, now: Instant) {
        if self.birthday.is_some_and(|(_, until)| until > now) {
            return;
        }
        self.birthday = None;
        let in_use: std::collections::HashSet<u32> = self
            .peers
            .values()
            .filter(|st| st.best.is_some())
            .map(|st| st.best_via)
            .collect();
        self.extra.retain(|via, (_, reader)| {
            let keep = in_use.contains(via);
            if !keep {
                reader.abort();
            }
            keep
        });
    }

    /// Records that a disco message from `addr` proved `peer` (bounded: the stalest goes).
    fn map_addr(&mut self, addr: SocketAddr, peer: PublicKey, now: Instant) {
        self.addr_peer.insert(addr, (peer, now));
        if self.addr_peer.len() > MAX_ADDR_PEER {
            if let Some(oldest) = self
                .addr_peer
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(a, _)| *a)
            {
                self.addr_peer.remove(&oldest);
            }
        }
    }

    /// Forgets peers idle for [`PEER_IDLE`] with nothing in flight, and stale address
    /// mappings.
    fn prune(&mut self, now: Instant) {
        self.addr_peer
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < ADDR_TTL);
        let idle: Vec<PublicKey> = self
            .peers
            .iter()
            .filter(|(p, st)| {
                st.best.is_none()
                    && st.pings.is_empty()
                    && st.unacked.is_empty()
                    && !self.resend.contains_key(p)
                    && self.spray.as_ref().is_none_or(|s| s.peer != **p)
                    && !recent(st.last_active, PEER_IDLE, now)
                    && !recent(st.last_probe, PEER_IDLE, now)
            })
            .map(|(p, _)| *p)
            .collect();
        for p in idle {
            self.peers.remove(&p);
            self.paths.remove(&p);
            self.shared.paths.lock().expect("lock").remove(&p);
        }
    }

    /// Our candidate endpoints for CallMeMaybe.
    fn my_endpoints(&self) -> Vec<SocketAddr> {
        let mut set: BTreeSet<SocketAddr> = BTreeSet::new();
        if let Some(r) = self.shared.report.lock().expect("lock").as_ref() {
            set.extend(r.global_v4);
            set.extend(r.global_v6);
        }
        set.extend(self.local_endpoints.iter().copied());
        set.extend(self.observed.keys().copied());
        set.into_iter().take(disco::MAX_ENDPOINTS).collect()
    }

    async fn send_disco_relay(&mut self, peer: PublicKey, msg: &Message) {
        let pkt = disco::seal(&self.cfg.secret_key, &peer, msg);
        self.send_relay(peer, pkt.into()).await;
    }

    /// While data goes direct-only to `addr`: ack-ping the path when packets wait for an
    /// acknowledgement; if the ping waiting for its pong is overdue, the path is suspect —
    /// resend what is unacknowledged via the relay and ping again.
    async fn check_acks(&mut self, peer: PublicKey, addr: SocketAddr, via: u32, now: Instant) {
        let Some(st) = self.peers.get_mut(&peer) else {
            return;
        };
        match st.awaiting {
            Some(since) if now.saturating_duration_since(since) >= st.ack_timeout() => {
                let resend = st.take_unacked();
                if !st.suspect || !resend.is_empty() {
                    debug!(peer = %peer.short(), %addr, resent = resend.len(),
                        "direct path suspect (ping unanswered); sending on both paths");
                }
                st.suspect = true;
                if st.awaiting_pad > SMALL_PING_MAX {
                    let size = st.awaiting_pad;
                    if st.too_big.is_none_or(|(b, _)| size < b) {
                        debug!(peer = %peer.short(), %addr, size, "a padded ack ping went unanswered: packets this large go on both paths for a while");
                        st.too_big = Some((size, now));
                    }
                }
                st.awaiting = None; // the ping below starts the next wait
                self.resend_via_relay(peer, resend).await;
                self.ping_addr(peer, addr, via, now).await;
            }
            Some(_) => {}
            None => {
                let due = st.unacked.front().is_some_and(|(t, _)| {
                    st.unacked.len() >= ACK_COUNT
                        || now.saturating_duration_since(*t) >= ACK_INTERVAL
                });
                if due {
                    self.ping_addr(peer, addr, via, now).await;
                }
            }
        }
    }

    /// Resends `peer`'s unacknowledged direct packets via the relay (the direct path went
    /// away or changed).
    async fn resend_unacked(&mut self, peer: PublicKey) {
        let Some(st) = self.peers.get_mut(&peer) else {
            return;
        };
        st.awaiting = None;
        let resend = st.take_unacked();
        if !resend.is_empty() {
            debug!(peer = %peer.short(), n = resend.len(), "resending unacknowledged direct packets via the relay");
        }
        self.resend_via_relay(peer, resend).await;
    }

    /// Queues `pkts` for a paced resend via the relay (see [`Actor::resend`]).
    async fn resend_via_relay(&mut self, peer: PublicKey, pkts: Vec<Bytes>) {
        self.queue_paced(peer, pkts.into_iter().map(|p| (p, true)))
            .await;
    }

    /// Queues packets for the relay, sent [`RESEND_BURST`] per [`RESEND_GAP`] (`true`: a
    /// resend, counted as such).
    async fn queue_paced(
        &mut self,
        peer: PublicKey,
        pkts: impl IntoIterator<Item = (Bytes, bool)>,
    ) {
        let q = self.resend.entry(peer).or_default();
        q.extend(pkts);
        if q.is_empty() {
            self.resend.remove(&peer);
            return;
        }
        // Bounded: a resend further behind than the peer's replay window would be dropped there
        // anyway; the oldest go first.
        if q.len() > MAX_UNACKED {
            let over = q.len() - MAX_UNACKED;
            q.drain(..over);
            warn!(peer = %peer.short(), dropped = over, "resend queue full: oldest unacknowledged packets dropped");
        }
        if self.next_resend.is_none() {
            self.drain_resends().await;
        }
    }

    /// Sends the next [`RESEND_BURST`] queued resends of every peer.
    async fn drain_resends(&mut self) {
        let mut batch = Vec::new();
        for (peer, q) in &mut self.resend {
            let n = q.len().min(RESEND_BURST);
            batch.extend(q.drain(..n).map(|p| (*peer, p)));
        }
        self.resend.retain(|_, q| !q.is_empty());
        self.next_resend =
            (!self.resend.is_empty()).then(|| tokio::time::Instant::now() + RESEND_GAP);
        let resent = batch.iter().filter(|(_, (_, r))| *r).count() as u64;
        self.shared
            .resent_via_relay
            .fetch_add(resent, Ordering::Relaxed);
        self.shared
            .sent_relay
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for (peer, (p, _)) in batch {
            self.send_relay(peer, p).await;
        }
    }

    /// Pings `peer` at `addr` from socket `via`.
    async fn ping_addr(&mut self, peer: PublicKey, addr: SocketAddr, via: u32, now: Instant) {
        let txid = disco::new_txid();
        let st = self.peers.entry(peer).or_default();
        let mark = st.next_seq;
        st.pings.insert(
            txid,
            PingSent {
                addr,
                via,
                at: now,
                mark,
            },
        );
        let mut pad = 0;
        if st.is_best(addr, via) {
            pad = std::mem::take(&mut st.big_since_ping);
            if st.awaiting.is_none() {
                st.awaiting = Some(now);
                st.awaiting_pad = pad;
            }
        }
        let msg = Message::Ping {
            txid,
            node_key: self.cfg.secret_key.public(),
        };
        let pkt = disco::seal_padded(&self.cfg.secret_key, &peer, &msg, pad);
        self.send_direct(via, addr, &pkt).await;
    }

    /// A disco ping with a small TTL ([`PUNCH_TTL`]): it opens our NAT's mapping towards
    /// `addr` but dies before the peer's NAT, so that NAT keeps no "unreplied" entry for it.
    /// (A Linux router that saw the peer's ping before its host sent anything to us keeps
    /// that entry and then gives the host's own packets to us another port: neither side's
    /// pings get through.) Not tracked as a ping in flight: on a flat network it reaches the
    /// peer, whose peer-reflexive ping back makes the path. IPv6: an ordinary ping.
    async fn punch(&mut self, peer: PublicKey, addr: SocketAddr, now: Instant) {
        if !addr.is_ipv4() {
            self.ping_addr(peer, addr, udp::MAIN, now).await;
            return;
        }
        let Some(sock) = self.sockets.for_addr(&addr).cloned() else {
            return;
        };
        let msg = Message::Ping {
            txid: disco::new_txid(),
            node_key: self.cfg.secret_key.public(),
        };
        let pkt = disco::seal(&self.cfg.secret_key, &peer, &msg);
        let old = sock.ttl().unwrap_or(64);
        if sock.set_ttl(PUNCH_TTL).is_ok() {
            self.send_direct(udp::MAIN, addr, &pkt).await;
            let _ = sock.set_ttl(old);
        }
    }

    /// No fresh direct path: punch the peer's known candidates, then CallMeMaybe via the
    /// relay (see the module docs, 4.), at most every `probe_interval`.
    async fn maybe_probe(&mut self, peer: PublicKey, now: Instant) {
        if !self.cfg.direct.enabled || peer == self.cfg.secret_key.public() {
            return;
        }
        let interval = self.cfg.direct.probe_interval;
        let st = self.peers.entry(peer).or_default();
        if recent(st.last_probe, interval, now) {
            return;
        }
        st.last_probe = Some(now);
        let candidates: Vec<SocketAddr> = st.candidates.keys().copied().collect();
        // "Punched" only if the peer offered (or pinged from) some of them lately: punching
        // stale addresses (the peer moved) and saying "punched" would make it ping us at full
        // TTL before our NAT is open towards its new address — the conntrack trap.
        let fresh = st
            .candidates
            .values()
            .any(|t| now.saturating_duration_since(*t) < interval);
        let peer_easy = st.peer_hard == Some(false);
        debug!(peer = %peer.short(), ?candidates, fresh, "probing for a direct path");
        // Open our NAT towards every address we know of the peer (TTL 2: not as far as its
        // NAT), then say so: the peer pings us at full TTL on receiving it.
        for a in &candidates {
            self.punch(peer, *a, now).await;
        }
        if self.my_nat_hard() && peer_easy && self.direct_for(&peer, now).is_none() {
            self.birthday_open(peer, &candidates, now).await;
        }
        self.send_call_me_maybe(peer, fresh).await;
    }

    async fn send_call_me_maybe(&mut self, peer: PublicKey, punched: bool) {
        let msg = Message::CallMeMaybe {
            endpoints: self.my_endpoints(),
            hard_nat: self.my_nat_hard(),
            punched,
        };
        self.send_disco_relay(peer, &msg).await;
    }

    /// Expiry, heartbeats and periodic probes.
    async fn disco_tick(&mut self, now: Instant) {
        if !self.cfg.direct.enabled {
            return;
        }
        let d = self.cfg.direct;
        let mut expired = Vec::new();
        let mut heartbeat = Vec::new();
        let mut acks = Vec::new();
        let mut probe = Vec::new();
        self.observed
            .retain(|_, t| now.saturating_duration_since(*t) < ADDR_TTL);
        for (peer, st) in &mut self.peers {
            st.candidates
                .retain(|_, t| now.saturating_duration_since(*t) < ADDR_TTL);
            st.pings
                .retain(|_, p| now.saturating_duration_since(p.at) < d.trust);
            let active = recent(st.last_active, d.active_timeout, now);
            match st.best {
                Some((addr, pong)) if now.saturating_duration_since(pong) >= d.trust => {
                    st.best = None;
                    st.suspect = false;
                    expired.push((*peer, addr));
                    if active {
                        probe.push(*peer);
                    }
                }
                Some((addr, _)) if st.awaiting.is_some() => acks.push((*peer, addr, st.best_via)),
                Some((addr, _)) => {
                    let due = !recent(st.last_heartbeat, d.heartbeat, now);
                    if !st.unacked.is_empty() {
                        acks.push((*peer, addr, st.best_via));
                    } else if active && due {
                        st.last_heartbeat = Some(now);
                        heartbeat.push((*peer, addr, st.best_via));
                    }
                }
                None if active => probe.push(*peer),
                None => {}
            }
        }
        for (peer, addr) in expired {
            info!(peer = %peer.short(), %addr, "direct path expired (no fresh pong); relay");
            self.resend_unacked(peer).await;
            if self.paths.get(&peer) == Some(&Path::Direct(addr)) {
                let region = self.region_for(&peer);
                self.set_path(peer, Path::Relay(region));
            }
        }
        for (peer, addr, via) in heartbeat {
            self.ping_addr(peer, addr, via, now).await;
        }
        for (peer, addr, via) in acks {
            self.check_acks(peer, addr, via, now).await;
        }
        for peer in probe {
            self.maybe_probe(peer, now).await;
        }
        self.spray_step(now).await;
        self.close_unused_sockets(now);
    }

    /// A disco message, from UDP (`from`, on socket `via`) or the relay (`from` = None,
    /// `relay_src` = the relay's source key, which must be the sealer).
    async fn on_disco(
        &mut self,
        data: &[u8],
        from: Option<SocketAddr>,
        via: u32,
        relay_src: Option<PublicKey>,
    ) {
        if !self.cfg.direct.enabled {
            return;
        }
        let (peer, msg) = match disco::open(&self.cfg.secret_key, data, relay_src.as_ref()) {
            Ok(x) => x,
            Err(e) => {
                debug!(?from, "disco message dropped: {e}");
                return;
            }
        };
        let now = Instant::now();
        match (msg, from) {
            (Message::Ping { txid, node_key }, Some(src)) => {
                if node_key != peer {
                    debug!(%src, "disco ping whose node key is not its sealer's; dropped");
                    return;
                }
                self.map_addr(src, peer, now);
                let pong = disco::seal(&self.cfg.secret_key, &peer, &Message::Pong { txid, src });
                self.send_direct(via, src, &pong).await;
                let st = self.peers.entry(peer).or_default();
                let new = remember(&mut st.candidates, src, now, MAX_CANDIDATES);
                let fresh = self.direct_for(&peer, now).is_some();
                let pinging = self.peers[&peer].pinged_lately(src, via, now);
                if (new || !fresh) && !pinging {
                    // Peer-reflexive: ping it back (this is the other half of the hole punch),
                    // from the socket its ping came to.
                    self.ping_addr(peer, src, via, now).await;
                }
            }
            (
                Message::Pong {
                    txid,
                    src: observed,
                },
                Some(src),
            ) => {
                if via != udp::MAIN && !self.extra.contains_key(&via) {
                    debug!(%src, "pong on a birthday socket closed meanwhile; ignored");
                    return;
                }
                let Some(st) = self.peers.get_mut(&peer) else {
                    return;
                };
                let Some(sent) = st.pings.remove(&txid) else {
                    debug!(%src, "pong for no ping in flight");
                    return;
                };
                if sent.addr != src || sent.via != via {
                    debug!(%src, pinged = %sent.addr, "pong from another address or socket than pinged; ignored");
                    return;
                }
                let keep_other = !st.is_best(src, via)
                    && st.best.is_some_and(|(_, t)| {
                        now.saturating_duration_since(t) < self.cfg.direct.trust
                    });
                let moved = !keep_other && st.best.is_some() && !st.is_best(src, via);
                if !keep_other {
                    if !st.is_best(src, via) {
                        st.too_big = None; // a new path: its own size limits
                    }
                    if via != udp::MAIN && !st.is_best(src, via) {
                        info!(peer = %peer.short(), %src, "birthday probing found a direct path");
                    }
                    st.best = Some((src, now));
                    st.best_via = via;
                    st.rtt = Some(now.saturating_duration_since(sent.at));
                    if !moved {
                        // Everything sent direct before the ping has crossed (one path keeps
                        // its order). (If the path moved, what is kept went to the old
                        // address: resent below.)
                        st.ack(sent.mark);
                    }
                    if st.awaiting.is_none_or(|w| sent.at >= w) {
                        st.awaiting = None;
                        st.suspect = false;
                    }
                }
                if moved {
                    // Packets still unacknowledged went to the old address.
                    self.resend_unacked(peer).await;
                }
                self.map_addr(src, peer, now);
                if !observed.ip().is_unspecified() && observed.port() != 0 {
                    remember(&mut self.observed, observed, now, MAX_OBSERVED);
                }
                if !keep_other {
                    self.set_path(peer, Path::Direct(src));
                }
            }
            (
                Message::CallMeMaybe {
                    endpoints,
                    hard_nat: peer_hard,
                    punched,
                },
                None,
            ) => {
                let me_hard = self.my_nat_hard();
                let fresh = self.direct_for(&peer, now).is_some();
                let st = self.peers.entry(peer).or_default();
                st.peer_hard = Some(peer_hard);
                debug!(peer = %peer.short(), ?endpoints, punched, peer_hard, me_hard, "call-me-maybe");
                for a in &endpoints {
                    remember(&mut st.candidates, *a, now, MAX_CANDIDATES);
                }
                // Birthday probing when we are the hard side and the peer is easy.
                let birthday = me_hard && !peer_hard && !fresh;
                if !punched {
                    // The peer has not opened its NAT towards us (it knew no address of
                    // ours). Open ours towards its endpoints without reaching its NAT, then
                    // answer "punched": it pings us on receiving that, its pings come through
                    // the mapping just opened, and we ping back (peer-reflexive). A full ping
                    // now could reach its router before its own first packet and leave the
                    // conntrack entry that breaks the path (docs/nat-traversal.md).
                    if recent(st.last_response, RESPONSE_INTERVAL, now) {
                        return;
                    }
                    st.last_response = Some(now);
                    st.last_probe = Some(now);
                    for a in &endpoints {
                        self.punch(peer, *a, now).await;
                    }
                    if birthday {
                        // Open the mappings before the answer makes the peer probe them.
                        self.birthday_open(peer, &endpoints, now).await;
                    }
                    self.send_call_me_maybe(peer, true).await;
                    return;
                }
                // The peer has opened its NAT towards us: ping every endpoint at full TTL.
                if birthday && self.birthday_open(peer, &endpoints, now).await {
                    // Our mappings are open now: say so, the peer probes them.
                    self.send_call_me_maybe(peer, true).await;
                }
                if peer_hard && !me_hard && !fresh {
                    // Birthday, easy side: the hard peer has opened its mappings before
                    // sending this: probe random ports on its address.
                    self.spray_start(peer, &endpoints, now);
                }
                for a in endpoints {
                    if !self.peers[&peer].pinged_lately(a, udp::MAIN, now) {
                        self.ping_addr(peer, a, udp::MAIN, now).await;
                    }
                }
            }
            (m, _) => debug!(?from, "disco {m:?} on an unexpected path; ignored"),
        }
    }

    async fn on_udp(&mut self, d: Datagram) {
        if self.shared.blackhole_direct.load(Ordering::Relaxed) {
            return;
        }
        if disco::is_disco(&d.data) {
            self.on_disco(&d.data, Some(d.from), d.via, None).await;
        } else if e2e::is_e2e(&d.data) {
            // By the session index in the packet, not by the source address (which anyone
            // can spoof); initiations by the address a disco message proved (a spoof makes
            // the handshake fail, and it is retried).
            let Some(peer) = self
                .sessions
                .peer_of(&d.data)
                .or_else(|| self.addr_peer.get(&d.from).map(|(p, _)| *p))
            else {
                debug!(from = %d.from, "E2E datagram of no known session, from an address no disco message proved");
                return;
            };
            self.on_e2e(peer, d.data, Path::Direct(d.from)).await;
        } else {
            debug!(from = %d.from, "unknown datagram dropped");
        }
    }

    /// Records the path data to `peer` is sent on (called per packet: the shared map, behind
    /// a mutex, is only touched when the path changes).
    fn set_path(&mut self, peer: PublicKey, new: Path) {
        let old = self.paths.insert(peer, new);
        if old != Some(new) {
            self.shared.paths.lock().expect("lock").insert(peer, new);
            let _ = self.events.send(PathEvent { peer, old, new });
        }
    }

    /// An E2E packet from `src` (proven by the relay's source key or the UDP address map;
    /// the Noise session proves it again), which arrived via `via`.
    async fn on_e2e(&mut self, src: PublicKey, data: Bytes, via: Path) {
        let now = Instant::now();
        let opened = match self.sessions.open(&src, &data, now) {
            Ok(o) => o,
            Err(e) => {
                debug!(%via, "packet from {} dropped: {e}", src.short());
                return;
            }
        };
        if let Path::Relay(region) = via {
            // Authenticated: this is where the peer is reachable now.
            self.peer_region.insert(src, region);
            if self.direct_for(&src, now).is_none() {
                self.set_path(src, via);
            }
        }
        if opened.replies.len() > RESEND_BURST && self.direct_for(&src, now).is_none() {
            // Packets queued during the handshake, flushed at once: paced, like resends (a
            // burst can overflow a relay's per-client queue, 32 packets in derper: tests/derper.rs
            // missed some of 50 packets about 1 run in 4 before this, 0 in 30 after).
            let region = self.region_for(&src);
            self.set_path(src, Path::Relay(region));
            self.queue_paced(src, opened.replies.into_iter().map(|r| (r.into(), false)))
                .await;
            self.maybe_probe(src, now).await;
        } else {
            for r in opened.replies {
                self.send_to_peer(src, r.into()).await;
            }
        }
        let Some(pt) = opened.plaintext else { return };
        self.peers.entry(src).or_default().last_active = Some(now);
        match pt.first() {
            Some(&M_DATA) => {
                let data = Bytes::from(pt).slice(1..);
                let _ = self.recv_tx.send((src, data)).await;
            }
            Some(&M_PING) if pt.len() == 9 => {
                let mut m = pt;
                m[0] = M_PONG;
                if let Err(e) = self.seal_and_send(src, &m).await {
                    debug!("pong to {} not sent: {e}", src.short());
                }
            }
            Some(&M_PONG) if pt.len() == 9 => {
                let id = u64::from_be_bytes(pt[1..9].try_into().expect("len"));
                if let Some((sent, tx)) = self.pings.remove(&id) {
                    let _ = tx.send(PingReply {
                        rtt: sent.elapsed(),
                        path: via,
                    });
                }
            }
            _ => debug!("unknown inner message from {}", src.short()),
        }
    }

    async fn on_relay(&mut self, region: u32, ev: RelayEvent) {
        match ev {
            RelayEvent::Packet { src, data } => {
                if disco::is_disco(&data) {
                    self.on_disco(&data, None, udp::MAIN, Some(src)).await;
                } else if e2e::is_e2e(&data) {
                    self.on_e2e(src, data, Path::Relay(region)).await;
                } else {
                    debug!(region, "non-E2E packet from {} ignored", src.short());
                }
            }
            RelayEvent::PeerGone { peer, reason } => {
                debug!(
                    region,
                    ?reason,
                    "peer {} is not on this relay",
                    peer.short()
                );
            }
            RelayEvent::Connected { generation, .. } => {
                debug!(region, generation, "relay connected");
            }
            RelayEvent::Disconnected { error, retry_in } => {
                debug!(region, ?retry_in, "relay disconnected: {error}");
            }
            RelayEvent::Health(h) => {
                if !h.is_empty() {
                    warn!(region, "relay health: {h}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_addresses_are_bounded_and_the_stalest_goes() {
        let mut m = HashMap::new();
        let t0 = Instant::now();
        let addr = |p: u16| SocketAddr::from(([10, 0, 0, 1], p));
        for p in 0..4 {
            assert!(remember(
                &mut m,
                addr(p),
                t0 + Duration::from_secs(p.into()),
                4
            ));
        }
        assert!(!remember(&mut m, addr(0), t0 + Duration::from_secs(10), 4));
        assert!(remember(&mut m, addr(9), t0 + Duration::from_secs(11), 4));
        assert_eq!(m.len(), 4);
        assert!(!m.contains_key(&addr(1)), "the stalest entry is evicted");
        assert!(m.contains_key(&addr(0)), "a refreshed entry stays");
    }

    #[test]
    fn a_pong_acknowledges_what_was_sent_before_its_ping() {
        let mut st = PeerDisco::default();
        let t = Instant::now();
        let pkt = |i: u8| Bytes::from(vec![i; 10]);
        for i in 0..3 {
            assert!(st.keep_unacked(&pkt(i), t));
        }
        let mark = st.next_seq; // a ping sent now
        assert!(st.keep_unacked(&pkt(3), t));
        st.ack(mark);
        assert_eq!(st.unacked.len(), 1);
        assert_eq!(
            st.unacked[0].1,
            pkt(3),
            "the packet sent after the ping stays"
        );
        assert_eq!(st.unacked_bytes, 10);
        st.ack(mark); // a late duplicate changes nothing
        assert_eq!(st.unacked.len(), 1);
        assert_eq!(st.take_unacked(), vec![pkt(3)]);
        assert_eq!((st.unacked.len(), st.unacked_bytes), (0, 0));
        // Full: the caller sends on both paths instead.
        for _ in 0..MAX_UNACKED {
            assert!(st.keep_unacked(&pkt(0), t));
        }
        assert!(!st.keep_unacked(&pkt(0), t));
        let big = Bytes::from(vec![0; MAX_UNACKED_BYTES + 1]);
        assert!(!PeerDisco::default().keep_unacked(&big, t));
    }

    #[test]
    fn spray_targets_are_distinct_random_ports_on_public_addresses() {
        let ips: Vec<std::net::IpAddr> = vec![[203, 0, 113, 6].into(), [198, 51, 100, 9].into()];
        let known: SocketAddr = "203.0.113.6:40000".parse().unwrap();
        let t = spray_targets(&ips, BIRTHDAY_PROBES, &[known]);
        assert_eq!(t.len(), BIRTHDAY_PROBES);
        let set: std::collections::HashSet<_> = t.iter().collect();
        assert_eq!(set.len(), t.len(), "no port probed twice");
        assert!(t.iter().all(|a| a.port() >= 1024 && ips.contains(&a.ip())));
        assert!(!t.contains(&known));
        // Interleaved: both addresses get half.
        assert_eq!(
            t.iter().filter(|a| a.ip() == ips[0]).count(),
            BIRTHDAY_PROBES / 2
        );
        // Random: two sprays differ.
        assert_ne!(t, spray_targets(&ips, BIRTHDAY_PROBES, &[]));
        assert!(spray_targets(&[], 10, &[]).is_empty());
    }

    #[test]
    fn only_public_ipv4_endpoints_are_birthday_targets() {
        for (a, public) in [
            ("203.0.113.6:1", true),
            ("8.8.8.8:53", true),
            ("192.168.1.2:1", false),
            ("10.0.0.1:1", false),
            ("172.16.0.1:1", false),
            ("127.0.0.1:1", false),
            ("169.254.1.1:1", false),
            ("0.0.0.0:1", false),
            ("[2001:db8::1]:1", false),
        ] {
            assert_eq!(is_public_v4(&a.parse().unwrap()), public, "{a}");
        }
    }

    #[test]
    fn ack_timeout_follows_the_round_trip_within_bounds() {
        let mut st = PeerDisco::default();
        assert_eq!(st.ack_timeout(), ACK_TIMEOUT_MIN);
        st.rtt = Some(Duration::from_millis(1));
        assert_eq!(st.ack_timeout(), ACK_TIMEOUT_MIN);
        st.rtt = Some(Duration::from_millis(150));
        assert_eq!(st.ack_timeout(), Duration::from_millis(600));
        st.rtt = Some(Duration::from_secs(5));
        assert_eq!(st.ack_timeout(), ACK_TIMEOUT_MAX);
    }

    #[test]
    fn local_endpoints_keep_specified_addresses_and_resolve_wildcards() {
        let lo: SocketAddr = "127.0.0.1:4242".parse().unwrap();
        assert_eq!(local_endpoints(&[lo]), vec![lo]);
        // A wildcard socket is offered under the routed source address (if there is a
        // route at all), never as 0.0.0.0, and keeps its port.
        for a in local_endpoints(&["0.0.0.0:4243".parse().unwrap()]) {
            assert!(!a.ip().is_unspecified());
            assert_eq!(a.port(), 4243);
        }
    }
}
