//! One DERP connection after the HTTP upgrade: handshake, then a reader (this task) and a writer
//! task. The reader forwards packets straight into receivers' queues; the writer drains this
//! client's queues in batches and flushes once per batch.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, trace};

use super::metrics::{CloseReason, DropReason, HandshakeFailure};
use super::queue::{QueueLimits, SourceBuf};
use super::registry::{ClientHandle, Control, Presence, Queues};
use super::{ratelimit, Shared};
use crate::proto::{
    self, frame_type as ft, ClientFrame, FrameDecoder, PeerGoneReason, ProtoError, PublicKey,
    ServerInfo,
};

/// Read size of a busy connection; it grows to hold one whole frame when needed.
const READ_CHUNK: usize = 8 << 10;
/// ... and doubles, up to this, while the sender has more waiting ([`next_read_chunk`]): a
/// sender with many packets in flight gets them in a few large reads (fewer `recvfrom`s per
/// byte, and larger batches for the receivers' writers, so fewer and larger TCP segments).
const MAX_READ_CHUNK: usize = 64 << 10;
/// Read size of a connection whose last read was small (idle: keepalives, pings).
const IDLE_CHUNK: usize = 512;
/// A connection whose reads had grown and that has then read nothing for one to two of these
/// gives its read buffer back and reads [`IDLE_CHUNK`] again (a burst and then silence would
/// otherwise keep up to 64 KiB, over TLS twice that with the record layer's, until the client
/// spoke again).
pub(crate) const QUIET_RELEASE: Duration = Duration::from_secs(1);
/// A batch buffer larger than this after a flush is released (idle clients stay small).
const KEEP_WRITE_BUF: usize = 64 << 10;
/// Packet bytes (payload + 64 each) the writer takes per batch; more stay queued (and wake it
/// again). A writer stuck on a slow reader holds at most this, beside its queue.
const WRITE_BATCH: usize = 64 << 10;

/// The size of the next read after one of `n` bytes into `room` bytes with reads of `chunk`:
/// doubled (from [`READ_CHUNK`] up to [`MAX_READ_CHUNK`]) when the sender has more waiting,
/// [`IDLE_CHUNK`] after a small read, halved after a read of under a quarter.
///
/// "More waiting" is a full read for an idle connection, and half its room or more for a busy
/// one: over TLS a read that filled the socket's share of the buffer hands out less plaintext
/// than that (the records' headers and tags, and the start of a record it cut off, are taken
/// out), so with "full" the reads of a busy TLS connection never grew past 8 KiB.
fn next_read_chunk(chunk: usize, n: usize, room: usize) -> usize {
    let more = if chunk == IDLE_CHUNK {
        n >= room.min(MAX_READ_CHUNK)
    } else {
        n * 2 >= room.min(MAX_READ_CHUNK)
    };
    if more {
        (chunk * 2).clamp(READ_CHUNK, MAX_READ_CHUNK)
    } else if n < IDLE_CHUNK {
        IDLE_CHUNK
    } else if n < chunk / 4 {
        (chunk / 2).max(READ_CHUNK)
    } else {
        chunk
    }
}

/// PeerGone(not here) replies: a burst of 3, then one per second, per connection (derper's
/// `peerGoneLim`).
struct NotHereLimiter {
    tokens: f64,
    last: Instant,
}

