//! Stock Tailscale nodes through ferry, as a Headscale user runs them: Headscale v0.27.1 as the
//! control server with ferry as the tailnet's only DERP region (the map from
//! `ferry-relay derpmap --format headscale`) and Headscale's `/verify` as ferry's verify URL, two
//! `tailscaled` v1.102.5 in userspace-networking mode forced onto the relay path
//! (`TS_DEBUG_ALWAYS_USE_DERP=1`). Everything runs in a network namespace that has only `lo`:
//! nothing leaves the machine (`--no-logs-no-support`, no DERP URLs in Headscale).
//!
//! Checks: `tailscale netcheck` (UDP, ferry's region and latency), `tailscale ping` via
//! DERP(ferry), a node not in the tailnet refused through `/verify`, 64 MiB through the nodes'
//! SOCKS5 and inbound forwarding with a SHA-256 and ferry's counters showing the bytes, and a
//! second transfer that survives a SIGTERM and restart of ferry in the middle.
//!
//! Needs root (network namespaces) and `tailscaled`, `tailscale`, `headscale` from
//! `scripts/test-deps.sh`; skipped with a note otherwise, except under CI.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::require;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-relay");
const RELAY_HOST: &str = "derp.ferry.test";
const DERP_PORT: u16 = 8443;
const METRICS: &str = "127.0.0.1:9090";
const HEADSCALE: &str = "127.0.0.1:8080";
const SINK_PORT: u16 = 5201;
const SHUTDOWN_TIMEOUT_S: u64 = 5;

/// A network namespace with only `lo` up, and the processes started in it. Dropping it kills
/// them and deletes the namespace (also when the test fails).
struct Ns {
    name: String,
    dir: tempfile::TempDir,
    procs: Vec<Child>,
}

impl Ns {
    fn create() -> Result<Ns, String> {
        let name = format!("ferryts-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = |c: &mut Command| -> Result<(), String> {
            let out = c.output().map_err(|e| e.to_string())?;
            out.status
                .success()
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string())
        };
        ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Ns {
            name,
            dir: tempfile::tempdir().unwrap(),
            procs: Vec::new(),
        };
        ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// `prog args` inside the namespace.
    fn cmd(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(prog);
        c
    }

    /// Starts a long-running process; its output goes to `<dir>/<log>`.
    fn spawn(&mut self, mut c: Command, log: &str) -> usize {
        let f = std::fs::File::create(self.path(log)).unwrap();
        c.stdout(f.try_clone().unwrap()).stderr(f);
        self.procs.push(c.spawn().unwrap());
        self.procs.len() - 1
    }

    /// Runs a command to its end (at most `limit`); its stdout, or why it failed.
    fn run(&self, mut c: Command, limit: Duration) -> Result<String, String> {
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let o = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let e = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (o, e) = (o.join().unwrap(), e.join().unwrap());
        match status {
            Some(s) if s.success() => Ok(o),
            Some(s) => Err(format!("{c:?}: {s}\n{o}{e}")),
            None => Err(format!("{c:?}: still running after {limit:?}\n{o}{e}")),
        }
    }

