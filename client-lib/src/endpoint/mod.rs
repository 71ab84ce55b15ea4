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
//! 1. `bind` opens the UDP socket(s), starts [netcheck](crate::netcheck) from them and, once it
//!    is done or after [`HOME_GRACE`] (200 ms; at once with a forced home), whichever is
//!    first, connects the home region's relay and sends NotePreferred: the lowest STUN latency
//!    so far; if no STUN answered — UDP blocked — the lowest region id. So a node whose UDP is
//!    blocked is on its relay within ~0.2 s, not after netcheck's 3 s deadline. If that relay
//!    is unreachable the next-fastest region is tried; only when none works does `bind` fail.
//!    A netcheck that finishes later moves the home if it prefers another region.
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
//!    endpoint in it at full TTL (at most [`crate::disco::MAX_ENDPOINTS`] are read, and as many such
//!    pings per peer per second); receiving an unpunched one, it punches the endpoints and
//!    answers with a punched CallMeMaybe. A node pinged from a new address pings that address
//!    back (peer-reflexive): simultaneous open. A pong from the address (and socket) pinged
//!    makes it the peer's direct path. An easy NAT facing a hard one uses birthday probing
//!    (`birthday.rs`, docs/client.md).
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
//! 6. **UDP relay path** (issue 15; [udprelay](crate::udprelay)): an active peer without a
//!    direct path for 1 s (at once when both NATs are hard) gets a
//!    UDP relay session: the side with the lower node key asks its home relay for one over its
//!    DERP connection (the other side asks only after 6 s, in case that relay has none, as
//!    derper has not), tells the peer with a CallMeMaybeVia via DERP, and both bind their
//!    main socket's address to it (Bind → Challenge → Answer), at the relay's first address
//!    our sockets reach (IPv4 first); three Binds there without a Challenge (1.5 s) and the
//!    next address is tried, in turn (a dual-stack relay with one family blocked). Disco
//!    pings through the session prove it; then data goes that way — still end-to-end encrypted, Geneve-framed, from the
//!    main socket — with the same acknowledgements and resends as a direct path. The order of
//!    preference is direct > UDP relay > DERP: a direct pong takes the data off the UDP relay
//!    path (its unacknowledged packets go again via DERP); when the direct path expires, data
//!    goes back to the UDP relay path, which heartbeats keep warm meanwhile. A UDP relay path
//!    with no pong for 15 s is given up (a relay restart, an expired session) and asked for
//!    again at most every 10 s. Off with `DirectOptions::udp_relay = false`.
//! 7. The path per peer is `Path::Direct(addr)`, `Path::UdpRelay(region)` or
//!    `Path::Relay(region)` (the path data is sent on); each change is broadcast as a
//!    [`PathEvent`]. Netcheck runs again every 20–26 s and moves the home region (with
//!    hysteresis).
//!
//! Code layout (`endpoint/`):
//!
//! - `mod.rs` (this file): the public types and the [`Endpoint`] API; `bind` connects the
//!   home relay and starts the actor.
//! - `path.rs`: `PeerPath`, one peer's path rules (points 4 to 6 above) as a sans-IO
//!   state machine: inputs `on_send`, `on_flush`, `on_ping`, `on_pong`, `on_call_me_maybe`,
//!   `tick`, each with `now`, returning `Action`s. Its unit tests (`path/tests.rs`) run the
//!   rules on a fake clock.
//! - `actor.rs`: the endpoint's task, I/O glue: the event loop, E2E sessions, disco
//!   parsing, executing the machine's actions on sockets and relays, path publication.
//! - `relays.rs`: home relay choice at bind, relay connections per region, the region per
//!   peer (`RelaySet`).
//! - `pacer.rs`: relay-bound resends and handshake flushes, 16 per 2 ms (`Pacer`, sans-IO).
//! - `addrbook.rs`: source address → peer, our observed and offered endpoints (`AddrBook`).
//! - `birthday.rs`: the node-wide birthday decisions (`Birthday`, sans-IO: one session and
//!   one spray at a time, rate limits); `sockets.rs`: the birthday sockets themselves.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_proto::{PublicKey, SecretKey};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::info;

