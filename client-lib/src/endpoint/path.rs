//! One peer's direct path, as a sans-IO state machine ([`PeerPath`]).
//!
//! No sockets, no async code, no locks and no clock: every input takes `now` from the caller
//! and returns the [`Action`]s it decided on, which the actor ([`super::actor`]) executes **in
//! order** (the order matters: punches before the CallMeMaybe that says "punched", birthday
//! sockets opened before the CallMeMaybe that announces them). The machine keeps the per-peer
//! state — candidates, pings in flight, the direct path and its last pong, the packets waiting
//! for an acknowledgement — and every rule about it (module docs of [`super`], 4. and 5.):
//!
//! - [`PeerPath::on_send`]: the path of one E2E packet — direct while the last pong is younger
//!   than `trust`, also via the relay while stale (older than 2 heartbeats), suspect, of a
//!   size the path lost, or when the resend buffer is full; otherwise via the relay, probing.
//!   Direct-only packets are kept until a pong acknowledges them; ack pings (padded to the
//!   largest kept packet) are due after [`ACK_INTERVAL`] or [`ACK_COUNT`] packets; an ack ping
//!   unanswered for the ack timeout makes the path suspect and resends what is kept.
//! - [`PeerPath::on_flush`]: a handshake's queued packets (paced via the relay when many).
//! - [`PeerPath::on_ping`], [`PeerPath::on_pong`], [`PeerPath::on_call_me_maybe`]: disco.
//! - [`PeerPath::tick`]: expiry (relay fallback), heartbeats, overdue ack pings, probes.
//! - [`PeerPath::ping`]: a tracked ping (the birthday spray uses it so its pongs match).
//!
//! Node-wide facts come in per call through [`Env`]; node-wide state (the address book, the
//! relays, the pacer, the birthday session) is the actor's, reached through actions. Birthday
//! probing is node-wide (one session and one spray at a time), so the machine only asks for it
//! ([`Action::OpenBirthday`], [`Action::StartSpray`]) and the sans-IO
//! [`super::birthday::Birthday`] coordinator applies the node-wide gates.
//!
//! Log lines keep their texts: `tests/nat_lab_no_loss.rs` reads `direct path suspect`
//! (`resent=N`) and `resending unacknowledged` (`n=N`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_proto::PublicKey;
use tracing::{debug, info};

use super::addrbook::{remember, ADDR_TTL};
use super::pacer::RESEND_BURST;
use super::{recent, DirectOptions};
use crate::disco::{self, TxId};
use crate::udp;

/// Most candidate addresses kept per peer.
pub(super) const MAX_CANDIDATES: usize = 64;
/// A peer with no traffic, no probe and no direct path for this long is forgotten (its
/// `Endpoint::path` becomes `None`; its E2E session lives on in `Sessions`).
pub(super) const PEER_IDLE: Duration = Duration::from_secs(600);
/// Most E2E packets kept for a resend (see [`PeerPath::unacked`]); beyond it packets go on
/// both paths. Well inside the receiver's replay window ([`crate::e2e::REPLAY_WINDOW`]).
pub(super) const MAX_UNACKED: usize = 4096;
/// Most bytes kept for a resend.
pub(super) const MAX_UNACKED_BYTES: usize = 4 << 20;
/// While data goes direct, ping the path (an "ack ping") when the oldest unacknowledged
/// packet is this old ...
pub(super) const ACK_INTERVAL: Duration = Duration::from_millis(100);
/// ... or this many packets are unacknowledged.
pub(super) const ACK_COUNT: usize = 128;
/// An ack ping unanswered for `ACK_RTTS` round trips (at least `ACK_TIMEOUT_MIN`) makes the
/// direct path suspect.
pub(super) const ACK_RTTS: u32 = 4;
pub(super) const ACK_TIMEOUT_MIN: Duration = Duration::from_millis(200);
pub(super) const ACK_TIMEOUT_MAX: Duration = Duration::from_secs(2);
/// A ping to an address is not repeated for this long (disco answers take one round trip).
pub(super) const PING_AGAIN_AFTER: Duration = Duration::from_millis(500);
/// Ack pings up to this size are not "padded" (a lost one says nothing about packet sizes).
pub(super) const SMALL_PING_MAX: usize = 1_280;
/// How long packets of a size the direct path lost go on both paths before it is tried again.
pub(super) const TOO_BIG_RETRY: Duration = Duration::from_secs(30);
/// At most one answer per peer to its unpunched CallMeMaybes this often (they come at most
/// every `probe_interval` from a well-behaved peer); and at most
/// [`disco::MAX_ENDPOINTS`] full-TTL pings per peer this often in answer to punched ones.
pub(super) const RESPONSE_INTERVAL: Duration = Duration::from_secs(1);

