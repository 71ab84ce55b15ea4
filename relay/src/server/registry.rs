//! Who is connected: a concurrent map from key to the connections holding it, and each
//! connection's bounded send queues.
//!
//! Senders never block and never await: enqueueing takes a short, uncontended mutex on the
//! receiver's queues (no await while it is held), drops the oldest packet when the queue is full,
//! and wakes the receiver's writer task. Map guards are dropped before enqueueing.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::mesh::MeshLink;
use super::metrics::{CloseReason, DropReason, RelayMetrics};
use crate::proto::{PeerGoneReason, PublicKey};

/// A packet waiting in a receiver's queue.
#[derive(Debug)]
pub(crate) struct QueuedPacket {
    pub(crate) src: PublicKey,
    pub(crate) data: Bytes,
}

/// Frames other than packets that the writer sends.
#[derive(Debug, Clone)]
pub(crate) enum Control {
    Pong([u8; 8]),
    PeerGone(PublicKey, PeerGoneReason),
    PeerPresent {
        key: PublicKey,
        addr: SocketAddr,
        flags: u8,
    },
}

/// Control frames are few (pongs, peer-gone notes); a client that floods pings without reading
/// loses pongs beyond this, like any other frame of a client that does not read.
const MAX_CONTROL: usize = 64;

#[derive(Debug, Default)]
pub(crate) struct Queues {
    pub(crate) disco: VecDeque<QueuedPacket>,
    pub(crate) data: VecDeque<QueuedPacket>,
    pub(crate) control: VecDeque<Control>,
    /// What `disco` and `data` hold, in [`queued_cost`] units (kept in the handle's queues
    /// only; [`ClientHandle::take_queued`] zeroes them).
    disco_bytes: usize,
    data_bytes: usize,
}

/// Bookkeeping per queued packet, counted against the byte budget with its payload (so a
/// flood of tiny packets cannot queue without bound).
const QUEUED_OVERHEAD: usize = 64;

/// What a queued packet of `len` bytes counts against the byte budget.
fn queued_cost(len: usize) -> usize {
    len + QUEUED_OVERHEAD
}

/// One authenticated DERP connection, as seen by everyone else.
#[derive(Debug)]
pub(crate) struct ClientHandle {
    pub(crate) key: PublicKey,
    pub(crate) conn_id: u64,
    pub(crate) remote: SocketAddr,
    queues: Mutex<Queues>,
    /// A queue sheds its oldest packet only when it holds more than `depth` packets *and*
    /// more than `budget` bytes (see [`ClientHandle::enqueue_packet`]).
    depth: usize,
    budget: usize,
    /// Wakes the writer task: a permit is stored if it is busy, so no wake-up is lost.
    pub(crate) notify: Notify,
    /// Set while another connection holds the same key (then the last sender is the receiver).
    pub(crate) has_dup: AtomicBool,
    /// Cancels this connection (ClosePeer, write failure, shutdown of the connection).
    pub(crate) cancel: CancellationToken,
    /// The client understands Health/Restarting/PeerPresent (Go clients; see `derp-v2.md`).
    pub(crate) extended_frames: bool,
    /// Why the connection was closed from outside the reader (first reason wins).
    close_reason: Mutex<Option<CloseReason>>,
}

impl ClientHandle {
    pub(crate) fn new(
        key: PublicKey,
        conn_id: u64,
        remote: SocketAddr,
        (depth, budget): (usize, usize),
        cancel: CancellationToken,
        extended_frames: bool,
    ) -> Self {
        ClientHandle {
            key,
            conn_id,
            remote,
            queues: Mutex::new(Queues::default()),
            depth: depth.max(1),
            budget,
            notify: Notify::new(),
            has_dup: AtomicBool::new(false),
            cancel,
            extended_frames,
            close_reason: Mutex::new(None),
        }
    }

    /// Closes the connection, remembering why (the first reason given wins).
    pub(crate) fn close(&self, why: CloseReason) {
        self.close_reason.lock().get_or_insert(why);
        self.cancel.cancel();
    }

