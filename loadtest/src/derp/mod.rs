//! Packet runs through a DERP relay.
//!
//! Every packet starts with a 24-byte header: magic `fLT1`, a kind byte, three zero bytes, the
//! sender's sequence number and its send time in nanoseconds since the run's epoch (all clients
//! live in this process, so one clock serves both ends). Receivers measure one-way latency; with
//! echo they send each packet back with its kind changed and the sender measures the round trip.
//!
//! The end of a run is exact, so `sent = received + dropped by the relay`:
//! 1. at the end of the window every sender stops and sends a Ping; its Pong proves the relay has
//!    read (and queued or dropped) everything the sender wrote before it;
//! 2. once every sender has its Pong, one sender per receiver sends an end marker. Nothing is
//!    sent to that receiver after the marker, so a queue that drops its oldest packet first
//!    (ferry, derper) cannot drop the marker, and when the receiver reads it everything queued
//!    before it has been delivered or dropped;
//! 3. with echo, the receiver, after the marker, Pings too and then sends an end marker to each
//!    of its senders, which wait for it.
//!
//! Senders flood (open loop), keep a fixed rate (open loop), or keep a window (closed loop,
//! `--window N`): at most N packets sent and not yet read by the receiver. The receiver task
//! publishes the sequence number it has read up to in a [`Window`] it shares with the sender
//! task (both run in this process) and wakes it; the sender never polls. A relay keeps each
//! sender's packets in order, so every packet below the highest one read was delivered or
//! dropped and none of them is in flight. Only a drop of the last packets of a full window
//! would stall it forever (DERP does not report loss), so a window that sees no progress for
//! `--window-timeout` writes its outstanding packets off and opens again ([`WindowCtl`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use ferry_proto::derp::{
    self as proto, frame_type as ft, FrameDecoder, PublicKey, ServerFrame, KEY_LEN,
};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch, Barrier, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::cli::{DerpArgs, Topology};
use crate::progress::{Meter, Sampler};
use crate::report::{self, Hist, Packets, Report, ServerStats, Settings};
use crate::target::{BoxIo, DerpConn, Target};

mod tasks;

/// Bytes of our header in every packet.
pub const HEADER_LEN: usize = 24;
const MAGIC: [u8; 4] = *b"fLT1";
const KIND_DATA: u8 = 0;
const KIND_ECHO: u8 = 1;
const KIND_END: u8 = 2;
const KIND_END_ACK: u8 = 3;

/// Frames are written in batches of about this many bytes.
const BATCH_BYTES: usize = 64 << 10;
/// How long the end-of-run drain may take before the report says it is incomplete.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Handshakes in progress at once while connecting the clients.
const CONNECT_CONCURRENCY: usize = 64;

/// Appends SendPacket(dst, our packet) to `out`.
fn put_packet(out: &mut BytesMut, dst: &PublicKey, kind: u8, seq: u64, ts_ns: u64, size: usize) {
    proto::put_header(out, ft::SEND_PACKET, KEY_LEN + size);
    out.put_slice(dst.as_bytes());
    out.put_slice(&MAGIC);
    out.put_u8(kind);
    out.put_bytes(0, 3);
    out.put_u64(seq);
    out.put_u64(ts_ns);
    out.put_bytes(0, size - HEADER_LEN);
}

/// (kind, seq, send time in ns since the epoch) of one of our packets.
fn parse_packet(p: &[u8]) -> Option<(u8, u64, u64)> {
    if p.len() < HEADER_LEN || p[..4] != MAGIC {
        return None;
    }
    let seq = u64::from_be_bytes(p[8..16].try_into().ok()?);
    let ts = u64::from_be_bytes(p[16..24].try_into().ok()?);
    Some((p[4], seq, ts))
}

/// The run's clock.
#[derive(Debug, Clone, Copy)]
struct Clock {
    epoch: Instant,
    measure_from: Instant,
    stop_at: Instant,
}

