//! Birthday probing (an easy NAT facing a hard one), the node-wide decisions (sans-IO):
//! [`Birthday`] owns the hard side's session (one at a time, held [`BIRTHDAY_HOLD`]), the easy
//! side's spray (one at a time) and the rate limits, per peer and node-wide. The per-peer
//! machine asks for it ([`super::path::Action::OpenBirthday`] and
//! [`super::path::Action::StartSpray`]); the actor opens and closes the sockets
//! ([`super::sockets::BirthdaySockets`]) and sends the spray's pings as the coordinator says.
//! See docs/client.md, "Birthday probing".

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ferry_proto::PublicKey;
use tracing::{debug, info, warn};

use super::recent;

/// Birthday probing (an easy NAT facing a hard one): the hard side opens this many sockets,
/// each punching a mapping towards the easy side's endpoint ...
pub(super) const BIRTHDAY_SOCKETS: usize = 256;
/// ... and the easy side pings this many random ports of the hard side's address per round.
/// With 256 of the 64,512 ports 1024–65535 open, 1024 probes hit one with probability
/// 1 − (1 − 256/64512)^1024 ≈ 98 % ...
pub(super) const BIRTHDAY_PROBES: usize = 1024;
/// ... and a round that found nothing goes straight on to another (fresh ports, the hard
/// side's mappings are still held), rather than waiting for the next probe interval:
/// 2,048 probes miss with probability ≈ 0.03 %. (The lab saw ~2 % of first rounds miss,
/// each costing a whole probe interval, 5 s.)
pub(super) const BIRTHDAY_ROUNDS: usize = 2;
/// Probes per second (a round of 1024 takes about 2 s; about 120 kB/s of disco pings).
pub(super) const BIRTHDAY_RATE: u64 = 500;
/// The hard side keeps unused birthday sockets this long (the probes follow within ~4 s of
/// its CallMeMaybe; Linux keeps an unanswered UDP mapping for 30 s).
pub(super) const BIRTHDAY_HOLD: Duration = Duration::from_secs(10);
/// Fewer free descriptors than this for the sockets: no birthday session.
pub(super) const BIRTHDAY_SOCKETS_MIN: usize = 32;

/// The easy side's probes towards a hard peer.
#[derive(Debug)]
struct Spray {
    peer: PublicKey,
    targets: Vec<SocketAddr>,
    sent: usize,
    started: Instant,
}

/// What [`Birthday::gate`] allows the hard side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Gate {
    /// Open a session towards these targets (at most 2 public IPv4 endpoints).
    Open(Vec<SocketAddr>),
    /// This peer's session is open already (its mappings are held): do not open another,
    /// but a CallMeMaybe may say "punched", so the peer sprays.
    Held,
    /// No session (no public target, another peer's session is held, or rate-limited).
    No,
}

/// The node's birthday sessions and sprays, and their rate limits.
#[derive(Debug)]
pub(super) struct Birthday {
    probe_interval: Duration,
    /// Hard side: the running session (peer, hold until): its sockets stay open until then.
    session: Option<(PublicKey, Instant)>,
    /// Hard side: last session opened per peer.
    last_birthday: HashMap<PublicKey, Instant>,
    /// Easy side: the running spray.
    spray: Option<Spray>,
    /// Easy side: last spray per peer, and towards anyone.
    last_spray: HashMap<PublicKey, Instant>,
    last_spray_any: Option<Instant>,
}

impl Birthday {
    /// No session, no spray; rate limits per `probe_interval`.
    pub(super) fn new(probe_interval: Duration) -> Birthday {
        Birthday {
            probe_interval,
            session: None,
            last_birthday: HashMap::new(),
            spray: None,
            last_spray: HashMap::new(),
            last_spray_any: None,
        }
    }

    /// Hard side, the gates: [`Gate::Open`] with the targets (at most 2 public IPv4
    /// endpoints) if a session for `peer` may open now — none for another peer is held, none
    /// for this peer within `probe_interval`; then the previous session ends: the caller closes
    /// its unused sockets and calls [`Birthday::start`] with its descriptor budget.
    /// [`Gate::Held`] if this peer's session is still held: the peer's CallMeMaybe that arrives
    /// while (or just after) we opened it must still make us answer "punched", or the round is
    /// lost (the lab saw both sides' probe timers fire together: the answer to the peer's
    /// CallMeMaybe was gated off, the peer never sprayed).
    pub(super) fn gate(&mut self, now: Instant, peer: PublicKey, endpoints: &[SocketAddr]) -> Gate {
        let targets: Vec<SocketAddr> = endpoints
            .iter()
            .copied()
            .filter(is_public_v4)
            .take(2)
            .collect();
        if self.holds(peer, now)
            && recent(
                self.last_birthday.get(&peer).copied(),
                self.probe_interval,
                now,
            )
        {
            return Gate::Held;
        }
        if targets.is_empty() || self.session.is_some_and(|(p, t)| p != peer && t > now) {
            return Gate::No;
        }
        if recent(
            self.last_birthday.get(&peer).copied(),
            self.probe_interval,
            now,
        ) {
            return Gate::No;
        }
        self.last_birthday.insert(peer, now);
        // A new session replaces the last one: its sockets that found nothing are closed.
        self.session = None;
        Gate::Open(targets)
    }

    /// Hard side: whether `peer`'s session is open and held (its mappings towards the peer are
    /// open: a CallMeMaybe we send it now may say "punched").
    pub(super) fn holds(&self, peer: PublicKey, now: Instant) -> bool {
        self.session
            .is_some_and(|(p, until)| p == peer && until > now)
    }

