//! `udp-relay` mode (issue 15): a UDP relay's forwarding capacity, in datagrams forwarded per
//! server CPU-second.
//!
//! Setup, over real DERP connections: `2 × pairs` clients connect; the first of each pair asks
//! for a UDP relay session for the two (ferry's frame `0xF0`, answered by `0xF1`); both sides
//! bind a UDP socket of their own to it with the Bind → Challenge → Answer handshake; a probe
//! each way proves the session forwards. Then one OS thread drives every socket with
//! `sendmmsg`/`recvmmsg` (as `stun` mode does): each side sends Geneve-framed datagrams of
//! `--size` bytes to the relay, which forwards them to the other side. Closed loop: at most
//! `--window` datagrams in flight per direction (what one side sent minus what the other
//! received); a direction that receives nothing for `--loss-timeout` writes its window off as
//! lost and goes on. Or open loop with `--rate` (datagrams/s in all, paced per millisecond).
//!
//! The measured window's datagrams delivered and the server's CPU time (utime + stime from
//! /proc/PID/stat, `--server-pid`) give the headline figure: forwarded per server CPU-second
//! (each delivered datagram is one forward by the relay).

use std::io;
use std::mem::zeroed;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_proto::derp::{self as proto, SecretKey};
use ferry_proto::udprelay::{
    AllocRequest, AllocResponse, BindKind, BindMsg, Endpoint, Geneve, FRAME_ALLOCATE,
    FRAME_ENDPOINT, GENEVE_LEN,
};
use ferry_proto::PublicKey;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::cli::{FlowArgs, RunArgs, UdpRelayArgs};
use crate::procfs;
use crate::target::{DerpConn, Target};

const BATCH: usize = 64;
/// Geneve protocol of the load (any: the relay forwards every protocol).
const PROTO_LOAD: u16 = 0x7A1F;
/// How long setup steps wait for the relay.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The run's result (`--json`: this, serialized).
#[derive(Debug, Clone, Serialize)]
pub struct UdpRelayReport {
    /// `udp-relay` (ferry's UDP relay: `pairs` sessions) or `turn` (a TURN server: `pairs`
    /// clients, each with a peer).
    pub mode: &'static str,
    /// The settings.
    pub pairs: usize,
    /// Datagram size on the wire (Geneve header included).
    pub size: usize,
    /// Closed-loop window per direction (0: open loop at `rate`).
    pub window: u64,
    /// Open-loop rate asked for (datagrams/s in all; 0: closed loop).
    pub rate: u64,
    /// Bursts sent with UDP GSO and received with GRO (`--gso`).
    pub gso: bool,
    /// The measured window.
    pub seconds: f64,
    /// Datagrams sent in the measured window (those in flight when it opens are delivered in
    /// it, so `delivered` may exceed this by up to a window per direction).
    pub sent: u64,
    /// Delivered in the measured window.
    pub delivered: u64,
    /// Delivered per second.
    pub delivered_per_second: f64,
    /// Written off (windows that stalled for `--loss-timeout`), whole run.
    pub lost: u64,
    /// The server, if `--server-pid` was given.
    pub server: Option<Server>,
    /// This process's CPU time over the measured window.
    pub client_cpu_seconds: f64,
}

/// The server's share.
#[derive(Debug, Clone, Serialize)]
pub struct Server {
    /// Its PID.
    pub pid: u32,
    /// utime + stime over the measured window.
    pub cpu_seconds: f64,
    /// Of which in the kernel (stime): the sockets' work, not the relay's code.
    pub system_seconds: f64,
    /// cpu_seconds / seconds.
    pub cores: f64,
    /// Datagrams forwarded (delivered) per server CPU-second.
    pub per_cpu_second: f64,
}

impl UdpRelayReport {
    /// The report of a run of `mode` with these settings that ended with `r`.
    pub(crate) fn new(
        mode: &'static str,
        pairs: usize,
        size: usize,
        flow: &FlowArgs,
        run: &RunArgs,
        r: &Totals,
    ) -> Self {
        let seconds = run.duration.as_secs_f64();
        UdpRelayReport {
            mode,
            pairs,
            gso: flow.gso,
            size,
            window: if flow.rate > 0 { 0 } else { flow.window },
            rate: flow.rate,
            seconds,
            sent: r.sent,
            delivered: r.delivered,
            delivered_per_second: r.delivered as f64 / seconds,
            lost: r.lost,
            server: r.server_cpu.map(|(pid, cpu, sys)| Server {
                pid,
                cpu_seconds: cpu,
                system_seconds: sys,
                cores: cpu / seconds,
                per_cpu_second: if cpu > 0.0 {
                    r.delivered as f64 / cpu
                } else {
                    0.0
                },
            }),
            client_cpu_seconds: r.client_cpu,
        }
    }

