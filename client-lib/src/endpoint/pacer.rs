//! Pacing of packets that go via the relay in bulk (sans-IO): unacknowledged direct packets
//! resent after the direct path went quiet, and a handshake's queued packets. A burst would
//! overflow the relay's per-client queue (32 packets in derper; in ferry 32 or 128 KiB,
//! whichever holds more) and be dropped there, so each peer's queue goes out
//! [`RESEND_BURST`] packets per [`RESEND_GAP`]. One timer for all peers: the actor sleeps
//! until [`Pacer::deadline`] and then calls [`Pacer::drain`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_proto::PublicKey;
use tracing::warn;

use super::path::MAX_UNACKED;

/// Resends via the relay go out at most this many per peer ...
pub(super) const RESEND_BURST: usize = 16;
/// ... per this long (8,000 packets/s per peer; 4,096 packets in about half a second).
pub(super) const RESEND_GAP: Duration = Duration::from_millis(2);

/// A packet the pacer releases now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Paced {
    /// To whom (via its relay).
    pub(super) peer: PublicKey,
    /// The E2E ciphertext.
    pub(super) pkt: Bytes,
    /// A resend of an unacknowledged direct packet (counted as such).
    pub(super) resend: bool,
}

/// Per-peer queues with one timer.
#[derive(Debug, Default)]
pub(super) struct Pacer {
    queues: HashMap<PublicKey, VecDeque<(Bytes, bool)>>,
    /// When the next batch is due (`None`: nothing queued).
    next: Option<Instant>,
}

impl Pacer {
    /// Queues `pkts` for `peer` (`resend`: counted as resends). Capped at [`MAX_UNACKED`] per
    /// peer: a resend further behind than the peer's replay window would be dropped there
    /// anyway; the oldest go first. If no batch is due yet (the timer is idle), the first
    /// batch is released at once.
    pub(super) fn push(
        &mut self,
        now: Instant,
        peer: PublicKey,
        pkts: impl IntoIterator<Item = Bytes>,
        resend: bool,
    ) -> Vec<Paced> {
        let q = self.queues.entry(peer).or_default();
        q.extend(pkts.into_iter().map(|p| (p, resend)));
        if q.is_empty() {
            self.queues.remove(&peer);
            return Vec::new();
        }
        if q.len() > MAX_UNACKED {
            let over = q.len() - MAX_UNACKED;
            q.drain(..over);
            warn!(peer = %peer.short(), dropped = over, "resend queue full: oldest unacknowledged packets dropped");
        }
        if self.next.is_none() {
            self.drain(now)
        } else {
            Vec::new()
        }
    }

    /// Releases the next [`RESEND_BURST`] packets of every peer and arms the timer
    /// ([`RESEND_GAP`]) if any are left.
    pub(super) fn drain(&mut self, now: Instant) -> Vec<Paced> {
        let mut batch = Vec::new();
        for (peer, q) in &mut self.queues {
            let n = q.len().min(RESEND_BURST);
            batch.extend(q.drain(..n).map(|(pkt, resend)| Paced {
                peer: *peer,
                pkt,
                resend,
            }));
        }
        self.queues.retain(|_, q| !q.is_empty());
        self.next = (!self.queues.is_empty()).then(|| now + RESEND_GAP);
        batch
    }

    /// When [`Pacer::drain`] is due (`None`: nothing queued).
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.next
    }

    /// Whether packets for `peer` are queued.
    pub(super) fn has(&self, peer: &PublicKey) -> bool {
        self.queues.contains_key(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;

    fn pkts(n: usize, tag: u8) -> Vec<Bytes> {
        (0..n).map(|i| Bytes::from(vec![tag, i as u8])).collect()
    }

    #[test]
    fn resends_go_sixteen_per_gap_and_the_first_batch_at_once() {
        let t0 = Instant::now();
        let a = SecretKey::generate().public();
        let mut p = Pacer::default();
        assert_eq!(p.deadline(), None);
        let first = p.push(t0, a, pkts(40, 1), true);
        assert_eq!(first.len(), RESEND_BURST, "the first burst goes at once");
        assert!(first.iter().all(|x| x.resend && x.peer == a));
        assert_eq!(first[0].pkt, Bytes::from(vec![1, 0]), "oldest first");
        assert_eq!(p.deadline(), Some(t0 + RESEND_GAP));
        assert!(p.has(&a));
        // Queued behind a running timer: nothing at once.
        assert!(p.push(t0, a, pkts(0, 2), true).is_empty());
        let t1 = t0 + RESEND_GAP;
        assert_eq!(p.drain(t1).len(), 16);
        assert_eq!(p.deadline(), Some(t1 + RESEND_GAP));
        let last = p.drain(t1 + RESEND_GAP);
        assert_eq!(last.len(), 8);
        assert_eq!(p.deadline(), None, "empty: the timer stops");
        assert!(!p.has(&a));
    }

    #[test]
    fn every_peer_gets_a_burst_per_gap_and_flushes_are_not_resends() {
        let t0 = Instant::now();
        let (a, b) = (
            SecretKey::generate().public(),
            SecretKey::generate().public(),
        );
        let mut p = Pacer::default();
        assert_eq!(p.push(t0, a, pkts(20, 1), true).len(), 16);
        assert!(p.push(t0, b, pkts(20, 2), false).is_empty());
        let next = p.drain(t0 + RESEND_GAP);
        assert_eq!(next.iter().filter(|x| x.peer == a).count(), 4);
        assert_eq!(next.iter().filter(|x| x.peer == b).count(), 16);
        assert!(next.iter().all(|x| x.resend == (x.peer == a)));
    }

    #[test]
    fn a_full_queue_drops_the_oldest() {
        let t0 = Instant::now();
        let a = SecretKey::generate().public();
        let mut p = Pacer::default();
        let first = p.push(t0, a, pkts(MAX_UNACKED + 100, 1), true);
        assert_eq!(first.len(), RESEND_BURST);
        assert_eq!(
            first[0].pkt,
            Bytes::from(vec![1, 100]),
            "the 100 oldest were dropped"
        );
        let mut n = first.len();
        let mut t = t0;
        while p.deadline().is_some() {
            t += RESEND_GAP;
            n += p.drain(t).len();
        }
        assert_eq!(n, MAX_UNACKED);
    }
}
