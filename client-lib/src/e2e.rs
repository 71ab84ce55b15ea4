//! End-to-end encryption between nodes: Noise IK keyed by the node keys, sans-IO.
//!
//! The pattern is `Noise_IK_25519_ChaChaPoly_BLAKE2s` (WireGuard's choice): the initiator knows
//! the responder's node key in advance, and each side's static key is its node key (Curve25519,
//! the same key the relay handshake uses), so a completed handshake proves both identities.
//! Both messages carry fresh ephemeral keys, so transport keys are forward secret; a session is
//! replaced by a new handshake after [`REKEY_AFTER`] when it sends (the old one still opens
//! packets in flight for [`PREVIOUS_KEEP`]), is not used to send after [`SEND_LIMIT`] and is
//! dropped after [`REJECT_AFTER_TIME`] even when idle (WireGuard's timers): traffic recorded
//! earlier cannot be decrypted with keys taken from memory later.
//!
//! Wire format (the bytes a relay, or later a UDP path, carries; none starts with the disco
//! magic):
//!
//! | type | layout |
//! |---|---|
//! | `0x01` init | `sender_index: u32` ‖ Noise message 1 (payload: a timestamp, u64 ns) |
//! | `0x02` response | `sender_index: u32` ‖ `receiver_index: u32` ‖ Noise message 2 |
//! | `0x03` data | `receiver_index: u32` ‖ `counter: u64` ‖ ChaCha20-Poly1305 ciphertext |
//!
//! Transport messages use snow's stateless transport mode: the counter on the wire is the AEAD
//! nonce, and a sliding window ([`ReplayWindow`], [`REPLAY_WINDOW`] packets) rejects repeats
//! and packets too old, while allowing reordering within the window. The window only moves
//! after a packet authenticated, so forged packets cannot push it. Replayed handshake
//! initiations are rejected by their timestamp (it must grow per peer), as WireGuard does.
//!
//! Packets queued while a handshake is in flight are sent as soon as it completes, so the first
//! packet is never lost to the handshake.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use ferry_proto::{PublicKey, SecretKey};
use snow::{HandshakeState, StatelessTransportState};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Bound into every handshake: a different application or version never interoperates.
const PROLOGUE: &[u8] = b"ferry e2e v1";
/// Packets reordered by up to this many are still accepted. Large enough for the endpoint's
/// resend of unacknowledged direct packets via the relay (at most `MAX_UNACKED` = 4096
/// packets behind) plus what crossed on the other path meanwhile; WireGuard's is 8128.
pub const REPLAY_WINDOW: u64 = 8192;
/// Start a new handshake when the current session is this old (forward secrecy over time).
pub const REKEY_AFTER: Duration = Duration::from_secs(120);
/// Resend an unanswered initiation after this long.
pub const HANDSHAKE_RETRY: Duration = Duration::from_secs(5);
/// Give up (drop queued packets) when a handshake has not completed after this long.
pub const HANDSHAKE_GIVE_UP: Duration = Duration::from_secs(90);
/// After a new session takes over, the old one still decrypts for this long.
pub const PREVIOUS_KEEP: Duration = Duration::from_secs(180);
/// A session this old opens nothing and is dropped (WireGuard's REJECT_AFTER_TIME): keys of an
/// idle session do not linger, so a later compromise cannot decrypt traffic recorded under
/// them. (snow does not zeroize its key bytes on drop; they are freed.)
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// A session this old is no longer used to send: data waits for a new handshake instead (a
/// margin before [`REJECT_AFTER_TIME`] for the peer's clock and packets in flight).
pub const SEND_LIMIT: Duration = Duration::from_secs(165);
/// Packets queued per peer while a handshake is in flight.
pub const QUEUE_LIMIT: usize = 1024;
/// Most bytes of plaintext per packet.
/// The largest E2E packet is 65,507 bytes: the most one UDP datagram carries over IPv4
/// (65,535 − 20 − 8), so every packet fits a direct path as well as the relay (64 KiB).
pub const MAX_PLAINTEXT: usize = 65_507 - 16 - HEADER_DATA;
/// Sessions never use counters at or above this (far beyond any rekey).
const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

const T_INIT: u8 = 0x01;
const T_RESP: u8 = 0x02;
const T_DATA: u8 = 0x03;
const HEADER_DATA: usize = 1 + 4 + 8;

/// Whether a packet is an E2E packet (by its type byte).
pub fn is_e2e(packet: &[u8]) -> bool {
    matches!(packet.first(), Some(&(T_INIT | T_RESP | T_DATA)))
}