    /// A few lines for people.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} {}, {} B datagrams, {}\n  delivered {} in {:.1} s: {:.0}/s ({:.1} MB/s), lost {}\n",
            self.mode,
            self.pairs,
            if self.mode == "turn" { "clients" } else { "pairs" },
            self.size,
            if self.window > 0 {
                format!("window {} per direction", self.window)
            } else {
                format!("{} datagrams/s", self.rate)
            } + if self.gso { ", GSO/GRO" } else { "" },
            self.delivered,
            self.seconds,
            self.delivered_per_second,
            self.delivered_per_second * self.size as f64 / 1e6,
            self.lost
        );
        if let Some(v) = &self.server {
            s += &format!(
                "  server: {:.2} cores ({:.0} % in the kernel), {:.0} datagrams forwarded per server CPU-second\n",
                v.cores,
                100.0 * v.system_seconds / v.cpu_seconds.max(1e-9),
                v.per_cpu_second
            );
        }
        s
    }
}

/// One end of a flow through a relay: a connected UDP socket, the datagram it sends (the
/// sequence number goes at `seq_at`, 8 bytes), and the size of what it receives.
pub(crate) struct Side {
    pub(crate) sock: UdpSocket,
    pub(crate) tx: Vec<u8>,
    pub(crate) seq_at: usize,
    /// At most this many bytes per datagram received: an entry of n bytes read with GRO holds
    /// n / rx_size datagrams, rounded up.
    pub(crate) rx_size: usize,
    /// At least this many (below `rx_size` when the sender's datagrams may be padded).
    pub(crate) rx_min: usize,
    /// What every datagram received starts with (the setup's probe tells forwarded load from
    /// a late answer of the setup's own handshake by it and by the size).
    pub(crate) rx_prefix: Vec<u8>,
}

impl Side {
    /// Whether `d` is a load datagram of the other side's, as this side receives it.
    fn accepts(&self, d: &[u8]) -> bool {
        (self.rx_min..=self.rx_size).contains(&d.len()) && d.starts_with(&self.rx_prefix)
    }
}

/// Runs the mode. See the module docs.
pub async fn run(a: &UdpRelayArgs) -> Result<UdpRelayReport> {
    if a.pairs == 0 || a.size < GENEVE_LEN + 8 || a.size > 65_000 {
        bail!(
            "--pairs must be at least 1 and --size between {} and 65000 bytes",
            GENEVE_LEN + 8
        );
    }
    if let Some(pid) = a.run.server_pid {
        procfs::check_pid(pid)?;
    }
    let target = Target::resolve(&a.target)
        .await
        .context("the relay's URL")?;
    let mut sides: Vec<(Side, Side)> = Vec::with_capacity(a.pairs);
    // Kept open for the run (the sessions do not need them, but a relay may tie them).
    let mut conns: Vec<DerpConn> = Vec::with_capacity(2 * a.pairs);
    for p in 0..a.pairs {
        let mut ca = target.connect().await.context("DERP connection")?;
        let cb = target.connect().await.context("DERP connection")?;
        let ep = allocate(&mut ca, cb.key(), p as u32)
            .await
            .with_context(|| format!("pair {p}: UDP relay allocation"))?;
        let relay = ep
            .addrs
            .iter()
            .copied()
            .find(|x| x.is_ipv4() == target.addr.is_ipv4())
            .unwrap_or_else(|| SocketAddr::new(target.addr.ip(), ep.port));
        let sa = bind(&ca.secret, &ep, relay, cb.key(), a.size)
            .await
            .with_context(|| format!("pair {p}: binding side A to {relay}"))?;
        let sb = bind(&cb.secret, &ep, relay, ca.key(), a.size)
            .await
            .with_context(|| format!("pair {p}: binding side B to {relay}"))?;
        probe(&sa, &sb).with_context(|| format!("pair {p}: A -> B"))?;
        probe(&sb, &sa).with_context(|| format!("pair {p}: B -> A"))?;
        sides.push((sa, sb));
        conns.push(ca);
        conns.push(cb);
    }
    let (flow, run) = (a.flow.clone(), a.run.clone());
    let r = tokio::task::spawn_blocking(move || blast(sides, &flow, &run))
        .await
        .context("the sending thread")??;
    drop(conns);
    Ok(UdpRelayReport::new(
        "udp-relay",
        a.pairs,
        a.size,
        &a.flow,
        &a.run,
        &r,
    ))
}

