//! The node's UDP sockets (one IPv4, one IPv6 if the host has it) and the demultiplexer on
//! them: STUN answers go to whoever waits for that transaction, everything else to the
//! endpoint (disco and direct data, later). One socket carries data, disco and STUN, so STUN
//! reports the NAT mapping of the very socket data uses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::stun::{self, TxId};

/// A STUN answer: the reflexive address, who answered, and when it arrived.
#[derive(Debug, Clone, Copy)]
pub struct StunAnswer {
    /// Our address as the server saw it.
    pub mapped: SocketAddr,
    /// The server.
    pub from: SocketAddr,
    /// Arrival time.
    pub at: Instant,
}

/// Transactions waiting for an answer.
#[derive(Debug, Default)]
pub struct StunWaiters {
    map: Mutex<HashMap<TxId, mpsc::Sender<StunAnswer>>>,
}

impl StunWaiters {
    /// Registers `txid`; its answer goes to `tx`.
    pub fn register(&self, txid: TxId, tx: mpsc::Sender<StunAnswer>) {
        self.map.lock().expect("not poisoned").insert(txid, tx);
    }

    /// Forgets `txid`.
    pub fn remove(&self, txid: &TxId) {
        self.map.lock().expect("not poisoned").remove(txid);
    }

    /// Hands a STUN datagram to its waiter. Returns false if nobody waits for it.
    pub fn deliver(&self, packet: &[u8], from: SocketAddr, at: Instant) -> bool {
        let Ok((txid, mapped)) = stun::parse_binding_response(packet) else {
            return false;
        };
        let tx = self.map.lock().expect("not poisoned").get(&txid).cloned();
        match tx {
            Some(tx) => tx.try_send(StunAnswer { mapped, from, at }).is_ok(),
            None => false,
        }
    }
}