/// The socket id of the UDP relay path ([`Action::SendDirect`], [`Action::Ping`],
/// [`Action::Pong`] with this `via` go through the peer's UDP relay session, Geneve-framed, from
/// the main socket; the address is the relay's). Birthday socket ids never reach it.
pub(super) const VIA_UDP_RELAY: u32 = u32::MAX;
/// The allocating side asks for a UDP relay session once the peer has had no direct path for
/// this long while probing (at once when both NATs are hard: punching cannot work there).
/// Direct probing goes on; the session is only used while there is no direct path.
pub(super) const UDP_RELAY_AFTER: Duration = Duration::from_secs(1);
/// The other side asks only this much later (the allocator's relay may lack the UDP relay, as
/// derper does); both asking the same relay get the same session.
pub(super) const UDP_RELAY_AFTER_OTHER: Duration = Duration::from_secs(6);
/// While the UDP relay path is unproven, a ping through it from the peer (which is bound, then)
/// is answered with a ping of ours (at most one per this interval), whatever pings we sent
/// before: those may have reached the relay before the peer had bound (forwarded nowhere).
/// Each ping-back draws a pong that proves the path, so the exchange ends after one round trip.
pub(super) const UDP_RELAY_PING_BACK: Duration = Duration::from_millis(10);
/// At most one allocation per peer this often.
pub(super) const UDP_RELAY_RETRY: Duration = Duration::from_secs(10);
/// A UDP relay path with no pong for this long (since it was set up, or since its last pong)
/// is given up (the relay restarted, the session expired, our NAT mapping changed); a new
/// allocation may follow.
pub(super) const UDP_RELAY_GIVE_UP: Duration = Duration::from_secs(15);

/// Node-wide facts a peer's rules depend on, passed per call (read-only).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Env {
    /// Netcheck found our NAT hard (mapping varies by destination).
    pub(super) me_hard: bool,
    /// The peer has proven its key in a Noise handshake (birthday spray gate).
    pub(super) has_session: bool,
    /// We are the side that asks for a UDP relay session first (the lower node key).
    pub(super) udp_relay_first: bool,
}

/// The path data to the peer goes on, as the machine sees it (the actor maps `Relay` to the
/// peer's region).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PathChoice {
    /// Direct, to this address.
    Direct(SocketAddr),
    /// Via the peer's relay.
    Relay,
    /// Through the peer's UDP relay session.
    UdpRelay,
}

/// What the actor does for the machine, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Publish the path (a [`super::PathEvent`] if it changed).
    SetPath(PathChoice),
    /// The direct path at `addr` expired: if the published path is `Direct(addr)`, it becomes
    /// the relay.
    LeaveDirect(SocketAddr),
    /// An E2E packet on the direct path, from socket `via` (counts `sent_direct`).
    SendDirect {
        /// Peer's address.
        addr: SocketAddr,
        /// Our socket ([`udp::MAIN`] or a birthday socket).
        via: u32,
        /// The ciphertext.
        pkt: Bytes,
    },
    /// An E2E packet via the peer's relay, now (counts `sent_relay`).
    SendRelay {
        /// The ciphertext.
        pkt: Bytes,
    },
    /// E2E packets via the relay, paced ([`super::pacer::Pacer`]); `resend`: unacknowledged
    /// direct packets sent again (counted as such).
    QueuePaced {
        /// The ciphertexts, oldest first.
        pkts: Vec<Bytes>,
        /// Resends (true) or a handshake's flush (false).
        resend: bool,
    },
    /// A tracked disco ping from socket `via`, padded to at least `pad` bytes.
    Ping {
        /// Peer's address.
        addr: SocketAddr,
        /// Our socket.
        via: u32,
        /// Its transaction id (the pong echoes it).
        txid: TxId,
        /// Minimum datagram size (0: not padded).
        pad: usize,
    },
    /// An untracked ping with IP TTL 2 from the main IPv4 socket (opens our NAT only).
    Punch {
        /// Peer's IPv4 address.
        addr: SocketAddr,
    },
    /// Answer to a ping, from the socket it came to.
    Pong {
        /// Where the ping came from.
        addr: SocketAddr,
        /// The socket it came to.
        via: u32,
        /// The ping's transaction id.
        txid: TxId,
    },
    /// A CallMeMaybe via the relay with our endpoints and NAT hardness.
    CallMeMaybe {
        /// Whether we have just opened our NAT towards the peer's fresh candidates.
        punched: bool,
    },
    /// Birthday probing, hard side: open the sockets if the node-wide gates allow; if
    /// `announce` and sockets opened, then send `CallMeMaybe { punched: true }`.
    OpenBirthday {
        /// The peer's endpoints (public IPv4 ones are the targets).
        endpoints: Vec<SocketAddr>,
        /// Announce the opened sockets with a CallMeMaybe.
        announce: bool,
    },
    /// Birthday probing, easy side: start the spray if the node-wide gates allow.
    StartSpray {
        /// The hard peer's endpoints.
        endpoints: Vec<SocketAddr>,
        /// The peer is active or has a session (else no spray).
        eligible: bool,
    },
    /// Address book: a disco message from `addr` proved the peer.
    MapAddr {
        /// The source address.
        addr: SocketAddr,
    },
    /// Address book: the peer saw us at `addr` (a pong's observed source).
    Observed {
        /// Our address as seen.
        addr: SocketAddr,
    },
    /// Ask our home relay for a UDP relay session with the peer (then tell the peer with a
    /// CallMeMaybeVia, bind, and ping through it).
    AllocateUdpRelay,
    /// The UDP relay path was given up: forget its session.
    DropUdpRelay,
}