/// Asks for a session for `c` and `other` over `c`'s DERP connection.
async fn allocate(c: &mut DerpConn, other: PublicKey, id: u32) -> Result<Endpoint> {
    let req = AllocRequest {
        id,
        keys: [c.key(), other],
    };
    let mut out = Vec::new();
    proto::put_frame(&mut out, FRAME_ALLOCATE, &[&req.encode()]);
    c.io.write_all(&out).await?;
    c.io.flush().await?;
    let answer = tokio::time::timeout(SETUP_TIMEOUT, async {
        loop {
            let Some(f) = c.read_frame().await? else {
                bail!("the relay closed the connection");
            };
            if f.frame_type == FRAME_ENDPOINT {
                return Ok(AllocResponse::parse(&f.payload)?);
            }
        }
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "no answer within {SETUP_TIMEOUT:?}: does the relay run a UDP relay? \
             (ferry-relay --udp-relay-listen; derper has none)"
        )
    })??;
    answer
        .result
        .map_err(|why| anyhow::anyhow!("the relay refused: {why}"))
}

/// Binds a new socket's address to the session (Bind → Challenge → Answer).
async fn bind(
    secret: &SecretKey,
    ep: &Endpoint,
    relay: SocketAddr,
    other: PublicKey,
    size: usize,
) -> Result<Side> {
    let local: SocketAddr = if relay.is_ipv4() {
        "127.0.0.1:0".parse().expect("literal")
    } else {
        "[::1]:0".parse().expect("literal")
    };
    let local = if relay.ip().is_loopback() {
        local
    } else if relay.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(local)?;
    sock.connect(relay)?;
    let _ = set_buffers(&sock);
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let msg = |kind, challenge| BindMsg {
        kind,
        vni: ep.vni,
        generation: 1,
        remote_key: other,
        challenge,
    };
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        sock.send(&msg(BindKind::Bind, [0; 32]).seal(secret, &ep.server_key))?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e.into()),
        };
        let Ok(m) = BindMsg::open(secret, &ep.server_key, &buf[..n]) else {
            continue;
        };
        if m.kind == BindKind::Challenge && m.vni == ep.vni {
            sock.send(&msg(BindKind::Answer, m.challenge).seal(secret, &ep.server_key))?;
            sock.set_nonblocking(true)?;
            let tx = frame(ep.vni, 0, size);
            return Ok(Side {
                sock,
                // Both sides' datagrams carry the session's header; the relay forwards them
                // unchanged (a Challenge has the control bit set: another header).
                rx_prefix: tx[..GENEVE_LEN].to_vec(),
                tx,
                seq_at: GENEVE_LEN,
                rx_size: size,
                rx_min: size,
            });
        }
    }
    bail!("no Challenge from {relay} within {SETUP_TIMEOUT:?} (is UDP to it blocked?)")
}

/// One datagram from `a` must reach `b` (both connected, non-blocking): retried for a while.
pub(crate) fn probe(a: &Side, b: &Side) -> Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut buf = [0u8; 65_536];
    while Instant::now() < deadline {
        a.sock.send(&a.tx)?;
        std::thread::sleep(Duration::from_millis(5));
        while let Ok(n) = b.sock.recv(&mut buf) {
            if b.accepts(&buf[..n]) {
                // Drain what else came (earlier tries), so the run starts with nothing queued.
                while b.sock.recv(&mut buf).is_ok() {}
                return Ok(());
            }
        }
    }
    bail!("the relay forwards nothing between the two bound sides")
}

/// A load datagram: Geneve header, sequence number, padding to `size`.
fn frame(vni: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut d = vec![0u8; size];
    d[..GENEVE_LEN].copy_from_slice(
        &Geneve {
            control: false,
            protocol: PROTO_LOAD,
            vni,
        }
        .encode(),
    );
    d[GENEVE_LEN..GENEVE_LEN + 8].copy_from_slice(&seq.to_be_bytes());
    d
}

