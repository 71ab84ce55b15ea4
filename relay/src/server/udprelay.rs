//! The UDP relay path's sessions (issue 15), sans-IO: allocation, the bind handshake and the
//! forwarding decision for each datagram, on a caller's clock. The I/O around it (the UDP
//! listener, batched receive and send, the DERP frame that asks for an allocation) is the next
//! step; this is the part every rule lives in, tested here on a fake clock.
//!
//! Follows Tailscale's peer relay (`net/udprelay/server.go`, docs/notes-udp-relay.md §3):
//!
//! - [`Sessions::allocate`]: a session (VNI, sequential from 1) for a pair of client disco keys,
//!   asked for by an admitted DERP client (the caller checks admission). The same pair gets the
//!   same session while it lives. Capped per requester and in total.
//! - Bind: a client sends Bind (sealed to the relay's *server key*, [`Sessions::server_key`])
//!   from the address it wants bound; the relay answers a Challenge to that address whose
//!   32 bytes are a keyed BLAKE2s MAC over (VNI, generation, the other side's key, the source
//!   address and port) with a secret rotated every 2 min (two kept): a stateless cookie, so a
//!   spoofed source never sees it and an Answer from another address fails. The Answer binds
//!   that side to its source; no reply. A later handshake from a new address re-binds (NAT
//!   rebinding).
//! - Forwarding: a datagram of the session from one bound side goes out unchanged to the other,
//!   only once both are bound; from any other source, dropped. Nothing else is ever answered:
//!   the relay never sends more bytes than it got (a Challenge is exactly a Bind's 160 bytes)
//!   and never sends to an address that has not bound.
//! - Expiry: 30 s from allocation to both sides bound; then 5 min without data from either side.
//!
//! Where ferry differs from Tailscale, and why: allocation comes over the requester's own DERP
//! connection (admission and the verify URL apply; no netmap, so no `cap/relay` grants) and is
//! capped per requesting node key; the MAC compares in constant time; drops are counted by
//! reason (Tailscale counts none).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use blake2::digest::{KeyInit, Mac};
use ferry_proto::udprelay::{BindKind, BindMsg, Geneve, MAX_VNI};
use ferry_proto::{PublicKey, SecretKey};

/// From allocation to both sides bound, at most.
pub const BIND_LIFETIME: Duration = Duration::from_secs(30);
/// A bound session ends after this long without data from either side.
pub const IDLE_LIFETIME: Duration = Duration::from_secs(300);
/// The challenge secret is replaced this often (lazily, on the next control datagram); the
/// previous one stays valid, so a challenge is good for 2 to 4 minutes.
pub const SECRET_ROTATION: Duration = Duration::from_secs(120);

/// Caps on sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sessions in all.
    pub total: usize,
    /// Sessions one requesting node key holds.
    pub per_client: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            total: 100_000,
            per_client: 16,
        }
    }
}

/// Why an allocation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// [`Limits::total`] sessions exist.
    #[error("the relay holds its maximum of {0} UDP relay sessions")]
    Total(usize),
    /// The requester holds [`Limits::per_client`] sessions.
    #[error("this node already holds its maximum of {0} UDP relay sessions")]
    PerClient(usize),
    /// The two keys are the same, or one is the relay's own server key.
    #[error("a UDP relay session needs two distinct client keys, neither the relay's")]
    BadPair,
    /// The requester is not one of the two sides.
    #[error("a node may allocate UDP relay sessions only for itself and a peer")]
    NotMember,
}

/// A granted session: what the requester needs to bind and to tell its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// The session's VNI.
    pub vni: u32,
    /// The relay's server key (Bind and Answer are sealed to it).
    pub server_key: PublicKey,
    /// The two client keys, sorted.
    pub keys: [PublicKey; 2],
    /// Increases with every allocation of this relay process (Tailscale's LamportID).
    pub lamport: u64,
    /// [`BIND_LIFETIME`].
    pub bind_lifetime: Duration,
    /// [`IDLE_LIFETIME`].
    pub idle_lifetime: Duration,
}

