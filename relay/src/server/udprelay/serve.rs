//! The UDP relay's I/O: one task per socket reads datagrams in batches (`recvmmsg`), decides
//! each with [`Sessions::handle`] under one lock per batch, and sends the forwards and
//! challenges in batches (`sendmmsg`), copying each datagram once into the send batch (no
//! allocation per packet). Allocation requests come from DERP connections
//! ([`UdpRelay::allocate`]). A sweep ends expired sessions every 10 s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::udprelay::{AllocRequest, AllocResponse, Endpoint};
use ferry_proto::PublicKey;
use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{Outcome, Sessions};

/// Kernel buffer asked for on the UDP relay socket, each way (as the STUN server's): a burst of
/// small datagrams costs far more buffer than its bytes (each takes an skb of about 1 KiB), and
/// the default 208 KiB overflowed at 256 datagrams of 250 bytes in flight in the NAT lab
/// (`tests/nat_lab_no_loss.rs`: `RcvbufErrors` 91, the same 91 datagrams lost). As root the
/// `net.core.rmem_max` cap is passed (`SO_RCVBUFFORCE`); otherwise the kernel caps it there.
pub(crate) const UDP_RELAY_BUFFER_BYTES: usize = 4 << 20;

/// The UDP relay's socket on `addr` with [`UDP_RELAY_BUFFER_BYTES`] of buffers. An IPv6
/// wildcard stays dual-stack (IPv4 clients arrive as IPv4-mapped addresses), as a plain bind
/// is.
pub(crate) fn bind_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    let _ = s.set_recv_buffer_size(UDP_RELAY_BUFFER_BYTES);
    let _ = s.set_send_buffer_size(UDP_RELAY_BUFFER_BYTES);
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let value = libc::c_int::try_from(UDP_RELAY_BUFFER_BYTES).unwrap_or(libc::c_int::MAX);
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            // SAFETY: a valid socket fd and a c_int option value of the stated size; failing
            // (no CAP_NET_ADMIN) is harmless.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}
use crate::server::metrics::{UdpRelayAlloc, UdpRelayMetrics};

/// Receive buffer per datagram: the largest UDP payload (a larger one cannot exist).
const MAX_DATAGRAM: usize = 65_535;
/// Sessions are swept this often.
const SWEEP: Duration = Duration::from_secs(10);

/// The UDP relay of one relay process: its sessions, port and advertised addresses.
#[derive(Debug)]
pub(crate) struct UdpRelay {
    pub(crate) sessions: Mutex<Sessions>,
    pub(crate) port: u16,
    pub(crate) advertise: Vec<SocketAddr>,
    pub(crate) metrics: UdpRelayMetrics,
    /// GRO on receive, GSO on send ([`crate::server::UdpRelayConfig::gso`]).
    pub(crate) gso: bool,
}

impl UdpRelay {
    /// Answers an AllocateUdpRelay frame from the admitted client `requester`.
    pub(crate) fn allocate(&self, requester: PublicKey, req: AllocRequest) -> AllocResponse {
        let r = self
            .sessions
            .lock()
            .allocate(requester, req.keys[0], req.keys[1], Instant::now());
        let result = match r {
            Ok(a) => {
                self.metrics.allocation(UdpRelayAlloc::Granted);
                Ok(Endpoint {
                    server_key: a.server_key,
                    keys: a.keys,
                    lamport: a.lamport,
                    vni: a.vni,
                    bind_lifetime: a.bind_lifetime,
                    idle_lifetime: a.idle_lifetime,
                    port: self.port,
                    addrs: self.advertise.clone(),
                })
            }
            Err(e) => {
                self.metrics.allocation(match e {
                    super::AllocError::Total(_) => UdpRelayAlloc::RefusedTotal,
                    super::AllocError::PerClient(_) => UdpRelayAlloc::RefusedPerClient,
                    super::AllocError::BadPair => UdpRelayAlloc::RefusedBadPair,
                    super::AllocError::NotMember => UdpRelayAlloc::RefusedNotMember,
                });
                debug!(requester = %requester.short(), "UDP relay allocation refused: {e}");
                Err(e.to_string())
            }
        };
        AllocResponse { id: req.id, result }
    }

    /// Ends expired sessions and updates the session gauges.
    pub(crate) fn sweep(&self, now: Instant) {
        let mut s = self.sessions.lock();
        let n = s.expire(now);
        let (connecting, open) = s.counts();
        drop(s);
        self.metrics.expired.increment(n as u64);
        self.metrics.connecting.set(connecting as f64);
        self.metrics.open.set(open as f64);
    }
}

