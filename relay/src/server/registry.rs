//! Who is connected: a concurrent map from key to the connections holding it, and each
//! connection's bounded send queues.
//!
//! Senders never block and never await: enqueueing takes a short, uncontended mutex on the
//! receiver's queues (no await while it is held), drops the oldest packet when the queue is full,
//! and wakes the receiver's writer task. Map guards are dropped before enqueueing.

use std::collections::{HashMap, VecDeque};
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
use super::queue::{Cost, DropOldest, QueueLimits, SourceBuf, QUEUED_OVERHEAD};
use crate::proto::{PeerGoneReason, PublicKey};

/// A packet waiting in a receiver's queue.
#[derive(Debug)]
pub(crate) struct QueuedPacket {
    pub(crate) src: PublicKey,
    pub(crate) data: Bytes,
}

impl Cost for QueuedPacket {
    fn cost(&self) -> usize {
        self.data.len() + QUEUED_OVERHEAD
    }
}

/// Frames other than packets that the writer sends.
#[derive(Debug, Clone)]
pub(crate) enum Control {
    Pong([u8; 8]),
    PeerGone(PublicKey, PeerGoneReason),
    /// The answer to the client's AllocateUdpRelay (an encoded `AllocResponse`).
    UdpRelayEndpoint(Vec<u8>),
}

/// A change in who is connected, for watchers (mesh peers): PeerPresent or PeerGone.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Presence {
    Present {
        key: PublicKey,
        addr: SocketAddr,
        flags: u8,
    },
    Gone(PublicKey),
}

/// Control frames are few (pongs, peer-gone notes); a client that floods pings without reading
/// loses pongs beyond this, like any other frame of a client that does not read.
const MAX_CONTROL: usize = 64;

/// Mesh peers get derper's write timeout for privileged clients: a watcher that stalls loses
/// its whole view, so it is given longer than an ordinary client's 2 s.
pub(crate) const MESH_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Default)]
pub(crate) struct Queues {
    pub(crate) disco: DropOldest<QueuedPacket>,
    pub(crate) data: DropOldest<QueuedPacket>,
    pub(crate) control: VecDeque<Control>,
    /// Presence changes for a watcher, in order: the snapshot it got when it subscribed, then
    /// every join and leave since. Never cut silently: see [`Registry::add_watcher`].
    pub(crate) presence: VecDeque<Presence>,
    /// Set at teardown ([`ClientHandle::close_queues`]): packets are counted, not queued.
    closed: bool,
}

/// One authenticated DERP connection, as seen by everyone else.
#[derive(Debug)]
pub(crate) struct ClientHandle {
    pub(crate) key: PublicKey,
    pub(crate) conn_id: u64,
    pub(crate) remote: SocketAddr,
    queues: Mutex<Queues>,
    /// Limits of the disco and data queues (see [`super::queue`]).
    limits: QueueLimits,
    /// Wakes the writer task: a permit is stored if it is busy, so no wake-up is lost.
    pub(crate) notify: Notify,
    /// Set while another connection holds the same key (then the last sender is the receiver).
    pub(crate) has_dup: AtomicBool,
    /// Cancels this connection (ClosePeer, write failure, shutdown of the connection).
    pub(crate) cancel: CancellationToken,
    /// The client understands Health/Restarting/PeerPresent (Go clients; see `derp-v2.md`).
    pub(crate) extended_frames: bool,
    /// The client presented the mesh key (a peer relay): mesh frames allowed, longer write
    /// timeout.
    pub(crate) is_mesh: bool,
    /// What PeerPresent says of this connection (derper's flags: regular, mesh peer, prober).
    pub(crate) present_flags: u8,
    /// Why the connection was closed from outside the reader (first reason wins).
    close_reason: Mutex<Option<CloseReason>>,
}

impl ClientHandle {
    pub(crate) fn new(
        key: PublicKey,
        conn_id: u64,
        remote: SocketAddr,
        limits: QueueLimits,
        cancel: CancellationToken,
        (extended_frames, is_mesh, is_prober): (bool, bool, bool),
    ) -> Self {
        use crate::proto::present_flags as pf;
        let present_flags = match (is_mesh, is_prober) {
            (false, false) => pf::REGULAR,
            (m, p) => (if m { pf::MESH_PEER } else { 0 }) | (if p { pf::PROBER } else { 0 }),
        };
        ClientHandle {
            key,
            conn_id,
            remote,
            queues: Mutex::new(Queues::default()),
            limits,
            notify: Notify::new(),
            has_dup: AtomicBool::new(false),
            cancel,
            extended_frames,
            is_mesh,
            present_flags,
            close_reason: Mutex::new(None),
        }
    }