/// The sockets and their reader tasks. Dropping it stops the readers.
#[derive(Debug)]
pub struct Sockets {
    /// The IPv4 socket.
    pub v4: Arc<UdpSocket>,
    /// The IPv6 socket, if IPv6 is available.
    pub v6: Option<Arc<UdpSocket>>,
    /// STUN transactions in flight.
    pub stun: Arc<StunWaiters>,
    /// What the readers of these sockets read.
    pub read: Arc<ReadCounters>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

/// Datagrams read, and the messages the kernel handed them over as: with UDP GRO (Linux 5.0+)
/// a run of one flow's datagrams that arrived as one GSO message is one.
#[derive(Debug, Default)]
pub struct ReadCounters {
    /// Datagrams (STUN answers included).
    pub datagrams: AtomicU64,
    /// Messages.
    pub messages: AtomicU64,
    /// Datagrams read but dropped because the endpoint's actor was behind (its queue of
    /// 1,024 datagrams full): the reader never waits for it, so a stalled actor cannot stall
    /// the socket (which would drop in the kernel instead, uncounted).
    pub dropped: AtomicU64,
}

impl Drop for Sockets {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// A datagram that is not a STUN answer.
#[derive(Debug, Clone)]
pub struct Datagram {
    /// Sender.
    pub from: SocketAddr,
    /// Payload.
    pub data: Bytes,
    /// Which socket it came in on: [`MAIN`] for the node's own sockets, otherwise the id
    /// given to [`spawn_reader`] (the endpoint's extra birthday-probing sockets).
    pub via: u32,
}

/// Receive and send buffer size asked for the data sockets (Tailscale asks 7 MiB): bursts of
/// datagrams wait there while the endpoint is busy, instead of being dropped by the kernel.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A UDP socket bound to `addr` with [`SOCKET_BUFFER_BYTES`] of receive and send buffer — as
/// root even beyond the `net.core.rmem_max` / `wmem_max` caps (`SO_RCVBUFFORCE`), otherwise up
/// to them. Buffer sizes are best effort; binding errors are returned.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::from_std(bind_udp_std(addr)?)
}

/// [`bind_udp`] as a std socket (non-blocking), usable without a tokio runtime.
pub fn bind_udp_std(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    #[cfg(target_os = "linux")]
    force_buffers(&s);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE` (need CAP_NET_ADMIN; fail harmlessly without it).
#[cfg(target_os = "linux")]
fn force_buffers(s: &socket2::Socket) {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(SOCKET_BUFFER_BYTES).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: a valid socket fd and a c_int option value of the stated size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                std::ptr::addr_of!(value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// [`Datagram::via`] of the node's own sockets.
pub const MAIN: u32 = 0;

impl Sockets {
    /// Binds the IPv4 socket to `v4` (e.g. `0.0.0.0:0`) and, if `v6` is given, tries an IPv6
    /// socket (IPv6 being unavailable is not an error). Non-STUN datagrams go to `other`.
    pub async fn bind(
        v4: SocketAddr,
        v6: Option<SocketAddr>,
        other: Option<mpsc::Sender<Datagram>>,
    ) -> std::io::Result<Sockets> {
        let s4 = Arc::new(bind_udp(v4)?);
        let s6 = match v6 {
            Some(a) => bind_udp(a).ok().map(Arc::new),
            None => None,
        };
        let stun = Arc::new(StunWaiters::default());
        let read = Arc::new(ReadCounters::default());
        let reader = |s: &Arc<UdpSocket>, other| {
            let r = Reader {
                stun: Arc::clone(&stun),
                other,
                via: MAIN,
                batch: MAIN_READ_BATCH,
                counters: Some(Arc::clone(&read)),
            };
            tokio::spawn(read_loop(Arc::clone(s), r))
        };
        let mut readers = vec![reader(&s4, other.clone())];
        if let Some(s) = &s6 {
            readers.push(reader(s, other));
        }
        Ok(Sockets {
            v4: s4,
            v6: s6,
            stun,
            read,
            readers,
        })
    }

    /// The socket for sending to `dst`'s family.
    pub fn for_addr(&self, dst: &SocketAddr) -> Option<&Arc<UdpSocket>> {
        if dst.is_ipv4() {
            Some(&self.v4)
        } else {
            self.v6.as_ref()
        }
    }

    /// The local addresses of the sockets.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let mut v = Vec::new();
        v.extend(self.v4.local_addr().ok());
        if let Some(s) = &self.v6 {
            v.extend(s.local_addr().ok());
        }
        v
    }
}

/// Messages one read of a main socket takes (each up to 64 KiB: a GRO run): 256 KiB of buffer
/// per main socket. Birthday sockets read one at a time (there can be hundreds of them).
const MAIN_READ_BATCH: usize = 4;

/// Reads `sock` until aborted: STUN answers to `stun`, the rest to `other` tagged `via`.
pub fn spawn_reader(
    sock: Arc<UdpSocket>,
    stun: Arc<StunWaiters>,
    other: Option<mpsc::Sender<Datagram>>,
    via: u32,
) -> tokio::task::JoinHandle<()> {
    let r = Reader {
        stun,
        other,
        via,
        batch: 1,
        counters: None,
    };
    tokio::spawn(read_loop(sock, r))
}

/// Where a reader's datagrams go.
struct Reader {
    stun: Arc<StunWaiters>,
    other: Option<mpsc::Sender<Datagram>>,
    via: u32,
    /// Messages per read (Linux).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    batch: usize,
    counters: Option<Arc<ReadCounters>>,
}

impl Reader {
    fn deliver(&self, pkt: &[u8], from: SocketAddr, at: Instant) {
        if stun::is_stun(pkt) {
            self.stun.deliver(pkt, from, at);
            return;
        }
        if let Some(tx) = &self.other {
            let sent = tx.try_send(Datagram {
                from,
                data: Bytes::copy_from_slice(pkt),
                via: self.via,
            });
            // Closed: the endpoint is going away; nothing to count.
            if let (Err(mpsc::error::TrySendError::Full(_)), Some(c)) = (sent, &self.counters) {
                c.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn count(&self, datagrams: u64, messages: u64) {
        if let Some(c) = &self.counters {
            c.datagrams.fetch_add(datagrams, Ordering::Relaxed);
            c.messages.fetch_add(messages, Ordering::Relaxed);
        }
    }
}

/// Sends every message of `batch` on `sock`, in order, waiting while the socket's send buffer
/// is full; `each(i, error)` hears of message `i` (`sendmmsg` fails only on its first message:
/// that one is reported and skipped, the rest go on). Warns once if the kernel made the batch
/// give up GSO. The batch is left as it was (clear it to reuse it).
#[cfg(target_os = "linux")]
pub async fn send_gso_batch(
    sock: &UdpSocket,
    batch: &mut ferry_proto::mmsg::GsoSendBatch,
    mut each: impl FnMut(usize, Option<std::io::Error>),
) {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let had_gso = batch.gso();
    let mut from = 0;
    while from < batch.len() {
        // `async_io` waits for room in the send buffer when the kernel says EAGAIN.
        match sock
            .async_io(tokio::io::Interest::WRITABLE, || batch.send(fd, from))
            .await
        {
            Ok(n) => {
                let n = n.max(1);
                (from..from + n).for_each(|i| each(i, None));
                from += n;
            }
            Err(e) => {
                each(from, Some(e));
                from += 1;
            }
        }
    }
    if had_gso && !batch.gso() {
        tracing::warn!(
            "the kernel refused a UDP GSO send; sending datagram by datagram from now on"
        );
    }
}

/// Linux: `recvmmsg` with UDP GRO, so a GSO run (a peer's burst, or a UDP relay's forward of
/// one) comes in as one message and is cut into its datagrams here, in order.
#[cfg(target_os = "linux")]
async fn read_loop(sock: Arc<UdpSocket>, r: Reader) {
    use ferry_proto::mmsg::{RecvBatch, MAX_UDP_PAYLOAD};
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let mut rx = RecvBatch::new(r.batch.max(1), MAX_UDP_PAYLOAD + 1);
    // Best effort: without GRO every message is one datagram, as before.
    rx.enable_gro(fd);
    loop {
        let n = match sock
            .async_io(tokio::io::Interest::READABLE, || rx.recv(fd))
            .await
        {
            Ok(n) => n,
            // ICMP errors (port unreachable from an earlier send) surface here on Linux;
            // they say nothing about this read.
            Err(_) => continue,
        };
        let at = Instant::now();
        let mut datagrams = 0;
        for i in 0..n {
            let Some((buf, from)) = rx.get(i) else {
                continue;
            };
            let seg = rx.segment_size(i).max(1);
            let mut off = 0;
            loop {
                let end = (off + seg).min(buf.len());
                r.deliver(&buf[off..end], from, at);
                datagrams += 1;
                off = end;
                if off >= buf.len() {
                    break;
                }
            }
        }
        r.count(datagrams, n as u64);
    }
}

#[cfg(not(target_os = "linux"))]
async fn read_loop(sock: Arc<UdpSocket>, r: Reader) {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => continue,
        };
        r.deliver(&buf[..n], from, Instant::now());
        r.count(1, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reader never waits for the endpoint's actor (a stalled actor must not stall the
    /// socket), so a full channel drops the datagram; it must be counted, not vanish.
    #[test]
    fn a_full_channel_to_the_actor_drops_and_counts() {
        let (tx, mut rx) = mpsc::channel(2);
        let counters = Arc::new(ReadCounters::default());
        let r = Reader {
            stun: Arc::new(StunWaiters::default()),
            other: Some(tx),
            via: MAIN,
            batch: 1,
            counters: Some(Arc::clone(&counters)),
        };
        let from: SocketAddr = "192.0.2.1:41641".parse().unwrap();
        for i in 0u8..5 {
            r.deliver(&[0xF0, i], from, Instant::now());
        }
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 3);
        let mut got = Vec::new();
        while let Ok(d) = rx.try_recv() {
            got.push(d.data[1]);
        }
        assert_eq!(got, [0, 1], "the first ones are kept, the rest dropped");
    }

    #[tokio::test]
    async fn data_sockets_get_large_buffers() {
        let s = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let r = socket2::SockRef::from(&s);
        let (rcv, snd) = (r.recv_buffer_size().unwrap(), r.send_buffer_size().unwrap());
        // Linux reports twice what was set (bookkeeping overhead). As root the caps do not
        // apply; otherwise at least the default is kept.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(
                rcv >= SOCKET_BUFFER_BYTES && snd >= SOCKET_BUFFER_BYTES,
                "{rcv} {snd}"
            );
        } else {
            assert!(rcv > 0 && snd > 0);
        }
    }
}