/// The peer's UDP relay path, as the machine sees it (the session itself is the actor's).
#[derive(Debug, Clone, Copy)]
struct UdpRelaySlot {
    /// The relay's UDP address.
    addr: SocketAddr,
    /// When the session was set up here.
    since: Instant,
    /// The last pong through it.
    pong: Option<Instant>,
    /// The last ping through it.
    last_ping: Option<Instant>,
    /// The last ping through it in answer to the peer's ([`UDP_RELAY_PING_BACK`]).
    last_ping_back: Option<Instant>,
    /// The published path is this one (to move it back to DERP when it goes stale).
    carried: bool,
}

/// A disco ping in flight.
#[derive(Debug, Clone, Copy)]
struct PingSent {
    addr: SocketAddr,
    /// The socket it went from ([`udp::MAIN`] or a birthday socket).
    via: u32,
    at: Instant,
    /// [`PeerPath::next_seq`] when it was sent: its pong acknowledges the direct-only packets
    /// numbered below.
    mark: u64,
}

/// What the endpoint knows about one peer's direct paths, and the rules (module docs).
#[derive(Debug)]
pub(super) struct PeerPath {
    /// The peer (for logs).
    peer: PublicKey,
    cfg: DirectOptions,
    /// The peer is this node: never probed.
    is_self: bool,
    /// Addresses to ping: from CallMeMaybe and peer-reflexive (sources of its pings).
    /// Each with when it was last offered or seen; bounded (`MAX_CANDIDATES`, `ADDR_TTL`).
    candidates: HashMap<SocketAddr, Instant>,
    /// Pings in flight (kept for `trust`).
    pings: HashMap<TxId, PingSent>,
    /// The direct path and its last pong.
    best: Option<(SocketAddr, Instant)>,
    /// The socket of the direct path ([`udp::MAIN`], or the birthday socket that found it).
    best_via: u32,
    /// Whether the peer's last CallMeMaybe said its NAT is hard.
    peer_hard: Option<bool>,
    /// Last CallMeMaybe we sent in answer to an unpunched one.
    last_response: Option<Instant>,
    /// Full-TTL pings sent in answer to punched CallMeMaybes since the instant (a budget of
    /// [`disco::MAX_ENDPOINTS`] per [`RESPONSE_INTERVAL`]: anyone can send CallMeMaybes
    /// through a relay, naming any addresses).
    answer_pings: (Option<Instant>, usize),
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
    /// The path the packets in `unacked` went on (direct address and socket, or the UDP relay
    /// path): only a pong from it acknowledges them, and when data moves to another path they
    /// are resent via DERP.
    unacked_path: Option<(SocketAddr, u32)>,
    /// The UDP relay path (issue 15), if a session is set up.
    udp_relay: Option<UdpRelaySlot>,
    /// When we last asked for a UDP relay session.
    last_alloc: Option<Instant>,
    /// Since when the (active) peer has had no direct path.
    no_direct_since: Option<Instant>,
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

impl PeerPath {
    /// A peer not heard of before.
    pub(super) fn new(peer: PublicKey, cfg: DirectOptions, is_self: bool) -> PeerPath {
        PeerPath {
            peer,
            cfg,
            is_self,
            candidates: HashMap::new(),
            pings: HashMap::new(),
            best: None,
            best_via: udp::MAIN,
            peer_hard: None,
            last_response: None,
            answer_pings: (None, 0),
            last_probe: None,
            last_heartbeat: None,
            last_active: None,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            next_seq: 0,
            awaiting: None,
            suspect: false,
            rtt: None,
            big_since_ping: 0,
            awaiting_pad: 0,
            too_big: None,
            unacked_path: None,
            udp_relay: None,
            last_alloc: None,
            no_direct_since: None,
        }
    }

    // ----- queries -----

    /// The direct address to use now, the socket to send from, and whether to send on the
    /// relay too (the pong is older than two heartbeats). `None`: no fresh direct path.
    pub(super) fn direct(&self, now: Instant) -> Option<(SocketAddr, u32, bool)> {
        let (addr, pong) = self.best?;
        let age = now.saturating_duration_since(pong);
        (age < self.cfg.trust).then_some((addr, self.best_via, age > self.cfg.heartbeat * 2))
    }

    /// The UDP relay path, if it has had a pong within `trust` (and the relay's address).
    fn udp_relay_fresh(&self, now: Instant) -> Option<SocketAddr> {
        let r = self.udp_relay?;
        recent(r.pong, self.cfg.trust, now).then_some(r.addr)
    }

    /// The path data goes on: the fresh direct path, else the fresh UDP relay path (with
    /// [`VIA_UDP_RELAY`]), with whether to send via DERP too (the pong is older than two
    /// heartbeats). `None`: DERP only.
    pub(super) fn current(&self, now: Instant) -> Option<(SocketAddr, u32, bool)> {
        if let Some(d) = self.direct(now) {
            return Some(d);
        }
        let r = self.udp_relay?;
        let age = now.saturating_duration_since(r.pong?);
        (age < self.cfg.trust).then_some((r.addr, VIA_UDP_RELAY, age > self.cfg.heartbeat * 2))
    }

    /// Whether the UDP relay path has been proven (a pong through it) and not given up.
    pub(super) fn udp_relay_proven(&self) -> bool {
        self.udp_relay.is_some_and(|r| r.pong.is_some())
    }