/// 4 MiB socket buffers (best effort), so the generator's own sockets do not drop.
pub(crate) fn set_buffers(s: &UdpSocket) -> io::Result<()> {
    let v: libc::c_int = 4 << 20;
    for opt in [
        libc::SO_RCVBUF,
        libc::SO_SNDBUF,
        libc::SO_RCVBUFFORCE,
        libc::SO_SNDBUFFORCE,
    ] {
        // SAFETY: a valid fd and a c_int option of the stated size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    Ok(())
}

pub(crate) struct Totals {
    pub(crate) sent: u64,
    pub(crate) delivered: u64,
    pub(crate) lost: u64,
    /// pid, CPU seconds, of which system.
    pub(crate) server_cpu: Option<(u32, f64, f64)>,
    pub(crate) client_cpu: f64,
}

/// One direction: `from` sends, `to` receives.
struct Flow {
    from: usize,
    to: usize,
    inflight: u64,
    last_progress: Instant,
}

/// Drives every pair's two flows (a -> b, b -> a) from this thread until the run ends.
pub(crate) fn blast(sides: Vec<(Side, Side)>, b: &FlowArgs, run: &RunArgs) -> Result<Totals> {
    let socks: Vec<&Side> = sides.iter().flat_map(|(a, b)| [a, b]).collect();
    // With GSO, one send carries a burst (at most 64 datagrams and 64 KiB); each entry read may
    // hold a run of datagrams (GRO), so the receive buffer has room for a full one per entry.
    let bursts: Vec<usize> = socks
        .iter()
        .map(|s| {
            if b.gso {
                enable_gso(&s.sock, s.tx.len())?;
                Ok(BATCH.min(GSO_MAX_BYTES / s.tx.len()).max(1))
            } else {
                Ok(BATCH)
            }
        })
        .collect::<Result<_>>()?;
    let stride = if b.gso {
        65_536
    } else {
        socks.iter().map(|s| s.rx_size).max().unwrap_or(0) + 1
    };
    // Flow 2p: A -> B of pair p; 2p + 1: B -> A. Socket i receives flow i ^ 1.
    let now = Instant::now();
    let mut flows: Vec<Flow> = (0..socks.len())
        .map(|i| Flow {
            from: i,
            to: i ^ 1,
            inflight: 0,
            last_progress: now,
        })
        .collect();
    // Per socket, BATCH ready datagrams in one buffer; only the sequence numbers change.
    let mut batches: Vec<Vec<u8>> = socks.iter().map(|s| s.tx.repeat(BATCH)).collect();
    let mut rx = vec![0u8; BATCH * stride];
    let start = Instant::now();
    let measure_from = start + run.warmup;
    let stop_at = measure_from + run.duration;
    let mut cpu0: Option<((f64, f64), f64)> = None;
    let (mut sent, mut delivered, mut lost) = (0u64, 0u64, 0u64);
    let mut seq = 0u64;
    // Open loop: datagrams due so far, per flow.
    let per_flow_rate = b.rate as f64 / flows.len() as f64;
    let mut owed = vec![0f64; flows.len()];
    let mut last_tick = start;
    loop {
        let now = Instant::now();
        if cpu0.is_none() && now >= measure_from {
            let server = match run.server_pid {
                Some(p) => procfs::cpu_split(p)?,
                None => (0.0, 0.0),
            };
            cpu0 = Some((server, procfs::own_cpu_seconds()));
            sent = 0;
            delivered = 0;
        }
        if now >= stop_at {
            break;
        }
        let elapsed = now.duration_since(last_tick).as_secs_f64();
        last_tick = now;
        for (i, f) in flows.iter_mut().enumerate() {
            let want = if b.rate > 0 {
                owed[i] = (owed[i] + per_flow_rate * elapsed).min(BATCH as f64 * 4.0);
                owed[i] as usize
            } else {
                b.window.saturating_sub(f.inflight) as usize
            }
            .min(bursts[f.from]);
            if want > 0 {
                let s = socks[f.from];
                let n = send_batch(
                    &s.sock,
                    &mut batches[f.from],
                    (s.tx.len(), s.seq_at),
                    want,
                    &mut seq,
                    b.gso,
                );
                f.inflight += n as u64;
                if cpu0.is_some() {
                    sent += n as u64;
                }
                if b.rate > 0 {
                    owed[i] -= n as f64;
                }
            }
        }
        let mut busy = false;
        for f in flows.iter_mut() {
            let to = socks[f.to];
            let n = recv_batch(&to.sock, &mut rx, stride, to.rx_size) as u64;
            busy |= n > 0;
            if n > 0 {
                f.inflight = f.inflight.saturating_sub(n);
                f.last_progress = now;
                if cpu0.is_some() {
                    delivered += n;
                }
            } else if f.inflight > 0 && now.duration_since(f.last_progress) > b.loss_timeout {
                lost += f.inflight;
                f.inflight = 0;
                f.last_progress = now;
            }
        }
        if b.rate > 0 {
            std::thread::sleep(Duration::from_micros(200));
        } else if !busy {
            // Nothing came back: give the core away for a moment rather than spin (the
            // relay may share it).
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    let ((u0, s0), c0) = cpu0.unwrap_or(((0.0, 0.0), 0.0));
    let server_cpu = match run.server_pid {
        Some(p) => {
            let (u1, s1) = procfs::cpu_split(p)?;
            Some((p, (u1 - u0) + (s1 - s0), s1 - s0))
        }
        None => None,
    };
    Ok(Totals {
        sent,
        delivered,
        lost,
        server_cpu,
        client_cpu: procfs::own_cpu_seconds() - c0,
    })
}

/// Most bytes in one GSO send (a UDP datagram's payload limit, less room for IPv6).
const GSO_MAX_BYTES: usize = 65_000;

/// `UDP_SEGMENT` (every send larger than `size` is cut into `size`-byte datagrams by the
/// kernel) and `UDP_GRO` on `s`.
fn enable_gso(s: &UdpSocket, size: usize) -> Result<()> {
    for (opt, v, what) in [
        (
            libc::UDP_SEGMENT,
            size as libc::c_int,
            "UDP_SEGMENT (GSO, Linux 4.18+)",
        ),
        (libc::UDP_GRO, 1, "UDP_GRO (Linux 5.0+)"),
    ] {
        // SAFETY: a valid fd and a c_int option of the stated size.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_UDP,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            bail!(
                "--gso: this kernel refused {what}: {}",
                io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Sends up to `n` (≤ [`BATCH`]) of the `size`-byte datagrams in `buf` on a connected socket,
/// each with the next sequence number at `seq_at` (no allocation): with `gso`, as one send
/// that the kernel cuts into datagrams, else with sendmmsg. Returns how many went.
fn send_batch(
    sock: &UdpSocket,
    buf: &mut [u8],
    (size, seq_at): (usize, usize),
    n: usize,
    seq: &mut u64,
    gso: bool,
) -> usize {
    let n = n.min(BATCH);
    for k in 0..n {
        let o = k * size + seq_at;
        buf[o..o + 8].copy_from_slice(&(*seq + k as u64).to_be_bytes());
    }
    if gso {
        // SAFETY: n * size bytes of `buf` (BATCH * size long), live for the call.
        let r = unsafe {
            libc::send(
                sock.as_raw_fd(),
                buf.as_ptr().cast(),
                n * size,
                libc::MSG_DONTWAIT,
            )
        };
        let sent = if r > 0 { n } else { 0 };
        *seq += sent as u64;
        return sent;
    }
    // SAFETY: plain old data; zero is valid.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    let base = buf.as_mut_ptr();
    for k in 0..n {
        // SAFETY: k * size + size is inside `buf` (BATCH * size bytes).
        iov[k].iov_base = unsafe { base.add(k * size) }.cast();
        iov[k].iov_len = size;
        hdrs[k].msg_hdr.msg_iov = &mut iov[k];
        hdrs[k].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: the headers point at live buffers for the call; the socket is connected.
    let r = unsafe {
        libc::sendmmsg(
            sock.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n as _,
            libc::MSG_DONTWAIT as _,
        )
    };
    let sent = r.max(0) as usize;
    *seq += sent as u64;
    sent
}

/// Reads what is there (at most [`BATCH`] entries of `stride` bytes); returns how many
/// datagrams of `size` bytes (an entry holds several when the kernel coalesced them: GRO).
fn recv_batch(sock: &UdpSocket, rx: &mut [u8], stride: usize, size: usize) -> usize {
    // SAFETY: plain old data; zero is valid.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    let base = rx.as_mut_ptr();
    for k in 0..BATCH {
        // SAFETY: inside `rx` (BATCH * stride bytes).
        iov[k].iov_base = unsafe { base.add(k * stride) }.cast();
        iov[k].iov_len = stride;
        hdrs[k].msg_hdr.msg_iov = &mut iov[k];
        hdrs[k].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: as above.
    let r = unsafe {
        libc::recvmmsg(
            sock.as_raw_fd(),
            hdrs.as_mut_ptr(),
            BATCH as _,
            libc::MSG_DONTWAIT as _,
            std::ptr::null_mut(),
        )
    };
    hdrs.iter()
        .take(r.max(0) as usize)
        .map(|h| (h.msg_len as usize).div_ceil(size).max(1))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_the_session_and_a_sequence_number() {
        let d = frame(0x12_3456, 7, 1200);
        assert_eq!(d.len(), 1200);
        let g = Geneve::parse(&d).unwrap();
        assert_eq!(
            (g.vni, g.protocol, g.control),
            (0x12_3456, PROTO_LOAD, false)
        );
        assert_eq!(&d[GENEVE_LEN..GENEVE_LEN + 8], &7u64.to_be_bytes());
    }
}