    /// Runs `f` on a thread that has joined the namespace (sockets made there stay in it).
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        use std::os::fd::AsRawFd;
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: a valid namespace fd; setns changes only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the namespace thread panicked")
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", p]).output();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A plain HTTP GET from inside the namespace (ferry's metrics).
fn http_get(ns: &Ns, addr: &'static str, path: &'static str) -> String {
    ns.within(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            (s == series).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn relay_args(ns: &Ns) -> Vec<String> {
    [
        "--listen",
        &format!("127.0.0.1:{DERP_PORT}"),
        "--hostname",
        RELAY_HOST,
        "--key-file",
        ns.path("relay.key").to_str().unwrap(),
        "--stun-listen",
        "127.0.0.1:3478",
        "--http-listen",
        "off",
        "--metrics-listen",
        METRICS,
        "--shutdown-timeout",
        &format!("{SHUTDOWN_TIMEOUT_S}s"),
    ]
    .map(str::to_string)
    .to_vec()
}

/// Starts ferry-relay in the namespace with Headscale's `/verify` as its verify URL; returns
/// its index in `ns.procs` once it said it is ready.
fn start_relay(ns: &mut Ns, log: &str) -> usize {
    let mut c = ns.cmd(BIN);
    c.args(relay_args(ns))
        .args(["--verify-client-url", &format!("http://{HEADSCALE}/verify")])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(ns.path(log)).unwrap());
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains(" ready: "), "no ready line: {line:?}");
    ns.procs.push(child);
    ns.procs.len() - 1
}

fn headscale_config(ns: &Ns) -> String {
    let d = ns.dir.path().display();
    format!(
        "server_url: http://{HEADSCALE}
listen_addr: {HEADSCALE}
metrics_listen_addr: 127.0.0.1:9091
grpc_listen_addr: 127.0.0.1:50443
noise:
  private_key_path: {d}/noise_private.key
prefixes:
  v4: 100.64.0.0/10
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: false
  urls: []
  paths:
    - {d}/derp.yaml
  auto_update_enabled: false
disable_check_updates: true
database:
  type: sqlite
  sqlite:
    path: {d}/headscale.sqlite
log:
  level: info
dns:
  magic_dns: false
  base_domain: ferry.test
  override_local_dns: false
  nameservers:
    global: []
unix_socket: {d}/headscale.sock
unix_socket_permission: \"0770\"
logtail:
  enabled: false
"
    )
}

/// A `tailscale` command for node `n`.
fn tailscale(ns: &Ns, bin: &Path, n: usize) -> Command {
    let mut c = ns.cmd(bin);
    c.arg("--socket").arg(ns.path(&format!("node{n}.sock")));
    c
}

/// Deterministic bytes: a transfer's content, so both ends can hash it.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// What a receiver got: bytes, SHA-256, and the longest time between two reads.
struct Received {
    bytes: u64,
    sha: [u8; 32],
    longest_gap: Duration,
}

/// Sends `n` bytes from node 1 (its SOCKS5 server) to `to:SINK_PORT` (node 2 forwards it to a
/// listener on the namespace's loopback); returns (sent SHA-256, received). `progress` counts
/// bytes received as they arrive.
fn transfer(
    ns: &Ns,
    socks: SocketAddr,
    to: Ipv4Addr,
    n: u64,
    progress: Arc<AtomicU64>,
) -> std::thread::JoinHandle<([u8; 32], Received)> {
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a valid namespace fd; setns changes only this thread (and the sink's, which
        // inherits nothing: it joins on its own below).
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let listener = TcpListener::bind(("127.0.0.1", SINK_PORT)).unwrap();
        let sink = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let (mut bytes, mut last, mut longest_gap) = (0u64, Instant::now(), Duration::ZERO);
            loop {
                let k = c.read(&mut buf).expect("the transfer stalled for 60 s");
                if k == 0 {
                    break;
                }
                longest_gap = longest_gap.max(last.elapsed());
                last = Instant::now();
                h.update(&buf[..k]);
                bytes += k as u64;
                progress.store(bytes, Ordering::SeqCst);
            }
            Received {
                bytes,
                sha: h.finalize().into(),
                longest_gap,
            }
        });
        let mut s = TcpStream::connect(socks).unwrap();
        s.write_all(&[5, 1, 0]).unwrap();
        let mut r = [0u8; 2];
        s.read_exact(&mut r).unwrap();
        assert_eq!(r, [5, 0], "SOCKS5: no-auth refused");
        let mut req = vec![5, 1, 0, 1];
        req.extend_from_slice(&to.octets());
        req.extend_from_slice(&SINK_PORT.to_be_bytes());
        s.write_all(&req).unwrap();
        let mut r = [0u8; 10];
        s.read_exact(&mut r).unwrap();
        assert_eq!(r[1], 0, "SOCKS5 CONNECT to {to}:{SINK_PORT} failed: {r:?}");
        let mut h = Sha256::new();
        let (mut state, mut left) = (0x9e37_79b9_7f4a_7c15u64, n);
        let mut buf = vec![0u8; 1 << 16];
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            fill(&mut buf[..k], &mut state);
            s.write_all(&buf[..k]).unwrap();
            h.update(&buf[..k]);
            left -= k as u64;
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let got = sink.join().unwrap();
        (h.finalize().into(), got)
    })
}