impl Clock {
    fn ns(&self, t: Instant) -> u64 {
        t.duration_since(self.epoch).as_nanos() as u64
    }
    fn in_window(&self, t: Instant) -> bool {
        t >= self.measure_from && t < self.stop_at
    }
}

#[derive(Debug, Default)]
struct SendStats {
    sent: u64,
    sent_in_window: u64,
    window_timeouts: u64,
    written_off: u64,
}

/// Closed-loop state one sender shares with the receiver task that reads its packets.
#[derive(Debug, Default)]
struct Window {
    /// One past the highest sequence number the receiver has read from this sender.
    read_to: AtomicU64,
    /// Wakes the sender when `read_to` moves. There is one waiter, and `notify_one` keeps a
    /// permit when it is not waiting yet, so no wake-up is lost between its check and its wait.
    notify: Notify,
}

impl Window {
    /// The receiver read packet `seq` of this sender.
    fn read(&self, seq: u64) -> bool {
        self.read_to.fetch_max(seq + 1, Ordering::Release) <= seq
    }
}

/// What a closed-loop sender does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Send this many packets now.
    Send(u64),
    /// The window is full: wait for progress, or until this instant (the timeout).
    WaitUntil(Instant),
}

/// The sender's side of a window: decisions from the counters and the clock only (no I/O), so
/// they are tested without a relay and without sleeping.
#[derive(Debug)]
struct WindowCtl {
    size: u64,
    timeout: Duration,
    /// Packets below this sequence number were written off by a timeout.
    written_off_to: u64,
    /// The start of the window (lowest sequence number that may be in flight) last seen...
    base: u64,
    /// ...and since when the window has had no progress.
    since: Instant,
    timeouts: u64,
    written_off: u64,
}

impl WindowCtl {
    fn new(size: u64, timeout: Duration, now: Instant) -> WindowCtl {
        WindowCtl {
            size: size.max(1),
            timeout,
            written_off_to: 0,
            base: 0,
            since: now,
            timeouts: 0,
            written_off: 0,
        }
    }

    /// `sent`: packets sent so far (the next sequence number); `read_to`: from [`Window`].
    fn step(&mut self, sent: u64, read_to: u64, now: Instant) -> Step {
        let base = read_to.max(self.written_off_to).min(sent);
        if base != self.base {
            self.base = base;
            self.since = now;
        }
        let in_flight = sent - base;
        if in_flight < self.size {
            // The no-progress clock runs only while the window is full.
            self.since = now;
            return Step::Send(self.size - in_flight);
        }
        let deadline = self.since + self.timeout;
        if now < deadline {
            return Step::WaitUntil(deadline);
        }
        // No progress for the whole timeout: the relay dropped the rest (or holds it far
        // longer than any queue should). Count it and open the window again.
        self.timeouts += 1;
        self.written_off += in_flight;
        self.written_off_to = sent;
        self.base = sent;
        self.since = now;
        Step::Send(self.size)
    }
}

#[derive(Debug)]
struct RecvStats {
    data: u64,
    data_in_window: u64,
    echoes: u64,
    echoes_in_window: u64,
    peer_gone: u64,
    one_way: Histogram<u64>,
    round_trip: Histogram<u64>,
}

impl Default for RecvStats {
    fn default() -> Self {
        RecvStats {
            data: 0,
            data_in_window: 0,
            echoes: 0,
            echoes_in_window: 0,
            peer_gone: 0,
            one_way: report::new_hist(),
            round_trip: report::new_hist(),
        }
    }
}

/// What a client does.
#[derive(Debug, Clone)]
enum Role {
    /// Sends to `dst`; sends the end marker if `marks_end`.
    Sender { dst: usize, marks_end: bool },
    /// Receives from these senders (and echoes to them with --echo).
    Receiver { senders: Vec<usize> },
}

