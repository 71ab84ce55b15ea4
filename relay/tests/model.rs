//! Structured fuzzing of the relay as a whole: random sequences of client actions (connect, send
//! to live, departed and unknown keys, stop and resume reading, ping, close cleanly, close in the
//! middle of a frame, garbage, mesh frames without the mesh key) against an in-process relay,
//! with the invariants checked as it goes and at the end:
//!
//! - a packet reaches only its addressee, with the key of the connection that sent it;
//! - a Pong answers a Ping that connection sent;
//! - when every client has closed: packets written = packets read by clients + dropped (by
//!   reason), and written = queued for a receiver + unknown_dest, exactly;
//! - no growth: connections, queued packets/bytes and watchers are back to 0, and the runtime
//!   has as many live tasks as before the first client.
//!
//! Each seed is one scenario, replayable: `MODEL_SEEDS=1000 MODEL_FIRST=0 cargo test -p
//! ferry-relay --test model -- --nocapture` runs more (the CI run is 24 seeds).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use ferry_relay::proto::{self, frame_type as ft, FrameDecoder, PublicKey, ServerFrame};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const MAGIC: &[u8; 4] = b"fzmd";

/// What every reader saw, shared by all clients of a scenario.
#[derive(Default)]
struct Seen {
    /// Packets read by any client.
    delivered: AtomicU64,
    /// Invariant violations, as text (a reader task cannot fail the test itself).
    violations: Mutex<Vec<String>>,
}

impl Seen {
    fn violation(&self, v: String) {
        self.violations.lock().push(v);
    }
}

struct Client {
    key: PublicKey,
    tx: WriteHalf<BoxIo>,
    /// false while the client has stopped reading.
    reading: watch::Sender<bool>,
    reader: JoinHandle<()>,
    /// After garbage or a forbidden frame the relay closes the connection: send nothing more.
    poisoned: bool,
    pings: Arc<Mutex<HashSet<[u8; 8]>>>,
}

/// Reads frames until EOF, checking each against the invariants.
fn spawn_reader(
    mut rx: ReadHalf<BoxIo>,
    mut buf: BytesMut,
    me: PublicKey,
    keys: Arc<Mutex<HashMap<u32, PublicKey>>>,
    pings: Arc<Mutex<HashSet<[u8; 8]>>>,
    mut reading: watch::Receiver<bool>,
    seen: Arc<Seen>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut dec = FrameDecoder::new();
        loop {
            // A client that stopped reading: its socket buffer and then the relay's queue fill.
            while !*reading.borrow() {
                if reading.changed().await.is_err() {
                    break;
                }
            }
            let frame = match dec.decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    buf.reserve(16 << 10);
                    match rx.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => continue,
                    }
                }
                Err(e) => return seen.violation(format!("{me}: undecodable frame: {e}")),
            };
            match ServerFrame::parse(frame) {
                Ok(ServerFrame::RecvPacket { src, packet }) => {
                    seen.delivered.fetch_add(1, Ordering::Relaxed);
                    if packet.len() < 4 + 4 + 32 || &packet[..4] != MAGIC {
                        seen.violation(format!("{me}: a packet nobody sent: {packet:?}"));
                        continue;
                    }
                    let from = u32::from_be_bytes(packet[4..8].try_into().unwrap());
                    let to = PublicKey::from_slice(&packet[8..40]).unwrap();
                    if to != me {
                        seen.violation(format!("{me} got a packet addressed to {to}"));
                    }
                    let true_src = keys.lock().get(&from).copied();
                    if true_src != Some(src) {
                        seen.violation(format!(
                            "{me}: packet from client {from} ({true_src:?}) arrived as from {src}"
                        ));
                    }
                }
                Ok(ServerFrame::Pong(d)) => {
                    if !pings.lock().remove(&d) {
                        seen.violation(format!("{me}: a Pong for no Ping: {d:?}"));
                    }
                }
                Ok(_) => {}
                Err(e) => seen.violation(format!("{me}: unparsable server frame: {e}")),
            }
        }
    })
}