#[test]
fn stock_tailscale_nodes_under_headscale_use_ferry_as_their_derp_region() {
    let (Some(tailscaled), Some(tailscale_bin), Some(headscale)) = (
        require("tailscaled", "scripts/test-deps.sh"),
        require("tailscale", "scripts/test-deps.sh"),
        require("headscale", "scripts/test-deps.sh"),
    ) else {
        return;
    };
    let mut ns = match Ns::create() {
        Ok(ns) => ns,
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("network namespaces are needed under CI (CI runs as root): {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: needs root for a network namespace (CI runs as root): {why}");
            return;
        }
    };

    // 1. ferry, then its DERP map for Headscale (the self-signed certificate's pin included).
    let relay = start_relay(&mut ns, "relay-1.log");
    let map = ns
        .run(
            {
                let mut c = ns.cmd(BIN);
                c.arg("derpmap")
                    .args(["--format", "headscale"])
                    .args(relay_args(&ns))
                    .args(["--ipv4", "127.0.0.1"]);
                c
            },
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(map.contains("certname: \"sha256-raw:"), "{map}");
    std::fs::write(ns.path("derp.yaml"), &map).unwrap();

    // 2. Headscale with ferry as the only region, a user and a pre-auth key.
    let hs_cfg = ns.path("headscale.yaml");
    std::fs::write(&hs_cfg, headscale_config(&ns)).unwrap();
    {
        let mut c = ns.cmd(&headscale);
        c.arg("-c").arg(&hs_cfg).arg("serve");
        ns.spawn(c, "headscale.log");
    }
    let hs = |args: &[&str]| {
        let mut c = ns.cmd(&headscale);
        c.arg("-c").arg(&hs_cfg).args(args);
        ns.run(c, Duration::from_secs(30))
    };
    wait_until("Headscale listening", Duration::from_secs(30), || {
        ns.within(|| TcpStream::connect(HEADSCALE).is_ok())
    });
    hs(&["users", "create", "ferry"]).unwrap();
    let key = hs(&[
        "preauthkeys",
        "create",
        "--user",
        "1",
        "--reusable",
        "--expiration",
        "1h",
    ])
    .unwrap()
    .trim()
    .lines()
    .last()
    .unwrap()
    .to_string();

    // 3. Two stock tailscaled, userspace networking, relay path forced, SOCKS5 on node 1.
    for n in 1..=2 {
        let mut c = ns.cmd(&tailscaled);
        c.arg("--tun=userspace-networking")
            .arg(format!(
                "--statedir={}",
                ns.path(&format!("node{n}")).display()
            ))
            .arg(format!(
                "--socket={}",
                ns.path(&format!("node{n}.sock")).display()
            ))
            .arg(format!("--port={}", 41640 + n))
            .arg("--no-logs-no-support")
            .arg(format!("--socks5-server=127.0.0.1:{}", 1080 + n))
            .env("TS_ASSUME_NETWORK_UP_FOR_TEST", "1")
            .env("TS_DEBUG_ALWAYS_USE_DERP", "1")
            .env("TS_NO_LOGS_NO_SUPPORT", "true");
        ns.spawn(c, &format!("tailscaled-{n}.log"));
    }
    let mut ips = Vec::new();
    for n in 1..=2 {
        let sock = ns.path(&format!("node{n}.sock"));
        wait_until("tailscaled's socket", Duration::from_secs(30), || {
            sock.exists()
        });
        let mut up = tailscale(&ns, &tailscale_bin, n);
        up.args(["up", "--login-server", &format!("http://{HEADSCALE}")])
            .args(["--authkey", &key, "--hostname", &format!("node{n}")])
            .args(["--timeout", "60s"]);
        ns.run(up, Duration::from_secs(90)).unwrap();
        let mut ip = tailscale(&ns, &tailscale_bin, n);
        ip.args(["ip", "-4"]);
        let ip: Ipv4Addr = ns
            .run(ip, Duration::from_secs(10))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        ips.push(ip);
    }
    eprintln!("nodes up: {ips:?}");

    // 4. netcheck: UDP works (ferry's STUN), and ferry's region is the nearest, with a latency.
    let mut c = tailscale(&ns, &tailscale_bin, 1);
    c.arg("netcheck");
    let report = ns.run(c, Duration::from_secs(60)).unwrap();
    eprintln!("{report}");
    assert!(report.contains("* UDP: true"), "{report}");
    assert!(report.contains("* Nearest DERP: ferry"), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.trim_start().starts_with("- ferry:")),
        "no latency for ferry's region: {report}"
    );

    // 5. tailscale ping answered via DERP(ferry) (the nodes are kept off direct paths).
    let mut c = tailscale(&ns, &tailscale_bin, 1);
    c.args(["ping", "-c", "5", "--timeout", "5s", &ips[1].to_string()]);
    let pings = ns.run(c, Duration::from_secs(60)).unwrap_or_else(|e| e);
    eprintln!("{pings}");
    assert!(pings.contains("via DERP(ferry)"), "{pings}");

    // 6. Admission through Headscale's /verify: both nodes were admitted, a key that is not in
    //    the tailnet is refused (the relay closes the connection before ServerInfo).
    let m = http_get(&ns, METRICS, "/metrics");
    assert!(
        metric(&m, "ferry_relay_admission_total{result=\"allowed\"}") >= 2.0,
        "{m}"
    );
    let cert = std::fs::read(ns.path("self-signed-cert.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut &cert[..])
        .next()
        .unwrap()
        .unwrap()
        .to_vec();
    let refused = ns.within(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use ferry_relay::proto::client::{HandshakeError, HttpUpgrade, Stage, Upgrade};
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", DERP_PORT))
                .await
                .unwrap();
            let name = rustls::pki_types::ServerName::try_from(RELAY_HOST).unwrap();
            let io: common::BoxIo =
                Box::new(common::client_tls(&der).connect(name, tcp).await.unwrap());
            let up = Upgrade::Http(HttpUpgrade::new(RELAY_HOST, "outsider/1"));
            let r = common::RawClient::try_over(
                io,
                ferry_relay::proto::SecretKey::generate(),
                ferry_relay::proto::ClientInfo::default(),
                up,
            )
            .await;
            matches!(r, Err(HandshakeError::Closed(Stage::ServerInfo)))
        })
    });
    assert!(refused, "a key outside the tailnet got a ServerInfo");
    let m = http_get(&ns, METRICS, "/metrics");
    assert_eq!(
        metric(&m, "ferry_relay_admission_total{result=\"refused_verify\"}"),
        1.0,
        "{m}"
    );

    // 7. 64 MiB node 1 -> node 2 through ferry, checksummed; ferry forwarded at least as many
    //    bytes (WireGuard packets of it, plus the acknowledgements the other way).
    let socks: SocketAddr = "127.0.0.1:1081".parse().unwrap();
    let before = metric(
        &http_get(&ns, METRICS, "/metrics"),
        "ferry_relay_bytes_forwarded_total",
    );
    const N: u64 = 64 << 20;
    let t0 = Instant::now();
    let (sent, got) = transfer(&ns, socks, ips[1], N, Arc::default())
        .join()
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(
        (got.bytes, got.sha),
        (N, sent),
        "the transfer arrived changed"
    );
    let m = http_get(&ns, METRICS, "/metrics");
    let through = metric(&m, "ferry_relay_bytes_forwarded_total") - before;
    eprintln!(
        "64 MiB in {took:.2?} ({:.1} MB/s); ferry forwarded {:.1} MB for it",
        N as f64 / took.as_secs_f64() / 1e6,
        through / 1e6
    );
    assert!(through >= N as f64, "ferry forwarded only {through} bytes");

    // 8. A second transfer: ferry is stopped with SIGTERM and started again in the middle of it;
    //    the nodes reconnect and the transfer completes intact.
    const M: u64 = 96 << 20;
    let progress = Arc::new(AtomicU64::new(0));
    let t = transfer(&ns, socks, ips[1], M, Arc::clone(&progress));
    wait_until(
        "the second transfer under way",
        Duration::from_secs(60),
        || progress.load(Ordering::SeqCst) >= 16 << 20,
    );
    let at = progress.load(Ordering::SeqCst);
    let signalled = Instant::now();
    let pid = ns.procs[relay].id() as libc::pid_t;
    // SAFETY: kill(2) on our own child (ip netns exec execs the relay in place).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = ns.procs[relay].wait().unwrap();
    let exit = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        exit < Duration::from_secs(SHUTDOWN_TIMEOUT_S + 1),
        "ferry took {exit:?} to stop"
    );
    start_relay(&mut ns, "relay-2.log");
    let (sent, got) = t.join().unwrap();
    assert_eq!(
        (got.bytes, got.sha),
        (M, sent),
        "the transfer arrived changed"
    );
    let m = http_get(&ns, METRICS, "/metrics");
    eprintln!(
        "96 MiB with a restart after {} MiB: ferry exited {exit:.2?} after SIGTERM; longest pause in the transfer {:.2?}; \
         the restarted ferry forwarded {:.1} MB",
        at >> 20,
        got.longest_gap,
        metric(&m, "ferry_relay_bytes_forwarded_total") / 1e6
    );
    assert!(metric(&m, "ferry_relay_bytes_forwarded_total") > 0.0);
    // The old process's last words: its drops by reason, and whether the nodes left cleanly.
    let log = std::fs::read_to_string(ns.path("relay-1.log")).unwrap();
    let stopped = log.lines().find(|l| l.contains("stopped")).unwrap_or("");
    eprintln!("first ferry: {stopped}");
    assert!(!log.contains('\x1b'), "colour codes in a log file");
}