/// Why a datagram was dropped (each is a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Drop {
    /// Shorter than a Geneve header.
    Short,
    /// No such session.
    UnknownVni,
    /// A control datagram that does not open or is not a valid Bind/Answer for this session
    /// (wrong key, wrong remote key, VNI or generation).
    BadControl,
    /// An Answer whose challenge does not match its source (spoofed, replayed from elsewhere,
    /// or older than two secret rotations).
    BadChallenge,
    /// Data before both sides are bound.
    NotBound,
    /// Data from an address that is not one of the session's bound sides.
    UnknownSource,
}

impl Drop {
    /// Every reason, in declaration order (metric handles are indexed by `as usize`).
    pub const ALL: [Drop; 6] = [
        Drop::Short,
        Drop::UnknownVni,
        Drop::BadControl,
        Drop::BadChallenge,
        Drop::NotBound,
        Drop::UnknownSource,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Drop::Short => "short",
            Drop::UnknownVni => "unknown_session",
            Drop::BadControl => "bad_control",
            Drop::BadChallenge => "bad_challenge",
            Drop::NotBound => "not_bound",
            Drop::UnknownSource => "unknown_source",
        }
    }
}

/// What to do with a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send this (a Challenge, as large as the Bind it answers) back to the source.
    Reply(Vec<u8>),
    /// A side is bound now (nothing to send).
    Bound,
    /// Send the datagram unchanged to this address.
    Forward(SocketAddr),
    /// Drop it, counted by reason.
    Drop(Drop),
}

#[derive(Debug)]
struct Session {
    keys: [PublicKey; 2],
    /// The box between the server key and each side's key, made once at allocation: opening a
    /// control datagram then costs no X25519 (anyone may send them, naming a session's public
    /// keys and its guessable VNI).
    boxes: [ferry_proto::derp::SharedBox; 2],
    requester: PublicKey,
    allocated: Instant,
    /// Generation of the handshake in progress per side (0: none).
    in_progress: [u32; 2],
    bound: [Option<SocketAddr>; 2],
    last_seen: [Instant; 2],
    lamport: u64,
}

impl Session {
    fn open(&self) -> bool {
        self.bound[0].is_some() && self.bound[1].is_some()
    }

    fn expired(&self, now: Instant) -> bool {
        if !self.open() {
            return now.saturating_duration_since(self.allocated) > BIND_LIFETIME;
        }
        self.last_seen
            .iter()
            .any(|t| now.saturating_duration_since(*t) > IDLE_LIFETIME)
    }
}

/// All sessions of one relay process. See the module docs.
pub struct Sessions {
    server: SecretKey,
    limits: Limits,
    /// The MAC secrets, newest first, and when the newest was made.
    secrets: [[u8; 32]; 2],
    rotated: Instant,
    by_vni: HashMap<u32, Session>,
    by_pair: HashMap<[PublicKey; 2], u32>,
    per_client: HashMap<PublicKey, usize>,
    next_vni: u32,
    lamport: u64,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("server_key", &self.server.public())
            .field("sessions", &self.by_vni.len())
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// No sessions; a fresh server key and secrets.
    pub fn new(limits: Limits, now: Instant) -> Sessions {
        Sessions {
            server: SecretKey::generate(),
            limits,
            secrets: [rand::random(), rand::random()],
            rotated: now,
            by_vni: HashMap::new(),
            by_pair: HashMap::new(),
            per_client: HashMap::new(),
            next_vni: 1,
            lamport: 0,
        }
    }

    /// The relay's server key (clients seal Bind and Answer to it).
    pub fn server_key(&self) -> PublicKey {
        self.server.public()
    }