/// Why a packet was rejected. None of these should end a connection: drop the packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum E2eError {
    /// Too short, or an unknown type.
    #[error("malformed E2E packet: {0}")]
    Malformed(&'static str),
    /// The handshake did not verify (tampered, or sealed for another key).
    #[error("handshake from {0} failed to verify (tampered, or not for this node's key)")]
    Handshake(String),
    /// The Noise static key inside the handshake is not the sender's node key.
    #[error("handshake claims node key {claimed} but arrived from {from}")]
    WrongPeerKey {
        /// Key proven by Noise.
        claimed: String,
        /// Key the transport (relay) says it came from.
        from: String,
    },
    /// An old handshake initiation was replayed.
    #[error("replayed handshake initiation from {0}")]
    ReplayedHandshake(String),
    /// No session with this index (expired, or never existed).
    #[error("no session for index {0:#010x}")]
    UnknownSession(u32),
    /// A session's packet arrived from another node.
    #[error("packet for a session with {expected} arrived from {from}")]
    WrongSender {
        /// The session's peer.
        expected: String,
        /// The claimed sender.
        from: String,
    },
    /// Decryption failed (tampered or forged).
    #[error("packet failed authentication (tampered or forged)")]
    Decrypt,
    /// Counter seen before, or older than the window.
    #[error("replayed or too old packet (counter {0})")]
    Replay(u64),
    /// Plaintext too big.
    #[error("plaintext of {0} bytes is over the {MAX_PLAINTEXT}-byte limit")]
    TooBig(usize),
    /// Too many packets waiting for the handshake.
    #[error("{QUEUE_LIMIT} packets already wait for the handshake with this peer")]
    QueueFull,
}

/// Sliding-window replay protection over 64-bit counters (RFC 6479 style bitmap).
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// One past the highest counter accepted (0: none yet).
    next: u64,
    bits: Vec<u64>,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            next: 0,
            bits: vec![0; (REPLAY_WINDOW / 64) as usize],
        }
    }
}

impl ReplayWindow {
    fn bit(&self, n: u64) -> (usize, u64) {
        let i = n % REPLAY_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Whether `n` would be accepted (not seen, not too old). Does not change the window.
    pub fn check(&self, n: u64) -> bool {
        if n >= self.next {
            return true;
        }
        if self.next - n > REPLAY_WINDOW {
            return false;
        }
        let (w, m) = self.bit(n);
        self.bits[w] & m == 0
    }

    /// Records `n` as seen (call only after the packet authenticated).
    pub fn mark(&mut self, n: u64) {
        if n >= self.next {
            let advance = n - self.next + 1;
            if advance >= REPLAY_WINDOW {
                self.bits.iter_mut().for_each(|b| *b = 0);
            } else {
                for k in self.next..=n {
                    let (w, m) = self.bit(k);
                    self.bits[w] &= !m;
                }
            }
            self.next = n + 1;
        }
        let (w, m) = self.bit(n);
        self.bits[w] |= m;
    }
}

struct Session {
    local_index: u32,
    remote_index: u32,
    transport: StatelessTransportState,
    send_counter: u64,
    replay: ReplayWindow,
    created: Instant,
}

impl Session {
    fn new(
        local_index: u32,
        remote_index: u32,
        transport: StatelessTransportState,
        now: Instant,
    ) -> Session {
        Session {
            local_index,
            remote_index,
            transport,
            send_counter: 0,
            replay: ReplayWindow::default(),
            created: now,
        }
    }
}

struct Pending {
    index: u32,
    hs: HandshakeState,
    sent: Instant,
    first_sent: Instant,
}

#[derive(Default)]
struct Peer {
    current: Option<Session>,
    /// The session the current one replaced, and when it was replaced.
    previous: Option<(Session, Instant)>,
    pending: Option<Pending>,
    queue: VecDeque<Vec<u8>>,
    /// Highest handshake timestamp accepted from this peer.
    last_init_ts: u64,
}

/// What [`Sessions::open`] produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// Packets to send back to the peer (a handshake response, queued data).
    pub replies: Vec<Vec<u8>>,
    /// Decrypted application plaintext, if the packet carried some.
    pub plaintext: Option<Vec<u8>>,
}