impl NotHereLimiter {
    fn allow(&mut self, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64()).min(3.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Writes all of `buf`, failing if no progress is made for `timeout` (derper: 2 s per frame).
async fn write_with_deadline<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut buf: &[u8],
    timeout: Duration,
) -> Result<(), CloseReason> {
    while !buf.is_empty() {
        match tokio::time::timeout(timeout, w.write(buf)).await {
            Err(_) => return Err(CloseReason::WriteTimeout),
            Ok(Err(_)) | Ok(Ok(0)) => return Err(CloseReason::WriteError),
            Ok(Ok(n)) => buf = &buf[n..],
        }
    }
    match tokio::time::timeout(timeout, w.flush()).await {
        Err(_) => Err(CloseReason::WriteTimeout),
        Ok(Err(_)) => Err(CloseReason::WriteError),
        Ok(Ok(())) => Ok(()),
    }
}

/// Runs a DERP connection to its end. `prefix` is written before the ServerKey frame (the 101
/// response, or nothing with fast-start); `rbuf` holds bytes the client already sent.
///
/// The handshake runs in a boxed future of its own that is freed when it ends, so a connection
/// that then idles for hours keeps only the state of its read loop (most of a relay's
/// connections are idle, and this is most of their memory).
pub(crate) async fn run<S>(
    io: S,
    prefix: Vec<u8>,
    rbuf: BytesMut,
    remote: SocketAddr,
    accepted: Instant,
    shared: Arc<Shared>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    if let Some(est) = Box::pin(handshake(io, prefix, rbuf, remote, accepted, &shared)).await {
        established(est, remote, shared).await;
    }
}

/// A connection past its handshake.
struct Established<S> {
    r: tokio::io::ReadHalf<S>,
    w: tokio::io::WriteHalf<S>,
    rbuf: BytesMut,
    dec: FrameDecoder,
    key: PublicKey,
    is_mesh: bool,
    is_prober: bool,
    extended_frames: bool,
    bucket: Option<(u64, u64)>,
}

/// ServerKey, ClientInfo, admission, ServerInfo. `None` when the connection ended (counted).
async fn handshake<S>(
    io: S,
    prefix: Vec<u8>,
    mut rbuf: BytesMut,
    remote: SocketAddr,
    accepted: Instant,
    shared: &Arc<Shared>,
) -> Option<Established<S>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut r, mut w) = tokio::io::split(io);
    let m = &shared.metrics;
    let limits = &shared.limits;

    // 1. ServerKey.
    let mut out = prefix;
    proto::put_frame(
        &mut out,
        ft::SERVER_KEY,
        &[&proto::server_key_payload(&shared.public)],
    );
    if write_with_deadline(&mut w, &out, limits.write_timeout)
        .await
        .is_err()
    {
        m.handshake_failed(HandshakeFailure::Io);
        return None;
    }

    // 2. ClientInfo, within the handshake deadline (counted from accept).
    let mut dec = FrameDecoder::new();
    let deadline = tokio::time::Instant::from_std(accepted + limits.handshake_timeout);
    let info = tokio::time::timeout_at(deadline, async {
        loop {
            match dec.decode(&mut rbuf) {
                Ok(Some(f)) if f.frame_type == ft::CLIENT_INFO => return Ok(f.payload),
                Ok(Some(f)) => {
                    return Err(HandshakeErr::Proto(ProtoError::UnexpectedFrame {
                        expected: "ClientInfo",
                        got: f.frame_type,
                    }))
                }
                Ok(None) => {}
                Err(e) => return Err(HandshakeErr::Proto(e)),
            }
            rbuf.reserve(dec.bytes_needed(&rbuf).max(1024));
            match r.read_buf(&mut rbuf).await {
                Ok(0) | Err(_) => return Err(HandshakeErr::Io),
                Ok(_) => {}
            }
        }
    })
    .await;
    let payload = match info {
        Err(_) => {
            m.handshake_failed(HandshakeFailure::HandshakeTimeout);
            debug!("no ClientInfo before the handshake deadline");
            return None;
        }
        Ok(Err(HandshakeErr::Io)) => {
            m.handshake_failed(HandshakeFailure::Io);
            return None;
        }
        Ok(Err(HandshakeErr::Proto(e))) => {
            m.handshake_failed(HandshakeFailure::ClientInfo);
            debug!(error = %e, "bad ClientInfo");
            return None;
        }
        Ok(Ok(p)) => p,
    };
    let (key, info) = match proto::open_client_info(&shared.secret, &payload) {
        Ok(v) => v,
        Err(e) => {
            m.handshake_failed(HandshakeFailure::ClientInfo);
            debug!(error = %e, "ClientInfo did not open");
            return None;
        }
    };
    let is_mesh = match (info.mesh_key, shared.mesh_key) {
        (Some(theirs), Some(ours)) if theirs == ours => true,
        (Some(_), _) => {
            // derper does not refuse a wrong mesh key at the handshake; the client just cannot
            // use mesh frames. Count it: a misconfigured mesh peer is worth seeing.
            m.handshake_failed(HandshakeFailure::MeshKey);
            false
        }
        _ => false,
    };

    // Admission (allowlist, verify URL), as derper: after ClientInfo proves the key, before
    // ServerInfo; a refused client is closed without another frame. Mesh peers skip it.
    if !is_mesh {
        if let Some(adm) = &shared.admission {
            // Boxed: an HTTP request's state must not size every connection's task.
            let verdict = Box::pin(adm.check(&key, remote.ip())).await;
            m.admission(verdict);
            if !verdict.admits() {
                debug!(key = %key.short(), result = verdict.label(), "client refused by admission control");
                return None;
            }
        }
    }
    // Receive rate limit (mesh peers exempt), advertised so clients can pace themselves.
    let bucket = (limits.client_rate_limit > 0 && !is_mesh).then(|| {
        let burst = limits.client_rate_burst.max(ratelimit::MIN_CLIENT_BURST);
        (limits.client_rate_limit, burst)
    });

    // 3. ServerInfo.
    out.clear();
    let clamp = |n: u64| n.min(u32::MAX as u64) as u32;
    let si = ServerInfo {
        version: proto::PROTOCOL_VERSION,
        token_bucket_bytes_per_second: bucket.map(|(r, _)| clamp(r)),
        token_bucket_bytes_burst: bucket.map(|(_, b)| clamp(b)),
    };
    proto::put_frame(
        &mut out,
        ft::SERVER_INFO,
        &[&proto::seal(&shared.secret, &key, &si.to_json())],
    );
    if write_with_deadline(&mut w, &out, limits.write_timeout)
        .await
        .is_err()
    {
        m.handshake_failed(HandshakeFailure::Io);
        return None;
    }
    m.handshakes.increment(1);
    m.handshake_duration
        .record(accepted.elapsed().as_secs_f64());
    debug!(key = %key.short(), mesh = is_mesh, version = info.version, prober = info.is_prober, "connected");
    Some(Established {
        r,
        w,
        rbuf,
        dec,
        key,
        is_mesh,
        is_prober: info.is_prober,
        extended_frames: info.can_ack_pings || is_mesh,
        bucket,
    })
}