    /// Sessions now: (waiting for both binds, both bound).
    pub fn counts(&self) -> (usize, usize) {
        let open = self.by_vni.values().filter(|s| s.open()).count();
        (self.by_vni.len() - open, open)
    }

    /// A session for the pair `a`, `b`, asked for by `requester` (an admitted DERP client).
    /// The same pair gets its live session again (not counted twice).
    pub fn allocate(
        &mut self,
        requester: PublicKey,
        a: PublicKey,
        b: PublicKey,
        now: Instant,
    ) -> Result<Allocation, AllocError> {
        let me = self.server.public();
        if a == b || a == me || b == me {
            return Err(AllocError::BadPair);
        }
        // ferry clients use their node key as their disco key: a node allocates only for itself
        // (so nobody can take a pair's session, or its bind window, from under it).
        if requester != a && requester != b {
            return Err(AllocError::NotMember);
        }
        let keys = if a.as_bytes() <= b.as_bytes() {
            [a, b]
        } else {
            [b, a]
        };
        if let Some(vni) = self.by_pair.get(&keys).copied() {
            let s = self.by_vni.get_mut(&vni).expect("by_pair and by_vni agree");
            if !s.expired(now) {
                // Asked again before both bound (a retry, or the peer): a full bind window.
                if !s.open() {
                    s.allocated = now;
                }
                let (k, l) = (s.keys, s.lamport);
                return Ok(self.allocation(vni, k, l));
            }
            self.remove(vni);
        }
        if self.by_vni.len() >= self.limits.total {
            return Err(AllocError::Total(self.limits.total));
        }
        let held = self.per_client.get(&requester).copied().unwrap_or(0);
        if held >= self.limits.per_client {
            return Err(AllocError::PerClient(self.limits.per_client));
        }
        let vni = self.free_vni();
        self.lamport += 1;
        let boxes = [
            ferry_proto::derp::SharedBox::new(&self.server, &keys[0]),
            ferry_proto::derp::SharedBox::new(&self.server, &keys[1]),
        ];
        self.by_vni.insert(
            vni,
            Session {
                keys,
                boxes,
                requester,
                allocated: now,
                in_progress: [0; 2],
                bound: [None; 2],
                last_seen: [now; 2],
                lamport: self.lamport,
            },
        );
        self.by_pair.insert(keys, vni);
        *self.per_client.entry(requester).or_default() += 1;
        Ok(self.allocation(vni, keys, self.lamport))
    }

    fn allocation(&self, vni: u32, keys: [PublicKey; 2], lamport: u64) -> Allocation {
        Allocation {
            vni,
            server_key: self.server.public(),
            keys,
            lamport,
            bind_lifetime: BIND_LIFETIME,
            idle_lifetime: IDLE_LIFETIME,
        }
    }

    /// The next free VNI after the last one handed out (sequential, wrapping, never 0).
    fn free_vni(&mut self) -> u32 {
        loop {
            let v = self.next_vni;
            self.next_vni = if v >= MAX_VNI { 1 } else { v + 1 };
            if !self.by_vni.contains_key(&v) {
                return v;
            }
        }
    }

    fn remove(&mut self, vni: u32) {
        if let Some(s) = self.by_vni.remove(&vni) {
            self.by_pair.remove(&s.keys);
            if let Some(n) = self.per_client.get_mut(&s.requester) {
                *n -= 1;
                if *n == 0 {
                    self.per_client.remove(&s.requester);
                }
            }
        }
    }

