//! The endpoint's task: I/O glue around the sans-IO parts. One event loop ([`Actor::run`])
//! over API commands, relay events, UDP datagrams, the pacer's timer and a ~100 ms tick. It
//! reads the clock once per event and hands `now` down; it routes E2E packets through
//! [`Sessions`], disco messages to the peer's [`PeerPath`], and executes the [`Action`]s the
//! machine returns ([`Actor::execute`]) on the sockets ([`Actor::send_direct`], the TTL-2
//! punch), the relays ([`RelaySet`]), the [`Pacer`], the [`AddrBook`] and the birthday
//! coordinator and sockets ([`Birthday`], [`BirthdaySockets`]). It also publishes each peer's
//! path ([`Actor::set_path`]: `SharedState` + [`PathEvent`]) and counts packets.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_proto::PublicKey;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use super::addrbook::AddrBook;
use super::birthday::{Birthday, Gate};
use super::outbox::Outbox;
use super::pacer::Pacer;
use super::path::{Action, Env, PathChoice, PeerPath, ACK_TIMEOUT_MIN, VIA_UDP_RELAY};
use super::relays::RelaySet;
use super::sockets::{birthday_socket_budget, BirthdaySockets};
use super::{
    Cmd, EndpointConfig, EndpointError, Path, PathEvent, PingReply, SharedState, M_DATA, M_PING,
    M_PONG,
};
use crate::disco::{self, DiscoKeys, Message};
use crate::e2e::{self, Sessions};
use crate::netcheck;
use crate::relay::RelayEvent;
use crate::udp::{self, Datagram, Sockets};
use crate::udprelay::{self, BindState, Binding, PROTO_FERRY_E2E};
use ferry_proto::udprelay::{Endpoint as UdpRelayEndpoint, GENEVE_LEN, PROTO_DISCO};

/// A Bind unanswered this long is sent again; an Answer whose path is still unproven (no pong
/// through the session) this long after it went out is followed by a new handshake.
const REBIND_AFTER: Duration = Duration::from_millis(500);

/// A UDP relay session with one peer (issue 15): the bind handshake and the framing
/// ([`Binding`]); the path rules are the peer's [`PeerPath`]'s.
struct UdpRelaySession {
    binding: Binding,
    /// The region whose relay serves it (for [`Path::UdpRelay`]).
    region: u32,
    /// When the last Bind or Answer went out.
    last_sent: Instant,
    /// The relay's addresses our sockets can reach, IPv4 first; the binding uses one.
    addrs: Vec<SocketAddr>,
    /// Binds sent to the binding's address without a Challenge back: after
    /// [`BINDS_PER_ADDRESS`] the next address is tried.
    unanswered: u32,
}

/// Unanswered Binds (one per [`REBIND_AFTER`]) before the next advertised address of the
/// relay is tried: one family may be blocked (a dual-stack relay whose IPv4 is firewalled)
/// while the other works.
const BINDS_PER_ADDRESS: u32 = 3;
/// Addresses of one session tried at most (the first ones advertised that our sockets can
/// reach): the list comes from the relay, or from the peer's CallMeMaybeVia.
const UDP_RELAY_ADDRS: usize = 4;

/// How often [`Actor::prune`] runs.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// IP TTL of hole-punching pings ([`Action::Punch`], birthday sockets): past our own NAT
/// router (one hop) but not across the Internet to the peer's NAT.
pub(super) const PUNCH_TTL: u32 = 2;

/// ... and the same hop limit once more, for a peer whose router is only two hops away (two
/// homes on one ISP segment): a router does not check the TTL of a packet addressed to itself,
/// so the TTL-2 punch reaches it and leaves the "unreplied" conntrack entry the punch exists to
/// avoid. An IPv4 Timestamp option (RFC 791, type 68) that is already full, its 4-bit overflow
/// counter at 16 − [`PUNCH_TTL`]: every router that parses it (Linux does, for forwarded and
/// local packets alike, before conntrack keeps any entry) adds one and drops the packet when
/// the counter would pass 15. Our router takes it to 15 and forwards it (creating our mapping);
/// the next one, the peer's own router included, drops it. Measured in the lab (docs/
/// nat-traversal.md): neighbouring routers 0 of 25 trials direct with TTL 2 alone. Setting it
/// needs no privilege. A router that strips the option leaves TTL 2 as the only limit (today's
/// behaviour); one that drops optioned packets makes no mapping (see the docs).
const PUNCH_IP_OPTIONS: [u8; 8] = [68, 8, 9, ((16 - PUNCH_TTL) as u8) << 4, 0, 0, 0, 0];

