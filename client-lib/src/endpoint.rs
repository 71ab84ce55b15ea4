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
//! What happens inside (first cut, relay path only):
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
//! 4. The path per peer is `Path::Relay(region)`; each change is broadcast as a [`PathEvent`].
//!    Netcheck runs again every 20–26 s and moves the home region (with hysteresis).
//!
//! Disco, direct UDP paths and hole punching come next (see docs/notes-client.md).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_relay::proto::{PublicKey, SecretKey};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::e2e::{self, E2eError, Sessions};
use crate::netcheck::{self, NetcheckOptions, Report};
use crate::relay::{
    Backoff, RelayClient, RelayError, RelayEvent, RelayOptions, RelayStatus, Transport,
};
use crate::relaymap::RelayMap;
use crate::tls::TlsOptions;
use crate::udp::Sockets;

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
        }
    }
}

/// How packets to a peer travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Through the relay of this region.
    Relay(u32),
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Relay(r) => write!(f, "relay {r}"),
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
        let sockets = Arc::new(
            Sockets::bind(cfg.bind_v4, cfg.bind_v6, None)
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
        let actor = Actor {
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
            cmd_tx: cmd_tx.clone(),
            sockets: Arc::clone(&sockets),
        };
        let task = tokio::spawn(actor.run(cmd_rx, relay_rx));
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

    /// The UDP sockets' local addresses.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets.local_addrs()
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
    cmd_tx: mpsc::Sender<Cmd>,
    sockets: Arc<Sockets>,
}

impl Actor {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut relay_rx: mpsc::Receiver<(u32, RelayEvent)>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_restun = self.restun_at();
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(c) => self.on_cmd(c).await,
                    None => return,
                },
                Some((region, ev)) = relay_rx.recv() => self.on_relay(region, ev).await,
                _ = tick.tick() => {
                    let now = Instant::now();
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
                let r = self.seal_and_send(peer, &plaintext).await;
                let _ = done.send(r);
            }
            Cmd::Ping { peer, done } => {
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

    /// Sends an E2E packet to `peer` on its current path.
    async fn send_to_peer(&mut self, peer: PublicKey, pkt: Bytes) {
        let region = self.region_for(&peer);
        self.set_path(peer, Path::Relay(region));
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

    fn set_path(&mut self, peer: PublicKey, new: Path) {
        let old = self.shared.paths.lock().expect("lock").insert(peer, new);
        if old != Some(new) {
            let _ = self.events.send(PathEvent { peer, old, new });
        }
    }

    async fn on_relay(&mut self, region: u32, ev: RelayEvent) {
        match ev {
            RelayEvent::Packet { src, data } => {
                if !e2e::is_e2e(&data) {
                    debug!(region, "non-E2E packet from {} ignored", src.short());
                    return;
                }
                let opened = match self.sessions.open(&src, &data, Instant::now()) {
                    Ok(o) => o,
                    Err(e) => {
                        debug!(region, "packet from {} dropped: {e}", src.short());
                        return;
                    }
                };
                // Authenticated: this is where the peer is reachable now.
                self.peer_region.insert(src, region);
                self.set_path(src, Path::Relay(region));
                for r in opened.replies {
                    self.send_to_peer(src, r.into()).await;
                }
                let Some(pt) = opened.plaintext else { return };
                match pt.first() {
                    Some(&M_DATA) => {
                        let data = Bytes::from(pt).slice(1..);
                        let _ = self.recv_tx.send((src, data)).await;
                    }
                    Some(&M_PING) if pt.len() == 9 => {
                        let mut m = pt.clone();
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
                                path: Path::Relay(region),
                            });
                        }
                    }
                    _ => debug!("unknown inner message from {}", src.short()),
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