/// The DERP phase: register, forward until the end, tear down.
async fn established<S>(est: Established<S>, remote: SocketAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Established {
        mut r,
        w,
        rbuf,
        dec,
        key,
        is_mesh,
        is_prober,
        extended_frames,
        bucket,
    } = est;
    let m = &shared.metrics;
    let limits = &shared.limits;
    let cancel = shared.conns_cancel.child_token();
    let me = Arc::new(ClientHandle::new(
        key,
        shared.registry.next_conn_id(),
        remote,
        QueueLimits::receiver(limits.queue_depth, limits.queue_bytes),
        cancel.clone(),
        (extended_frames, is_mesh, is_prober),
    ));
    shared.registry.register(Arc::clone(&me));
    m.connections.increment(1.0);

    let writer = tokio::spawn(write_loop(w, Arc::clone(&me), Arc::clone(&shared)));
    let bucket = bucket.map(|(rate, burst)| {
        ratelimit::TokenBucket::new(rate as f64, burst as f64, Instant::now())
    });
    let (why, sent_to, home) = read_loop(&mut r, rbuf, dec, &me, is_mesh, bucket, &shared).await;

    // Tear down: nobody may queue for us any more, then stop the writer.
    let key_gone = shared.registry.unregister(&me);
    me.cancel.cancel();
    let writer_why = writer.await.ok().flatten();
    m.drop_n(DropReason::GoneDisconnected, me.close_queues() as u64);
    m.connections.decrement(1.0);
    if home {
        m.home_connections.decrement(1.0);
    }
    let why = writer_why.unwrap_or(why);
    m.closed(why);
    debug!(key = %key.short(), reason = why.label(), "disconnected");
    if key_gone {
        for peer in sent_to {
            if let Some(p) = shared.registry.get(&peer) {
                if p.enqueue_control(Control::PeerGone(key, PeerGoneReason::Disconnected)) {
                    m.peer_gone_sent.increment(1);
                }
            }
        }
    }
}