    /// Why [`ClientHandle::close`] was called, if it was.
    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        *self.close_reason.lock()
    }

    /// Queues a packet for this client. Never blocks: when the queue is full the oldest packets
    /// are dropped (counted as `queue_head`), as derper does. Full means more than `depth`
    /// packets (derper: 32) *and* more than `budget` bytes: derper's count alone holds 32 × 64
    /// KiB of large packets but only ~8 KiB of small ones, so one sender's burst of small
    /// packets (a single 8 KiB read is ~30–80 of them) overflowed a receiver whose writer missed
    /// a millisecond of CPU. The budget keeps such bursts; memory per queue stays at most
    /// max(`depth` × the largest packet, `budget` + one packet), derper's bound for a budget
    /// up to 2 MiB. Budget 0 is derper's rule exactly.
    pub(crate) fn enqueue_packet(
        &self,
        src: PublicKey,
        data: Bytes,
        disco: bool,
        m: &RelayMetrics,
    ) {
        let dropped = {
            let mut guard = self.queues.lock();
            let qs = &mut *guard;
            let (q, bytes) = if disco {
                (&mut qs.disco, &mut qs.disco_bytes)
            } else {
                (&mut qs.data, &mut qs.data_bytes)
            };
            *bytes += queued_cost(data.len());
            q.push_back(QueuedPacket { src, data });
            let mut dropped = 0u64;
            while q.len() > self.depth && *bytes > self.budget {
                let Some(old) = q.pop_front() else { break };
                *bytes -= queued_cost(old.data.len());
                dropped += 1;
            }
            dropped
        };
        if dropped > 0 {
            m.drop_n(DropReason::QueueHead, dropped);
        }
        self.notify.notify_one();
    }

    /// Queues a control frame; returns false (and drops it) when the control queue is full.
    pub(crate) fn enqueue_control(&self, c: Control) -> bool {
        let ok = {
            let mut q = self.queues.lock();
            if q.control.len() >= MAX_CONTROL {
                false
            } else {
                q.control.push_back(c);
                true
            }
        };
        if ok {
            self.notify.notify_one();
        }
        ok
    }

    /// Moves everything queued into `into` (which must be empty), keeping both allocations.
    pub(crate) fn take_queued(&self, into: &mut Queues) {
        let mut q = self.queues.lock();
        std::mem::swap(&mut q.disco, &mut into.disco);
        std::mem::swap(&mut q.data, &mut into.data);
        std::mem::swap(&mut q.control, &mut into.control);
        // `into`'s queues were drained by the caller: the handle's are empty now.
        (q.disco_bytes, q.data_bytes) = (0, 0);
    }
}

/// The connections holding one key. `active` receives; the others wait their turn.
#[derive(Debug)]
struct ClientSet {
    active: Arc<ClientHandle>,
    others: Vec<Arc<ClientHandle>>,
}

impl ClientSet {
    fn set_dup_flags(&self) {
        let dup = !self.others.is_empty();
        self.active.has_dup.store(dup, Ordering::Relaxed);
        for o in &self.others {
            o.has_dup.store(dup, Ordering::Relaxed);
        }
    }
}

/// Something that wants to hear about connects and disconnects (mesh watchers).
pub(crate) type Watcher = Arc<ClientHandle>;

/// The registry of connected clients.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    clients: DashMap<PublicKey, ClientSet>,
    watchers: DashMap<u64, Watcher>,
    /// Keys connected to mesh peers, with the links that reach them (the newest is used).
    /// Local clients always win over these.
    remote: DashMap<PublicKey, Vec<Arc<MeshLink>>>,
    next_conn_id: AtomicU64,
}

impl Registry {
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The connection that receives for `key`, if any.
    pub(crate) fn get(&self, key: &PublicKey) -> Option<Arc<ClientHandle>> {
        self.clients.get(key).map(|s| Arc::clone(&s.active))
    }

    /// The mesh link that reaches `key` on a peer relay, if any.
    pub(crate) fn get_remote(&self, key: &PublicKey) -> Option<Arc<MeshLink>> {
        self.remote.get(key).and_then(|v| v.last().cloned())
    }

    /// A mesh peer reports `key` connected to it.
    pub(crate) fn add_remote(&self, key: PublicKey, link: Arc<MeshLink>) {
        let mut v = self.remote.entry(key).or_default();
        v.retain(|l| l.id != link.id);
        v.push(link);
    }