/// One punch datagram from `sock` to `addr` with [`PUNCH_TTL`] and [`PUNCH_IP_OPTIONS`] as
/// per-packet ancillary data (`IP_TTL`, `IP_RETOPTS`: Linux 4.6 and later), so the socket's own
/// TTL and options never change: a STUN request netcheck sends from the same socket at the same
/// moment is not caught by the punch's limits.
fn sendmsg_punch(
    sock: &tokio::net::UdpSocket,
    addr: std::net::SocketAddrV4,
    pkt: &[u8],
) -> std::io::Result<()> {
    use std::mem::{size_of, zeroed};
    use std::os::fd::AsRawFd;
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut sin: libc::sockaddr_in = unsafe { zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_port = addr.port().to_be();
    sin.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
    let mut iov = libc::iovec {
        iov_base: pkt.as_ptr() as *mut libc::c_void,
        iov_len: pkt.len(),
    };
    let ttl: libc::c_int = PUNCH_TTL as libc::c_int;
    // u64s: aligned for cmsghdr.
    let mut cbuf = [0u64; 16];
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe {
        libc::CMSG_SPACE(size_of::<libc::c_int>() as u32)
            + libc::CMSG_SPACE(PUNCH_IP_OPTIONS.len() as u32)
    } as usize;
    debug_assert!(space <= size_of::<[u64; 16]>());
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut sin as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is `space` bytes, aligned, and holds exactly the two messages
    // CMSG_SPACE was computed for; CMSG_FIRSTHDR/NXTHDR stay inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::IPPROTO_IP;
        (*c).cmsg_type = libc::IP_TTL;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as _;
        std::ptr::copy_nonoverlapping(
            (&ttl as *const libc::c_int).cast::<u8>(),
            libc::CMSG_DATA(c),
            size_of::<libc::c_int>(),
        );
        let c = libc::CMSG_NXTHDR(&msg, c);
        (*c).cmsg_level = libc::IPPROTO_IP;
        (*c).cmsg_type = libc::IP_RETOPTS;
        (*c).cmsg_len = libc::CMSG_LEN(PUNCH_IP_OPTIONS.len() as u32) as _;
        std::ptr::copy_nonoverlapping(
            PUNCH_IP_OPTIONS.as_ptr(),
            libc::CMSG_DATA(c),
            PUNCH_IP_OPTIONS.len(),
        );
    }
    sock.try_io(tokio::io::Interest::WRITABLE, || {
        // SAFETY: every pointer in `msg` refers to a live local of this function.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    })
}

/// Puts `sock` in hole-punching mode ([`PUNCH_TTL`] and [`PUNCH_IP_OPTIONS`]) or back to
/// normal (`ttl` and no options). IPv4 sockets only. The TTL is set whatever happens to the
/// options: a kernel (or sandbox) that refuses IP options still punches with TTL 2 alone, and a
/// socket always gets its TTL back. Errors: the TTL's; an options failure is logged.
fn punch_mode(sock: &tokio::net::UdpSocket, on: bool, ttl: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if sock.local_addr().is_ok_and(|a| a.is_ipv4()) {
        let opts: &[u8] = if on { &PUNCH_IP_OPTIONS } else { &[] };
        // SAFETY: a valid socket fd and a buffer of the length given.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                opts.as_ptr().cast(),
                opts.len() as libc::socklen_t,
            )
        };
        if r != 0 {
            debug!(
                on,
                "cannot set the punch's IP options: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    sock.set_ttl(if on { PUNCH_TTL } else { ttl })
}

/// One datagram from `sock`, now (what the outbox must not delay: a punch, a birthday socket).
async fn send_now(sock: &tokio::net::UdpSocket, addr: SocketAddr, pkt: &[u8]) {
    if let Err(e) = sock.send_to(pkt, addr).await {
        debug!(%addr, "UDP send failed: {e}");
    }
}

/// Completes at `at`; never, with `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// The endpoint's state, owned by its task.
pub(super) struct Actor {
    cfg: EndpointConfig,
    me: PublicKey,
    peers: HashMap<PublicKey, PeerPath>,
    /// The path per peer (the actor's copy of `SharedState::paths`, which it alone writes).
    paths: HashMap<PublicKey, Path>,
    addrs: AddrBook,
    /// Our key for disco, with each peer's box computed once.
    disco: DiscoKeys,
    sessions: Sessions,
    relays: RelaySet,
    /// Relay-bound packets paced (resends and handshake flushes).
    pacer: Pacer,
    birthday: Birthday,
    extra: BirthdaySockets,
    /// Pending [`super::Endpoint::ping`]s by id.
    pings: HashMap<u64, (Instant, oneshot::Sender<PingReply>)>,
    /// UDP relay sessions by peer, and the peer by (relay address, VNI).
    udp_relays: HashMap<PublicKey, UdpRelaySession>,
    udp_relay_index: HashMap<(SocketAddr, u32), PublicKey>,
    recv_tx: mpsc::Sender<(PublicKey, Bytes)>,
    events: broadcast::Sender<PathEvent>,
    shared: Arc<SharedState>,
    cmd_tx: mpsc::Sender<Cmd>,
    sockets: Arc<Sockets>,
    /// The main sockets' datagrams of the current event, sent when it ends.
    outbox: Outbox,
}

/// The channels and shared parts [`Actor::new`] takes from `Endpoint::bind`.
pub(super) struct Parts {
    pub(super) cfg: EndpointConfig,
    pub(super) relays: RelaySet,
    pub(super) sockets: Arc<Sockets>,
    pub(super) shared: Arc<SharedState>,
    pub(super) recv_tx: mpsc::Sender<(PublicKey, Bytes)>,
    pub(super) events: broadcast::Sender<PathEvent>,
    pub(super) cmd_tx: mpsc::Sender<Cmd>,
    pub(super) udp_tx: mpsc::Sender<Datagram>,
}

impl Actor {
    pub(super) fn new(p: Parts) -> Actor {
        Actor {
            me: p.cfg.secret_key.public(),
            peers: HashMap::new(),
            paths: HashMap::new(),
            addrs: AddrBook::new(&p.sockets.local_addrs()),
            disco: DiscoKeys::new(p.cfg.secret_key.clone()),
            sessions: Sessions::new(p.cfg.secret_key.clone()),
            relays: p.relays,
            pacer: Pacer::default(),
            birthday: Birthday::new(p.cfg.direct.probe_interval),
            extra: BirthdaySockets::new(p.udp_tx),
            pings: HashMap::new(),
            udp_relays: HashMap::new(),
            udp_relay_index: HashMap::new(),
            recv_tx: p.recv_tx,
            events: p.events,
            shared: p.shared,
            cmd_tx: p.cmd_tx,
            outbox: Outbox::new(p.cfg.udp_gso, p.sockets.v6.is_some()),
            sockets: p.sockets,
            cfg: p.cfg,
        }
    }

    pub(super) async fn run(
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
                _ = sleep_until_some(self.pacer.deadline()) => {
                    let batch = self.pacer.drain(Instant::now());
                    self.send_paced(batch).await;
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.disco_tick(now).await;
                    if now.saturating_duration_since(last_prune) >= PRUNE_EVERY {
                        last_prune = now;
                        self.prune(now);
                    }
                    for (peer, pkt) in self.sessions.poll(now) {
                        self.send_to_peer(peer, pkt.into(), now).await;
                    }
                    self.pings.retain(|_, (_, tx)| !tx.is_closed());
                    if next_restun.is_some_and(|t| t <= now) {
                        next_restun = self.restun_at();
                        self.spawn_netcheck();
                    }
                }
            }
            self.flush_udp().await;
        }
    }

    /// Sends what the event kept in the outbox, counted.
    async fn flush_udp(&mut self) {
        let f = self.outbox.flush(&self.sockets).await;
        if f.datagrams > 0 {
            let s = &self.shared;
            s.udp_out_datagrams
                .fetch_add(f.datagrams, Ordering::Relaxed);
            s.udp_out_messages.fetch_add(f.messages, Ordering::Relaxed);
        }
    }

    /// Keeps datagram `d` for `to` (from the main socket of its family) until the event ends.
    async fn queue_udp(&mut self, to: SocketAddr, d: &[u8]) {
        if self.sockets.for_addr(&to).is_none() {
            return;
        }
        if !self.outbox.push(to, d) {
            self.flush_udp().await;
            if !self.outbox.push(to, d) {
                debug!(%to, len = d.len(), "datagram larger than the outbox; dropped");
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
        let prev = Some(self.relays.home());
        let tx = self.cmd_tx.clone();
        tokio::spawn(async move {
            let r = netcheck::run(&map, &sockets, prev, opts).await;
            let _ = tx.send(Cmd::Netcheck(r)).await;
        });
    }

    /// The peer's machine, created on first use.
    fn peer_mut(&mut self, peer: PublicKey) -> &mut PeerPath {
        let (cfg, me) = (self.cfg.direct, self.me);
        self.peers
            .entry(peer)
            .or_insert_with(|| PeerPath::new(peer, cfg, peer == me))
    }

    /// Node-wide facts for `peer`'s rules.
    fn env(&self, peer: &PublicKey) -> Env {
        Env {
            me_hard: self.my_nat_hard(),
            has_session: self.sessions.has_session(peer),
            udp_relay_first: self.me < *peer,
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

    async fn on_cmd(&mut self, c: Cmd) {
        let now = Instant::now();
        match c {
            Cmd::Send {
                peer,
                plaintexts,
                done,
            } => {
                self.peer_mut(peer).on_activity(now);
                let mut results = Vec::with_capacity(plaintexts.len());
                for p in &plaintexts {
                    results.push(self.seal_and_send(peer, p, now).await);
                }
                // Handed to the kernel before the caller hears back (as `send_to` was): an
                // endpoint dropped right after `send` loses nothing it said was sent.
                self.flush_udp().await;
                let _ = done.send(results);
            }
            Cmd::Ping { peer, done } => {
                self.peer_mut(peer).on_activity(now);
                let id: u64 = rand::random();
                self.pings.insert(id, (now, done));
                let mut m = vec![M_PING];
                m.extend_from_slice(&id.to_be_bytes());
                if let Err(e) = self.seal_and_send(peer, &m, now).await {
                    debug!("ping to {} not sent: {e}", peer.short());
                    self.pings.remove(&id);
                }
            }
            Cmd::SetPeerRegion(peer, region) => self.relays.set_peer_region(peer, region),
            Cmd::UdpRelay {
                peer,
                region,
                result,
            } => match result {
                Ok(ep) => {
                    // Tell the peer (via DERP, end to end), then bind our side.
                    let msg = Message::CallMeMaybeVia(ep.clone());
                    let pkt = self.disco.seal(&peer, &msg);
                    self.relays.send(peer, pkt.into());
                    self.start_udp_relay(peer, region, ep, now).await;
                }
                Err(e) => {
                    info!(peer = %peer.short(), region, "no UDP relay session: {e}; the peer stays on DERP")
                }
            },
            Cmd::RelayUp(region, r) => self.relays.on_relay_up(region, r),
            Cmd::Netcheck(report) => {
                // A forced home stays; otherwise the best region, with hysteresis against the
                // current home (the bind-time report was measured before there was one).
                let homes = netcheck::home_latencies(&self.cfg.relay_map, &report.region_latency);
                let new_home = match self.cfg.home_region {
                    Some(_) => None,
                    None => netcheck::choose_home(&homes, Some(self.relays.home())),
                };
                *self.shared.report.lock().expect("lock") = Some(report);
                if let Some(h) = new_home.filter(|h| *h != self.relays.home()) {
                    self.relays.change_home(h);
                }
            }
        }
    }

    async fn seal_and_send(
        &mut self,
        peer: PublicKey,
        plaintext: &[u8],
        now: Instant,
    ) -> Result<(), EndpointError> {
        let pkts = self.sessions.seal(&peer, plaintext, now)?;
        for p in pkts {
            self.send_to_peer(peer, p.into(), now).await;
        }
        Ok(())
    }

    /// Sends an E2E packet to `peer` on its current path ([`PeerPath::on_send`]).
    async fn send_to_peer(&mut self, peer: PublicKey, pkt: Bytes, now: Instant) {
        let env = self.env(&peer);
        let actions = self.peer_mut(peer).on_send(now, pkt, &env);
        self.execute(peer, actions, now).await;
    }

    /// Carries out what `peer`'s machine decided, in order.
    async fn execute(&mut self, peer: PublicKey, actions: Vec<Action>, now: Instant) {
        for a in actions {
            match a {
                Action::SetPath(PathChoice::Direct(addr)) => {
                    self.set_path(peer, Path::Direct(addr))
                }
                Action::SetPath(PathChoice::Relay) => {
                    let region = self.relays.region_for(&peer);
                    self.set_path(peer, Path::Relay(region));
                }
                Action::SetPath(PathChoice::UdpRelay) => {
                    if let Some(s) = self.udp_relays.get(&peer) {
                        let region = s.region;
                        self.set_path(peer, Path::UdpRelay(region));
                    }
                }
                Action::LeaveDirect(addr) => {
                    if self.paths.get(&peer) == Some(&Path::Direct(addr)) {
                        let region = self.relays.region_for(&peer);
                        self.set_path(peer, Path::Relay(region));
                    }
                }
                Action::SendDirect { via, pkt, .. } if via == VIA_UDP_RELAY => {
                    self.send_udp_relay(peer, PROTO_FERRY_E2E, &pkt).await;
                    self.shared.sent_udp_relay.fetch_add(1, Ordering::Relaxed);
                }
                Action::SendDirect { addr, via, pkt } => {
                    self.send_direct(via, addr, &pkt).await;
                    self.shared.sent_direct.fetch_add(1, Ordering::Relaxed);
                }
                Action::SendRelay { pkt } => {
                    self.shared.sent_relay.fetch_add(1, Ordering::Relaxed);
                    self.relays.send(peer, pkt);
                }
                Action::QueuePaced { pkts, resend } => {
                    let batch = self.pacer.push(now, peer, pkts, resend);
                    self.send_paced(batch).await;
                }
                Action::Ping {
                    addr,
                    via,
                    txid,
                    pad,
                } => {
                    let msg = Message::Ping {
                        txid,
                        node_key: self.me,
                    };
                    let pkt = self.disco.seal_padded(&peer, &msg, pad);
                    self.send_disco_on(peer, via, addr, &pkt).await;
                }
                Action::Punch { addr } => self.punch(peer, addr).await,
                Action::Pong { addr, via, txid } => {
                    let msg = Message::Pong { txid, src: addr };
                    let pong = self.disco.seal(&peer, &msg);
                    self.send_disco_on(peer, via, addr, &pong).await;
                }
                Action::CallMeMaybe { punched } => self.send_call_me_maybe(peer, punched).await,
                Action::OpenBirthday {
                    endpoints,
                    announce,
                } => {
                    if self.birthday_open(peer, &endpoints, now).await && announce {
                        // Our mappings are open now: say so, the peer probes them.
                        self.send_call_me_maybe(peer, true).await;
                    }
                }
                Action::StartSpray {
                    endpoints,
                    eligible,
                } => {
                    self.birthday.start_spray(now, peer, &endpoints, eligible);
                }
                Action::MapAddr { addr } => self.addrs.map_addr(addr, peer, now),
                Action::Observed { addr } => self.addrs.observe(addr, now),
                Action::AllocateUdpRelay => self.allocate_udp_relay(peer),
                Action::DropUdpRelay => self.drop_udp_relay(&peer),
            }
        }
    }

    /// Sends what the pacer released via the relays, counted.
    async fn send_paced(&mut self, batch: Vec<super::pacer::Paced>) {
        if batch.is_empty() {
            return;
        }
        let resent = batch.iter().filter(|p| p.resend).count() as u64;
        self.shared
            .resent_via_relay
            .fetch_add(resent, Ordering::Relaxed);
        self.shared
            .sent_relay
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for p in batch {
            self.relays.send(p.peer, p.pkt);
        }
    }

    /// Sends a datagram straight to `addr` from the data socket (`via` = [`udp::MAIN`]: kept
    /// in the outbox until the event ends) or from one of the birthday sockets (at once).
    async fn send_direct(&mut self, via: u32, addr: SocketAddr, pkt: &[u8]) {
        if self.shared.blackhole_direct.load(Ordering::Relaxed) {
            return;
        }
        if via == udp::MAIN {
            return self.queue_udp(addr, pkt).await;
        }
        if let Some(sock) = self.extra.get(via) {
            send_now(sock, addr, pkt).await;
        }
    }

    /// A disco message to `addr` from socket `via`, or through the peer's UDP relay session.
    async fn send_disco_on(&mut self, peer: PublicKey, via: u32, addr: SocketAddr, pkt: &[u8]) {
        if via == VIA_UDP_RELAY {
            self.send_udp_relay(peer, PROTO_DISCO, pkt).await;
        } else {
            self.send_direct(via, addr, pkt).await;
        }
    }

    /// `pkt` framed for the peer's UDP relay session, to the relay from the main socket. Not
    /// subject to the direct-path test hook (it is not the direct path).
    async fn send_udp_relay(&mut self, peer: PublicKey, protocol: u16, pkt: &[u8]) {
        let Some(s) = self.udp_relays.get(&peer) else {
            warn!(peer = %peer.short(), "no UDP relay session for a packet on its path; dropped");
            return;
        };
        let relay = s.binding.relay();
        let d = s.binding.wrap(protocol, pkt);
        self.send_raw(relay, &d).await;
    }

    /// A datagram to `addr` from the main socket of its family, when the event ends.
    async fn send_raw(&mut self, addr: SocketAddr, d: &[u8]) {
        self.queue_udp(addr, d).await;
    }

    /// Asks the home relay for a UDP relay session with `peer` (in the background; the answer
    /// comes back as [`Cmd::UdpRelay`]).
    fn allocate_udp_relay(&mut self, peer: PublicKey) {
        let region = self.relays.home();
        let Some(fut) = self.relays.allocate_udp_relay(region, [self.me, peer]) else {
            return;
        };
        let tx = self.cmd_tx.clone();
        tokio::spawn(async move {
            let result = fut.await;
            let _ = tx
                .send(Cmd::UdpRelay {
                    peer,
                    region,
                    result,
                })
                .await;
        });
    }

    /// Sets up the UDP relay session `ep` with `peer` (ours, or the peer's CallMeMaybeVia):
    /// sends our Bind and tells the peer's machine. The same session again changes nothing.
    async fn start_udp_relay(
        &mut self,
        peer: PublicKey,
        region: u32,
        ep: UdpRelayEndpoint,
        now: Instant,
    ) {
        if !(ep.keys.contains(&self.me) && ep.keys.contains(&peer)) || peer == self.me {
            debug!(peer = %peer.short(), "UDP relay session for another pair; ignored");
            return;
        }
        // The addresses our sockets can reach, IPv4 first (that socket always exists); the
        // first is bound, the others are tried in turn if it goes unanswered.
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for a in &ep.addrs {
            if !a.ip().is_unspecified()
                && a.port() != 0
                && self.sockets.for_addr(a).is_some()
                && !addrs.contains(a)
                && addrs.len() < UDP_RELAY_ADDRS
            {
                addrs.push(*a);
            }
        }
        addrs.sort_by_key(|a| a.is_ipv6());
        let Some(&relay) = addrs.first() else {
            debug!(peer = %peer.short(), addrs = ?ep.addrs, "UDP relay session with no usable address");
            return;
        };
        let vni = ep.vni;
        if self
            .udp_relays
            .get(&peer)
            .is_some_and(|s| s.binding.vni() == vni && s.addrs == addrs)
        {
            return;
        }
        self.drop_udp_relay(&peer);
        let mut binding = Binding::new(self.cfg.secret_key.clone(), ep, relay, peer);
        let bind = binding.bind();
        self.send_raw(relay, &bind).await;
        info!(peer = %peer.short(), region, %relay, vni, "UDP relay session: binding");
        self.udp_relays.insert(
            peer,
            UdpRelaySession {
                binding,
                region,
                last_sent: now,
                addrs,
                unanswered: 1,
            },
        );
        self.udp_relay_index.insert((relay, vni), peer);
        let actions = self.peer_mut(peer).on_udp_relay(now, relay, true);
        self.execute(peer, actions, now).await;
    }

    fn drop_udp_relay(&mut self, peer: &PublicKey) {
        if let Some(s) = self.udp_relays.remove(peer) {
            self.udp_relay_index
                .remove(&(s.binding.relay(), s.binding.vni()));
        }
    }

    /// A relay reconnected: the UDP relay sessions it served are given up (a restarted relay
    /// has none of them any more), and new ones follow by the usual rules.
    async fn on_relay_reconnected(&mut self, region: u32) {
        let now = Instant::now();
        let peers: Vec<PublicKey> = self
            .udp_relays
            .iter()
            .filter(|(_, s)| s.region == region)
            .map(|(p, _)| *p)
            .collect();
        for peer in peers {
            let actions = match self.peers.get_mut(&peer) {
                Some(pp) => pp.on_udp_relay_reconnected(),
                None => {
                    self.drop_udp_relay(&peer);
                    continue;
                }
            };
            self.execute(peer, actions, now).await;
        }
    }

    /// Binds again where the handshake stalls (a lost Bind, Challenge or Answer), until the
    /// path is proven or given up.
    async fn rebind_udp_relays(&mut self, now: Instant) {
        let mut out = Vec::new();
        let mut moved = Vec::new();
        for (peer, s) in &mut self.udp_relays {
            let proven = self.peers.get(peer).is_some_and(|pp| pp.udp_relay_proven());
            if proven || now.saturating_duration_since(s.last_sent) < REBIND_AFTER {
                continue;
            }
            // Binding: the same Bind again; Answered but no pong yet: a new handshake.
            let wait = if s.binding.state() == BindState::Answered {
                REBIND_AFTER * 2
            } else {
                REBIND_AFTER
            };
            if now.saturating_duration_since(s.last_sent) < wait {
                continue;
            }
            s.last_sent = now;
            // Answered but unproven: `bind` below starts a new handshake at the same address.
            let restart = s.binding.state() == BindState::Answered;
            if !restart && s.unanswered >= BINDS_PER_ADDRESS && s.addrs.len() > 1 {
                // Unanswered there: the next address (the index moves with it).
                let old = s.binding.relay();
                let at = s.addrs.iter().position(|a| *a == old).unwrap_or(0);
                let next = s.addrs[(at + 1) % s.addrs.len()];
                s.binding.move_to(next);
                s.unanswered = 0;
                moved.push((*peer, old, next, s.binding.vni()));
            }
            s.unanswered = if restart { 1 } else { s.unanswered + 1 };
            out.push((s.binding.relay(), s.binding.bind()));
        }
        for (peer, old, next, vni) in moved {
            info!(peer = %peer.short(), vni, "UDP relay: no Challenge from {old}; binding at {next}");
            self.udp_relay_index.remove(&(old, vni));
            self.udp_relay_index.insert((next, vni), peer);
            // The same session: it is still given up if no address answers in time.
            self.peer_mut(peer).on_udp_relay_moved(next);
        }
        for (relay, d) in out {
            self.send_raw(relay, &d).await;
        }
    }

    /// A Geneve datagram on the main socket: a UDP relay session's Challenge, or a packet the
    /// peer sent through it.
    async fn on_geneve(&mut self, d: Datagram) {
        let Some((h, _)) = udprelay::unwrap(&d.data) else {
            return;
        };
        let Some(&peer) = self.udp_relay_index.get(&(d.from, h.vni)) else {
            debug!(from = %d.from, vni = h.vni, "Geneve datagram of no UDP relay session");
            return;
        };
        let now = Instant::now();
        if h.control {
            let Some(s) = self.udp_relays.get_mut(&peer) else {
                return;
            };
            if let Some(answer) = s.binding.on_datagram(d.from, &d.data) {
                s.last_sent = now;
                s.unanswered = 0;
                self.send_raw(d.from, &answer).await;
                // Bound (the relay does not confirm): prove the path with a ping through it.
                let ping = self.peer_mut(peer).ping(now, d.from, VIA_UDP_RELAY);
                self.execute(peer, vec![ping], now).await;
            }
            return;
        }
        let payload = d.data.slice(GENEVE_LEN..);
        match h.protocol {
            PROTO_DISCO => {
                self.on_disco(&payload, Some(d.from), VIA_UDP_RELAY, Some(peer), None)
                    .await
            }
            PROTO_FERRY_E2E => {
                let region = self.udp_relays.get(&peer).map_or(0, |s| s.region);
                self.on_e2e(peer, payload, Path::UdpRelay(region)).await;
            }
            p => {
                debug!(peer = %peer.short(), protocol = p, "UDP relay datagram of an unknown protocol")
            }
        }
    }

    /// The punch ([`PUNCH_TTL`], [`PUNCH_IP_OPTIONS`], see [`PeerPath`]'s `punch`): an
    /// untracked ping from the main IPv4 socket in punching mode for this one send.
    async fn punch(&mut self, peer: PublicKey, addr: SocketAddr) {
        // What the event queued goes first: the punch itself cannot wait in the outbox.
        self.flush_udp().await;
        let Some(sock) = self.sockets.for_addr(&addr).cloned() else {
            return;
        };
        let msg = Message::Ping {
            txid: disco::new_txid(),
            node_key: self.me,
        };
        let pkt = self.disco.seal(&peer, &msg);
        if self.shared.blackhole_direct.load(Ordering::Relaxed) {
            return;
        }
        if let SocketAddr::V4(v4) = addr {
            let sent = loop {
                if let Err(e) = sock.writable().await {
                    break Err(e);
                }
                match sendmsg_punch(&sock, v4, &pkt) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    r => break r,
                }
            };
            match sent {
                Ok(()) => return,
                Err(e) => {
                    debug!(%addr, "per-packet punch options refused ({e}); setting them on the socket")
                }
            }
        }
        // Older kernels: the socket's TTL and options for this one send.
        let old = sock.ttl().unwrap_or(64);
        // At once, not via the outbox: the socket is in punching mode for this one datagram.
        match punch_mode(&sock, true, old) {
            Ok(()) => send_now(&sock, addr, &pkt).await,
            Err(e) => debug!(%addr, "cannot set the punch's TTL and IP options: {e}"),
        }
        if let Err(e) = punch_mode(&sock, false, old) {
            warn!("cannot reset the socket after a punch: {e}");
        }
    }

    async fn send_call_me_maybe(&mut self, peer: PublicKey, punched: bool) {
        // While our birthday session towards the peer is held its mappings are open: say
        // "punched", so that the (easy) peer sprays, whatever round this CallMeMaybe belongs to.
        let punched = punched || self.birthday.holds(peer, Instant::now());
        let endpoints = {
            let report = self.shared.report.lock().expect("lock");
            self.addrs.my_endpoints(report.as_ref())
        };
        let msg = Message::CallMeMaybe {
            endpoints,
            hard_nat: self.my_nat_hard(),
            punched,
        };
        let pkt = self.disco.seal(&peer, &msg);
        // The pings that opened our side go out before the peer hears about them.
        self.flush_udp().await;
        self.relays.send(peer, pkt.into());
    }

    /// Birthday probing, hard side: if [`Birthday`] allows, opens its sockets and punches
    /// (TTL 2) from each towards the peer's public IPv4 endpoints, so the NAT holds that many
    /// mappings to them; the peer's random-port probes that hit one come in on that socket,
    /// which then carries the path. Returns whether it opened a session.
    async fn birthday_open(
        &mut self,
        peer: PublicKey,
        endpoints: &[SocketAddr],
        now: Instant,
    ) -> bool {
        let targets = match self.birthday.gate(now, peer, endpoints) {
            Gate::Open(targets) => targets,
            // Our mappings towards the peer are open already: it may be told so.
            Gate::Held => return true,
            Gate::No => return false,
        };
        // What the event queued (pings timed from `now`) leaves before the sockets open.
        self.flush_udp().await;
        self.close_unused_sockets(now);
        let Some(want) = self.birthday.start(now, peer, birthday_socket_budget()) else {
            return false;
        };
        let ip = self
            .sockets
            .v4
            .local_addr()
            .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |a| {
                a.ip()
            });
        let mut opened = 0;
        for _ in 0..want {
            let (via, sock) = match self.extra.open(ip, &self.sockets.stun) {
                Ok(x) => x,
                Err(e) => {
                    warn!("birthday probing: cannot open more sockets after {opened}: {e}");
                    break;
                }
            };
            let msg = Message::Ping {
                txid: disco::new_txid(),
                node_key: self.me,
            };
            let pkt = self.disco.seal(&peer, &msg);
            let old = sock.ttl().unwrap_or(64);
            if punch_mode(&sock, true, old).is_ok() {
                for t in &targets {
                    self.send_direct(via, *t, &pkt).await;
                }
            }
            let _ = punch_mode(&sock, false, old);
            opened += 1;
        }
        info!(peer = %peer.short(), sockets = opened, ?targets, "birthday probing: hard side opened its mappings");
        opened > 0
    }

    /// Closes birthday sockets that no peer's direct path uses, once their session is over.
    fn close_unused_sockets(&mut self, now: Instant) {
        if !self.birthday.session_over(now) {
            return;
        }
        let in_use: HashSet<u32> = self.peers.values().filter_map(PeerPath::best_via).collect();
        self.extra.retain(&in_use);
    }

    /// Sends the birthday spray's probes that are due (tracked pings from the main socket).
    async fn spray_step(&mut self, now: Instant) {
        let peers = &self.peers;
        let Some((peer, batch)) = self.birthday.spray_step(now, |p| {
            peers.get(p).is_none_or(|pp| pp.best_via().is_some())
        }) else {
            return;
        };
        let pp = self.peer_mut(peer);
        let actions: Vec<Action> = batch
            .into_iter()
            .map(|a| pp.ping(now, a, udp::MAIN))
            .collect();
        self.execute(peer, actions, now).await;
    }

    /// Forgets peers idle with nothing in flight ([`PeerPath::is_idle`], nothing paced, no
    /// spray towards them), and stale address mappings.
    fn prune(&mut self, now: Instant) {
        self.addrs.expire_mappings(now);
        let spray = self.birthday.spray_peer();
        let idle: Vec<PublicKey> = self
            .peers
            .iter()
            .filter(|(p, pp)| pp.is_idle(now) && !self.pacer.has(p) && spray != Some(**p))
            .map(|(p, _)| *p)
            .collect();
        for p in idle {
            self.drop_udp_relay(&p);
            self.peers.remove(&p);
            self.birthday.forget(&p);
            self.paths.remove(&p);
            self.shared.paths.lock().expect("lock").remove(&p);
        }
    }

    /// Every peer's [`PeerPath::tick`], then the spray and the birthday sockets.
    async fn disco_tick(&mut self, now: Instant) {
        if !self.cfg.direct.enabled {
            return;
        }
        self.addrs.expire_observed(now);
        let me_hard = self.my_nat_hard();
        let mut all = Vec::new();
        for (peer, pp) in &mut self.peers {
            let env = Env {
                me_hard,
                has_session: self.sessions.has_session(peer),
                udp_relay_first: self.me < *peer,
            };
            let actions = pp.tick(now, &env);
            if !actions.is_empty() {
                all.push((*peer, actions));
            }
        }
        for (peer, actions) in all {
            self.execute(peer, actions, now).await;
        }
        self.spray_step(now).await;
        self.close_unused_sockets(now);
        self.rebind_udp_relays(now).await;
    }

    /// A disco message, from UDP (`from`, on socket `via`), through a UDP relay session
    /// (`from` = the relay, `via` = [`VIA_UDP_RELAY`], `relay_src` = the session's peer, which
    /// must be the sealer) or via DERP (`from` = None, `relay_src` = the relay's source key,
    /// which must be the sealer; `region` = the relay's region).
    async fn on_disco(
        &mut self,
        data: &[u8],
        from: Option<SocketAddr>,
        via: u32,
        relay_src: Option<PublicKey>,
        region: Option<u32>,
    ) {
        if !self.cfg.direct.enabled {
            return;
        }
        let (peer, msg) = match self.disco.open(data, relay_src.as_ref()) {
            Ok(x) => x,
            Err(e) => {
                debug!(?from, "disco message dropped: {e}");
                return;
            }
        };
        let now = Instant::now();
        let actions = match (msg, from) {
            (Message::Ping { txid, node_key }, Some(src)) => {
                if node_key != peer {
                    debug!(%src, "disco ping whose node key is not its sealer's; dropped");
                    return;
                }
                self.peer_mut(peer).on_ping(now, src, via, txid)
            }
            (
                Message::Pong {
                    txid,
                    src: observed,
                },
                Some(src),
            ) => {
                if via != udp::MAIN && via != VIA_UDP_RELAY && !self.extra.contains(via) {
                    debug!(%src, "pong on a birthday socket closed meanwhile; ignored");
                    return;
                }
                let Some(pp) = self.peers.get_mut(&peer) else {
                    return;
                };
                pp.on_pong(now, src, via, txid, observed)
            }
            (
                Message::CallMeMaybe {
                    endpoints,
                    hard_nat,
                    punched,
                },
                None,
            ) => {
                let env = self.env(&peer);
                self.peer_mut(peer)
                    .on_call_me_maybe(now, endpoints, hard_nat, punched, &env)
            }
            (Message::CallMeMaybeVia(ep), None) => {
                if !self.cfg.direct.udp_relay {
                    return;
                }
                // The session's region: the relay whose server key it names, if we are
                // connected to it; else the region the message came through.
                let region = self
                    .relays
                    .region_of_server(&ep.server_key)
                    .or(region)
                    .unwrap_or_else(|| self.relays.home());
                self.start_udp_relay(peer, region, ep, now).await;
                return;
            }
            (m, _) => {
                debug!(?from, "disco {m:?} on an unexpected path; ignored");
                return;
            }
        };
        self.execute(peer, actions, now).await;
    }

    async fn on_udp(&mut self, d: Datagram) {
        if d.via == udp::MAIN && udprelay::is_geneve(&d.data) {
            self.on_geneve(d).await;
            return;
        }
        if self.shared.blackhole_direct.load(Ordering::Relaxed) {
            return;
        }
        if disco::is_disco(&d.data) {
            self.on_disco(&d.data, Some(d.from), d.via, None, None)
                .await;
        } else if e2e::is_e2e(&d.data) {
            // By the session index in the packet, not by the source address (which anyone
            // can spoof); initiations by the address a disco message proved (a spoof makes
            // the handshake fail, and it is retried).
            let Some(peer) = self
                .sessions
                .peer_of(&d.data)
                .or_else(|| self.addrs.peer_at(&d.from))
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
            self.relays.set_peer_region(src, region);
            if self.peers.get(&src).and_then(|pp| pp.direct(now)).is_none() {
                self.set_path(src, via);
            }
        }
        if !opened.replies.is_empty() {
            let env = self.env(&src);
            let replies = opened.replies.into_iter().map(Bytes::from).collect();
            let actions = self.peer_mut(src).on_flush(now, replies, &env);
            self.execute(src, actions, now).await;
        }
        let Some(pt) = opened.plaintext else { return };
        self.peer_mut(src).on_activity(now);
        match pt.first() {
            Some(&M_DATA) => {
                let data = Bytes::from(pt).slice(1..);
                let _ = self.recv_tx.send((src, data)).await;
            }
            Some(&M_PING) if pt.len() == 9 => {
                let mut m = pt;
                m[0] = M_PONG;
                if let Err(e) = self.seal_and_send(src, &m, now).await {
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
                    self.on_disco(&data, None, udp::MAIN, Some(src), Some(region))
                        .await;
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
                if generation > 1 {
                    self.on_relay_reconnected(region).await;
                }
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