use crate::e2e::{self, E2eError};
use crate::netcheck::{self, NetcheckOptions, Report};
use crate::relay::{Backoff, RelayClient, RelayError, RelayStatus, Transport};
use crate::relaymap::RelayMap;
use crate::tls::TlsOptions;
use crate::udp::Sockets;

pub use outbox::MAX_BATCH;

mod actor;
mod addrbook;
mod birthday;
mod outbox;
mod pacer;
mod path;
mod relays;
mod sockets;

/// Inner message types (inside the E2E plaintext).
const M_DATA: u8 = 0x00;
const M_PING: u8 = 0x01;
const M_PONG: u8 = 0x02;

/// How long [`Endpoint::bind`] waits for netcheck before it connects a home relay by the
/// answers so far (none, with UDP blocked: the first region by id). Netcheck itself runs on to
/// its deadline (3 s) and may then move the home.
pub const HOME_GRACE: Duration = Duration::from_millis(200);

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
    /// Hand a run of datagrams of one size to one address, sent together
    /// ([`Endpoint::send_batch`]), to the kernel as one UDP GSO message (Linux 4.18+): the same
    /// datagrams leave, for one pass through the kernel's UDP and IP layers. Default on; off
    /// by itself where the kernel refuses it (`EIO`: no checksum offload on the route).
    pub udp_gso: bool,
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
    /// Use a UDP relay session (issue 15) while there is no direct path, where the relay offers
    /// it (`false`: DERP only).
    pub udp_relay: bool,
}

