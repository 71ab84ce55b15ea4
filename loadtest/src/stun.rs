//! STUN mode: pipelined Binding requests over UDP (RFC 8489), answers/s, latency, loss.
//!
//! One OS thread drives every socket with `sendmmsg`/`recvmmsg` (up to 64 datagrams a call), so
//! the generator is cheap next to the server it measures. Each socket is connected to the
//! target and keeps `window` requests in flight; the transaction id holds the socket's tag and
//! a sequence number, whose send time sits in a ring, so every answer is matched to its request
//! (latency) and a request still unanswered after the loss timeout is written off (loss).

use std::io;
use std::mem::zeroed;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

use crate::cli::StunArgs;
use ferry_proto::stun;

use crate::procfs;
use crate::progress::{Meter, Sampler};
use crate::report::{self, Hist, Report, ServerStats, Settings, Stun};

const BATCH: usize = 64;
const REQ_MAX: usize = 40;
const REPLY_BUF: usize = 256;
const RING: usize = 1 << 16;
const TAG_BASE: u32 = 0x464C_5400;
/// SOFTWARE value Tailscale's clients send; derper answers only requests that carry it.
const TAILSCALE_SOFTWARE: &[u8] = b"tailnode";

/// A Binding request with this transaction id, written into `out`. `tailscale` adds
/// SOFTWARE=tailnode and a FINGERPRINT, as Tailscale's clients send and derper requires.
pub fn binding_request(txid: &[u8; 12], tailscale: bool, out: &mut [u8]) -> usize {
    stun::encode_binding_request(
        txid,
        tailscale.then_some(TAILSCALE_SOFTWARE),
        tailscale,
        out,
    )
}

/// Whether `msg` is a well-formed Binding success response; returns its transaction id.
pub use ferry_proto::stun::success_txid;

struct Flow {
    sock: UdpSocket,
    tag: u32,
    /// Next sequence number to send.
    seq: u64,
    /// Lowest sequence number that may still be outstanding.
    lo: u64,
    inflight: usize,
    /// Send time (ns since the epoch, 0 = not outstanding) and sequence number per ring slot.
    sent_at: Vec<u64>,
    slot_seq: Vec<u64>,
    reqs: Vec<u8>,
    replies: Vec<u8>,
}

#[derive(Debug)]
struct Totals {
    requests: u64,
    answers: u64,
    answers_in_window: u64,
    invalid: u64,
    lost: u64,
    late: u64,
    hist: Histogram<u64>,
}

struct Ctx {
    epoch: Instant,
    measure_from: Instant,
    stop_at: Instant,
    window: usize,
    loss_timeout: Duration,
    tailscale: bool,
    meter: Arc<Meter>,
}