    /// How long a write to this client may make no progress.
    pub(crate) fn write_timeout(&self, normal: std::time::Duration) -> std::time::Duration {
        if self.is_mesh {
            MESH_WRITE_TIMEOUT
        } else {
            normal
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

    /// Queues a packet for this client. Never blocks: when the queue is over its limits the
    /// oldest packets are dropped (counted as `queue_head`), as derper does. The limits are
    /// derper's depth (32) *and* a byte budget: derper's count alone holds 32 × 64 KiB of large
    /// packets but only ~8 KiB of small ones, so one sender's burst of small packets (a single
    /// 8 KiB read is ~30–80 of them) overflowed a receiver whose writer missed a millisecond of
    /// CPU. See [`super::queue`] for the rule and the memory bound.
    /// `buf`: the read buffer `data` is a slice of ([`super::queue::detach`]).
    pub(crate) fn enqueue_packet(
        &self,
        src: PublicKey,
        data: Bytes,
        buf: SourceBuf,
        disco: bool,
        m: &RelayMetrics,
    ) {
        let (dropped, reason) = {
            let mut qs = self.queues.lock();
            if qs.closed {
                (1, DropReason::GoneDisconnected)
            } else {
                let q = if disco { &mut qs.disco } else { &mut qs.data };
                let data = super::queue::detach(q, data, buf);
                (
                    q.push(QueuedPacket { src, data }, self.limits),
                    DropReason::QueueHead,
                )
            }
        };
        m.drop_n(reason, dropped);
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

    /// Queues presence changes for a watcher; false (nothing queued) when that would put more
    /// than `cap` changes in its backlog: the caller then cuts the watcher off.
    fn enqueue_presence(&self, notes: impl ExactSizeIterator<Item = Presence>, cap: usize) -> bool {
        {
            let mut q = self.queues.lock();
            if q.presence.len() + notes.len() > cap {
                return false;
            }
            q.presence.extend(notes);
        }
        self.notify.notify_one();
        true
    }

    /// At teardown: closes the queues and takes every packet in them (returned as a count, for
    /// the caller's `gone_disconnected`). A sender that looked this connection up before it
    /// left may still enqueue afterwards; [`ClientHandle::enqueue_packet`] then counts the
    /// packet instead of leaving it in a queue nobody reads.
    pub(crate) fn close_queues(&self) -> usize {
        let mut rest = Queues::default();
        {
            let mut q = self.queues.lock();
            q.closed = true;
            q.disco.swap(&mut rest.disco);
            q.data.swap(&mut rest.data);
        }
        rest.disco.len() + rest.data.len()
    }

    /// Moves everything queued into `into` (which must be empty), keeping both allocations.
    #[cfg(test)]
    pub(crate) fn take_queued(&self, into: &mut Queues) {
        self.take_batch(into, usize::MAX);
    }

    /// Moves what the writer sends next into `into` (which must be empty): every control and
    /// presence note, and the oldest packets up to about `max_bytes` (disco first). The rest
    /// stays queued, so a writer stuck on a slow client holds one bounded batch, not a second
    /// copy of its whole queue. Returns whether packets were left.
    pub(crate) fn take_batch(&self, into: &mut Queues, max_bytes: usize) -> bool {
        let mut q = self.queues.lock();
        q.disco.take_front(&mut into.disco, max_bytes);
        let left = max_bytes.saturating_sub(into.disco.bytes());
        if left > 0 {
            q.data.take_front(&mut into.data, left);
        }
        std::mem::swap(&mut q.control, &mut into.control);
        std::mem::swap(&mut q.presence, &mut into.presence);
        q.disco.len() + q.data.len() > 0
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
///
/// Presence is kept consistent for watchers by one lock (`watchers`): a client's join or leave
/// and the notes about it to every watcher are one step under it, and so are a new watcher's
/// snapshot of who is connected and its enrolment for later changes (derper does both under its
/// server mutex). So a watcher sees every change exactly once and in order after its snapshot,
/// whatever the region's size. Its backlog is bounded: a watcher that falls more than
/// `watcher_backlog` changes (beyond one per connected key) behind is cut off — it then
/// reconnects and starts from a fresh snapshot — rather than left with a partial view.
#[derive(Debug)]
pub(crate) struct Registry {
    clients: DashMap<PublicKey, ClientSet>,
    watchers: Mutex<HashMap<u64, Watcher>>,
    watcher_backlog: usize,
    /// Keys connected to mesh peers, with the links that reach them (the newest is used).
    /// Local clients always win over these.
    remote: DashMap<PublicKey, Vec<Arc<MeshLink>>>,
    next_conn_id: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(DEFAULT_WATCHER_BACKLOG)
    }
}

/// Presence changes a watcher may fall behind by, beyond one per connected key (its snapshot).
pub(crate) const DEFAULT_WATCHER_BACKLOG: usize = 65_536;

impl Registry {
    pub(crate) fn new(watcher_backlog: usize) -> Self {
        Registry {
            clients: DashMap::new(),
            watchers: Mutex::new(HashMap::new()),
            watcher_backlog,
            remote: DashMap::new(),
            next_conn_id: AtomicU64::new(0),
        }
    }

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

    /// A mesh peer reports `key` connected to it. Keeps `ferry_relay_mesh_remote_keys` equal
    /// to the number of distinct keys reachable through mesh links.
    pub(crate) fn add_remote(&self, key: PublicKey, link: Arc<MeshLink>, m: &RelayMetrics) {
        let mut v = self.remote.entry(key).or_default();
        if v.is_empty() {
            m.mesh_remote_keys.increment(1.0);
        }
        v.retain(|l| l.id != link.id);
        v.push(link);
    }

    /// `key` left the peer behind `link_id` (or that link broke).
    pub(crate) fn remove_remote(&self, key: &PublicKey, link_id: u64, m: &RelayMetrics) {
        if let dashmap::Entry::Occupied(mut e) = self.remote.entry(*key) {
            e.get_mut().retain(|l| l.id != link_id);
            if e.get().is_empty() {
                e.remove();
                m.mesh_remote_keys.decrement(1.0);
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

    /// Number of watchers subscribed now.
    pub(crate) fn watcher_count(&self) -> usize {
        self.watchers.lock().len()
    }

    /// Adds a connection; it becomes the receiver for its key.
    pub(crate) fn register(&self, c: Arc<ClientHandle>) {
        let key = c.key;
        let mut watchers = self.watchers.lock();
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
        let note = Presence::Present {
            key,
            addr: c.remote,
            flags: c.present_flags,
        };
        self.notify_watchers(&mut watchers, note, c.conn_id);
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
        let mut watchers = self.watchers.lock();
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
        watchers.remove(&c.conn_id);
        if gone {
            self.notify_watchers(&mut watchers, Presence::Gone(c.key), c.conn_id);
        }
        gone
    }

    /// Subscribes a watcher: it gets one PeerPresent per connected key (the snapshot), then every
    /// change, in order, with nothing lost in between (one lock covers both).
    pub(crate) fn add_watcher(&self, w: Watcher) {
        let mut watchers = self.watchers.lock();
        let snapshot: Vec<Presence> = self
            .clients
            .iter()
            .filter(|s| *s.key() != w.key)
            .map(|s| Presence::Present {
                key: *s.key(),
                addr: s.value().active.remote,
                flags: s.value().active.present_flags,
            })
            .collect();
        let cap = snapshot.len() + self.watcher_backlog;
        if w.enqueue_presence(snapshot.into_iter(), cap) {
            watchers.insert(w.conn_id, w);
        } else {
            w.close(CloseReason::WatcherOverflow);
        }
    }

    /// Tells every watcher but `except_conn` about a change (caller holds the watcher lock). A
    /// watcher whose backlog would pass its bound is cut off and unsubscribed.
    fn notify_watchers(
        &self,
        watchers: &mut HashMap<u64, Watcher>,
        note: Presence,
        except_conn: u64,
    ) {
        if watchers.is_empty() {
            return;
        }
        let cap = self.clients.len() + self.watcher_backlog;
        watchers.retain(|&id, w| {
            if id == except_conn || w.enqueue_presence(std::iter::once(note), cap) {
                return true;
            }
            w.close(CloseReason::WatcherOverflow);
            false
        });
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

    /// Packets waiting in every receiver's queues, and their bytes (payload + 64 each). Walks
    /// every connection: for the periodic gauge, not the hot path.
    pub(crate) fn queued(&self) -> (usize, usize) {
        let (mut packets, mut bytes) = (0, 0);
        for c in self.all() {
            let q = c.queues.lock();
            packets += q.disco.len() + q.data.len();
            bytes += q.disco.bytes() + q.data.bytes();
        }
        (packets, bytes)
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

    fn handle_with(reg: &Registry, k: [u8; 32], mesh: bool) -> Arc<ClientHandle> {
        Arc::new(ClientHandle::new(
            PublicKey(k),
            reg.next_conn_id(),
            "127.0.0.1:1".parse().unwrap(),
            QueueLimits::receiver(2, 0),
            CancellationToken::new(),
            (mesh, mesh, false),
        ))
    }

    fn handle(reg: &Registry, k: u8) -> Arc<ClientHandle> {
        handle_with(reg, [k; 32], false)
    }

    /// What a watcher believes is connected after applying everything queued for it.
    fn view_of(w: &ClientHandle, view: &mut std::collections::HashSet<PublicKey>) {
        let mut q = Queues::default();
        w.take_queued(&mut q);
        for p in q.presence {
            match p {
                Presence::Present { key, .. } => {
                    view.insert(key);
                }
                Presence::Gone(key) => {
                    assert!(view.remove(&key), "PeerGone for a key never announced");
                }
            }
        }
    }

    #[test]
    fn full_queue_drops_oldest_and_counts_it() {
        let m = RelayMetrics::detached();
        let reg = Registry::default();
        let c = handle(&reg, 1);
        for i in 0..5u8 {
            c.enqueue_packet(
                PublicKey([9; 32]),
                Bytes::from(vec![i]),
                SourceBuf::new(1),
                false,
                &m,
            );
        }
        let mut q = Queues::default();
        c.take_queued(&mut q);
        let kept: Vec<u8> = q.data.drain().map(|p| p.data[0]).collect();
        assert_eq!(kept, vec![3, 4]);
        assert_eq!(m.drops_for(DropReason::QueueHead), 3);
    }

    /// A sender that looked the receiver up just before it left still enqueues after the
    /// teardown took the queue: that packet must be counted, not left in a dead queue.
    #[test]
    fn a_packet_enqueued_after_the_receiver_closed_is_counted() {
        let m = RelayMetrics::detached();
        let reg = Registry::default();
        let c = handle(&reg, 1);
        reg.register(Arc::clone(&c));
        let looked_up = reg.get(&c.key).unwrap();
        c.enqueue_packet(
            PublicKey([9; 32]),
            Bytes::from_static(b"before"),
            SourceBuf::new(6),
            false,
            &m,
        );
        // The receiver leaves: unregistered, its queue closed and what it held counted.
        reg.unregister(&c);
        assert_eq!(c.close_queues(), 1);
        // The late sender.
        looked_up.enqueue_packet(
            PublicKey([9; 32]),
            Bytes::from_static(b"late"),
            SourceBuf::new(4),
            false,
            &m,
        );
        assert_eq!(m.drops_for(DropReason::GoneDisconnected), 1);
        assert_eq!(c.close_queues(), 0, "nothing sits in the dead queue");
    }

    #[test]
    fn a_watcher_gets_a_whole_snapshot_then_every_change_in_order() {
        let reg = Registry::default();
        let clients: Vec<_> = (0..5000u32)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..4].copy_from_slice(&i.to_be_bytes());
                let c = handle_with(&reg, k, false);
                reg.register(Arc::clone(&c));
                c
            })
            .collect();
        let w = handle_with(&reg, [0xff; 32], true);
        reg.add_watcher(Arc::clone(&w));
        let mut view = std::collections::HashSet::new();
        view_of(&w, &mut view);
        assert_eq!(view.len(), 5000, "the snapshot holds every connected key");
        // Leaves and joins after the snapshot arrive in order.
        reg.unregister(&clients[0]);
        reg.register(Arc::clone(&clients[0]));
        reg.unregister(&clients[1]);
        let mut q = Queues::default();
        w.take_queued(&mut q);
        let notes: Vec<(bool, PublicKey)> = q
            .presence
            .iter()
            .map(|p| match *p {
                Presence::Present { key, .. } => (true, key),
                Presence::Gone(key) => (false, key),
            })
            .collect();
        assert_eq!(
            notes,
            vec![
                (false, clients[0].key),
                (true, clients[0].key),
                (false, clients[1].key)
            ]
        );
        assert_eq!(reg.watcher_count(), 1);
    }

    /// Joins and leaves racing with a subscription: whatever the interleaving, the watcher's
    /// view (snapshot + changes) ends equal to what is connected. Copying the client list
    /// before enrolling the watcher (as once done) loses changes in between.
    #[test]
    fn subscribing_while_clients_come_and_go_loses_nothing() {
        for round in 0..20u8 {
            let reg = Arc::new(Registry::default());
            let stop = Arc::new(AtomicBool::new(false));
            let churners: Vec<_> = (0..2u8)
                .map(|t| {
                    let (reg, stop) = (Arc::clone(&reg), Arc::clone(&stop));
                    std::thread::spawn(move || {
                        let mut live: Vec<Arc<ClientHandle>> = Vec::new();
                        let mut n = 0u32;
                        while !stop.load(Ordering::Relaxed) || n < 2000 {
                            n += 1;
                            let mut k = [t; 32];
                            k[1..5].copy_from_slice(&n.to_be_bytes());
                            let c = handle_with(&reg, k, false);
                            reg.register(Arc::clone(&c));
                            live.push(c);
                            if n.is_multiple_of(3) {
                                let c = live.swap_remove((n as usize * 7) % live.len());
                                reg.unregister(&c);
                            }
                        }
                        live
                    })
                })
                .collect();
            let w = handle_with(&reg, [0xfe; 32], true);
            // Subscribe part-way through the churn.
            while reg.len() < 500 {
                std::thread::yield_now();
            }
            reg.add_watcher(Arc::clone(&w));
            let mut view = std::collections::HashSet::new();
            view_of(&w, &mut view);
            stop.store(true, Ordering::Relaxed);
            let live: usize = churners.into_iter().map(|t| t.join().unwrap().len()).sum();
            view_of(&w, &mut view);
            let truth: std::collections::HashSet<PublicKey> =
                reg.clients.iter().map(|s| *s.key()).collect();
            assert_eq!(truth.len(), live);
            assert_eq!(view, truth, "round {round}: the watcher's view drifted");
        }
    }

    #[test]
    fn a_watcher_that_falls_behind_is_cut_off_not_left_partial() {
        let reg = Registry::new(10);
        for i in 0..100u8 {
            reg.register(handle(&reg, i));
        }
        let w = handle_with(&reg, [0xff; 32], true);
        reg.add_watcher(Arc::clone(&w));
        assert!(
            !w.cancel.is_cancelled(),
            "the snapshot (100) is within its bound"
        );
        // It reads nothing. Joins alone keep it within its bound (one per connected key, plus
        // 10); joins and leaves of the same keys push it past.
        for i in 100..110u8 {
            reg.register(handle(&reg, i));
        }
        assert!(!w.cancel.is_cancelled());
        let mut cycles = 0;
        while !w.cancel.is_cancelled() {
            cycles += 1;
            assert!(cycles < 100, "never cut off");
            let c = handle(&reg, 200);
            reg.register(Arc::clone(&c));
            reg.unregister(&c);
        }
        assert_eq!(w.close_reason(), Some(CloseReason::WatcherOverflow));
        assert_eq!(reg.watcher_count(), 0, "and no longer notified");
        // Its backlog stopped at the bound (110 connected + 10) and grows no further.
        for i in 0..50u8 {
            let c = handle(&reg, 201 + i);
            reg.register(Arc::clone(&c));
            reg.unregister(&c);
        }
        let mut q = Queues::default();
        w.take_queued(&mut q);
        assert_eq!(q.presence.len(), 121);
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