enum HandshakeErr {
    Io,
    Proto(ProtoError),
}

/// Reads frames until the connection ends; returns why, who we sent to, and whether we were
/// counted as a home connection.
async fn read_loop<R: AsyncRead + Unpin>(
    r: &mut R,
    mut rbuf: BytesMut,
    mut dec: FrameDecoder,
    me: &Arc<ClientHandle>,
    is_mesh: bool,
    mut bucket: Option<ratelimit::TokenBucket>,
    shared: &Shared,
) -> (CloseReason, HashSet<PublicKey>, bool) {
    let m = &shared.metrics;
    let reg = &shared.registry;
    let mut sent_to: HashSet<PublicKey> = HashSet::new();
    let mut last_dst: Option<PublicKey> = None;
    let mut home = false;
    let mut not_here = NotHereLimiter {
        tokens: 3.0,
        last: Instant::now(),
    };
    let mut read_chunk = IDLE_CHUNK;
    // The size of the buffer the last read went into: what a packet sliced from it keeps alive.
    let mut read_buf = SourceBuf::new(0);
    // When the first bytes of a frame not yet whole arrived (pushed back by the time the rate
    // limit held reads back): the frame must be whole `frame_timeout` after it.
    let mut frame_started: Option<tokio::time::Instant> = None;
    // One timer for the connection, moved only when the deadline changes (not re-armed on every
    // read of a stream whose reads end mid-frame).
    let frame_timer = tokio::time::sleep(shared.limits.frame_timeout);
    tokio::pin!(frame_timer);
    let mut armed: Option<tokio::time::Instant> = None;
    // The quiet timer (`QUIET_RELEASE`): armed while reads are large; when it fires, the
    // connection was quiet if no read completed since it was armed (so between 1 and 2 periods
    // after the last read), else it is armed again. Reads are counted, not timed: no clock
    // read per read.
    let quiet_timer = tokio::time::sleep(QUIET_RELEASE);
    tokio::pin!(quiet_timer);
    let mut quiet_armed = false;
    let (mut reads, mut reads_at_arm) = (0u64, 0u64);
    let why = 'conn: loop {
        // Everything already buffered, then one read. Counters are added once per read.
        let (mut pkts, mut bytes, mut mesh_pkts) = (0u64, 0u64, 0u64);
        // A bad frame ends the connection, but only after the packets before it in this read
        // are counted: they were queued for their receivers.
        let mut whole_frames = false;
        let bad = loop {
            let f = match dec.decode(&mut rbuf) {
                Ok(Some(f)) => {
                    whole_frames = true;
                    f
                }
                Ok(None) => break None,
                Err(e) => {
                    debug!(error = %e, "protocol error");
                    break Some(CloseReason::ProtocolError);
                }
            };
            let frame = match ClientFrame::parse(f) {
                Ok(fr) => fr,
                Err(e) => {
                    debug!(error = %e, "protocol error");
                    break Some(CloseReason::ProtocolError);
                }
            };
            match frame {
                ClientFrame::SendPacket { dst, packet } => {
                    if me.has_dup.load(std::sync::atomic::Ordering::Relaxed) {
                        reg.note_sender(me);
                    }
                    let disco = proto::looks_like_disco(&packet);
                    if let Some(to) = reg.get(&dst) {
                        bytes += packet.len() as u64;
                        pkts += 1;
                        to.enqueue_packet(me.key, packet, read_buf, disco, m);
                        if last_dst != Some(dst) {
                            sent_to.insert(dst);
                            last_dst = Some(dst);
                        }
                    } else if let Some(link) = reg.get_remote(&dst) {
                        bytes += packet.len() as u64;
                        pkts += 1;
                        mesh_pkts += 1;
                        link.forward(me.key, dst, packet, read_buf, shared);
                    } else {
                        m.drop(DropReason::UnknownDest);
                        if disco
                            && not_here.allow(Instant::now())
                            && me.enqueue_control(Control::PeerGone(dst, PeerGoneReason::NotHere))
                        {
                            m.peer_gone_sent.increment(1);
                        }
                    }
                }
                ClientFrame::ForwardPacket { src, dst, packet } => {
                    if !is_mesh {
                        break Some(CloseReason::NotPermitted);
                    }
                    match reg.get(&dst) {
                        Some(to) => {
                            bytes += packet.len() as u64;
                            pkts += 1;
                            let disco = proto::looks_like_disco(&packet);
                            to.enqueue_packet(src, packet, read_buf, disco, m);
                        }
                        None => m.drop(DropReason::UnknownDestOnFwd),
                    }
                }
                ClientFrame::NotePreferred(p) => {
                    if p != home {
                        home = p;
                        if p {
                            m.home_connections.increment(1.0)
                        } else {
                            m.home_connections.decrement(1.0)
                        }
                    }
                }
                ClientFrame::Ping(data) => {
                    me.enqueue_control(Control::Pong(data));
                }
                ClientFrame::Pong(_) => {}
                ClientFrame::WatchConns => {
                    if !is_mesh {
                        break Some(CloseReason::NotPermitted);
                    }
                    reg.add_watcher(Arc::clone(me));
                }
                ClientFrame::ClosePeer(k) => {
                    if !is_mesh {
                        break Some(CloseReason::NotPermitted);
                    }
                    reg.close_key(&k);
                }
                ClientFrame::AllocateUdpRelay(req) => match &shared.udp_relay {
                    // Over the client's own admitted connection: admission and the verify URL
                    // have applied; the requester is the connection's proven key.
                    Some(u) => {
                        let resp = u.allocate(me.key, req);
                        me.enqueue_control(Control::UdpRelayEndpoint(resp.encode()));
                    }
                    None => {
                        trace!("AllocateUdpRelay with the UDP relay off; skipped");
                        m.frames_ignored.increment(1);
                    }
                },
                ClientFrame::Other(t) => {
                    trace!(frame_type = t, "skipping unknown frame");
                    m.frames_ignored.increment(1);
                }
            }
        };
        if pkts > 0 {
            m.packets_forwarded.increment(pkts);
            m.bytes_forwarded.increment(bytes);
            if mesh_pkts > 0 {
                m.mesh_forwarded.increment(mesh_pkts);
            }
            // Let the receivers' writers run before reading more: under a flood the socket is
            // always readable, and without this a reader could queue up to the scheduler's
            // budget of reads (hundreds of packets, mostly dropped at full queues) before a
            // writer gets the core.
            if bad.is_none() {
                tokio::task::yield_now().await;
            }
        }
        if let Some(why) = bad {
            break 'conn why;
        }
        // An idle connection keeps a small buffer (most of a relay's connections are idle:
        // 512 bytes instead of 8 KiB each); one whose reads fill the buffer gets big chunks.
        if rbuf.is_empty() && rbuf.capacity() > read_chunk && read_chunk == IDLE_CHUNK {
            rbuf = BytesMut::new();
        }
        rbuf.reserve(dec.bytes_needed(&rbuf).max(read_chunk));
        read_buf = SourceBuf::new(rbuf.capacity());
        let room = rbuf.capacity() - rbuf.len();
        // A frame completed: what is left (if anything) is the start of the next one.
        if rbuf.is_empty() || whole_frames {
            frame_started = None;
        }
        if !rbuf.is_empty() && frame_started.is_none() {
            frame_started = Some(tokio::time::Instant::now());
        }
        let frame_deadline = frame_started.map(|t| t + shared.limits.frame_timeout);
        if let Some(d) = frame_deadline.filter(|d| armed != Some(*d)) {
            frame_timer.as_mut().reset(d);
        }
        armed = frame_deadline;
        let big = read_chunk > IDLE_CHUNK;
        if big && !quiet_armed {
            quiet_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + QUIET_RELEASE);
            (quiet_armed, reads_at_arm) = (true, reads);
        }
        tokio::select! {
            biased;
            _ = me.cancel.cancelled() => break me.close_reason().unwrap_or(CloseReason::Shutdown),
            () = &mut frame_timer, if frame_deadline.is_some() => {
                debug!(buffered = rbuf.len(), "a frame not whole within frame_timeout; closing");
                break CloseReason::FrameTimeout;
            }
            () = &mut quiet_timer, if big && quiet_armed => {
                quiet_armed = false;
                if reads == reads_at_arm {
                    // Quiet: read small again, which gives the buffer back when it holds no
                    // part of a frame (above; a part waits for the frame timeout), and the
                    // record layer's, which watches its own reads.
                    read_chunk = IDLE_CHUNK;
                }
            }
            res = r.read_buf(&mut rbuf) => match res {
                // End of stream at a frame boundary is a client leaving, with or without a
                // TLS close_notify (Go clients close TCP without one: rustls reports that as
                // UnexpectedEof). Ending in the middle of a frame is a read error.
                Ok(0) if rbuf.is_empty() => break CloseReason::ClientClosed,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && rbuf.is_empty() => {
                    break CloseReason::ClientClosed
                }
                Ok(0) | Err(_) => break CloseReason::ReadError,
                Ok(n) => {
                    reads += 1;
                    read_chunk = next_read_chunk(read_chunk, n, room);
                    // Rate limit: bytes are forwarded only once paid for. While this waits,
                    // nothing is read, the socket buffers fill and TCP slows the sender.
                    if let Some(b) = &mut bucket {
                        let wait = b.take(n as u64, Instant::now());
                        if !wait.is_zero() {
                            m.rate_limit_delay.record(wait.as_secs_f64());
                            // Our own hold-back does not count against the client's frame.
                            if let Some(t) = &mut frame_started {
                                *t += wait;
                            }
                            tokio::select! {
                                biased;
                                _ = me.cancel.cancelled() => break me.close_reason().unwrap_or(CloseReason::Shutdown),
                                _ = tokio::time::sleep(wait) => {}
                            }
                        }
                    }
                }
            }
        }
    };
    (why, sent_to, home)
}