    /// Ends expired sessions (see the module docs); returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let dead: Vec<u32> = self
            .by_vni
            .iter()
            .filter(|(_, s)| s.expired(now))
            .map(|(v, _)| *v)
            .collect();
        for v in &dead {
            self.remove(*v);
        }
        dead.len()
    }

    /// What to do with `datagram` from `from`.
    pub fn handle(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) -> Outcome {
        let Some(g) = Geneve::parse(datagram) else {
            return Outcome::Drop(Drop::Short);
        };
        if g.control {
            return self.control(g.vni, from, datagram, now);
        }
        let Some(s) = self.by_vni.get_mut(&g.vni) else {
            return Outcome::Drop(Drop::UnknownVni);
        };
        let [Some(a), Some(b)] = s.bound else {
            return Outcome::Drop(Drop::NotBound);
        };
        if from == a {
            s.last_seen[0] = now;
            Outcome::Forward(b)
        } else if from == b {
            s.last_seen[1] = now;
            Outcome::Forward(a)
        } else {
            Outcome::Drop(Drop::UnknownSource)
        }
    }

    fn control(&mut self, vni: u32, from: SocketAddr, datagram: &[u8], now: Instant) -> Outcome {
        if now.saturating_duration_since(self.rotated) >= SECRET_ROTATION {
            self.secrets = [rand::random(), self.secrets[0]];
            self.rotated = now;
        }
        let Some(s) = self.by_vni.get_mut(&vni) else {
            return Outcome::Drop(Drop::UnknownVni);
        };
        let Some(sender) = BindMsg::sender(datagram) else {
            return Outcome::Drop(Drop::BadControl);
        };
        let Some(side) = s.keys.iter().position(|k| *k == sender) else {
            return Outcome::Drop(Drop::BadControl);
        };
        let other = s.keys[1 - side];
        let Ok(m) = BindMsg::open_with(&s.boxes[side], &sender, datagram) else {
            return Outcome::Drop(Drop::BadControl);
        };
        if m.remote_key != other || m.generation == 0 {
            return Outcome::Drop(Drop::BadControl);
        }
        match m.kind {
            BindKind::Bind => {
                s.in_progress[side] = m.generation;
                let reply = BindMsg {
                    kind: BindKind::Challenge,
                    challenge: mac(&self.secrets[0], &m, from),
                    ..m
                };
                Outcome::Reply(reply.seal_with(&self.server.public(), &s.boxes[side]))
            }
            BindKind::Answer => {
                if s.in_progress[side] != m.generation {
                    return Outcome::Drop(Drop::BadControl);
                }
                let ok = self.secrets.iter().any(|k| verify(k, &m, from));
                if !ok {
                    return Outcome::Drop(Drop::BadChallenge);
                }
                s.bound[side] = Some(from);
                s.last_seen[side] = now;
                s.in_progress[side] = 0;
                Outcome::Bound
            }
            BindKind::Challenge => Outcome::Drop(Drop::BadControl),
        }
    }
}

type Blake2sMac = blake2::Blake2sMac256;

fn mac_input(h: &mut Blake2sMac, m: &BindMsg, from: SocketAddr) {
    h.update(&m.vni.to_be_bytes());
    h.update(&m.generation.to_be_bytes());
    h.update(m.remote_key.as_bytes());
    match from.ip() {
        IpAddr::V4(ip) => h.update(&ip.octets()),
        IpAddr::V6(ip) => h.update(&ip.octets()),
    }
    h.update(&from.port().to_be_bytes());
}

/// The challenge for `m` from `from` under `secret`.
fn mac(secret: &[u8; 32], m: &BindMsg, from: SocketAddr) -> [u8; 32] {
    let mut h = <Blake2sMac as KeyInit>::new_from_slice(secret).expect("a 32-byte key");
    mac_input(&mut h, m, from);
    h.finalize().into_bytes().into()
}

/// Whether `m`'s challenge is the MAC for its source, in constant time.
fn verify(secret: &[u8; 32], m: &BindMsg, from: SocketAddr) -> bool {
    let mut h = <Blake2sMac as KeyInit>::new_from_slice(secret).expect("a 32-byte key");
    mac_input(&mut h, m, from);
    h.verify_slice(&m.challenge).is_ok()
}

mod serve;
pub(crate) use serve::{bind_socket, serve, sweeper, UdpRelay};

#[cfg(test)]
mod tests;