    /// `key` left the peer behind `link_id` (or that link broke).
    pub(crate) fn remove_remote(&self, key: &PublicKey, link_id: u64) {
        if let dashmap::Entry::Occupied(mut e) = self.remote.entry(*key) {
            e.get_mut().retain(|l| l.id != link_id);
            if e.get().is_empty() {
                e.remove();
            }
        }
    }

    /// Number of distinct keys reachable through mesh peers.
    pub(crate) fn remote_len(&self) -> usize {
        self.remote.len()
    }

    /// Number of distinct keys connected.
    pub(crate) fn len(&self) -> usize {
        self.clients.len()
    }

    /// Adds a connection; it becomes the receiver for its key.
    pub(crate) fn register(&self, c: Arc<ClientHandle>) {
        let key = c.key;
        match self.clients.entry(key) {
            dashmap::Entry::Occupied(mut e) => {
                let set = e.get_mut();
                let old = std::mem::replace(&mut set.active, Arc::clone(&c));
                set.others.push(old);
                set.set_dup_flags();
            }
            dashmap::Entry::Vacant(e) => {
                e.insert(ClientSet {
                    active: Arc::clone(&c),
                    others: Vec::new(),
                });
            }
        }
        self.notify_watchers(
            Control::PeerPresent {
                key,
                addr: c.remote,
                flags: 0x01,
            },
            c.conn_id,
        );
    }

    /// A connection that shares its key just sent: make it the receiver (last writer wins).
    pub(crate) fn note_sender(&self, c: &Arc<ClientHandle>) {
        if let Some(mut set) = self.clients.get_mut(&c.key) {
            if set.active.conn_id != c.conn_id {
                if let Some(i) = set.others.iter().position(|o| o.conn_id == c.conn_id) {
                    let me = set.others.swap_remove(i);
                    let old = std::mem::replace(&mut set.active, me);
                    set.others.push(old);
                }
            }
        }
    }

    /// Removes a connection. Returns true if no other connection holds its key any more.
    pub(crate) fn unregister(&self, c: &ClientHandle) -> bool {
        let mut gone = false;
        if let dashmap::Entry::Occupied(mut e) = self.clients.entry(c.key) {
            let set = e.get_mut();
            if set.active.conn_id == c.conn_id {
                match set.others.pop() {
                    Some(next) => set.active = next,
                    None => gone = true,
                }
            } else {
                set.others.retain(|o| o.conn_id != c.conn_id);
            }
            if gone {
                e.remove();
            } else {
                e.get().set_dup_flags();
            }
        }
        self.watchers.remove(&c.conn_id);
        if gone {
            self.notify_watchers(
                Control::PeerGone(c.key, PeerGoneReason::Disconnected),
                c.conn_id,
            );
        }
        gone
    }

    /// Adds a mesh watcher and tells it about everyone connected now.
    pub(crate) fn add_watcher(&self, w: Watcher) {
        let present: Vec<(PublicKey, SocketAddr)> = self
            .clients
            .iter()
            .map(|s| (*s.key(), s.value().active.remote))
            .collect();
        for (key, addr) in present {
            if key != w.key {
                w.enqueue_control(Control::PeerPresent {
                    key,
                    addr,
                    flags: 0x01,
                });
            }
        }
        self.watchers.insert(w.conn_id, w);
    }

    fn notify_watchers(&self, note: Control, except_conn: u64) {
        if self.watchers.is_empty() {
            return;
        }
        let ws: Vec<Watcher> = self
            .watchers
            .iter()
            .map(|w| Arc::clone(w.value()))
            .collect();
        for w in ws {
            if w.conn_id != except_conn {
                w.enqueue_control(note.clone());
            }
        }
    }

    /// Cancels every connection holding `key` (mesh ClosePeer).
    pub(crate) fn close_key(&self, key: &PublicKey) {
        let conns: Vec<Arc<ClientHandle>> = match self.clients.get(key) {
            Some(s) => std::iter::once(Arc::clone(&s.active))
                .chain(s.others.iter().cloned())
                .collect(),
            None => return,
        };
        for c in conns {
            c.close(CloseReason::ClosedByMesh);
        }
    }