    /// The socket of the direct path, if there is one (fresh or not yet expired).
    pub(super) fn best_via(&self) -> Option<u32> {
        self.best.map(|_| self.best_via)
    }

    /// Whether the peer can be forgotten: no direct path, nothing in flight, no traffic and
    /// no probe for [`PEER_IDLE`] (the actor also checks its pacer and the spray).
    pub(super) fn is_idle(&self, now: Instant) -> bool {
        self.best.is_none()
            && self.udp_relay.is_none()
            && self.pings.is_empty()
            && self.unacked.is_empty()
            && !recent(self.last_active, PEER_IDLE, now)
            && !recent(self.last_probe, PEER_IDLE, now)
    }

    fn is_active(&self, now: Instant) -> bool {
        recent(self.last_active, self.cfg.active_timeout, now)
    }

    fn is_best(&self, addr: SocketAddr, via: u32) -> bool {
        self.best.is_some_and(|(b, _)| b == addr) && self.best_via == via
    }

    /// Whether `addr` from `via` is the path data goes on now (the direct path, even stale
    /// until it expires; or the UDP relay path while there is no direct one).
    fn is_data_path(&self, addr: SocketAddr, via: u32, now: Instant) -> bool {
        if via == VIA_UDP_RELAY {
            self.best.is_none() && self.udp_relay_fresh(now) == Some(addr)
        } else {
            self.is_best(addr, via)
        }
    }

    /// Data goes on `path` from now on: what is kept for a resend went on another path, so it
    /// goes again via DERP, and that path's ack state is over.
    fn enter_path(&mut self, path: (SocketAddr, u32), out: &mut Vec<Action>) {
        if self.unacked_path != Some(path) {
            self.resend_unacked(out);
            self.suspect = false;
            self.too_big = None;
            self.unacked_path = Some(path);
        }
    }

    /// Whether a ping to `addr` from `via` went out within [`PING_AGAIN_AFTER`] (pings stay
    /// in flight for `trust`, 6.5 s: one sent into an outage must not stop the pings that
    /// heal the path once it is over).
    fn pinged_lately(&self, addr: SocketAddr, via: u32, now: Instant) -> bool {
        self.pings.values().any(|p| {
            p.addr == addr && p.via == via && now.saturating_duration_since(p.at) < PING_AGAIN_AFTER
        })
    }

    fn ack_timeout(&self) -> Duration {
        self.rtt
            .map_or(ACK_TIMEOUT_MIN, |r| r * ACK_RTTS)
            .clamp(ACK_TIMEOUT_MIN, ACK_TIMEOUT_MAX)
    }

    // ----- the unacknowledged packets -----

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

    // ----- inputs -----

    /// Data went to or came from the peer (an API send or ping, authenticated plaintext).
    pub(super) fn on_activity(&mut self, now: Instant) {
        self.last_active = Some(now);
    }

    /// Sends an E2E packet on the current path (see the module docs of [`super`], 5.).
    pub(super) fn on_send(&mut self, now: Instant, pkt: Bytes, env: &Env) -> Vec<Action> {
        let mut out = Vec::new();
        match self.current(now) {
            Some((addr, via, stale)) => {
                self.enter_path((addr, via), &mut out);
                if via == VIA_UDP_RELAY {
                    self.mark_carried();
                    out.push(Action::SetPath(PathChoice::UdpRelay));
                } else {
                    out.push(Action::SetPath(PathChoice::Direct(addr)));
                }
                out.push(Action::SendDirect {
                    addr,
                    via,
                    pkt: pkt.clone(),
                });
                // Unsure of the path (stale or suspect), a packet the path lost at this size,
                // or no room to keep the packet for a resend: the relay carries it too.
                if self
                    .too_big
                    .is_some_and(|(_, t)| now.saturating_duration_since(t) >= TOO_BIG_RETRY)
                {
                    self.too_big = None;
                }
                let too_big = self.too_big.is_some_and(|(b, _)| pkt.len() >= b);
                if stale || self.suspect || too_big || !self.keep_unacked(&pkt, now) {
                    out.push(Action::SendRelay { pkt });
                }
                self.check_acks(now, addr, via, &mut out);
            }
            None => {
                out.push(Action::SetPath(PathChoice::Relay));
                out.push(Action::SendRelay { pkt });
                self.maybe_probe(now, env, &mut out);
                self.maybe_udp_relay(now, env, &mut out);
            }
        }
        out
    }

    fn mark_carried(&mut self) {
        if let Some(r) = &mut self.udp_relay {
            r.carried = true;
        }
    }

    /// A handshake completed and released the packets queued meanwhile: more than
    /// [`RESEND_BURST`] without a fresh direct path go via the relay paced (a burst can
    /// overflow a relay's per-client queue, 32 packets in derper: tests/derper.rs missed some
    /// of 50 packets about 1 run in 4 before this, 0 in 30 after); otherwise each is sent.
    pub(super) fn on_flush(&mut self, now: Instant, pkts: Vec<Bytes>, env: &Env) -> Vec<Action> {
        let mut out = Vec::new();
        if pkts.len() > RESEND_BURST && self.current(now).is_none() {
            out.push(Action::SetPath(PathChoice::Relay));
            out.push(Action::QueuePaced {
                pkts,
                resend: false,
            });
            self.maybe_probe(now, env, &mut out);
        } else {
            for p in pkts {
                out.extend(self.on_send(now, p, env));
            }
        }
        out
    }

