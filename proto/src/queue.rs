//! The one bounded queue ferry uses wherever a sender must never wait: the relay's per-receiver
//! and mesh-link queues, and the client's queue per relay connection.
//!
//! A push always succeeds; when the queue is over its limits the oldest items are dropped
//! (derper's `queue_head`) and returned as a count for the caller's metric. The limits are a
//! packet floor, a packet ceiling and a byte budget:
//!
//! - at or below `min_packets` nothing is dropped, whatever the bytes (derper's depth of 32:
//!   a receiver always keeps its last 32 packets, even 64 KiB ones);
//! - above `max_packets` the oldest go, whatever the bytes;
//! - in between the oldest go while the queue holds more than `max_bytes`.
//!
//! Bytes are payload plus [`QUEUED_OVERHEAD`] per packet, so a flood of tiny packets is
//! bounded too. Memory per queue is therefore at most
//! max(`min_packets` × the largest packet, `max_bytes` + one packet), and never more than
//! `max_packets` packets.

use std::collections::VecDeque;

/// Bookkeeping per queued packet, counted against the byte budget with its payload.
pub const QUEUED_OVERHEAD: usize = 64;

/// What a queued item counts against the byte budget.
pub trait Cost {
    /// Payload bytes plus [`QUEUED_OVERHEAD`].
    fn cost(&self) -> usize;
}

/// See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub min_packets: usize,
    pub max_packets: usize,
    pub max_bytes: usize,
}

impl QueueLimits {
    /// A receiver's queue: `depth` packets kept whatever their size, more up to `bytes` (0:
    /// derper's rule, `depth` packets and no more).
    pub fn receiver(depth: usize, bytes: usize) -> Self {
        QueueLimits {
            min_packets: depth.max(1),
            max_packets: usize::MAX,
            max_bytes: bytes,
        }
    }
}

/// A FIFO that drops its oldest entries when over its [`QueueLimits`].
#[derive(Debug)]
pub struct DropOldest<T> {
    items: VecDeque<T>,
    bytes: usize,
}

impl<T> Default for DropOldest<T> {
    fn default() -> Self {
        DropOldest {
            items: VecDeque::new(),
            bytes: 0,
        }
    }
}

impl<T: Cost> DropOldest<T> {
    /// Appends `item`, then drops the oldest while over `lim`; returns how many were dropped.
    pub fn push(&mut self, item: T, lim: QueueLimits) -> u64 {
        self.bytes += item.cost();
        self.items.push_back(item);
        let mut dropped = 0;
        while self.items.len() > lim.max_packets
            || (self.items.len() > lim.min_packets && self.bytes > lim.max_bytes)
        {
            let Some(old) = self.items.pop_front() else {
                break;
            };
            self.bytes -= old.cost();
            dropped += 1;
        }
        dropped
    }

    /// Number of queued items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// What the queue holds, in [`Cost`] units.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes the oldest item.
    pub fn pop_front(&mut self) -> Option<T> {
        let item = self.items.pop_front()?;
        self.bytes -= item.cost();
        Some(item)
    }