/// Serves `sock` until `cancel`; then returns.
pub(crate) async fn serve(relay: Arc<UdpRelay>, sock: UdpSocket, cancel: CancellationToken) {
    let local = sock.local_addr().ok();
    tokio::select! {
        _ = cancel.cancelled() => {}
        r = run(&relay, &sock) => if let Err(e) = r {
            error!(addr = ?local, error = %e, "UDP relay socket failed; it no longer serves");
        },
    }
}

/// Sweeps expired sessions every [`SWEEP`] until `cancel`.
pub(crate) async fn sweeper(relay: Arc<UdpRelay>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => relay.sweep(Instant::now()),
        }
    }
}

#[cfg(target_os = "linux")]
async fn run(relay: &UdpRelay, sock: &UdpSocket) -> std::io::Result<()> {
    use std::io::ErrorKind;
    use std::os::fd::AsRawFd;

    use ferry_stun::mmsg::{GsoSendBatch, RecvBatch, UDP_BATCH};
    use tokio::io::Interest;

    const BATCH: usize = 32;
    let fd = sock.as_raw_fd();
    // 32 entries of up to 64 KiB each way (4 MiB per socket): with GRO, an entry is a run of
    // datagrams of one flow; the send side keeps what a full receive batch can forward.
    let mut rx = RecvBatch::new(BATCH, MAX_DATAGRAM);
    let gro = relay.gso && rx.enable_gro(fd);
    let mut tx = GsoSendBatch::new(UDP_BATCH, BATCH * MAX_DATAGRAM, relay.gso).many_destinations();
    let m = &relay.metrics;
    info!(addr = ?sock.local_addr().ok(), gro, gso = relay.gso, "UDP relay listening");
    loop {
        sock.readable().await?;
        let n = match sock.try_io(Interest::READABLE, || rx.recv(fd)) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => {
                debug!(error = %e, "recvmmsg failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        // Entry i from byte `off`: the next datagram to decide. The send batch usually takes
        // the whole receive batch; when it is full (many destinations), it is sent and the
        // rest decided after.
        let (mut i, mut off) = (0, 0);
        while i < n {
            tx.clear();
            let (mut fwd_pkts, mut fwd_bytes) = (0u64, 0u64);
            {
                let now = Instant::now();
                let mut sessions = relay.sessions.lock();
                'fill: while i < n {
                    let Some((buf, from)) = rx.get(i) else {
                        m.dropped(super::Drop::Short);
                        i += 1;
                        continue;
                    };
                    let seg = rx.segment_size(i).max(1);
                    loop {
                        let end = (off + seg).min(buf.len());
                        let d = &buf[off..end];
                        if !tx.has_room(d.len()) && !tx.is_empty() {
                            break 'fill;
                        }
                        match sessions.handle(from, d, now) {
                            Outcome::Forward(to) => {
                                tx.push(d, to);
                                fwd_pkts += 1;
                                fwd_bytes += d.len() as u64;
                            }
                            Outcome::Reply(r) => {
                                tx.push_alone(&r, from);
                                m.challenges.increment(1);
                            }
                            Outcome::Bound => m.binds.increment(1),
                            Outcome::Drop(why) => m.dropped(why),
                        }
                        off = end;
                        if off >= buf.len() {
                            break;
                        }
                    }
                    i += 1;
                    off = 0;
                }
            }
            m.forwarded_packets.increment(fwd_pkts);
            m.forwarded_bytes.increment(fwd_bytes);
            let mut sent = 0;
            while sent < tx.len() {
                let had_gso = tx.gso();
                match sock.try_io(Interest::WRITABLE, || tx.send(fd, sent)) {
                    Ok(k) => sent += k.max(1),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => sock.writable().await?,
                    Err(e) => {
                        debug!(error = %e, "sendmmsg failed for one message");
                        m.send_errors.increment(1);
                        sent += 1;
                    }
                }
                if had_gso && !tx.gso() {
                    warn!("the kernel refused a UDP GSO send; sending datagram by datagram from now on");
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
async fn run(relay: &UdpRelay, sock: &UdpSocket) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let m = &relay.metrics;
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        let d = &buf[..n];
        let outcome = relay.sessions.lock().handle(from, d, Instant::now());
        match outcome {
            Outcome::Forward(to) => {
                m.forwarded_packets.increment(1);
                m.forwarded_bytes.increment(n as u64);
                let _ = sock.send_to(d, to).await;
            }
            Outcome::Reply(r) => {
                m.challenges.increment(1);
                let _ = sock.send_to(&r, from).await;
            }
            Outcome::Bound => m.binds.increment(1),
            Outcome::Drop(why) => m.dropped(why),
        }
    }
}