    /// A disco ping from `src` on our socket `via` (its node key already checked).
    pub(super) fn on_ping(
        &mut self,
        now: Instant,
        src: SocketAddr,
        via: u32,
        txid: TxId,
    ) -> Vec<Action> {
        if via == VIA_UDP_RELAY {
            // Through the peer's UDP relay session (the actor matched it): answer the same
            // way, and ping back while the path is unproven. The relay's address is not the
            // peer's: no address book entry, no candidate.
            if self.udp_relay.is_none_or(|r| r.addr != src) {
                return Vec::new();
            }
            let mut out = vec![Action::Pong {
                addr: src,
                via,
                txid,
            }];
            // The peer is bound (its ping came through): ours may be too now, so ping back
            // at once rather than at the next retry.
            if self.udp_relay_fresh(now).is_none()
                && self
                    .udp_relay
                    .is_some_and(|r| !recent(r.last_ping_back, UDP_RELAY_PING_BACK, now))
            {
                if let Some(r) = &mut self.udp_relay {
                    r.last_ping_back = Some(now);
                }
                out.push(self.ping(now, src, via));
            }
            return out;
        }
        let mut out = vec![
            Action::MapAddr { addr: src },
            Action::Pong {
                addr: src,
                via,
                txid,
            },
        ];
        let new = remember(&mut self.candidates, src, now, MAX_CANDIDATES);
        let fresh = self.direct(now).is_some();
        if (new || !fresh) && !self.pinged_lately(src, via, now) {
            // Peer-reflexive: ping it back (this is the other half of the hole punch), from
            // the socket its ping came to.
            out.push(self.ping(now, src, via));
        }
        out
    }

    /// A disco pong from `src` on our socket `via` (which the actor checked is still open),
    /// saying the peer saw our ping come from `observed`.
    pub(super) fn on_pong(
        &mut self,
        now: Instant,
        src: SocketAddr,
        via: u32,
        txid: TxId,
        observed: SocketAddr,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(sent) = self.pings.remove(&txid) else {
            debug!(%src, "pong for no ping in flight");
            return out;
        };
        if sent.addr != src || sent.via != via {
            debug!(%src, pinged = %sent.addr, "pong from another address or socket than pinged; ignored");
            return out;
        }
        if via == VIA_UDP_RELAY {
            self.on_udp_relay_pong(now, src, sent, &mut out);
            return out;
        }
        self.no_direct_since = None;
        let keep_other = !self.is_best(src, via)
            && self
                .best
                .is_some_and(|(_, t)| now.saturating_duration_since(t) < self.cfg.trust);
        let moved = !keep_other && self.best.is_some() && !self.is_best(src, via);
        if !keep_other {
            if !self.is_best(src, via) {
                self.too_big = None; // a new path: its own size limits
            }
            if via != udp::MAIN && !self.is_best(src, via) {
                info!(peer = %self.peer.short(), %src, "birthday probing found a direct path");
            }
            self.best = Some((src, now));
            self.best_via = via;
            self.rtt = Some(now.saturating_duration_since(sent.at));
            if !moved {
                // Everything sent direct before the ping has crossed (one path keeps its
                // order). (If the path moved, what is kept went to the old address: resent
                // below. If data went through the UDP relay until now, `enter_path` resends
                // that.)
                self.enter_path((src, via), &mut out);
                self.ack(sent.mark);
            }
            if self.awaiting.is_none_or(|w| sent.at >= w) {
                self.awaiting = None;
                self.suspect = false;
            }
        }
        if moved {
            // Packets still unacknowledged went to the old address.
            self.resend_unacked(&mut out);
            self.unacked_path = Some((src, via));
        }
        out.push(Action::MapAddr { addr: src });
        if !observed.ip().is_unspecified() && observed.port() != 0 {
            out.push(Action::Observed { addr: observed });
        }
        if !keep_other {
            out.push(Action::SetPath(PathChoice::Direct(src)));
        }
        out
    }

    /// A pong through the UDP relay session: the path is proven (again); while there is no
    /// direct path it carries data (acknowledging what it carried, like a direct pong).
    fn on_udp_relay_pong(
        &mut self,
        now: Instant,
        src: SocketAddr,
        sent: PingSent,
        out: &mut Vec<Action>,
    ) {
        let Some(r) = self.udp_relay.as_mut() else {
            return;
        };
        if r.addr != src {
            return;
        }
        if r.pong.is_none() {
            info!(peer = %self.peer.short(), relay = %src, "UDP relay path up");
        }
        r.pong = Some(now);
        if self.best.is_some() {
            return; // kept warm; a direct path carries the data
        }
        self.enter_path((src, VIA_UDP_RELAY), out);
        self.ack(sent.mark);
        self.rtt = Some(now.saturating_duration_since(sent.at));
        if self.awaiting.is_none_or(|w| sent.at >= w) {
            self.awaiting = None;
            self.suspect = false;
        }
        self.mark_carried();
        out.push(Action::SetPath(PathChoice::UdpRelay));
    }