    /// Hard side: starts the session for `peer` with `budget` sockets (the free descriptors
    /// allow); `None` (and a warning) below [`BIRTHDAY_SOCKETS_MIN`].
    pub(super) fn start(&mut self, now: Instant, peer: PublicKey, budget: usize) -> Option<usize> {
        if budget < BIRTHDAY_SOCKETS_MIN {
            warn!(
                sockets = budget,
                "birthday probing skipped: too few file descriptors left (raise `ulimit -n`)"
            );
            return None;
        }
        self.session = Some((peer, now + BIRTHDAY_HOLD));
        Some(budget)
    }

    /// Whether the session's hold is over (or there is none): then the sockets no direct path
    /// uses may be closed.
    pub(super) fn session_over(&mut self, now: Instant) -> bool {
        if self.session.is_some_and(|(_, until)| until > now) {
            return false;
        }
        self.session = None;
        true
    }

    /// Easy side: starts pinging random ports of the hard peer's public IPv4 addresses
    /// ([`BIRTHDAY_PROBES`] × [`BIRTHDAY_ROUNDS`] at [`BIRTHDAY_RATE`], see
    /// [`Birthday::spray_step`]). At most once
    /// per 0.8 × `probe_interval` per peer and in all, one spray at a time, and only if the
    /// peer is `eligible` (active or with a session). Returns whether it started.
    pub(super) fn start_spray(
        &mut self,
        now: Instant,
        peer: PublicKey,
        endpoints: &[SocketAddr],
        eligible: bool,
    ) -> bool {
        let mut ips: Vec<IpAddr> = endpoints
            .iter()
            .filter(|a| is_public_v4(a))
            .map(|a| a.ip())
            .collect();
        ips.sort();
        ips.dedup();
        ips.truncate(2);
        if ips.is_empty() || self.spray.is_some() {
            return false;
        }
        // A little under the hard side's once per probe_interval, so timing jitter does not
        // make us skip every other session it opens.
        let interval = self.probe_interval.mul_f64(0.8);
        if recent(self.last_spray.get(&peer).copied(), interval, now) {
            return false;
        }
        // 1,024 pings at an address the peer names: only for an active peer — one we sent to
        // or got authenticated data from lately, or that has proven its key in a Noise
        // handshake (the relay queues disco apart from data, so its CallMeMaybe can overtake
        // its first data) — and at most one spray per 0.8 × probe_interval in all, so a
        // node-key holder cannot make us a steady amplifier against a third party (at worst
        // 2,048 pings per 4 s, about 500 pings/s, for this whole node).
        if !eligible || recent(self.last_spray_any, interval, now) {
            debug!(peer = %peer.short(), "no birthday spray: peer not active, or a spray ran just now");
            return false;
        }
        self.last_spray.insert(peer, now);
        self.last_spray_any = Some(now);
        let targets = spray_targets(&ips, BIRTHDAY_PROBES * BIRTHDAY_ROUNDS, endpoints);
        info!(peer = %peer.short(), ?ips, probes = targets.len(), "birthday probing: easy side probes random ports");
        self.spray = Some(Spray {
            peer,
            targets,
            sent: 0,
            started: now,
        });
        true
    }

    /// The spray's probes due now (to ping, tracked, from the main socket); ends the spray
    /// when all are sent or when `found(peer)` (the peer has a direct path, or is gone).
    pub(super) fn spray_step(
        &mut self,
        now: Instant,
        found: impl FnOnce(&PublicKey) -> bool,
    ) -> Option<(PublicKey, Vec<SocketAddr>)> {
        let sp = self.spray.as_mut()?;
        let peer = sp.peer;
        let found = found(&peer);
        if found || sp.sent >= sp.targets.len() {
            debug!(peer = %peer.short(), sent = sp.sent, found, "birthday spray ends");
            self.spray = None;
            return None;
        }
        let elapsed = now.saturating_duration_since(sp.started);
        let due = ((elapsed.as_millis() as u64 * BIRTHDAY_RATE / 1000) as usize + 1)
            .min(sp.targets.len());
        let batch: Vec<SocketAddr> = sp.targets[sp.sent..due.max(sp.sent)].to_vec();
        sp.sent = due.max(sp.sent);
        Some((peer, batch))
    }

    /// The peer the running spray is aimed at.
    pub(super) fn spray_peer(&self) -> Option<PublicKey> {
        self.spray.as_ref().map(|s| s.peer)
    }

    /// Forgets a pruned peer's rate limits (as the per-peer state they were part of).
    pub(super) fn forget(&mut self, peer: &PublicKey) {
        self.last_birthday.remove(peer);
        self.last_spray.remove(peer);
    }
}

/// Whether `a` is a public IPv4 address (a NAT's outside), the only kind birthday probing aims
/// at.
pub(super) fn is_public_v4(a: &SocketAddr) -> bool {
    match a.ip() {
        IpAddr::V4(ip) => {
            !(ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || ip.is_multicast())
        }
        IpAddr::V6(_) => false,
    }
}

/// `n` distinct random ports in 1024–65535 for each of `ips`, skipping `known`, interleaved
/// across the addresses.
fn spray_targets(ips: &[IpAddr], n: usize, known: &[SocketAddr]) -> Vec<SocketAddr> {
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

#[cfg(test)]
mod tests;