struct Scenario {
    rng: StdRng,
    relay: Relay,
    clients: HashMap<u32, Client>,
    /// Every key a client ever had, by client number (readers check sources against it).
    keys: Arc<Mutex<HashMap<u32, PublicKey>>>,
    departed: Vec<PublicKey>,
    next: u32,
    /// SendPacket frames written by clients whose connection the relay reads to the end.
    sent: u64,
    seen: Arc<Seen>,
    log: Vec<String>,
}

impl Scenario {
    async fn connect(&mut self) {
        let c = RawClient::connect(&self.relay).await;
        let key = c.key();
        let (io, buf) = c.into_parts();
        let (rx, tx) = tokio::io::split(io);
        let (reading, reading_rx) = watch::channel(true);
        let n = self.next;
        self.next += 1;
        self.keys.lock().insert(n, key);
        let pings = Arc::new(Mutex::new(HashSet::new()));
        let reader = spawn_reader(
            rx,
            buf,
            key,
            self.keys.clone(),
            pings.clone(),
            reading_rx,
            self.seen.clone(),
        );
        self.clients.insert(
            n,
            Client {
                key,
                tx,
                reading,
                reader,
                poisoned: false,
                pings,
            },
        );
    }

    fn pick(&mut self) -> Option<u32> {
        let live: Vec<u32> = self.clients.keys().copied().collect();
        (!live.is_empty()).then(|| live[self.rng.gen_range(0..live.len())])
    }

    async fn write(&mut self, n: u32, bytes: &[u8]) {
        let c = self.clients.get_mut(&n).unwrap();
        // The relay may already have closed a poisoned connection; nothing else may fail.
        if c.tx.write_all(bytes).await.is_err() && !c.poisoned {
            self.seen.violation(format!("write to client {n} failed"));
        }
    }

    async fn step(&mut self) {
        let Some(n) = self.pick() else {
            return self.connect().await;
        };
        let poisoned = self.clients[&n].poisoned;
        let what = self.rng.gen_range(0..100);
        self.log.push(format!("{what}@{n}"));
        match what {
            0..=14 => self.connect().await,
            15..=59 if !poisoned => {
                // To a live client mostly; else one that left, or a key nobody has.
                let to = match self.rng.gen_range(0..10) {
                    0 if !self.departed.is_empty() => {
                        self.departed[self.rng.gen_range(0..self.departed.len())]
                    }
                    1 => proto::SecretKey::generate().public(),
                    _ => {
                        let m = self.pick().unwrap();
                        self.clients[&m].key
                    }
                };
                let burst = if self.rng.gen_bool(0.1) { 64 } else { 1 };
                let mut out = Vec::new();
                for _ in 0..burst {
                    let len = self.rng.gen_range(40..1400);
                    let mut p = vec![0u8; len];
                    p[..4].copy_from_slice(MAGIC);
                    p[4..8].copy_from_slice(&n.to_be_bytes());
                    p[8..40].copy_from_slice(to.as_bytes());
                    proto::put_send_packet(&mut out, &to, &p);
                    self.sent += 1;
                }
                self.write(n, &out).await;
            }
            60..=67 => {
                let c = &self.clients[&n];
                let now = *c.reading.borrow();
                c.reading.send_replace(!now);
            }
            68..=72 if !poisoned => {
                let d: [u8; 8] = self.rng.gen();
                self.clients[&n].pings.lock().insert(d);
                let mut out = Vec::new();
                proto::put_frame(&mut out, ft::PING, &[&d]);
                self.write(n, &out).await;
            }
            73..=84 => self.close(n).await,
            85..=99 if !poisoned => {
                // Input the relay must refuse: it closes this connection, nobody else notices.
                let mut out = Vec::new();
                match what {
                    85..=88 => {
                        // A SendPacket cut in the middle, then the connection ends.
                        proto::put_send_packet(&mut out, &self.clients[&n].key, &[0; 100]);
                        out.truncate(50);
                    }
                    89..=92 => proto::put_frame(&mut out, ft::WATCH_CONNS, &[]),
                    93..=95 => {
                        let k = self.clients[&n].key;
                        proto::put_forward_packet(&mut out, &k, &k, b"no mesh key")
                    }
                    _ => {
                        // A frame longer than any the relay accepts.
                        out.extend_from_slice(&[ft::SEND_PACKET, 0x7f, 0xff, 0xff, 0xff]);
                    }
                }
                self.write(n, &out).await;
                let c = self.clients.get_mut(&n).unwrap();
                c.poisoned = true;
                if (85..=88).contains(&what) {
                    let _ = c.tx.shutdown().await;
                }
            }
            _ => {}
        }
    }