    /// The actor set up a UDP relay session with the peer at the relay's `addr` (ours, or the
    /// peer's from a CallMeMaybeVia); `new_session`: not the one we had. Its path is proven by
    /// the first pong through it (the actor pings once its side is bound).
    pub(super) fn on_udp_relay(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        new_session: bool,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if !new_session && self.udp_relay.is_some_and(|r| r.addr == addr) {
            return out;
        }
        if self.udp_relay.is_some_and(|r| r.carried) && self.best.is_none() {
            out.push(Action::SetPath(PathChoice::Relay));
        }
        self.udp_relay = Some(UdpRelaySlot {
            addr,
            since: now,
            pong: None,
            last_ping: None,
            last_ping_back: None,
            carried: false,
        });
        out
    }

    /// Our side of the UDP relay session now binds at the relay's next address (the one in
    /// use went unanswered): the same session, so its start, and with it the
    /// [`UDP_RELAY_GIVE_UP`] clock, stays.
    pub(super) fn on_udp_relay_moved(&mut self, addr: SocketAddr) {
        if let Some(r) = &mut self.udp_relay {
            r.addr = addr;
            r.last_ping = None;
            r.last_ping_back = None;
        }
    }

    /// The relay serving our UDP relay session with this peer has reconnected: if it
    /// restarted, the session died with it, and nothing tells a session that outlived a mere
    /// reconnection from one that did not. Give it up now (data back to DERP, the session
    /// dropped) instead of after [`UDP_RELAY_GIVE_UP`] without pongs, and allow a new allocation
    /// at once: the usual rules then bring a fresh session within seconds.
    pub(super) fn on_udp_relay_reconnected(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(r) = self.udp_relay.take() else {
            return out;
        };
        info!(peer = %self.peer.short(), relay = %r.addr,
            "UDP relay path given up: its relay reconnected (a restart ends its sessions)");
        if r.carried && self.best.is_none() {
            out.push(Action::SetPath(PathChoice::Relay));
        }
        out.push(Action::DropUdpRelay);
        self.last_alloc = None;
        out
    }

    /// A CallMeMaybe from the peer (via the relay): its endpoints, whether its NAT is hard,
    /// and whether it has just punched towards us.
    pub(super) fn on_call_me_maybe(
        &mut self,
        now: Instant,
        mut endpoints: Vec<SocketAddr>,
        peer_hard: bool,
        punched: bool,
        env: &Env,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        // As many as we send at most: a relay frame carries about 3,600, each one a punch or
        // a ping to an address the sender chose.
        if endpoints.len() > disco::MAX_ENDPOINTS {
            debug!(peer = %self.peer.short(), n = endpoints.len(), "call-me-maybe with too many endpoints; the first {} kept", disco::MAX_ENDPOINTS);
            endpoints.truncate(disco::MAX_ENDPOINTS);
        }
        let me_hard = env.me_hard;
        let fresh = self.direct(now).is_some();
        self.peer_hard = Some(peer_hard);
        debug!(peer = %self.peer.short(), ?endpoints, punched, peer_hard, me_hard, "call-me-maybe");
        for a in &endpoints {
            remember(&mut self.candidates, *a, now, MAX_CANDIDATES);
        }
        // Birthday probing when we are the hard side and the peer is easy.
        let birthday = me_hard && !peer_hard && !fresh;
        if !punched {
            // The peer has not opened its NAT towards us (it knew no address of ours). Open
            // ours towards its endpoints without reaching its NAT, then answer "punched": it
            // pings us on receiving that, its pings come through the mapping just opened, and
            // we ping back (peer-reflexive). A full ping now could reach its router before its
            // own first packet and leave the conntrack entry that breaks the path
            // (docs/nat-traversal.md).
            if recent(self.last_response, RESPONSE_INTERVAL, now) {
                return out;
            }
            self.last_response = Some(now);
            self.last_probe = Some(now);
            for a in &endpoints {
                self.punch(now, *a, &mut out);
            }
            if birthday {
                // Open the mappings before the answer makes the peer probe them.
                out.push(Action::OpenBirthday {
                    endpoints,
                    announce: false,
                });
            }
            out.push(Action::CallMeMaybe { punched: true });
            return out;
        }
        // The peer has opened its NAT towards us: ping every endpoint at full TTL.
        if birthday {
            // Once our mappings are open, say so: the peer probes them.
            out.push(Action::OpenBirthday {
                endpoints: endpoints.clone(),
                announce: true,
            });
        }
        if peer_hard && !me_hard && !fresh {
            // Birthday, easy side: the hard peer has opened its mappings before sending this:
            // probe random ports on its address.
            out.push(Action::StartSpray {
                endpoints: endpoints.clone(),
                eligible: env.has_session || self.is_active(now),
            });
        }
        if !recent(self.answer_pings.0, RESPONSE_INTERVAL, now) {
            self.answer_pings = (Some(now), 0);
        }
        for a in endpoints {
            if self.answer_pings.1 >= disco::MAX_ENDPOINTS {
                debug!(peer = %self.peer.short(), "call-me-maybe pings over budget; the rest not sent");
                break;
            }
            if !self.pinged_lately(a, udp::MAIN, now) {
                out.push(self.ping(now, a, udp::MAIN));
                self.answer_pings.1 += 1;
            }
        }
        out
    }