impl Default for DirectOptions {
    fn default() -> Self {
        DirectOptions {
            enabled: true,
            trust: Duration::from_millis(6500),
            heartbeat: Duration::from_secs(2),
            probe_interval: Duration::from_secs(5),
            active_timeout: Duration::from_secs(45),
            udp_relay: true,
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
            udp_gso: true,
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
    /// Over UDP through a UDP relay session at this region's relay (issue 15): for peers that
    /// cannot reach each other directly; still end-to-end encrypted.
    UdpRelay(u32),
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Relay(r) => write!(f, "relay {r}"),
            Path::Direct(a) => write!(f, "direct {a}"),
            Path::UdpRelay(r) => write!(f, "udp-relay {r}"),
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
    /// Plaintexts to `peer`, sealed and sent in order in one event (their UDP datagrams
    /// leave together: see `outbox`); a result for each.
    Send {
        peer: PublicKey,
        plaintexts: Vec<Vec<u8>>,
        done: oneshot::Sender<Vec<Result<(), EndpointError>>>,
    },
    Ping {
        peer: PublicKey,
        done: oneshot::Sender<PingReply>,
    },
    SetPeerRegion(PublicKey, u32),
    RelayUp(u32, Result<RelayClient, RelayError>),
    Netcheck(Report),
    /// A UDP relay allocation for `peer` at `region` came back.
    UdpRelay {
        peer: PublicKey,
        region: u32,
        result: Result<ferry_proto::udprelay::Endpoint, RelayError>,
    },
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
    /// The bind-time netcheck, if it outlived `bind` (see there).
    netcheck: Option<tokio::task::AbortHandle>,
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
    sent_udp_relay: AtomicU64,
    resent_via_relay: AtomicU64,
    relay_dropped: AtomicU64,
    udp_out_datagrams: AtomicU64,
    udp_out_messages: AtomicU64,
}

/// Counters of end-to-end packets sent (data, pings and handshakes; not disco), since bind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Sent on a direct path.
    pub sent_direct: u64,
    /// Sent via a relay (including packets that went on both paths).
    pub sent_relay: u64,
    /// Sent through a UDP relay session ([`Path::UdpRelay`]).
    pub sent_udp_relay: u64,
    /// Sent direct, left unacknowledged when the direct path went quiet, and sent again via
    /// the relay (the peer drops the copies that did arrive).
    pub resent_via_relay: u64,
    /// Relay-bound packets dropped without being sent: the region's send queue was full (its
    /// relay slow or unreachable; the oldest go first) or its relay could not be connected.
    /// Sending never waits for a relay.
    pub relay_dropped: u64,
    /// Datagrams the main UDP sockets sent: E2E packets on a direct or UDP relay path, disco,
    /// UDP relay binds (not STUN, not birthday probes or punches).
    pub udp_out_datagrams: u64,
    /// The messages they were handed to the kernel as: one per datagram, except that a run of
    /// datagrams of one size to one address sent together ([`Endpoint::send_batch`]) is one
    /// UDP GSO message ([`EndpointConfig::udp_gso`]; one the kernel refuses still counts once,
    /// though its datagrams then go one by one).
    pub udp_out_messages: u64,
    /// Datagrams the main UDP sockets read (everything, STUN answers included).
    pub udp_in_datagrams: u64,
    /// The messages the kernel handed them over as: with UDP GRO (Linux 5.0+) a run of one
    /// sender's datagrams that arrived as one GSO message (a peer's burst, or a UDP relay's
    /// forward of one) is one.
    pub udp_in_messages: u64,
    /// Datagrams the main UDP sockets read but dropped because the endpoint could not keep
    /// up (its queue of 1,024 read datagrams was full). Reading never waits for the endpoint.
    pub udp_in_dropped: u64,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(n) = &self.netcheck {
            n.abort();
        }
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
        // Netcheck and the home relay in parallel: the relay is connected once netcheck is done
        // or after HOME_GRACE (at once with a forced home), whichever is first, by the latencies
        // measured so far; a netcheck finishing later may move the home (Cmd::Netcheck).
        let (progress, so_far) = watch::channel(BTreeMap::new());
        let mut netcheck = {
            let (map, sockets, opts) = (cfg.relay_map.clone(), Arc::clone(&sockets), cfg.netcheck);
            tokio::spawn(async move {
                netcheck::run_with_progress(&map, &sockets, None, opts, Some(&progress)).await
            })
        };
        let grace = if cfg.home_region.is_some() {
            Duration::ZERO
        } else {
            HOME_GRACE
        };
        let (report, pending) = match tokio::time::timeout(grace, &mut netcheck).await {
            Ok(r) => (Some(r.expect("netcheck panicked")), None),
            Err(_) => (None, Some(netcheck)),
        };
        // The answers so far, of regions that may be home (never an `Avoid` one).
        let so_far = netcheck::home_latencies(&cfg.relay_map, &so_far.borrow());
        let partial = Report {
            preferred_region: netcheck::choose_home(&so_far, None),
            region_latency: so_far,
            ..Report::default()
        };
        let connected = relays::connect_home(&cfg, report.as_ref().unwrap_or(&partial)).await;
        let (home, home_events) = match connected {
            Ok(c) => c,
            Err(e) => {
                if let Some(n) = &pending {
                    n.abort();
                }
                return Err(e);
            }
        };
        let home_id = home.region();
        info!(region = home_id, "home relay connected");
        let shared = Arc::new(SharedState::default());
        *shared.home.lock().expect("lock") = Some(home_id);
        *shared.report.lock().expect("lock") = report;
        shared
            .relay_status
            .lock()
            .expect("lock")
            .insert(home_id, home.status());
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (recv_tx, recv_rx) = mpsc::channel(1024);
        let (ev_tx, _) = broadcast::channel(256);
        let (relay_tx, relay_rx) = mpsc::channel(1024);
        relays::spawn_forwarder(home_id, home_events, relay_tx.clone());
        let public = cfg.secret_key.public();
        let relays =
            relays::RelaySet::new(&cfg, home, Arc::clone(&shared), cmd_tx.clone(), relay_tx);
        let actor = actor::Actor::new(actor::Parts {
            cfg,
            relays,
            sockets: Arc::clone(&sockets),
            shared: Arc::clone(&shared),
            recv_tx,
            events: ev_tx.clone(),
            cmd_tx: cmd_tx.clone(),
            udp_tx,
        });
        let task = tokio::spawn(actor.run(cmd_rx, relay_rx, udp_rx));
        // The late report goes to the actor (it may move the home, with hysteresis, unless the
        // home is forced); dropping the endpoint stops netcheck (it holds the sockets).
        let netcheck = pending.map(|netcheck| {
            let abort = netcheck.abort_handle();
            let tx = cmd_tx.clone();
            tokio::spawn(async move {
                if let Ok(r) = netcheck.await {
                    let _ = tx.send(Cmd::Netcheck(r)).await;
                }
            });
            abort
        });
        Ok(Endpoint {
            public,
            cmd: cmd_tx,
            recv: tokio::sync::Mutex::new(recv_rx),
            shared,
            events: ev_tx,
            sockets,
            task,
            netcheck,
        })
    }

