//! Load generator: floods a STUN server with Binding requests over UDP and counts valid answers.
//!
//! ```text
//! cargo run --release -p ferry-stun --example stun_flood -- \
//!     --target 127.0.0.1:3478 --sockets 4 --window 128 --seconds 5 [--warmup 1] [--pid PID]
//! ```
//!
//! One thread drives N sockets (Linux `sendmmsg`/`recvmmsg`, up to 64 datagrams per call).
//! Each socket keeps up to `window` requests in flight: it sends until the window is full,
//! then sleeps in `poll` until answers arrive, so the generator does not burn CPU the server
//! needs. A request unanswered for 200 ms is written off (counted as lost) so loss cannot stall
//! the run. An answer counts only if it is a Binding success response (0x0101) whose
//! transaction id is one this socket sent. With `--pid`, the server's CPU time (utime + stime
//! from `/proc/PID/stat`) over the measured interval is reported too, giving answers per
//! server CPU-second. Traffic goes only to `--target`; run it against loopback servers.
//!
//! Output: one line of `key=value` pairs, easy to grep and parse.

#[cfg(target_os = "linux")]
fn main() {
    if let Err(e) = linux::main() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("stun_flood uses recvmmsg/sendmmsg and runs on Linux only");
    std::process::exit(1);
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::mem::{size_of, zeroed};
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    const BATCH: usize = 64;
    const LOSS_TIMEOUT: Duration = Duration::from_millis(200);

    struct Args {
        target: SocketAddr,
        sockets: usize,
        window: usize,
        seconds: f64,
        warmup: f64,
        pid: Option<u32>,
    }

    fn parse_args() -> Result<Args, String> {
        let mut a = Args {
            target: "127.0.0.1:3478".parse().unwrap(),
            sockets: 4,
            window: 128,
            seconds: 5.0,
            warmup: 1.0,
            pid: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or(format!("{flag} needs a value"));
            let bad = |v: &str| format!("bad value {v:?} for {flag}");
            match flag.as_str() {
                "--target" => {
                    let v = value()?;
                    a.target = v.parse().map_err(|_| bad(&v))?;
                }
                "--sockets" => {
                    let v = value()?;
                    a.sockets = v.parse().map_err(|_| bad(&v))?;
                }
                "--window" => {
                    let v = value()?;
                    a.window = v.parse().map_err(|_| bad(&v))?;
                }
                "--seconds" => {
                    let v = value()?;
                    a.seconds = v.parse().map_err(|_| bad(&v))?;
                }
                "--warmup" => {
                    let v = value()?;
                    a.warmup = v.parse().map_err(|_| bad(&v))?;
                }
                "--pid" => {
                    let v = value()?;
                    a.pid = Some(v.parse().map_err(|_| bad(&v))?);
                }
                "-h" | "--help" => {
                    return Err(
                        "usage: stun_flood --target IP:PORT [--sockets N] [--window N] \
                                [--seconds S] [--warmup S] [--pid PID]"
                            .into(),
                    )
                }
                other => return Err(format!("unknown argument {other:?} (try --help)")),
            }
        }
        if a.sockets == 0 || a.window == 0 || a.seconds <= 0.0 {
            return Err("--sockets, --window and --seconds must be positive".into());
        }
        if !a.target.ip().is_loopback() {
            return Err(format!(
                "{} is not a loopback address; this flood tool only targets servers on this \
                 machine",
                a.target
            ));
        }
        Ok(a)
    }

    /// Server CPU time in seconds (user + system), from /proc/PID/stat.
    fn cpu_seconds(pid: u32) -> io::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the ")" that closes the command name: state is field 3, utime 14, stime 15.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| io::Error::other("unexpected /proc stat format"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields[11].parse().map_err(io::Error::other)?;
        let stime: f64 = fields[12].parse().map_err(io::Error::other)?;
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok((utime + stime) / ticks)
    }

    fn own_cpu_seconds() -> f64 {
        // SAFETY: getrusage writes into the zeroed struct we pass.
        let mut ru: libc::rusage = unsafe { zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }

    struct Flow {
        sock: UdpSocket,
        tag: u32,
        seq: u32,
        inflight: usize,
        last_progress: Instant,
        requests: Vec<u8>,
        replies: Vec<u8>,
    }

    const REQ: usize = 20;
    const REPLY_BUF: usize = 128;

    impl Flow {
        /// Send up to `n` requests with sendmmsg; returns how many went out.
        fn send(&mut self, n: usize, target: &libc::sockaddr_in) -> usize {
            let n = n.min(BATCH);
            for k in 0..n {
                let mut txid = [0u8; 12];
                txid[..4].copy_from_slice(&self.tag.to_be_bytes());
                txid[4..8].copy_from_slice(&self.seq.wrapping_add(k as u32).to_be_bytes());
                ferry_proto::stun::encode_binding_request(
                    &txid,
                    None,
                    false,
                    &mut self.requests[k * REQ..(k + 1) * REQ],
                );
            }
            // SAFETY: plain old data.
            let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
            let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
            let base = self.requests.as_mut_ptr();
            for k in 0..n {
                iov[k].iov_base = unsafe { base.add(k * REQ) }.cast();
                iov[k].iov_len = REQ;
                let h = &mut hdrs[k].msg_hdr;
                h.msg_name = (target as *const libc::sockaddr_in).cast_mut().cast();
                h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                h.msg_iov = &mut iov[k];
                h.msg_iovlen = 1;
            }
            // SAFETY: headers point at live buffers for the duration of the call.
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
            self.seq = self.seq.wrapping_add(sent as u32);
            self.inflight += sent;
            sent
        }

        /// Read available replies; returns (valid, invalid).
        fn recv(&mut self) -> (usize, usize) {
            // SAFETY: plain old data.
            let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
            let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
            let base = self.replies.as_mut_ptr();
            for k in 0..BATCH {
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
                return (0, 0);
            }
            let (mut ok, mut bad) = (0, 0);
            for (k, h) in hdrs.iter().enumerate().take(r as usize) {
                let msg = &self.replies[k * REPLY_BUF..k * REPLY_BUF + h.msg_len as usize];
                let valid = ferry_proto::stun::success_txid(msg)
                    .is_some_and(|t| t[..4] == self.tag.to_be_bytes());
                if valid {
                    ok += 1;
                } else {
                    bad += 1;
                }
            }
            self.inflight = self.inflight.saturating_sub(r as usize);
            self.last_progress = Instant::now();
            (ok, bad)
        }
    }

    #[derive(Default, Clone, Copy)]
    struct Totals {
        answers: u64,
        invalid: u64,
        lost: u64,
    }

    pub(super) fn main() -> Result<(), String> {
        let args = parse_args()?;
        let SocketAddr::V4(t4) = args.target else {
            return Err("only IPv4 targets are supported".into());
        };
        // SAFETY: plain old data.
        let mut target: libc::sockaddr_in = unsafe { zeroed() };
        target.sin_family = libc::AF_INET as libc::sa_family_t;
        target.sin_port = t4.port().to_be();
        target.sin_addr.s_addr = u32::from(*t4.ip()).to_be();

        let mut flows = Vec::new();
        for i in 0..args.sockets {
            let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            sock.set_nonblocking(true).map_err(|e| e.to_string())?;
            flows.push(Flow {
                sock,
                tag: 0x5EED_0000 + i as u32,
                seq: 0,
                inflight: 0,
                last_progress: Instant::now(),
                requests: vec![0; BATCH * REQ],
                replies: vec![0; BATCH * REPLY_BUF],
            });
        }

        let start = Instant::now();
        let measure_from = start + Duration::from_secs_f64(args.warmup);
        let end = measure_from + Duration::from_secs_f64(args.seconds);
        let mut measuring = false;
        let mut totals = Totals::default();
        let (mut cpu0, mut own0, mut t0) = (0.0, 0.0, Instant::now());
        let mut pollfds: Vec<libc::pollfd> = flows
            .iter()
            .map(|f| libc::pollfd {
                fd: f.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        loop {
            let now = Instant::now();
            if !measuring && now >= measure_from {
                measuring = true;
                totals = Totals::default();
                cpu0 = match args.pid {
                    Some(p) => cpu_seconds(p).map_err(|e| format!("/proc/{p}/stat: {e}"))?,
                    None => 0.0,
                };
                own0 = own_cpu_seconds();
                t0 = Instant::now();
            }
            if now >= end {
                break;
            }
            let mut progress = false;
            for f in flows.iter_mut() {
                loop {
                    let (ok, bad) = f.recv();
                    totals.answers += ok as u64;
                    totals.invalid += bad as u64;
                    if ok + bad == 0 {
                        break;
                    }
                    progress = true;
                }
                if f.inflight > 0 && f.last_progress.elapsed() > LOSS_TIMEOUT {
                    totals.lost += f.inflight as u64;
                    f.inflight = 0;
                }
                while f.inflight < args.window {
                    let was_idle = f.inflight == 0;
                    if f.send(args.window - f.inflight, &target) == 0 {
                        break;
                    }
                    if was_idle {
                        f.last_progress = Instant::now();
                    }
                    progress = true;
                }
            }
            if !progress {
                // Everything is in flight: sleep until an answer arrives (or 10 ms pass).
                // SAFETY: pollfds is a valid array of the given length.
                unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as _, 10) };
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let server_cpu = match args.pid {
            Some(p) => Some(cpu_seconds(p).map_err(|e| format!("/proc/{p}/stat: {e}"))? - cpu0),
            None => None,
        };
        let own_cpu = own_cpu_seconds() - own0;
        let rate = totals.answers as f64 / secs;
        let mut line = format!(
            "answers={} invalid={} lost={} seconds={secs:.3} answers_per_sec={rate:.0} \
             flood_cpu_seconds={own_cpu:.3}",
            totals.answers, totals.invalid, totals.lost
        );
        if let Some(cpu) = server_cpu {
            line.push_str(&format!(
                " server_cpu_seconds={cpu:.3} server_cores={:.2} answers_per_server_cpu_sec={:.0}",
                cpu / secs,
                if cpu > 0.0 {
                    totals.answers as f64 / cpu
                } else {
                    0.0
                }
            ));
        }
        println!("{line}");
        Ok(())
    }
}