/// The E2E state of one node towards all its peers. Sans-IO: bytes in, bytes out.
pub struct Sessions {
    local: SecretKey,
    local_pub: PublicKey,
    peers: HashMap<PublicKey, Peer>,
    /// Local session index → peer.
    index: HashMap<u32, PublicKey>,
    last_ts: u64,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("local", &self.local_pub)
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

fn hs_error(peer: &PublicKey) -> E2eError {
    E2eError::Handshake(peer.short())
}

impl Sessions {
    /// E2E state for the node with this key.
    pub fn new(local: SecretKey) -> Sessions {
        #[cfg(not(fuzzing))]
        let local_pub = local.public();
        #[cfg(fuzzing)]
        let local_pub = fuzzing::public(&local);
        Sessions {
            local,
            local_pub,
            peers: HashMap::new(),
            index: HashMap::new(),
            last_ts: 0,
        }
    }

    /// The peer a data packet or handshake response belongs to, from its receiver index (our
    /// local index: only the peer we gave it to uses it). `None` for initiations (their
    /// sender is only known once the handshake is read) and unknown indexes. Lets a packet
    /// that arrived over UDP be attributed without trusting its source address.
    pub fn peer_of(&self, packet: &[u8]) -> Option<PublicKey> {
        let at = match packet.first() {
            Some(&T_DATA) => 1,
            Some(&T_RESP) => 5,
            _ => return None,
        };
        let index = u32::from_be_bytes(packet.get(at..at + 4)?.try_into().ok()?);
        self.index.get(&index).copied()
    }

    /// Whether a session with `peer` is established.
    pub fn has_session(&self, peer: &PublicKey) -> bool {
        self.peers.get(peer).is_some_and(|p| p.current.is_some())
    }

    fn new_index(&mut self, peer: PublicKey) -> u32 {
        loop {
            let i: u32 = rand::random();
            if i != 0 && !self.index.contains_key(&i) {
                self.index.insert(i, peer);
                return i;
            }
        }
    }

    fn timestamp(&mut self) -> u64 {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        self.last_ts = now.max(self.last_ts + 1);
        self.last_ts
    }

    fn builder(&self) -> snow::Builder<'static> {
        let params = NOISE_PARAMS.parse().expect("valid Noise params");
        // Fuzzing builds only: the same X25519 results, memoized (the reason is in the module).
        #[cfg(fuzzing)]
        return snow::Builder::with_resolver(params, Box::new(fuzzing::Resolver));
        #[cfg(not(fuzzing))]
        snow::Builder::new(params)
    }

    /// Starts (or restarts) a handshake with `peer`: returns the initiation packet.
    fn initiate(&mut self, peer: PublicKey, now: Instant) -> Vec<u8> {
        let local = self.local.to_bytes();
        let mut hs = self
            .builder()
            .local_private_key(&local)
            .and_then(|b| b.remote_public_key(peer.as_bytes()))
            .and_then(|b| b.prologue(PROLOGUE))
            .and_then(|b| b.build_initiator())
            .expect("static Noise setup");
        let ts = self.timestamp();
        let index = self.new_index(peer);
        let mut out = vec![0u8; 1 + 4 + 256];
        out[0] = T_INIT;
        out[1..5].copy_from_slice(&index.to_be_bytes());
        let n = hs
            .write_message(&ts.to_be_bytes(), &mut out[5..])
            .expect("handshake message fits");
        out.truncate(5 + n);
        let p = self.peers.entry(peer).or_default();
        let first_sent = match p.pending.take() {
            Some(old) => {
                self.index.remove(&old.index);
                old.first_sent
            }
            None => now,
        };
        p.pending = Some(Pending {
            index,
            hs,
            sent: now,
            first_sent,
        });
        out
    }