    /// A clean close: resume reading, half-close, read until the relay closes too.
    async fn close(&mut self, n: u32) {
        let mut c = self.clients.remove(&n).unwrap();
        c.reading.send_replace(true);
        let _ = c.tx.shutdown().await;
        match tokio::time::timeout(T, &mut c.reader).await {
            Ok(r) => r.unwrap(),
            Err(_) => self
                .seen
                .violation(format!("client {n}: the relay never closed")),
        }
        self.departed.push(c.key);
    }
}

/// Waits (bounded) until the relay has no client and nothing queued; what it has then.
async fn settled(relay: &Relay) -> (usize, (usize, usize), f64) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let now = (
            relay.client_count(),
            relay.queued(),
            relay.metrics().sample("ferry_relay_connections", ""),
        );
        if now == (0, (0, 0), 0.0) || tokio::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run(seed: u64, steps: usize) {
    let limits = ferry_relay::server::Limits {
        queue_depth: 8,
        queue_bytes: 0,
        // A stalled reader is only ever dropped from, never cut off, within a scenario: so
        // the relay reads every connection to its end and the accounting is exact.
        write_timeout: Duration::from_secs(60),
        ..test_limits()
    };
    let relay = Options::plain().limits(limits).start().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let mut s = Scenario {
        rng: StdRng::seed_from_u64(seed),
        relay,
        clients: HashMap::new(),
        keys: Arc::default(),
        departed: Vec::new(),
        next: 0,
        sent: 0,
        seen: Arc::default(),
        log: Vec::new(),
    };
    for _ in 0..steps {
        s.step().await;
        if let Some(v) = s.seen.violations.lock().first() {
            panic!("seed {seed}: {v}\nsteps: {}", s.log.join(" "));
        }
    }
    let all: Vec<u32> = s.clients.keys().copied().collect();
    for n in all {
        s.close(n).await;
    }
    let ctx = || format!("seed {seed}, steps: {}", s.log.join(" "));
    if let Some(v) = s.seen.violations.lock().first() {
        panic!("{}: {v}", ctx());
    }
    let left = settled(&s.relay).await;
    assert_eq!(
        left,
        (0, (0, 0), 0.0),
        "clients, (queued packets, bytes), connections gauge after all closed; {}",
        ctx()
    );
    let (forwarded, dropped, reasons) = s.relay.metrics().packet_totals();
    let delivered = s.seen.delivered.load(Ordering::Relaxed);
    // `forwarded` counts packets queued for a receiver (derper's meaning); a queued packet can
    // still be dropped (queue_head, or gone_disconnected when its receiver leaves).
    let unknown = s.relay.metrics().sample(
        "ferry_relay_packets_dropped_total",
        "reason=\"unknown_dest\"",
    ) as u64;
    assert_eq!(
        s.sent,
        delivered + dropped,
        "packets written {} != read by clients {delivered} + dropped {dropped} ({reasons}); {}",
        s.sent,
        ctx()
    );
    assert_eq!(
        s.sent,
        forwarded + unknown,
        "packets written {} != queued {forwarded} + unknown_dest {unknown}; {}",
        s.sent,
        ctx()
    );
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let now = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        if now <= tasks_before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{now} live tasks after all clients closed, {tasks_before} before; {}",
            ctx()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "seed {seed}: {} clients, {} packets: {forwarded} forwarded, {dropped} dropped ({reasons})",
        s.next, s.sent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_client_actions_keep_every_invariant() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let first = env("MODEL_FIRST", 0);
    let seeds = env("MODEL_SEEDS", 24);
    let steps = env("MODEL_STEPS", 150) as usize;
    for seed in first..first + seeds {
        run(seed, steps).await;
    }
}