fn roles(n: usize, topology: Topology) -> Vec<Role> {
    match topology {
        Topology::Pairs => (0..n)
            .map(|i| {
                if i % 2 == 0 {
                    Role::Sender {
                        dst: i + 1,
                        marks_end: true,
                    }
                } else {
                    Role::Receiver {
                        senders: vec![i - 1],
                    }
                }
            })
            .collect(),
        Topology::FanIn => (0..n)
            .map(|i| {
                if i == 0 {
                    Role::Receiver {
                        senders: (1..n).collect(),
                    }
                } else {
                    Role::Sender {
                        dst: 0,
                        marks_end: i == 1,
                    }
                }
            })
            .collect(),
    }
}

fn bad_data(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// Opens `n` DERP connections, `CONNECT_CONCURRENCY` at a time; each failed connect is tried
/// again up to `retries` times (jittered backoff, 100 ms doubling to 2 s).
pub async fn connect_all(target: &Arc<Target>, n: usize, retries: u32) -> Result<Vec<DerpConn>> {
    let sem = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut set = JoinSet::new();
    let retried = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for i in 0..n {
        let (t, sem, retried) = (Arc::clone(target), Arc::clone(&sem), Arc::clone(&retried));
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("never closed");
            let mut attempt = 0u32;
            loop {
                match t.connect().await {
                    Err(_) if attempt < retries => {
                        let base = Duration::from_millis(100)
                            .saturating_mul(1 << attempt.min(5))
                            .min(Duration::from_secs(2));
                        attempt += 1;
                        retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(base + base.mul_f64(rand::random::<f64>() * 0.5)).await;
                    }
                    r => return (i, r),
                }
            }
        });
    }
    let mut conns: Vec<Option<DerpConn>> = (0..n).map(|_| None).collect();
    let mut opened = 0;
    while let Some(r) = set.join_next().await {
        let (i, c) = r.context("connect task panicked")?;
        match c {
            Ok(c) => {
                conns[i] = Some(c);
                opened += 1;
            }
            Err(e) => {
                set.abort_all();
                return Err(anyhow::Error::new(e).context(format!(
                    "opening client {i} ({opened} of {n} connected so far)"
                )));
            }
        }
    }
    let retried = retried.load(std::sync::atomic::Ordering::Relaxed);
    if retried > 0 {
        eprintln!("ferry-loadtest: {retried} connects failed and were retried");
    }
    Ok(conns.into_iter().map(|c| c.expect("all joined")).collect())
}