    /// Encrypts `plaintext` for `peer`. Returns the packets to send now: a data packet, or (while
    /// no session exists) a handshake initiation, with the plaintext queued until it completes.
    pub fn seal(
        &mut self,
        peer: &PublicKey,
        plaintext: &[u8],
        now: Instant,
    ) -> Result<Vec<Vec<u8>>, E2eError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(E2eError::TooBig(plaintext.len()));
        }
        let p = self.peers.entry(*peer).or_default();
        let mut out = Vec::new();
        match p.current.as_mut() {
            Some(s) if s.send_counter < REJECT_AFTER_MESSAGES && s.created + SEND_LIMIT > now => {
                out.push(seal_data(s, plaintext));
                let rekey = s.created + REKEY_AFTER <= now && p.pending.is_none();
                if rekey {
                    out.push(self.initiate(*peer, now));
                }
            }
            _ => {
                if p.queue.len() >= QUEUE_LIMIT {
                    return Err(E2eError::QueueFull);
                }
                p.queue.push_back(plaintext.to_vec());
                let start = p
                    .pending
                    .as_ref()
                    .is_none_or(|pd| pd.sent + HANDSHAKE_RETRY <= now);
                if start {
                    out.push(self.initiate(*peer, now));
                }
            }
        }
        Ok(out)
    }

    /// Retransmits and expiry. Call about once a second; returns packets to send.
    pub fn poll(&mut self, now: Instant) -> Vec<(PublicKey, Vec<u8>)> {
        let mut retry = Vec::new();
        let mut dead_indexes = Vec::new();
        for (key, p) in self.peers.iter_mut() {
            if let Some((old, since)) = &p.previous {
                if *since + PREVIOUS_KEEP <= now || old.created + REJECT_AFTER_TIME <= now {
                    dead_indexes.push(old.local_index);
                    p.previous = None;
                }
            }
            if p.current
                .as_ref()
                .is_some_and(|c| c.created + REJECT_AFTER_TIME <= now)
            {
                if let Some(c) = p.current.take() {
                    dead_indexes.push(c.local_index);
                }
            }
            let Some(pd) = &p.pending else { continue };
            if pd.first_sent + HANDSHAKE_GIVE_UP <= now {
                dead_indexes.push(pd.index);
                p.pending = None;
                p.queue.clear();
            } else if pd.sent + HANDSHAKE_RETRY <= now
                && (p.current.is_none() || !p.queue.is_empty())
            {
                retry.push(*key);
            }
        }
        for i in dead_indexes {
            self.index.remove(&i);
        }
        retry
            .into_iter()
            .map(|k| {
                let pkt = self.initiate(k, now);
                (k, pkt)
            })
            .collect()
    }

    /// Handles a packet from `src` (the key the transport authenticated: the relay's RecvPacket
    /// source, or the peer of a direct path).
    pub fn open(
        &mut self,
        src: &PublicKey,
        packet: &[u8],
        now: Instant,
    ) -> Result<Opened, E2eError> {
        match packet.first() {
            Some(&T_INIT) => self.on_init(src, packet, now),
            Some(&T_RESP) => self.on_resp(src, packet, now),
            Some(&T_DATA) => self.on_data(src, packet, now),
            Some(_) => Err(E2eError::Malformed("unknown type")),
            None => Err(E2eError::Malformed("empty")),
        }
    }

    fn on_init(&mut self, src: &PublicKey, pkt: &[u8], now: Instant) -> Result<Opened, E2eError> {
        if pkt.len() < 5 + 32 + 48 + 24 {
            return Err(E2eError::Malformed("short initiation"));
        }
        let remote_index = u32::from_be_bytes(pkt[1..5].try_into().expect("len"));
        let local = self.local.to_bytes();
        let mut hs = self
            .builder()
            .local_private_key(&local)
            .and_then(|b| b.prologue(PROLOGUE))
            .and_then(|b| b.build_responder())
            .expect("static Noise setup");
        let mut payload = [0u8; 64];
        let n = hs
            .read_message(&pkt[5..], &mut payload)
            .map_err(|_| hs_error(src))?;
        let claimed = hs
            .get_remote_static()
            .and_then(PublicKey::from_slice)
            .ok_or_else(|| hs_error(src))?;
        if claimed != *src {
            return Err(E2eError::WrongPeerKey {
                claimed: claimed.short(),
                from: src.short(),
            });
        }
        if n != 8 {
            return Err(hs_error(src));
        }
        let ts = u64::from_be_bytes(payload[..8].try_into().expect("len"));
        let p = self.peers.entry(*src).or_default();
        if ts <= p.last_init_ts {
            return Err(E2eError::ReplayedHandshake(src.short()));
        }
        // Both sides initiated at once: the smaller key's initiation wins; the other side
        // answers it and drops its own.
        if p.pending.is_some() && self.local_pub.0 < src.0 {
            return Ok(Opened::default());
        }
        p.last_init_ts = ts;
        if let Some(pd) = p.pending.take() {
            self.index.remove(&pd.index);
        }
        let local_index = self.new_index(*src);
        let mut out = vec![0u8; 1 + 8 + 128];
        out[0] = T_RESP;
        out[1..5].copy_from_slice(&local_index.to_be_bytes());
        out[5..9].copy_from_slice(&remote_index.to_be_bytes());
        let m = hs
            .write_message(&[], &mut out[9..])
            .map_err(|_| hs_error(src))?;
        out.truncate(9 + m);
        let transport = hs
            .into_stateless_transport_mode()
            .map_err(|_| hs_error(src))?;
        let session = Session::new(local_index, remote_index, transport, now);
        let mut replies = vec![out];
        replies.extend(self.install(*src, session, now));
        Ok(Opened {
            replies,
            plaintext: None,
        })
    }

    fn on_resp(&mut self, src: &PublicKey, pkt: &[u8], now: Instant) -> Result<Opened, E2eError> {
        if pkt.len() < 9 + 32 + 16 {
            return Err(E2eError::Malformed("short response"));
        }
        let remote_index = u32::from_be_bytes(pkt[1..5].try_into().expect("len"));
        let local_index = u32::from_be_bytes(pkt[5..9].try_into().expect("len"));
        let peer = self.session_peer(src, local_index)?;
        let p = self.peers.get_mut(&peer).expect("indexed peer exists");
        let Some(pd) = p.pending.as_mut().filter(|pd| pd.index == local_index) else {
            return Err(E2eError::UnknownSession(local_index));
        };
        let mut payload = [0u8; 64];
        pd.hs
            .read_message(&pkt[9..], &mut payload)
            .map_err(|_| hs_error(src))?;
        let pd = p.pending.take().expect("checked");
        let transport = pd
            .hs
            .into_stateless_transport_mode()
            .map_err(|_| hs_error(src))?;
        let session = Session::new(local_index, remote_index, transport, now);
        Ok(Opened {
            replies: self.install(peer, session, now),
            plaintext: None,
        })
    }

    /// The peer of local session `local_index`, checked against the packet's sender `src`.
    fn session_peer(&self, src: &PublicKey, local_index: u32) -> Result<PublicKey, E2eError> {
        let peer = *self
            .index
            .get(&local_index)
            .ok_or(E2eError::UnknownSession(local_index))?;
        if peer != *src {
            return Err(E2eError::WrongSender {
                expected: peer.short(),
                from: src.short(),
            });
        }
        Ok(peer)
    }

    /// Makes `s` the current session and flushes the queue through it.
    fn install(&mut self, peer: PublicKey, s: Session, now: Instant) -> Vec<Vec<u8>> {
        let p = self.peers.get_mut(&peer).expect("peer exists");
        if let Some(old) = p.current.take() {
            if let Some((older, _)) = p.previous.replace((old, now)) {
                self.index.remove(&older.local_index);
            }
        }
        let s = p.current.insert(s);
        p.queue.drain(..).map(|pt| seal_data(s, &pt)).collect()
    }

    fn on_data(&mut self, src: &PublicKey, pkt: &[u8], now: Instant) -> Result<Opened, E2eError> {
        if pkt.len() < HEADER_DATA + 16 {
            return Err(E2eError::Malformed("short data packet"));
        }
        let local_index = u32::from_be_bytes(pkt[1..5].try_into().expect("len"));
        let counter = u64::from_be_bytes(pkt[5..13].try_into().expect("len"));
        let peer = self.session_peer(src, local_index)?;
        let p = self.peers.get_mut(&peer).expect("indexed peer exists");
        let s = match (&mut p.current, &mut p.previous) {
            (Some(c), _) if c.local_index == local_index => c,
            (_, Some((o, _))) if o.local_index == local_index => o,
            _ => return Err(E2eError::UnknownSession(local_index)),
        };
        if s.created + REJECT_AFTER_TIME <= now {
            return Err(E2eError::UnknownSession(local_index));
        }
        if counter >= REJECT_AFTER_MESSAGES || !s.replay.check(counter) {
            return Err(E2eError::Replay(counter));
        }
        let mut out = vec![0u8; pkt.len() - HEADER_DATA];
        let n = s
            .transport
            .read_message(counter, &pkt[HEADER_DATA..], &mut out)
            .map_err(|_| E2eError::Decrypt)?;
        s.replay.mark(counter);
        out.truncate(n);
        Ok(Opened {
            replies: Vec::new(),
            plaintext: Some(out),
        })
    }
}

fn seal_data(s: &mut Session, plaintext: &[u8]) -> Vec<u8> {
    let counter = s.send_counter;
    s.send_counter += 1;
    let mut out = vec![0u8; HEADER_DATA + plaintext.len() + 16];
    out[0] = T_DATA;
    out[1..5].copy_from_slice(&s.remote_index.to_be_bytes());
    out[5..13].copy_from_slice(&counter.to_be_bytes());
    let n = s
        .transport
        .write_message(counter, plaintext, &mut out[HEADER_DATA..])
        .expect("buffer sized for the ciphertext");
    out.truncate(HEADER_DATA + n);
    out
}

#[cfg(any(fuzzing, test))]
#[path = "e2e_fuzzing.rs"]
pub mod fuzzing;

#[cfg(test)]
#[path = "e2e_tests.rs"]
mod tests;