    /// Takes every item, oldest first (the queue keeps its allocation).
    pub fn drain(&mut self) -> std::collections::vec_deque::Drain<'_, T> {
        self.bytes = 0;
        self.items.drain(..)
    }

    /// Exchanges contents with `other` (the writer swaps an empty queue in under the lock and
    /// drains the full one outside it).
    pub fn swap(&mut self, other: &mut Self) {
        std::mem::swap(self, other);
    }

    /// Moves the oldest items into `into` (empty) until it holds at least `max_bytes`, or
    /// everything: a whole queue within the bound is swapped, not moved item by item.
    pub fn take_front(&mut self, into: &mut Self, max_bytes: usize) {
        if self.bytes <= max_bytes {
            self.swap(into);
            return;
        }
        while into.bytes < max_bytes {
            let Some(item) = self.items.pop_front() else {
                break;
            };
            let c = item.cost();
            self.bytes -= c;
            into.bytes += c;
            into.items.push_back(item);
        }
    }

    /// Iterates over the queued items, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct P(u8, usize);
    impl Cost for P {
        fn cost(&self) -> usize {
            self.1 + QUEUED_OVERHEAD
        }
    }

    fn ids(q: &DropOldest<P>) -> Vec<u8> {
        q.iter().map(|p| p.0).collect()
    }

    #[test]
    fn derpers_rule_keeps_exactly_the_depth() {
        let lim = QueueLimits::receiver(2, 0);
        let mut q = DropOldest::default();
        let dropped: u64 = (0..5).map(|i| q.push(P(i, 1), lim)).sum();
        assert_eq!(ids(&q), vec![3, 4]);
        assert_eq!(dropped, 3);
    }

    #[test]
    fn the_byte_budget_keeps_small_bursts_and_bounds_large_packets() {
        let budget = 10 * (100 + QUEUED_OVERHEAD);
        let lim = QueueLimits::receiver(4, budget);
        let mut q = DropOldest::default();
        // Small packets: more than the depth of 4 are kept, up to the budget (10 of them).
        let d: u64 = (0..12).map(|i| q.push(P(i, 100), lim)).sum();
        assert_eq!((ids(&q), d), ((2..12).collect(), 2));
        assert_eq!(q.bytes(), budget);
        assert_eq!(q.drain().count(), 10);
        assert_eq!(q.bytes(), 0, "drained: the budget is whole again");
        // Large packets, each over the budget alone: the depth bounds them, as in derper.
        let d: u64 = (0..6).map(|i| q.push(P(i, 4 * budget), lim)).sum();
        assert_eq!((ids(&q), d), (vec![2, 3, 4, 5], 2));
        q.drain();
        // One large packet after a budget of small ones pushes small ones out down to the depth.
        for i in 0..10 {
            q.push(P(i, 100), lim);
        }
        assert_eq!(q.push(P(99, 4 * budget), lim), 7);
        assert_eq!(ids(&q), vec![7, 8, 9, 99]);
    }

    #[test]
    fn the_packet_ceiling_holds_whatever_the_bytes() {
        let lim = QueueLimits {
            min_packets: 2,
            max_packets: 5,
            max_bytes: usize::MAX,
        };
        let mut q = DropOldest::default();
        let d: u64 = (0..8).map(|i| q.push(P(i, 0), lim)).sum();
        assert_eq!((ids(&q), d), (vec![3, 4, 5, 6, 7], 3));
        // ... and the budget still bounds bytes above the floor.
        let lim = QueueLimits {
            max_bytes: 3 * QUEUED_OVERHEAD,
            ..lim
        };
        assert_eq!(q.push(P(8, 0), lim), 3);
        assert_eq!(ids(&q), vec![6, 7, 8]);
        let mut other = DropOldest::default();
        q.swap(&mut other);
        assert!(q.is_empty());
        assert_eq!((other.len(), other.bytes()), (3, 3 * QUEUED_OVERHEAD));
    }

    #[test]
    fn take_front_moves_the_oldest_up_to_a_bound() {
        let lim = QueueLimits::receiver(100, usize::MAX);
        let mut q = DropOldest::default();
        for i in 0..10 {
            q.push(P(i, 100 - QUEUED_OVERHEAD), lim);
        }
        let mut batch = DropOldest::default();
        q.take_front(&mut batch, 250);
        assert_eq!((ids(&batch), batch.bytes()), (vec![0, 1, 2], 300));
        assert_eq!((ids(&q), q.bytes()), ((3..10).collect(), 700));
        let mut rest = DropOldest::default();
        q.take_front(&mut rest, 700);
        assert_eq!(ids(&rest), (3..10).collect::<Vec<u8>>());
        assert!(q.is_empty());
    }
}