/// Runs `derp` mode.
pub async fn run(a: &DerpArgs) -> Result<Report> {
    if !(HEADER_LEN..=proto::MAX_PACKET_SIZE).contains(&a.size) {
        bail!(
            "--size {} is out of range: packets carry a {HEADER_LEN}-byte header and DERP allows at most {} bytes",
            a.size,
            proto::MAX_PACKET_SIZE
        );
    }
    match a.topology {
        Topology::Pairs if a.clients < 2 || !a.clients.is_multiple_of(2) => {
            bail!(
                "--topology pairs needs an even number of --clients (got {})",
                a.clients
            )
        }
        Topology::FanIn if a.clients < 2 => {
            bail!("--topology fan-in needs at least 2 --clients (1 receiver + senders)")
        }
        _ => {}
    }
    if a.run.duration.is_zero() {
        bail!("--duration must be more than 0");
    }
    if let Some(pid) = a.run.server_pid {
        crate::procfs::check_pid(pid)?;
    }
    let (nofile, _) = crate::limits::raise_nofile();
    let target = Arc::new(Target::resolve(&a.target).await?);
    let mut rep = Report::new(
        "derp",
        &target.url,
        Settings {
            clients: Some(a.clients as u64),
            topology: Some(
                match a.topology {
                    Topology::Pairs => "pairs",
                    Topology::FanIn => "fan-in",
                }
                .into(),
            ),
            packet_size: Some(a.size as u64),
            rate: Some(a.rate),
            send_mode: Some(
                match (a.window, a.rate) {
                    (Some(_), _) => "window",
                    (None, 0) => "flood",
                    (None, _) => "rate",
                }
                .into(),
            ),
            window: a.window,
            window_timeout_seconds: a.window.map(|_| a.window_timeout.as_secs_f64()),
            echo: Some(a.echo),
            warmup_seconds: a.run.warmup.as_secs_f64(),
            duration_seconds: a.run.duration.as_secs_f64(),
            ..Default::default()
        },
    );
    if let Some(w) = crate::limits::check_nofile(a.clients as u64) {
        rep.warnings.push(w);
    }
    let cpu_start = crate::procfs::own_cpu_seconds();

    let conns = connect_all(&target, a.clients, a.connect_retries).await?;
    let keys: Vec<PublicKey> = conns.iter().map(|c| c.key()).collect();
    let roles = roles(a.clients, a.topology);
    let n_senders = roles
        .iter()
        .filter(|r| matches!(r, Role::Sender { .. }))
        .count();
    let per_sender_rate = a.rate as f64 / n_senders as f64;

    let epoch = Instant::now();
    let clock = Clock {
        epoch,
        measure_from: epoch + a.run.warmup,
        stop_at: epoch + a.run.warmup + a.run.duration,
    };
    let meter = Arc::new(Meter::default());
    let sampler = Sampler::timed(Arc::clone(&meter), epoch, &a.run, "packets");
    let (finish_tx, finish) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let barrier = Arc::new(Barrier::new(n_senders));
    let expected_done = if a.echo {
        n_senders
    } else {
        a.clients - n_senders
    };

    if a.window.is_some() && a.window_timeout.is_zero() {
        bail!("--window-timeout must be more than 0");
    }
    // Closed loop: one window per sender, shared with the reader of its receiver.
    let windows: Vec<Option<Arc<Window>>> = roles
        .iter()
        .map(|r| match r {
            Role::Sender { .. } if a.window.is_some() => Some(Arc::new(Window::default())),
            _ => None,
        })
        .collect();

    let mut writers: JoinSet<(usize, std::io::Result<SendStats>)> = JoinSet::new();
    let mut readers: JoinSet<(usize, std::io::Result<RecvStats>)> = JoinSet::new();
    for (i, (conn, role)) in conns.into_iter().zip(roles.iter()).enumerate() {
        let DerpConn { io, buf, .. } = conn;
        let (rd, wr) = tokio::io::split(io);
        let (pong_tx, pong_rx) = mpsc::channel::<()>(4);
        let (echo_tx, echo_rx) = mpsc::channel::<Echo>(1024);
        let is_sender = matches!(role, Role::Sender { .. });
        let (window_keys, window_of) = match role {
            Role::Receiver { senders } if a.window.is_some() => {
                let w: Vec<Arc<Window>> = senders
                    .iter()
                    .map(|s| Arc::clone(windows[*s].as_ref().expect("a sender's window")))
                    .collect();
                let k = senders.iter().enumerate().map(|(j, s)| (keys[*s], j));
                (k.collect(), w)
            }
            _ => (HashMap::new(), Vec::new()),
        };
        let reader = Reader {
            window_dirty: vec![false; window_of.len()],
            window_keys,
            window_of,
            clock,
            size: a.size,
            echo: (a.echo && !is_sender).then_some(echo_tx),
            pong: pong_tx,
            done: done_tx.clone(),
            signal_end: if is_sender { a.echo } else { !a.echo },
            meter: Arc::clone(&meter),
            finish: finish.clone(),
        };
        readers.spawn(async move { (i, reader.run(rd, buf).await) });
        match role {
            Role::Sender { dst, marks_end } => {
                let s = SenderTask {
                    clock,
                    dst: keys[*dst],
                    size: a.size,
                    rate: per_sender_rate,
                    end_marker: *marks_end,
                    window: windows[i].as_ref().map(|w| {
                        (
                            WindowCtl::new(a.window.unwrap_or(1), a.window_timeout, epoch),
                            Arc::clone(w),
                        )
                    }),
                    barrier: Arc::clone(&barrier),
                    pongs: pong_rx,
                    finish: finish.clone(),
                };
                writers.spawn(async move { (i, s.run(wr).await) });
            }
            Role::Receiver { senders } if a.echo => {
                let e = EchoTask {
                    clock,
                    size: a.size,
                    senders: senders.iter().map(|s| keys[*s]).collect(),
                    rx: echo_rx,
                    pongs: pong_rx,
                    finish: finish.clone(),
                };
                writers.spawn(async move { (i, e.run(wr).await) });
            }
            Role::Receiver { .. } => {
                // No writer: keep the write half open until the end.
                let mut f = finish.clone();
                writers.spawn(async move {
                    let _ = f.wait_for(|x| *x).await;
                    drop(wr);
                    (i, Ok(SendStats::default()))
                });
            }
        }
    }
    drop(done_tx);

    // Server CPU over exactly the measured window.
    tokio::time::sleep_until(clock.measure_from.into()).await;
    let server_cpu0 = a
        .run
        .server_pid
        .map(crate::procfs::cpu_seconds)
        .transpose()?;
    tokio::time::sleep_until(clock.stop_at.into()).await;
    let server = match (a.run.server_pid, server_cpu0) {
        (Some(pid), Some(c0)) => Some(ServerStats {
            pid,
            cpu_seconds: crate::procfs::cpu_seconds(pid)? - c0,
            rss_bytes: crate::procfs::status_bytes(pid, "VmRSS")?,
            peak_rss_bytes: crate::procfs::status_bytes(pid, "VmHWM")?,
            ..Default::default()
        }),
        _ => None,
    };

    // Drain: wait for every end marker (or a failed task, or the timeout).
    let mut seen = 0;
    let mut failure: Option<anyhow::Error> = None;
    let mut sent_stats = Vec::new();
    let mut recv_stats = Vec::new();
    let drain_deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while seen < expected_done && failure.is_none() {
        tokio::select! {
            d = done_rx.recv() => match d {
                Some(()) => seen += 1,
                None => break,
            },
            Some(r) = writers.join_next() => match r.context("writer task panicked")? {
                (_, Ok(s)) => sent_stats.push(s),
                (i, Err(e)) => failure = Some(anyhow::Error::new(e).context(format!("client {i} (writing)"))),
            },
            Some(r) = readers.join_next() => match r.context("reader task panicked")? {
                (_, Ok(s)) => recv_stats.push(s),
                (i, Err(e)) => failure = Some(anyhow::Error::new(e).context(format!("client {i} (reading)"))),
            },
            _ = tokio::time::sleep_until(drain_deadline) => break,
        }
    }
    let drain_complete = seen == expected_done && failure.is_none();
    let _ = finish_tx.send(true);
    while let Some(r) = writers.join_next().await {
        match r.context("writer task panicked")? {
            (_, Ok(s)) => sent_stats.push(s),
            (i, Err(e)) => {
                failure.get_or_insert_with(|| {
                    anyhow::Error::new(e).context(format!("client {i} (writing)"))
                });
            }
        }
    }
    while let Some(r) = readers.join_next().await {
        match r.context("reader task panicked")? {
            (_, Ok(s)) => recv_stats.push(s),
            (i, Err(e)) => {
                failure.get_or_insert_with(|| {
                    anyhow::Error::new(e).context(format!("client {i} (reading)"))
                });
            }
        }
    }
    let mut send = SendStats::default();
    for s in sent_stats {
        send.sent += s.sent;
        send.sent_in_window += s.sent_in_window;
        send.window_timeouts += s.window_timeouts;
        send.written_off += s.written_off;
    }
    let mut recv = RecvStats::default();
    for s in recv_stats {
        recv.data += s.data;
        recv.data_in_window += s.data_in_window;
        recv.echoes += s.echoes;
        recv.echoes_in_window += s.echoes_in_window;
        recv.peer_gone += s.peer_gone;
        recv.one_way.add(&s.one_way).expect("same bounds");
        recv.round_trip.add(&s.round_trip).expect("same bounds");
    }
    rep.timeline = sampler.finish().await;
    if let Some(e) = failure {
        return Err(e.context(format!("the run against {} failed", target.url)));
    }

    let secs = a.run.duration.as_secs_f64();
    let received = recv.data + recv.echoes;
    let delivered_in_window = recv.data_in_window + recv.echoes_in_window;
    let delivered_per_second = delivered_in_window as f64 / secs;
    rep.measured_seconds = secs;
    rep.packets = Some(Packets {
        sent: send.sent,
        received,
        lost: send.sent.saturating_sub(received),
        loss_ratio: if send.sent > 0 {
            send.sent.saturating_sub(received) as f64 / send.sent as f64
        } else {
            0.0
        },
        sent_in_window: send.sent_in_window,
        delivered_in_window,
        sent_per_second: send.sent_in_window as f64 / secs,
        delivered_per_second,
        delivered_bytes_per_second: delivered_per_second * a.size as f64,
        peer_gone: recv.peer_gone,
        drain_complete,
        window_timeouts: a.window.map(|_| send.window_timeouts),
        written_off: a.window.map(|_| send.written_off),
    });
    if !drain_complete {
        rep.warnings.push(format!(
            "{} of {expected_done} end markers arrived within {} s after the window: `lost` includes packets the relay still held",
            seen,
            DRAIN_TIMEOUT.as_secs()
        ));
    }
    if received > send.sent {
        rep.warnings.push(format!(
            "received {received} packets but sent {}: the relay duplicated packets",
            send.sent
        ));
    }
    rep.latency.one_way = Hist::from_ns(&recv.one_way);
    rep.latency.round_trip = Hist::from_ns(&recv.round_trip);
    rep.server = server.map(|mut s| {
        s.cores = s.cpu_seconds / secs;
        s.per_cpu_second =
            (s.cpu_seconds > 0.0).then(|| delivered_in_window as f64 / s.cpu_seconds);
        s
    });
    rep.client.cpu_seconds = crate::procfs::own_cpu_seconds() - cpu_start;
    rep.client.source_addresses = target.source_count() as u64;
    rep.client.nofile_limit = nofile;
    Ok(rep)
}