impl Flow {
    fn send(&mut self, n: usize, ctx: &Ctx, tot: &mut Totals) -> usize {
        let n = n.min(BATCH);
        let mut lens = [0usize; BATCH];
        for (k, len) in lens.iter_mut().enumerate().take(n) {
            let mut txid = [0u8; 12];
            txid[..4].copy_from_slice(&self.tag.to_be_bytes());
            txid[4..].copy_from_slice(&(self.seq + k as u64).to_be_bytes());
            *len = binding_request(
                &txid,
                ctx.tailscale,
                &mut self.reqs[k * REQ_MAX..(k + 1) * REQ_MAX],
            );
        }
        // SAFETY: plain old data, zero is a valid value.
        let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let base = self.reqs.as_mut_ptr();
        for k in 0..n {
            // SAFETY: k * REQ_MAX is inside `reqs` (BATCH * REQ_MAX bytes).
            iov[k].iov_base = unsafe { base.add(k * REQ_MAX) }.cast();
            iov[k].iov_len = lens[k];
            hdrs[k].msg_hdr.msg_iov = &mut iov[k];
            hdrs[k].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the headers point at live buffers for the duration of the call; the socket
        // is connected, so no destination address is needed.
        let r = unsafe {
            libc::sendmmsg(
                self.sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                n as _,
                libc::MSG_DONTWAIT as _,
            )
        };
        if r <= 0 {
            return 0;
        }
        let sent = r as usize;
        let now = ctx.epoch.elapsed().as_nanos() as u64;
        for k in 0..sent as u64 {
            let s = self.seq + k;
            let slot = (s as usize) & (RING - 1);
            if self.sent_at[slot] != 0 {
                // The ring wrapped over a request that is still outstanding: write it off.
                self.sent_at[slot] = 0;
                self.inflight -= 1;
                tot.lost += 1;
            }
            self.sent_at[slot] = now.max(1);
            self.slot_seq[slot] = s;
        }
        self.seq += sent as u64;
        self.inflight += sent;
        tot.requests += sent as u64;
        sent
    }

    /// Reads what is there; returns how many datagrams came in.
    fn recv(&mut self, ctx: &Ctx, tot: &mut Totals) -> usize {
        // SAFETY: plain old data, zero is a valid value.
        let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let base = self.replies.as_mut_ptr();
        for k in 0..BATCH {
            // SAFETY: inside `replies` (BATCH * REPLY_BUF bytes).
            iov[k].iov_base = unsafe { base.add(k * REPLY_BUF) }.cast();
            iov[k].iov_len = REPLY_BUF;
            hdrs[k].msg_hdr.msg_iov = &mut iov[k];
            hdrs[k].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: as in send.
        let r = unsafe {
            libc::recvmmsg(
                self.sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as _,
                libc::MSG_DONTWAIT as _,
                std::ptr::null_mut(),
            )
        };
        if r <= 0 {
            return 0;
        }
        let now_i = Instant::now();
        let now = now_i.duration_since(ctx.epoch).as_nanos() as u64;
        let in_window = now_i >= ctx.measure_from && now_i < ctx.stop_at;
        let mut ok = 0u64;
        for (k, h) in hdrs.iter().enumerate().take(r as usize) {
            let msg = &self.replies[k * REPLY_BUF..k * REPLY_BUF + h.msg_len as usize];
            let Some(txid) = success_txid(msg) else {
                tot.invalid += 1;
                continue;
            };
            if txid[..4] != self.tag.to_be_bytes() {
                tot.invalid += 1;
                continue;
            }
            let s = u64::from_be_bytes(txid[4..].try_into().expect("8 bytes"));
            let slot = (s as usize) & (RING - 1);
            if self.slot_seq[slot] == s && self.sent_at[slot] != 0 {
                let rtt = now.saturating_sub(self.sent_at[slot]);
                self.sent_at[slot] = 0;
                self.inflight -= 1;
                tot.answers += 1;
                ok += 1;
                if in_window {
                    tot.answers_in_window += 1;
                    report::record(&mut tot.hist, Duration::from_nanos(rtt));
                }
            } else {
                tot.late += 1;
            }
        }
        if ok > 0 {
            ctx.meter.add(ok, 0);
        }
        r as usize
    }

    /// Writes off requests older than the loss timeout (or all, with `all`).
    fn expire(&mut self, ctx: &Ctx, tot: &mut Totals, all: bool) {
        let now = ctx.epoch.elapsed().as_nanos() as u64;
        let timeout = ctx.loss_timeout.as_nanos() as u64;
        while self.lo < self.seq {
            let slot = (self.lo as usize) & (RING - 1);
            if self.slot_seq[slot] != self.lo || self.sent_at[slot] == 0 {
                self.lo += 1;
                continue;
            }
            if all || now.saturating_sub(self.sent_at[slot]) > timeout {
                self.sent_at[slot] = 0;
                self.inflight -= 1;
                tot.lost += 1;
                self.lo += 1;
                continue;
            }
            break;
        }
    }
}

fn flood(mut flows: Vec<Flow>, ctx: Ctx) -> Totals {
    let mut tot = Totals {
        requests: 0,
        answers: 0,
        answers_in_window: 0,
        invalid: 0,
        lost: 0,
        late: 0,
        hist: report::new_hist(),
    };
    let mut pollfds: Vec<libc::pollfd> = flows
        .iter()
        .map(|f| libc::pollfd {
            fd: f.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut sending = true;
    let mut drain_until = ctx.stop_at;
    loop {
        let now = Instant::now();
        if sending && now >= ctx.stop_at {
            sending = false;
            drain_until = now + ctx.loss_timeout;
        }
        if !sending && (now >= drain_until || flows.iter().all(|f| f.inflight == 0)) {
            break;
        }
        let mut progress = false;
        for f in flows.iter_mut() {
            while f.recv(&ctx, &mut tot) > 0 {
                progress = true;
            }
            f.expire(&ctx, &mut tot, false);
            while sending && f.inflight < ctx.window {
                if f.send(ctx.window - f.inflight, &ctx, &mut tot) == 0 {
                    break;
                }
                progress = true;
            }
        }
        if !progress {
            // Everything is in flight: sleep until an answer arrives (at most 5 ms).
            // SAFETY: pollfds is a valid array of the given length.
            unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as _, 5) };
        }
    }
    for f in flows.iter_mut() {
        f.expire(&ctx, &mut tot, true);
    }
    tot
}

/// Runs `stun` mode.
pub async fn run(a: &StunArgs) -> Result<Report> {
    let tailscale = a.tailscale;
    if a.sockets == 0 || a.window == 0 {
        anyhow::bail!("--sockets and --window must be at least 1");
    }
    if a.window > RING / 2 {
        anyhow::bail!("--window must be at most {}", RING / 2);
    }
    if let Some(pid) = a.run.server_pid {
        procfs::check_pid(pid)?;
    }
    let mut rep = Report::new(
        "stun",
        &a.target.to_string(),
        Settings {
            sockets: Some(a.sockets as u64),
            window: Some(a.window as u64),
            warmup_seconds: a.run.warmup.as_secs_f64(),
            duration_seconds: a.run.duration.as_secs_f64(),
            ..Default::default()
        },
    );
    let cpu_start = procfs::own_cpu_seconds();
    let mut flows = Vec::with_capacity(a.sockets);
    for i in 0..a.sockets {
        let bind: SocketAddr = match a.target.ip() {
            IpAddr::V4(v4) if v4.is_loopback() => {
                (Ipv4Addr::new(127, 0, 0, 1 + (i % 32) as u8), 0).into()
            }
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock =
            UdpSocket::bind(bind).with_context(|| format!("binding a UDP socket to {bind}"))?;
        sock.connect(a.target)
            .with_context(|| format!("connecting a UDP socket to {}", a.target))?;
        sock.set_nonblocking(true)?;
        flows.push(Flow {
            sock,
            tag: TAG_BASE + i as u32,
            seq: 0,
            lo: 0,
            inflight: 0,
            sent_at: vec![0; RING],
            slot_seq: vec![u64::MAX; RING],
            reqs: vec![0; BATCH * REQ_MAX],
            replies: vec![0; BATCH * REPLY_BUF],
        });
    }
    probe(&flows[0], a.target, tailscale)?;

    let epoch = Instant::now();
    let measure_from = epoch + a.run.warmup;
    let stop_at = measure_from + a.run.duration;
    let meter = Arc::new(Meter::default());
    let sampler = Sampler::timed(Arc::clone(&meter), epoch, &a.run, "answers");
    let ctx = Ctx {
        epoch,
        measure_from,
        stop_at,
        window: a.window,
        loss_timeout: a.loss_timeout,
        tailscale,
        meter,
    };
    let worker = tokio::task::spawn_blocking(move || flood(flows, ctx));
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = a.run.server_pid.map(procfs::cpu_seconds).transpose()?;
    tokio::time::sleep_until(stop_at.into()).await;
    let cpu1 = a.run.server_pid.map(procfs::cpu_seconds).transpose()?;
    let tot = worker.await.context("STUN worker panicked")?;
    rep.timeline = sampler.finish().await;

    let secs = a.run.duration.as_secs_f64();
    rep.measured_seconds = secs;
    rep.stun = Some(Stun {
        requests: tot.requests,
        answers: tot.answers,
        invalid: tot.invalid,
        lost: tot.lost,
        late: tot.late,
        loss_ratio: if tot.requests > 0 {
            tot.lost as f64 / tot.requests as f64
        } else {
            0.0
        },
        answers_in_window: tot.answers_in_window,
        answers_per_second: tot.answers_in_window as f64 / secs,
        tailscale_style: tailscale,
    });
    rep.latency.stun = Hist::from_ns(&tot.hist);
    if tot.answers == 0 {
        rep.warnings.push(format!(
            "no valid answer from {} in the whole run{}",
            a.target,
            if tailscale {
                ""
            } else {
                " (derper answers only Tailscale-style requests: try --tailscale)"
            }
        ));
    }
    if let (Some(pid), Some(c0), Some(c1)) = (a.run.server_pid, cpu0, cpu1) {
        let cpu = c1 - c0;
        rep.server = Some(ServerStats {
            pid,
            cpu_seconds: cpu,
            cores: cpu / secs,
            rss_bytes: procfs::status_bytes(pid, "VmRSS")?,
            peak_rss_bytes: procfs::status_bytes(pid, "VmHWM")?,
            per_cpu_second: (cpu > 0.0).then(|| tot.answers_in_window as f64 / cpu),
        });
    }
    rep.client.cpu_seconds = procfs::own_cpu_seconds() - cpu_start;
    rep.client.source_addresses = a.sockets.min(32) as u64;
    rep.client.nofile_limit = crate::limits::nofile_soft();
    Ok(rep)
}

/// One request before the run: a server that does not answer at all gets a clear error.
fn probe(f: &Flow, target: SocketAddr, tailscale: bool) -> Result<()> {
    let mut req = [0u8; REQ_MAX];
    let txid = *b"ferry-probe!";
    let len = binding_request(&txid, tailscale, &mut req);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; REPLY_BUF];
    let mut next_send = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= next_send {
            match f.sock.send(&req[..len]) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e).context(format!("sending to {target}")),
            }
            next_send = Instant::now() + Duration::from_millis(200);
        }
        match f.sock.recv(&mut buf) {
            Ok(n) => {
                if success_txid(&buf[..n]) == Some(txid) {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                anyhow::bail!(
                    "{target} refused the STUN request (ICMP port unreachable): nothing listens on that UDP port"
                )
            }
            Err(e) => return Err(e).context(format!("receiving from {target}")),
        }
    }
    anyhow::bail!(
        "{target} sent no STUN Binding success answer within 2 s{}",
        if tailscale {
            ""
        } else {
            " (derper answers only Tailscale-style requests: add --tailscale)"
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_well_formed() {
        let mut b = [0u8; REQ_MAX];
        let n = binding_request(&[9; 12], false, &mut b);
        assert_eq!(n, 20);
        assert_eq!(&b[..4], &[0, 1, 0, 0]);
        assert_eq!(&b[4..8], &stun::COOKIE_BYTES);
        let n = binding_request(&[9; 12], true, &mut b);
        assert_eq!(n, 40);
        assert_eq!(u16::from_be_bytes([b[2], b[3]]), 20);
        assert_eq!(&b[24..32], b"tailnode");
        let m = stun::Message::parse(&b[..n]).unwrap();
        assert_eq!(m.fingerprint(), stun::FingerprintStatus::Valid);
    }

    #[test]
    fn answers_are_checked() {
        let mut ok = vec![0x01, 0x01, 0, 12];
        ok.extend_from_slice(&stun::COOKIE_BYTES);
        ok.extend_from_slice(&[7; 12]);
        ok.extend_from_slice(&[0; 12]);
        assert_eq!(success_txid(&ok), Some([7; 12]));
        let mut bad_len = ok.clone();
        bad_len[3] = 16;
        assert_eq!(success_txid(&bad_len), None);
        let mut error = ok.clone();
        error[1] = 0x11;
        assert_eq!(success_txid(&error), None);
    }
}
