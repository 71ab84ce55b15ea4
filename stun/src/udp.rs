//! The UDP serving loop: batched `recvmmsg`/`sendmmsg` on Linux, `recv_from`/`send_to`
//! elsewhere.

use std::sync::Arc;

use tokio::net::UdpSocket;

use crate::proto::{self, Change, Ctx, GridPos};
use crate::stats::TransportCounters;

#[cfg(target_os = "linux")]
pub use ferry_proto::mmsg;

/// Datagrams read (and replies sent) per system call on Linux.
#[cfg(target_os = "linux")]
pub use ferry_proto::mmsg::UDP_BATCH;
/// Datagrams read per wake-up elsewhere (one system call each), as many as on Linux.
#[cfg(not(target_os = "linux"))]
pub const UDP_BATCH: usize = 64;
/// Receive buffer per datagram. STUN over UDP should fit the path MTU; a bigger datagram is
/// truncated and counted as malformed.
pub(crate) const RECV_BUF: usize = 2048;

/// One serving task: a socket (`sockets[me]`) and, for RFC 5780, the other three grid sockets
/// it may answer from.
pub(crate) struct Worker {
    pub(crate) sockets: Arc<[UdpSocket]>,
    pub(crate) me: usize,
    pub(crate) pos: Option<GridPos>,
    pub(crate) ctx: Ctx,
    pub(crate) counters: TransportCounters,
}

impl Worker {
    /// The socket a reply with `change` leaves from.
    fn sender(&self, change: Change) -> &UdpSocket {
        match self.pos {
            Some(pos) if change != Change::NONE => &self.sockets[pos.changed(change).index()],
            _ => &self.sockets[self.me],
        }
    }
}

/// Serve until the task is aborted.
pub(crate) async fn serve(w: Worker) {
    let local = w.sockets[w.me].local_addr().ok();
    if let Err(e) = run(&w).await {
        tracing::error!(addr = ?local, error = %e, "STUN UDP socket failed; it no longer serves");
    }
}

#[cfg(target_os = "linux")]
async fn run(w: &Worker) -> std::io::Result<()> {
    use std::io::ErrorKind;
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;

    let sock = &w.sockets[w.me];
    let fd = sock.as_raw_fd();
    let mut rx = mmsg::RecvBatch::new(UDP_BATCH, RECV_BUF);
    let mut tx = mmsg::SendBatch::new(UDP_BATCH, proto::MAX_RESPONSE_LEN);
    loop {
        sock.readable().await?;
        let n = match sock.try_io(Interest::READABLE, || rx.recv(fd)) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!(error = %e, "recvmmsg failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let mut tally = [0u64; 5];
        tx.clear();
        for i in 0..n {
            let outcome = match rx.get(i) {
                Some((req, src)) => {
                    let outcome = proto::handle(req, src, &w.ctx, tx.next_buf());
                    if let Some(reply) = outcome.reply() {
                        if reply.is_direct() {
                            tx.commit(reply.len, rx.raw_addr(i));
                        } else {
                            // RFC 5780: another grid socket answers, or another port of the
                            // source; rare, so not batched.
                            let buf = &tx.next_buf()[..reply.len];
                            let _ = w
                                .sender(reply.change)
                                .try_send_to(buf, reply.destination(src));
                        }
                    }
                    outcome
                }
                None => proto::Outcome::Malformed,
            };
            tally[outcome.result().index()] += 1;
        }
        // Count before replying, so a client that sees its reply also sees it counted.
        w.counters.add(&tally);
        let mut sent = 0;
        while sent < tx.len() {
            match sock.try_io(Interest::WRITABLE, || tx.send(fd, sent)) {
                Ok(m) => sent += m.max(1),
                Err(e) if e.kind() == ErrorKind::WouldBlock => sock.writable().await?,
                Err(e) => {
                    // The first pending reply could not be sent (unreachable, filtered): skip
                    // it, keep the rest.
                    tracing::debug!(error = %e, "sendmmsg failed for one reply");
                    sent += 1;
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
async fn run(w: &Worker) -> std::io::Result<()> {
    // Portable fallback: one datagram per system call. Counted per datagram, before the
    // reply is sent.
    let sock = &w.sockets[w.me];
    let mut buf = vec![0u8; RECV_BUF];
    let mut out = vec![0u8; proto::MAX_RESPONSE_LEN];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "recv_from failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let outcome = proto::handle(&buf[..n], src, &w.ctx, &mut out);
        let mut tally = [0u64; 5];
        tally[outcome.result().index()] = 1;
        w.counters.add(&tally);
        if let Some(reply) = outcome.reply() {
            let _ = w
                .sender(reply.change)
                .send_to(&out[..reply.len], reply.destination(src))
                .await;
        }
    }
}