    /// Periodic work (every ~100 ms): expiry, heartbeats, overdue ack pings, probes.
    pub(super) fn tick(&mut self, now: Instant, env: &Env) -> Vec<Action> {
        let mut out = Vec::new();
        let d = self.cfg;
        self.candidates
            .retain(|_, t| now.saturating_duration_since(*t) < ADDR_TTL);
        self.pings
            .retain(|_, p| now.saturating_duration_since(p.at) < d.trust);
        let active = self.is_active(now);
        if !self.unacked.is_empty()
            && self.current(now).map(|(a, v, _)| (a, v)) != self.unacked_path
        {
            // The path they went on no longer carries data (the UDP relay path went stale).
            self.resend_unacked(&mut out);
        }
        match self.best {
            Some((addr, pong)) if now.saturating_duration_since(pong) >= d.trust => {
                self.best = None;
                self.suspect = false;
                info!(peer = %self.peer.short(), %addr, "direct path expired (no fresh pong); relay");
                self.resend_unacked(&mut out);
                if self.udp_relay_fresh(now).is_some() {
                    // Back to the UDP relay path (kept warm by heartbeats).
                    self.mark_carried();
                    out.push(Action::SetPath(PathChoice::UdpRelay));
                } else {
                    out.push(Action::LeaveDirect(addr));
                }
                if active {
                    self.maybe_probe(now, env, &mut out);
                    self.maybe_udp_relay(now, env, &mut out);
                }
            }
            Some((addr, _)) if self.awaiting.is_some() => {
                self.check_acks(now, addr, self.best_via, &mut out);
            }
            Some((addr, _)) => {
                let due = !recent(self.last_heartbeat, d.heartbeat, now);
                if !self.unacked.is_empty() {
                    self.check_acks(now, addr, self.best_via, &mut out);
                } else if active && due {
                    self.last_heartbeat = Some(now);
                    out.push(self.ping(now, addr, self.best_via));
                }
            }
            None if active => {
                self.maybe_probe(now, env, &mut out);
                self.maybe_udp_relay(now, env, &mut out);
            }
            None => {}
        }
        self.tick_udp_relay(now, &mut out);
        out
    }

    /// The UDP relay path's timers: give up a path without pongs, leave it when it goes
    /// stale, ack pings while it carries data, otherwise pings (every [`PING_AGAIN_AFTER`]
    /// until proven, then every heartbeat, while the peer is active).
    fn tick_udp_relay(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(r) = self.udp_relay else {
            return;
        };
        let last = r.pong.unwrap_or(r.since);
        if now.saturating_duration_since(last) >= UDP_RELAY_GIVE_UP {
            info!(peer = %self.peer.short(), relay = %r.addr, proven = r.pong.is_some(),
                "UDP relay path given up (no pong for {UDP_RELAY_GIVE_UP:?})");
            self.udp_relay = None;
            if r.carried && self.best.is_none() {
                out.push(Action::SetPath(PathChoice::Relay));
            }
            out.push(Action::DropUdpRelay);
            return;
        }
        let fresh = recent(r.pong, self.cfg.trust, now);
        if r.carried && !fresh {
            if let Some(slot) = &mut self.udp_relay {
                slot.carried = false;
            }
            if self.best.is_none() {
                out.push(Action::SetPath(PathChoice::Relay));
            }
        }
        if self.best.is_none() && fresh && (self.awaiting.is_some() || !self.unacked.is_empty()) {
            self.check_acks(now, r.addr, VIA_UDP_RELAY, out);
            return;
        }
        if !self.is_active(now) {
            return;
        }
        let every = if fresh {
            self.cfg.heartbeat
        } else {
            PING_AGAIN_AFTER
        };
        if !recent(r.last_ping, every, now) {
            let p = self.ping(now, r.addr, VIA_UDP_RELAY);
            out.push(p);
        }
    }

    /// No direct path: ask for a UDP relay session when it is time (module docs of
    /// [`super`]; [`UDP_RELAY_AFTER`]).
    fn maybe_udp_relay(&mut self, now: Instant, env: &Env, out: &mut Vec<Action>) {
        if !self.cfg.enabled
            || !self.cfg.udp_relay
            || self.is_self
            || self.udp_relay.is_some()
            || self.direct(now).is_some()
            || recent(self.last_alloc, UDP_RELAY_RETRY, now)
        {
            return;
        }
        // Called while the peer is active without a direct path: since when.
        let since = *self.no_direct_since.get_or_insert(now);
        let waited = now.saturating_duration_since(since);
        let due = if env.udp_relay_first {
            waited >= UDP_RELAY_AFTER || (env.me_hard && self.peer_hard == Some(true))
        } else {
            waited >= UDP_RELAY_AFTER_OTHER
        };
        if due {
            debug!(peer = %self.peer.short(), ?waited, "no direct path: asking for a UDP relay session");
            self.last_alloc = Some(now);
            out.push(Action::AllocateUdpRelay);
        }
    }