/// Drains this client's queues: control frames first, then presence notes (watchers), disco,
/// data; one flush per batch. Returns a close reason if the writer ended the connection.
///
/// At a graceful shutdown (`shared.drain`) it flushes what is queued, sends Restarting to
/// clients that understand it, and half-closes: the client sees the end of the stream and
/// leaves, while the reader goes on reading until it has (so every frame the client sent before
/// it saw the end is still forwarded or counted, not lost in a reset).
async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    me: Arc<ClientHandle>,
    shared: Arc<Shared>,
) -> Option<CloseReason> {
    let m = &shared.metrics;
    let limits = &shared.limits;
    let write_timeout = me.write_timeout(limits.write_timeout);
    let mut q = Queues::default();
    let mut out: Vec<u8> = Vec::new();
    let keepalive = |now: tokio::time::Instant| {
        let jitter = rand::random::<f64>() * limits.keepalive_jitter.as_secs_f64();
        now + limits.keepalive_interval + Duration::from_secs_f64(jitter)
    };
    // One timer for the connection's life, reset when it fires (not re-created per batch).
    let keepalive_timer = tokio::time::sleep_until(keepalive(tokio::time::Instant::now()));
    tokio::pin!(keepalive_timer);
    let mut draining = false;
    // Packets left queued by the last batch: write again without waiting for a wake-up.
    let mut more = false;
    loop {
        tokio::select! {
            biased;
            _ = me.cancel.cancelled() => return None,
            _ = shared.drain.cancelled(), if !draining => draining = true,
            _ = std::future::ready(()), if more => {}
            _ = me.notify.notified() => {}
            _ = &mut keepalive_timer => {
                proto::put_frame(&mut out, ft::KEEP_ALIVE, &[]);
                keepalive_timer.as_mut().reset(keepalive(tokio::time::Instant::now()));
            }
        }
        more = me.take_batch(&mut q, WRITE_BATCH);
        for c in q.control.drain(..) {
            match c {
                Control::Pong(d) => proto::put_frame(&mut out, ft::PONG, &[&d]),
                Control::PeerGone(k, r) => proto::put_peer_gone(&mut out, &k, r),
                Control::UdpRelayEndpoint(b) => {
                    proto::put_frame(&mut out, ferry_proto::udprelay::FRAME_ENDPOINT, &[&b])
                }
            }
        }
        if me.extended_frames {
            for p in q.presence.drain(..) {
                match p {
                    Presence::Present { key, addr, flags } => {
                        proto::put_peer_present(&mut out, &key, addr, flags)
                    }
                    Presence::Gone(key) => {
                        proto::put_peer_gone(&mut out, &key, PeerGoneReason::Disconnected)
                    }
                }
            }
        } else {
            q.presence.clear();
        }
        let batch_packets = (q.disco.len() + q.data.len()) as u64;
        for p in q.disco.drain().chain(q.data.drain()) {
            out.reserve(proto::FRAME_HEADER_LEN + proto::KEY_LEN + p.data.len());
            proto::put_recv_packet(&mut out, &p.src, &p.data);
        }
        // Draining: everything queued goes out first, then Restarting and the end of stream.
        let restarting = draining && !more;
        if restarting && me.extended_frames {
            let (reconnect, try_for) = shared.restart_hint();
            proto::put_restarting(&mut out, reconnect, try_for);
            m.restarting_sent.increment(1);
        }
        if !out.is_empty() {
            // A connection closed from outside (ClosePeer, a watcher cut off, a hard shutdown)
            // stops at once, not after a stuck write's timeout.
            let written = tokio::select! {
                biased;
                _ = me.cancel.cancelled() => Err(me.close_reason().unwrap_or(CloseReason::Shutdown)),
                r = write_with_deadline(&mut w, &out, write_timeout) => r,
            };
            if let Err(why) = written {
                // Every packet of the batch that did not go out is lost (a batch of control
                // frames only loses no packet).
                m.drop_n(DropReason::WriteError, batch_packets);
                me.close(why);
                return Some(why);
            }
            out.clear();
            if out.capacity() > KEEP_WRITE_BUF {
                out = Vec::new();
            }
        }
        if restarting {
            let _ = tokio::time::timeout(write_timeout, w.shutdown()).await;
            return Some(CloseReason::Shutdown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grow_while_the_sender_has_more_waiting_over_tls_too() {
        // Idle: a full read grows to 8 KiB; a part of one stays idle.
        assert_eq!(next_read_chunk(IDLE_CHUNK, 512, 512), READ_CHUNK);
        assert_eq!(next_read_chunk(IDLE_CHUNK, 300, 512), IDLE_CHUNK);
        // Plain TCP: a full read doubles, up to 64 KiB.
        assert_eq!(next_read_chunk(READ_CHUNK, 8192, 8192), 16 << 10);
        assert_eq!(
            next_read_chunk(MAX_READ_CHUNK, 65536, 65536),
            MAX_READ_CHUNK
        );
        // TLS, straight into the reader's buffer: a socket read that filled 8 KiB hands out
        // its 1,237-byte records' plaintext less the record cut off at the end. Before, reads
        // stayed at 8 KiB.
        let records = 8192 / (1237 + 22);
        assert_eq!(next_read_chunk(READ_CHUNK, records * 1237, 8192), 16 << 10);
        // 16 KiB records into 32 KiB: one whole record and the start of the next.
        assert_eq!(next_read_chunk(32 << 10, 16384, 32 << 10), 64 << 10);
        // Slowing down: under a quarter halves, a small read goes back to idle.
        assert_eq!(next_read_chunk(MAX_READ_CHUNK, 10_000, 65536), 32 << 10);
        assert_eq!(next_read_chunk(MAX_READ_CHUNK, 100, 65536), IDLE_CHUNK);
        assert_eq!(
            next_read_chunk(MAX_READ_CHUNK, 20_000, 65536),
            MAX_READ_CHUNK
        );
    }
}