    /// Every connection (for shutdown).
    pub(crate) fn all(&self) -> Vec<Arc<ClientHandle>> {
        let mut v = Vec::new();
        for s in self.clients.iter() {
            v.push(Arc::clone(&s.active));
            v.extend(s.others.iter().cloned());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(reg: &Registry, k: u8) -> Arc<ClientHandle> {
        Arc::new(ClientHandle::new(
            PublicKey([k; 32]),
            reg.next_conn_id(),
            "127.0.0.1:1".parse().unwrap(),
            (2, 0),
            CancellationToken::new(),
            false,
        ))
    }

    #[test]
    fn full_queue_drops_oldest_and_counts_it() {
        let m = RelayMetrics::detached();
        let reg = Registry::default();
        let c = handle(&reg, 1);
        for i in 0..5u8 {
            c.enqueue_packet(PublicKey([9; 32]), Bytes::from(vec![i]), false, &m);
        }
        let mut q = Queues::default();
        c.take_queued(&mut q);
        let kept: Vec<u8> = q.data.iter().map(|p| p.data[0]).collect();
        assert_eq!(kept, vec![3, 4]);
        assert_eq!(m.drops_for(DropReason::QueueHead), 3);
    }

    #[test]
    fn byte_budget_keeps_bursts_of_small_packets_and_still_bounds_large_ones() {
        let m = RelayMetrics::detached();
        let src = PublicKey([9; 32]);
        let budget = 10 * queued_cost(100);
        let c = ClientHandle::new(
            PublicKey([1; 32]),
            1,
            "127.0.0.1:1".parse().unwrap(),
            (4, budget),
            CancellationToken::new(),
            false,
        );
        let kept = |c: &ClientHandle| {
            let mut q = Queues::default();
            c.take_queued(&mut q);
            q.data.iter().map(|p| p.data[0]).collect::<Vec<u8>>()
        };
        // Small packets: more than the depth of 4 are kept, up to the budget (10 of them).
        for i in 0..12u8 {
            c.enqueue_packet(src, Bytes::from(vec![i; 100]), false, &m);
        }
        assert_eq!(kept(&c), (2..12).collect::<Vec<u8>>());
        assert_eq!(m.drops_for(DropReason::QueueHead), 2);
        // The queue was emptied by the writer: the budget is whole again.
        for i in 0..10u8 {
            c.enqueue_packet(src, Bytes::from(vec![i; 100]), false, &m);
        }
        assert_eq!(kept(&c).len(), 10);
        assert_eq!(m.drops_for(DropReason::QueueHead), 2);
        // Large packets, each over the budget alone: the depth bounds them, as in derper.
        for i in 0..6u8 {
            c.enqueue_packet(src, Bytes::from(vec![i; 4 * budget]), false, &m);
        }
        assert_eq!(kept(&c), vec![2, 3, 4, 5]);
        assert_eq!(m.drops_for(DropReason::QueueHead), 4);
        // One large packet after a full budget of small ones pushes out small ones until the
        // queue is within the depth (4: three small and the large one).
        for i in 0..10u8 {
            c.enqueue_packet(src, Bytes::from(vec![i; 100]), false, &m);
        }
        c.enqueue_packet(src, Bytes::from(vec![99; 4 * budget]), false, &m);
        assert_eq!(kept(&c), vec![7, 8, 9, 99]);
        assert_eq!(m.drops_for(DropReason::QueueHead), 11);
    }

    #[test]
    fn duplicate_keys_last_writer_receives_and_survivor_takes_over() {
        let reg = Registry::default();
        let a = handle(&reg, 1);
        let b = handle(&reg, 1);
        reg.register(Arc::clone(&a));
        reg.register(Arc::clone(&b));
        assert!(a.has_dup.load(Ordering::Relaxed));
        assert_eq!(
            reg.get(&a.key).unwrap().conn_id,
            b.conn_id,
            "newest connection receives"
        );
        reg.note_sender(&a);
        assert_eq!(
            reg.get(&a.key).unwrap().conn_id,
            a.conn_id,
            "last writer receives"
        );
        assert!(!reg.unregister(&a), "key still held by b");
        assert_eq!(reg.get(&a.key).unwrap().conn_id, b.conn_id);
        assert!(!b.has_dup.load(Ordering::Relaxed));
        assert!(reg.unregister(&b));
        assert!(reg.get(&a.key).is_none());
    }
}