    /// This node's public key: what peers send to.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Sends `data` to `peer`, end-to-end encrypted. Returns once it is queued to the relay
    /// or handed to the UDP socket.
    pub async fn send(&self, peer: PublicKey, data: Vec<u8>) -> Result<(), EndpointError> {
        let mut r = self.send_batch(peer, vec![data]).await?;
        r.pop().unwrap_or(Err(EndpointError::Closed))
    }

    /// Sends each of `datagrams` to `peer` as [`Endpoint::send`] would, in order, as one
    /// command: what goes over UDP leaves together, runs of one size as UDP GSO messages
    /// ([`EndpointConfig::udp_gso`]), so a burst costs this node (and a UDP relay that reads
    /// with GRO) one pass through the kernel per run instead of one per datagram. Up to
    /// [`MAX_BATCH`] datagrams per command (more are split). Returns one result per datagram;
    /// the outer error is only [`EndpointError::Closed`].
    pub async fn send_batch(
        &self,
        peer: PublicKey,
        datagrams: Vec<Vec<u8>>,
    ) -> Result<Vec<Result<(), EndpointError>>, EndpointError> {
        let mut results: Vec<Result<(), EndpointError>> = Vec::with_capacity(datagrams.len());
        let mut chunk = Vec::new();
        let mut slots = Vec::new();
        let last = datagrams.len().saturating_sub(1);
        for (i, data) in datagrams.into_iter().enumerate() {
            if data.len() > MAX_PAYLOAD {
                results.push(Err(EndpointError::TooBig(data.len())));
            } else {
                let mut plaintext = Vec::with_capacity(1 + data.len());
                plaintext.push(M_DATA);
                plaintext.extend_from_slice(&data);
                chunk.push(plaintext);
                slots.push(results.len());
                results.push(Ok(()));
            }
            if chunk.len() == MAX_BATCH || (i == last && !chunk.is_empty()) {
                let (done, rx) = oneshot::channel();
                let plaintexts = std::mem::take(&mut chunk);
                self.cmd
                    .send(Cmd::Send {
                        peer,
                        plaintexts,
                        done,
                    })
                    .await
                    .map_err(|_| EndpointError::Closed)?;
                let got = rx.await.map_err(|_| EndpointError::Closed)?;
                for (slot, r) in slots.drain(..).zip(got) {
                    results[slot] = r;
                }
            }
        }
        Ok(results)
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

    /// [`Endpoint::recv`], then whatever else has already arrived, up to `max` packets in
    /// all (at least one; nothing is waited for beyond the first): a receiver that hands
    /// packets on in batches (`ferry tunnel` with `sendmmsg`) pays one wake-up for them.
    pub async fn recv_batch(&self, max: usize) -> Result<Vec<(PublicKey, Bytes)>, EndpointError> {
        let mut out = Vec::with_capacity(max.clamp(1, MAX_BATCH));
        let n = self.recv.lock().await.recv_many(&mut out, max.max(1)).await;
        if n == 0 {
            return Err(EndpointError::Closed);
        }
        Ok(out)
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
            sent_udp_relay: s.sent_udp_relay.load(Ordering::Relaxed),
            resent_via_relay: s.resent_via_relay.load(Ordering::Relaxed),
            relay_dropped: s.relay_dropped.load(Ordering::Relaxed),
            udp_out_datagrams: s.udp_out_datagrams.load(Ordering::Relaxed),
            udp_out_messages: s.udp_out_messages.load(Ordering::Relaxed),
            udp_in_datagrams: self.sockets.read.datagrams.load(Ordering::Relaxed),
            udp_in_messages: self.sockets.read.messages.load(Ordering::Relaxed),
            udp_in_dropped: self.sockets.read.dropped.load(Ordering::Relaxed),
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

/// Whether `last` happened less than `window` before `now` (`None`: never). The rate limits
/// and activity checks of the endpoint's parts.
fn recent(last: Option<Instant>, window: Duration, now: Instant) -> bool {
    last.is_some_and(|t| now.saturating_duration_since(t) < window)
}