    /// Pings the peer at `addr` from socket `via` (tracked: its pong is matched). A ping to
    /// the direct path carries the ack padding and starts the wait for its pong.
    pub(super) fn ping(&mut self, now: Instant, addr: SocketAddr, via: u32) -> Action {
        let txid = disco::new_txid();
        let mark = self.next_seq;
        self.pings.insert(
            txid,
            PingSent {
                addr,
                via,
                at: now,
                mark,
            },
        );
        if via == VIA_UDP_RELAY {
            if let Some(r) = &mut self.udp_relay {
                r.last_ping = Some(now);
            }
        }
        let mut pad = 0;
        if self.is_data_path(addr, via, now) {
            pad = std::mem::take(&mut self.big_since_ping);
            if self.awaiting.is_none() {
                self.awaiting = Some(now);
                self.awaiting_pad = pad;
            }
        }
        Action::Ping {
            addr,
            via,
            txid,
            pad,
        }
    }

    // ----- rules shared by the inputs -----

    /// While data goes direct-only to `addr`: ack-ping the path when packets wait for an
    /// acknowledgement; if the ping waiting for its pong is overdue, the path is suspect —
    /// resend what is unacknowledged via the relay and ping again.
    fn check_acks(&mut self, now: Instant, addr: SocketAddr, via: u32, out: &mut Vec<Action>) {
        match self.awaiting {
            Some(since) if now.saturating_duration_since(since) >= self.ack_timeout() => {
                let resend = self.take_unacked();
                if !self.suspect || !resend.is_empty() {
                    debug!(peer = %self.peer.short(), %addr, resent = resend.len(),
                        "direct path suspect (ping unanswered); sending on both paths");
                }
                self.suspect = true;
                if self.awaiting_pad > SMALL_PING_MAX {
                    let size = self.awaiting_pad;
                    if self.too_big.is_none_or(|(b, _)| size < b) {
                        debug!(peer = %self.peer.short(), %addr, size, "a padded ack ping went unanswered: packets this large go on both paths for a while");
                        self.too_big = Some((size, now));
                    }
                }
                self.awaiting = None; // the ping below starts the next wait
                resend_via_relay(resend, out);
                out.push(self.ping(now, addr, via));
            }
            Some(_) => {}
            None => {
                let due = self.unacked.front().is_some_and(|(t, _)| {
                    self.unacked.len() >= ACK_COUNT
                        || now.saturating_duration_since(*t) >= ACK_INTERVAL
                });
                if due {
                    out.push(self.ping(now, addr, via));
                }
            }
        }
    }

    /// Resends the unacknowledged direct packets via the relay (the direct path went away or
    /// changed).
    fn resend_unacked(&mut self, out: &mut Vec<Action>) {
        self.awaiting = None;
        let resend = self.take_unacked();
        if !resend.is_empty() {
            debug!(peer = %self.peer.short(), n = resend.len(), "resending unacknowledged direct packets via the relay");
        }
        resend_via_relay(resend, out);
    }

    /// A disco ping with a small TTL ([`super::actor::PUNCH_TTL`], and the same limit as an IP
    /// option that also holds at a router two hops away, `PUNCH_IP_OPTIONS`): it opens our
    /// NAT's mapping towards `addr` but dies before the peer's NAT, so that NAT keeps no
    /// "unreplied" entry for it. (A Linux router that saw the peer's ping before its host sent
    /// anything to us keeps that entry and then gives the host's own packets to us another
    /// port: neither side's pings get through.) Not tracked as a ping in flight: on a flat
    /// network it reaches the peer, whose peer-reflexive ping back makes the path. IPv6: an
    /// ordinary (tracked) ping.
    fn punch(&mut self, now: Instant, addr: SocketAddr, out: &mut Vec<Action>) {
        if addr.is_ipv4() {
            out.push(Action::Punch { addr });
        } else {
            out.push(self.ping(now, addr, udp::MAIN));
        }
    }

    /// No fresh direct path: punch the peer's known candidates, then CallMeMaybe via the
    /// relay (see the module docs of [`super`], 4.), at most every `probe_interval`.
    fn maybe_probe(&mut self, now: Instant, env: &Env, out: &mut Vec<Action>) {
        if !self.cfg.enabled || self.is_self {
            return;
        }
        let interval = self.cfg.probe_interval;
        if recent(self.last_probe, interval, now) {
            return;
        }
        self.last_probe = Some(now);
        let candidates: Vec<SocketAddr> = self.candidates.keys().copied().collect();
        // "Punched" only if the peer offered (or pinged from) some of them lately: punching
        // stale addresses (the peer moved) and saying "punched" would make it ping us at full
        // TTL before our NAT is open towards its new address — the conntrack trap.
        let fresh = self
            .candidates
            .values()
            .any(|t| now.saturating_duration_since(*t) < interval);
        let peer_easy = self.peer_hard == Some(false);
        debug!(peer = %self.peer.short(), ?candidates, fresh, "probing for a direct path");
        // Open our NAT towards every address we know of the peer (TTL 2: not as far as its
        // NAT), then say so: the peer pings us at full TTL on receiving it.
        for a in &candidates {
            self.punch(now, *a, out);
        }
        if env.me_hard && peer_easy && self.direct(now).is_none() {
            out.push(Action::OpenBirthday {
                endpoints: candidates,
                announce: false,
            });
        }
        out.push(Action::CallMeMaybe { punched: fresh });
    }
}

/// Queues `pkts` (if any) for a paced resend via the relay.
fn resend_via_relay(pkts: Vec<Bytes>, out: &mut Vec<Action>) {
    if !pkts.is_empty() {
        out.push(Action::QueuePaced { pkts, resend: true });
    }
}

#[cfg(test)]
mod tests;