/// A sender's writer.
struct SenderTask {
    clock: Clock,
    dst: PublicKey,
    size: usize,
    /// Packets per second; 0 floods (unless there is a window).
    rate: f64,
    end_marker: bool,
    /// Closed loop: the window's controller and the state shared with the receiver.
    window: Option<(WindowCtl, Arc<Window>)>,
    barrier: Arc<Barrier>,
    pongs: mpsc::Receiver<()>,
    finish: watch::Receiver<bool>,
}

/// What a receiver's reader hands its echo writer.
enum Echo {
    Packet { to: PublicKey, packet: Bytes },
    End,
}

/// A receiver's writer with --echo.
struct EchoTask {
    clock: Clock,
    size: usize,
    senders: Vec<PublicKey>,
    rx: mpsc::Receiver<Echo>,
    pongs: mpsc::Receiver<()>,
    finish: watch::Receiver<bool>,
}

/// Every client's reader.
struct Reader {
    /// Closed loop, receivers: the window of each sender, by its key...
    window_keys: HashMap<PublicKey, usize>,
    window_of: Vec<Arc<Window>>,
    /// ...and which moved in the frames read so far (woken once per read, not per packet).
    window_dirty: Vec<bool>,
    clock: Clock,
    size: usize,
    /// Receivers with --echo: where packets go back out.
    echo: Option<mpsc::Sender<Echo>>,
    pong: mpsc::Sender<()>,
    done: mpsc::UnboundedSender<()>,
    /// Whether an end marker (receiver) or its acknowledgement (sender, echo) completes this
    /// client's part of the drain.
    signal_end: bool,
    meter: Arc<Meter>,
    finish: watch::Receiver<bool>,
}

#[cfg(test)]
mod tests;
