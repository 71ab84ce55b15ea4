//! A NAT lab from Linux network namespaces, for tests that run the `ferry` CLI behind NAT
//! routers. Needs root, `ip` (iproute2) and `iptables`; see [`prerequisites`].
//!
//! Topology (all addresses exist only inside the lab's namespaces; 203.0.113.0/24 is a
//! documentation range, 192.168.N.0/24 private):
//!
//! ```text
//!   home N (192.168.N.2) --lan-- router N (192.168.N.1 | wan 203.0.113.(4N-2)/30) --pN-- pub
//!   pub: 203.0.113.1/30, .5/30, ... (one /30 per router), forwards between routers and runs
//!        `ferry-relay --dev` on 203.0.113.1:3340 with STUN on 203.0.113.1:3478 and :3479
//!        (the DERP map lists :3479 as a STUNOnly node, so netcheck sees two servers)
//! ```
//!
//! [`Lab::shared_wan`] instead puts every router's WAN on one segment (a bridge in `pub`
//! holding 203.0.113.1/24; the routers keep their addresses, now /24 and on-link to each
//! other), as two homes on one ISP switch, a campus or a CGNAT segment: a packet from one
//! home then reaches the other home's router in two hops.
//!
//! Routers NAT their LAN with `MASQUERADE` ([`Nat::Easy`]), `MASQUERADE --random-fully`
//! ([`Nat::Hard`]), or drop the LAN's UDP ([`Nat::UdpBlocked`], also MASQUERADE for TCP), or
//! let UDP in from the relay's address only ([`Nat::InboundUdpBlocked`]).
//! Namespaces are named `ferrylab-<pid>-<n>-<role>`; [`Lab`]'s `Drop` kills the lab's
//! processes and deletes its namespaces (the veths go with them), also when a test panics.
//! [`Lab::new`] first deletes `ferrylab-<pid>-*` namespaces whose process is gone.
//!
//! The relay binary: `<target>/<profile>/ferry-relay`, next to the `ferry` binary cargo built
//! for this test. `cargo test --workspace` (scripts/test.sh, CI) builds it; with
//! `cargo test -p ferry-client` run `cargo build -p ferry-relay` first. `FERRY_RELAY_BIN`
//! overrides the path.
#![allow(dead_code, unreachable_pub)]

pub mod impair;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PREFIX: &str = "ferrylab-";
pub const RELAY_IP: &str = "203.0.113.1";
pub const RELAY_PORT: u16 = 3340;
pub const STUN_PORT: u16 = 3478;
/// The relay's Prometheus endpoint (in the `pub` namespace; read with [`Lab::relay_drops`]).
pub const METRICS_PORT: u16 = 9090;
/// A second STUN port on the relay, listed as a STUNOnly node of the region: with two STUN
/// servers netcheck can tell a hard NAT (a different mapping per destination) from an easy one,
/// which birthday probing needs.
pub const STUN_PORT2: u16 = 3479;

/// How a home's router treats its LAN's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// `MASQUERADE`: keeps the source port when it can (endpoint-independent mapping).
    Easy,
    /// `MASQUERADE --random-fully`: a random port per destination (endpoint-dependent).
    Hard,
    /// MASQUERADE, and all UDP from the LAN dropped.
    UdpBlocked,
    /// MASQUERADE (easy mapping), and every UDP datagram from the WAN dropped unless it comes
    /// from the relay's address: a firewall that lets UDP in only from known servers, so no
    /// peer's datagram gets in, solicited or not (a stateful "inbound blocked" firewall alone
    /// is what Linux conntrack does already, and birthday probing gets through that).
    InboundUdpBlocked,
}

/// A number from the environment variable `name` (the benchmarks' knobs), else `default`.
pub fn env_or(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `ferry` CLI binary of this package.
pub fn ferry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

/// The `ferry-relay` binary (see the module docs).
pub fn relay_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_RELAY_BIN") {
        return p.into();
    }
    ferry_bin().with_file_name(format!("ferry-relay{}", std::env::consts::EXE_SUFFIX))
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args).map(|_| ())
}

/// Whether the lab can run here: `Err(why)` if not (not root, no `ip`, no `iptables`, no
/// permission for `ip netns add`, or no relay binary).
pub fn prerequisites() -> Result<(), String> {
    let relay = relay_bin();
    if !relay.exists() {
        return Err(format!(
            "no relay binary at {} (run `cargo build -p ferry-relay`, or set FERRY_RELAY_BIN)",
            relay.display()
        ));
    }
    netns_prerequisites()
}

/// What [`NetNs`] needs: root, `ip`, `iptables`, and both working in a new namespace.
pub fn netns_prerequisites() -> Result<(), String> {
    // The effective uid via `id -u` (no libc dependency for one call).
    let uid = run("id", &["-u"]).map_err(|e| format!("cannot run `id -u`: {e}"))?;
    if uid.trim() != "0" {
        return Err(format!("not root (uid {})", uid.trim()));
    }
    run("ip", &["-V"]).map_err(|e| format!("no iproute2 `ip`: {e}"))?;
    run("iptables", &["-V"]).map_err(|e| format!("no `iptables`: {e}"))?;
    // Unique per call: tests of one binary check this in parallel.
    let n = LABS.fetch_add(1, Ordering::Relaxed);
    let probe = format!("{PREFIX}{}-{n}-probe", std::process::id());
    ip(&["netns", "add", &probe]).map_err(|e| format!("`ip netns add` not permitted: {e}"))?;
    let nat = run(
        "ip",
        &["netns", "exec", &probe, "iptables", "-t", "nat", "-L", "-n"],
    );
    let _ = ip(&["netns", "del", &probe]);
    nat.map_err(|e| format!("iptables does not work in a namespace: {e}"))?;
    Ok(())
}

/// `true` when the test should go on. Without the prerequisites, prints SKIPPED and returns
/// `false`; under CI (`CI` set) panics instead, since CI runs as root with iptables installed.
pub fn available(test: &str) -> bool {
    skip_unless(test, prerequisites())
}

/// [`available`] for a test that needs only a [`NetNs`] (no relay binary).
pub fn netns_available(test: &str) -> bool {
    skip_unless(test, netns_prerequisites())
}

fn skip_unless(test: &str, prereq: Result<(), String>) -> bool {
    match prereq {
        Ok(()) => true,
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("{test}: NAT lab prerequisites missing under CI: {why}")
        }
        Err(why) => {
            eprintln!("{test}: SKIPPED: needs root and iptables (CI runs as root): {why}");
            false
        }
    }
}

/// Deletes `ferrylab-<pid>-*` namespaces left by processes that no longer exist (a test
/// killed before its `Drop` ran), and the processes still running in them.
pub fn remove_leftovers() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(pids) = run("ip", &["netns", "pids", name]) {
            for p in pids.split_whitespace() {
                let _ = run("kill", &["-9", p]);
            }
        }
        let _ = ip(&["netns", "del", name]);
    }
}

/// A process in the lab whose stdout lines arrive on a channel (with their arrival time).
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<(Instant, String)>,
    /// Everything read so far (for failure messages).
    pub seen: Vec<String>,
}

impl Proc {
    /// The next stdout line containing `needle`, within `timeout`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Option<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, line)) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Some((t, line));
                    }
                }
                Err(_) => return None,
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

static LABS: AtomicU32 = AtomicU32::new(0);

/// A running lab: a public namespace with the relay, one router and one home per [`Nat`].
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    relay: Option<Proc>,
    pub dir: tempfile::TempDir,
    /// The DERP map (one region, 900, the lab's relay), as a file for `--relay-map`.
    pub map_file: PathBuf,
}

impl Lab {
    /// Builds the lab and starts the relay (waits until it is ready).
    pub fn new(homes: &[Nat]) -> Lab {
        Lab::build_with(homes, false)
    }

    /// [`Lab::new`] with every router's WAN side on one shared segment (see the module docs).
    pub fn shared_wan(homes: &[Nat]) -> Lab {
        Lab::build_with(homes, true)
    }

    fn build_with(homes: &[Nat], shared: bool) -> Lab {
        remove_leftovers();
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{PREFIX}{}-{n}-", std::process::id());
        let dir = tempfile::tempdir().expect("tempdir");
        let map_file = dir.path().join("derpmap.json");
        let mut lab = Lab {
            prefix,
            namespaces: Vec::new(),
            relay: None,
            dir,
            map_file,
        };
        if let Err(e) = lab.build(homes, shared) {
            panic!("building the NAT lab: {e}");
        }
        lab
    }

    /// The namespace of a role: `pub`, `rN` (router N) or `hN` (home N), N from 1.
    pub fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.prefix)
    }

    /// The lab's namespaces.
    pub fn namespaces(&self) -> Vec<String> {
        self.namespaces.clone()
    }

    /// The relay's process id, while it runs.
    pub fn relay_pid(&self) -> Option<u32> {
        self.relay.as_ref().map(|p| p.child.id())
    }

    /// Home N's namespace (N from 1).
    pub fn home(&self, n: usize) -> String {
        self.ns(&format!("h{n}"))
    }

    fn add_ns(&mut self, role: &str) -> Result<String, String> {
        let name = self.ns(role);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// Runs a command to completion in namespace `ns` (e.g. an iptables rule); its stdout.
    pub fn exec(ns: &str, cmd: &[&str]) -> Result<String, String> {
        let mut args = vec!["netns", "exec", ns];
        args.extend_from_slice(cmd);
        run("ip", &args)
    }

    fn build(&mut self, homes: &[Nat], shared: bool) -> Result<(), String> {
        let public = self.add_ns("pub")?;
        Self::exec(&public, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        if shared {
            ip(&["-n", &public, "link", "add", "br0", "type", "bridge"])?;
            ip(&[
                "-n",
                &public,
                "addr",
                "add",
                &format!("{RELAY_IP}/24"),
                "dev",
                "br0",
            ])?;
            ip(&["-n", &public, "link", "set", "br0", "up"])?;
        }
        for (i, nat) in homes.iter().enumerate() {
            let n = i + 1;
            let router = self.add_ns(&format!("r{n}"))?;
            let home = self.add_ns(&format!("h{n}"))?;
            // Veths are created inside the namespaces (never in the caller's), so their
            // short fixed names cannot collide between labs.
            let p = format!("p{n}");
            ip(&[
                "-n", &router, "link", "add", "wan", "type", "veth", "peer", "name", &p, "netns",
                &public,
            ])?;
            ip(&[
                "-n", &home, "link", "add", "eth0", "type", "veth", "peer", "name", "lan", "netns",
                &router,
            ])?;
            let base = 4 * i; // 203.0.113.(base+1) pub side, (base+2) router side
            let (pub_ip, prefix) = if shared {
                ip(&["-n", &public, "link", "set", &p, "master", "br0"])?;
                (RELAY_IP.to_string(), 24)
            } else {
                let pub_ip = format!("203.0.113.{}", base + 1);
                ip(&[
                    "-n",
                    &public,
                    "addr",
                    "add",
                    &format!("{pub_ip}/30"),
                    "dev",
                    &p,
                ])?;
                (pub_ip, 30)
            };
            let wan_ip = format!("203.0.113.{}", base + 2);
            let lan_gw = format!("192.168.{n}.1");
            ip(&[
                "-n",
                &router,
                "addr",
                "add",
                &format!("{wan_ip}/{prefix}"),
                "dev",
                "wan",
            ])?;
            ip(&[
                "-n",
                &router,
                "addr",
                "add",
                &format!("{lan_gw}/24"),
                "dev",
                "lan",
            ])?;
            ip(&[
                "-n",
                &home,
                "addr",
                "add",
                &format!("192.168.{n}.2/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &public, "link", "set", &p, "up"])?;
            ip(&["-n", &router, "link", "set", "wan", "up"])?;
            ip(&["-n", &router, "link", "set", "lan", "up"])?;
            ip(&["-n", &home, "link", "set", "eth0", "up"])?;
            ip(&["-n", &router, "route", "add", "default", "via", &pub_ip])?;
            ip(&["-n", &home, "route", "add", "default", "via", &lan_gw])?;
            Self::exec(&router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            let mut masq = vec![
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan",
                "-j",
                "MASQUERADE",
            ];
            if *nat == Nat::Hard {
                masq.push("--random-fully");
            }
            Self::exec(&router, &masq)?;
            if *nat == Nat::InboundUdpBlocked {
                Self::exec(
                    &router,
                    &[
                        "iptables", "-A", "FORWARD", "-i", "wan", "-p", "udp", "!", "-s", RELAY_IP,
                        "-j", "DROP",
                    ],
                )?;
            }
            if *nat == Nat::UdpBlocked {
                Self::exec(
                    &router,
                    &[
                        "iptables", "-A", "FORWARD", "-i", "lan", "-p", "udp", "-j", "DROP",
                    ],
                )?;
            }
        }
        let map = serde_json::json!({"Regions": {"900": {"RegionID": 900, "RegionCode": "lab",
            "RegionName": "NAT lab", "Nodes": [{"Name": "900a", "RegionID": 900,
            "HostName": RELAY_IP, "IPv4": RELAY_IP, "IPv6": "none", "DERPPort": RELAY_PORT,
            "STUNPort": STUN_PORT, "InsecureForTests": true},
            {"Name": "900s", "RegionID": 900, "HostName": RELAY_IP, "IPv4": RELAY_IP,
            "IPv6": "none", "STUNOnly": true, "STUNPort": STUN_PORT2}]}}});
        std::fs::write(&self.map_file, map.to_string()).map_err(|e| e.to_string())?;
        self.start_relay()
    }

    /// Starts the relay in `pub` (always with the same arguments, so a restart keeps its
    /// addresses and ports) and waits until it is ready. The lab starts it once itself; after
    /// [`Lab::stop_relay`] this starts it again. (`--dev`: a new ephemeral server key.)
    pub fn start_relay(&mut self) -> Result<(), String> {
        assert!(self.relay.is_none(), "the relay is already running");
        let relay = relay_bin();
        let listen = format!("{RELAY_IP}:{RELAY_PORT}");
        let stun = format!("{RELAY_IP}:{STUN_PORT},{RELAY_IP}:{STUN_PORT2}");
        let metrics = format!("{RELAY_IP}:{METRICS_PORT}");
        // Its log (stderr) goes to `relay.log` in the lab's directory ([`Lab::relay_log`]).
        let script = format!("exec \"$0\" \"$@\" 2>>'{}'", self.relay_log().display());
        let mut proc = self.spawn(
            "pub",
            "sh",
            &[
                "-c",
                &script,
                relay.to_str().expect("utf-8 path"),
                "--dev",
                "--listen",
                &listen,
                "--stun-listen",
                &stun,
                "--metrics-listen",
                &metrics,
            ],
        );
        if proc.wait_for("ready", Duration::from_secs(10)).is_none() {
            return Err(format!("relay not ready: {:?}", proc.seen));
        }
        self.relay = Some(proc);
        Ok(())
    }

    /// The relay's log file (all its runs, appended).
    pub fn relay_log(&self) -> PathBuf {
        self.dir.path().join("relay.log")
    }

    /// Stops the relay: `graceful` sends SIGTERM (the relay tells its clients it is
    /// restarting, drains, exits) and waits up to 15 s for it to exit, then kills it; otherwise
    /// SIGKILL at once (a crash). Returns once the process is gone.
    pub fn stop_relay(&mut self, graceful: bool) {
        let Some(mut proc) = self.relay.take() else {
            return;
        };
        if graceful {
            // `ip netns exec` execs the relay: the child's PID is the relay's.
            let _ = run("kill", &["-TERM", &proc.child.id().to_string()]);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = proc.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        proc.kill();
    }

    /// Runs `program args…` in the namespace of `role` (see [`Lab::ns`]), stdout on a channel.
    pub fn spawn(&self, role: &str, program: &str, args: &[&str]) -> Proc {
        let ns = self.ns(role);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("ip netns exec {ns} {program}: {e}"));
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// `ferry args…` in home N's namespace.
    pub fn ferry(&self, home: usize, args: &[&str]) -> Proc {
        self.spawn(
            &format!("h{home}"),
            ferry_bin().to_str().expect("utf-8 path"),
            args,
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.relay.take();
        for ns in self.namespaces.iter().rev() {
            // Anything a test left running in the namespace (its Proc normally kills it).
            if let Ok(pids) = run("ip", &["netns", "pids", ns]) {
                for p in pids.split_whitespace() {
                    let _ = run("kill", &["-9", p]);
                }
            }
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// The names `ip netns list` shows.
pub fn netns_list() -> Vec<String> {
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// A fresh key file in `dir` (made by `ferry keygen`); returns (path, public key).
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let out = Command::new(ferry_bin())
        .args(["keygen", "--out", path.to_str().expect("utf-8 path")])
        .output()
        .expect("ferry keygen");
    assert!(out.status.success(), "ferry keygen failed");
    (
        path,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

/// The median of `v` (sorted in place); `None` if empty.
pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// A UDP socket bound to `127.0.0.1:0` inside namespace `ns` (e.g. [`Lab::home`]): a test's own
/// "application" next to a lab process. A socket keeps the namespace it was created in, so it
/// can then be used from any thread. `setns` runs in a short-lived thread of its own, so the
/// caller's thread stays in its namespace.
pub fn udp_socket_in(ns: &str) -> std::net::UdpSocket {
    in_netns(ns, || {
        // With the same large buffers as ferry's own sockets (an application that expects
        // bursts would ask for them too).
        ferry_client::udp::bind_udp_std("127.0.0.1:0".parse().expect("literal"))
            .and_then(|s| s.set_nonblocking(false).map(|()| s))
            .map_err(|e| format!("bind 127.0.0.1:0: {e}"))
    })
    .and_then(|r| r)
    .unwrap_or_else(|e| panic!("in namespace {ns}: {e}"))
}

/// Runs `f` in a short-lived thread that has joined network namespace `ns` (the caller's
/// thread stays in its own). Sockets made there keep the namespace, and threads started there
/// (a tokio runtime's workers) are in it too.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    use std::os::fd::AsRawFd;
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: a valid namespace fd; setns changes only this (short-lived) thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "setns({path}): {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(f())
    })
    .join()
    .expect("the setns thread panicked")
}

impl Lab {
    /// `ferry args…` in home `home`, with `--log ferry_client=debug` appended to the file `log`
    /// (for failure messages; [`Lab::spawn`] discards stderr).
    pub fn ferry_logged(&self, home: usize, log: &Path, args: &[&str]) -> Proc {
        let script = format!(
            "exec \"$0\" \"$@\" --log ferry_client=debug 2>>'{}'",
            log.display()
        );
        let bin = ferry_bin();
        let mut all = vec!["-c", script.as_str(), bin.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        self.spawn(&format!("h{home}"), "sh", &all)
    }

    /// The relay's packet-drop counters (`ferry_relay_packets_dropped_total` lines with a
    /// non-zero value, e.g. `{reason="queue_head"} 27`), read from its metrics
    /// endpoint inside the lab: where a packet the relay was given went missing.
    pub fn relay_drops(&self) -> Result<Vec<String>, String> {
        let body = tcp_get_in(
            &self.ns("pub"),
            &format!("{RELAY_IP}:{METRICS_PORT}"),
            "/metrics",
        )?;
        Ok(body
            .lines()
            .filter(|l| {
                l.starts_with("ferry_relay_packets_dropped_total")
                    || l.starts_with("ferry_relay_udp_relay_dropped_total")
            })
            .filter(|l| !l.ends_with(" 0"))
            .map(|l| {
                l.trim_start_matches("ferry_relay_packets_dropped_total")
                    .to_string()
            })
            .collect())
    }
}

/// `GET path` over plain HTTP/1.0 to `addr` from inside namespace `ns`; the response body.
pub fn tcp_get_in(ns: &str, addr: &str, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut stream = in_netns(ns, move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))
    })??;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .map_err(|e| format!("GET {path} from {addr}: {e}"))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| format!("GET {path} from {addr}: {e}"))?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_string())
        }
        _ => Err(format!("GET {path} from {addr}: {:?}", text.lines().next())),
    }
}

/// With `NATLAB_KEEP_LOGS=DIR` set, copies `logs` into DIR (the lab's own directory is deleted
/// with it) and says where, for a failure message; otherwise says how to keep them.
pub fn keep_logs(logs: &[&Path]) -> String {
    let Some(dir) = std::env::var_os("NATLAB_KEEP_LOGS").map(PathBuf::from) else {
        return "\n(set NATLAB_KEEP_LOGS=DIR to keep the whole logs)".into();
    };
    let _ = std::fs::create_dir_all(&dir);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut kept = Vec::new();
    for log in logs {
        let name = log.file_name().and_then(|n| n.to_str()).unwrap_or("log");
        let to = dir.join(format!("{stamp}-{name}"));
        match std::fs::copy(log, &to) {
            Ok(_) => kept.push(to.display().to_string()),
            Err(e) => kept.push(format!("{} (not copied: {e})", log.display())),
        }
    }
    format!("\nwhole logs kept: {}", kept.join(", "))
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The iptables command (`op`: `-I` or `-D`) for a rule in a router's FORWARD chain that drops
/// all forwarded UDP — the direct path; the relay is TCP — tagged with the comment `tag` so
/// that exactly it can be deleted.
pub fn udp_cut_rule<'a>(op: &'a str, tag: &'a str) -> Vec<&'a str> {
    udp_drop_rule(op, tag, None)
}

/// [`udp_cut_rule`], or with `lengths` (e.g. `"1400:65535"`, IP datagram bytes) only the
/// forwarded UDP datagrams of those sizes.
pub fn udp_drop_rule<'a>(op: &'a str, tag: &'a str, lengths: Option<&'a str>) -> Vec<&'a str> {
    let mut rule = vec!["iptables", op, "FORWARD", "-p", "udp"];
    if let Some(l) = lengths {
        rule.extend(["-m", "length", "--length", l]);
    }
    rule.extend(["-m", "comment", "--comment", tag, "-j", "DROP"]);
    rule
}

/// `NATLAB_TRIALS` (trials per case), or `default`.
pub fn trials_or(default: usize) -> usize {
    std::env::var("NATLAB_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// A network namespace of its own for an in-process test (only `lo`, up), deleted on drop with
/// anything still running in it: the test's servers and clients bind to 127.0.0.1 there, and
/// iptables rules it adds ([`NetNs::exec`]) touch nothing outside.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        remove_leftovers();
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{tag}", std::process::id());
        ip(&["netns", "add", &name]).unwrap_or_else(|e| panic!("{e}"));
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]).unwrap_or_else(|e| panic!("{e}"));
        ns
    }

    /// Runs a command to completion in the namespace; its stdout.
    pub fn exec(&self, cmd: &[&str]) -> Result<String, String> {
        Lab::exec(&self.name, cmd)
    }

    /// Runs `fut` to completion on a two-worker tokio runtime whose threads are all in the
    /// namespace.
    pub fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        in_netns(&self.name, move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(fut)
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Ok(pids) = run("ip", &["netns", "pids", &self.name]) {
            for p in pids.split_whitespace() {
                let _ = run("kill", &["-9", p]);
            }
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

// ----- two `ferry tunnel`s (tests/nat_lab_no_loss.rs, tests/nat_lab_loss_bench.rs) -----

/// Waits for a tunnel's ready line; returns its `--listen` address.
pub fn tunnel_ready(t: &mut Proc, name: &str, log: &Path) -> Result<SocketAddr, String> {
    let Some((_, l)) = t.wait_for("tunnel ready: ", Duration::from_secs(15)) else {
        return Err(format!(
            "tunnel {name} not ready: {:?}\n--- its log (tail):\n{}",
            t.seen,
            tail(log, 30)
        ));
    };
    l.strip_prefix("tunnel ready: udp ")
        .and_then(|r| r.split(' ').next())
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("tunnel {name}: no address in {l:?}"))
}

/// SIGTERM, then the rest of stdout until the process exits; returns the summary line.
pub fn stop_tunnel(t: &mut Proc) -> String {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &t.child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Ok((_, l)) = t
        .lines
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        t.seen.push(l);
    }
    t.kill();
    t.seen
        .iter()
        .rev()
        .find(|l| l.starts_with("tunnel summary: "))
        .cloned()
        .unwrap_or_else(|| "(no summary line)".into())
}

/// Two `ferry tunnel`s, A in home 1 and B in home 2 (B forwarding to B-app), with the test's two
/// applications (UDP sockets inside the homes) and the tunnels' debug logs.
pub struct Tunnels {
    pub a: Proc,
    pub b: Proc,
    /// Tunnel A's and B's `--listen` addresses.
    pub a_addr: SocketAddr,
    pub b_addr: SocketAddr,
    pub a_app: std::net::UdpSocket,
    pub b_app: std::net::UdpSocket,
    pub alog: std::path::PathBuf,
    pub blog: std::path::PathBuf,
    pub bpub: String,
}

/// Starts [`Tunnels`] with fresh keys named after `tag` (A in home 1, B in home 2), both with
/// the `extra` arguments; waits for both ready lines.
pub fn start_tunnels(lab: &Lab, tag: &str, extra: &[&str]) -> Result<Tunnels, String> {
    let map = lab.map_file.to_str().expect("utf-8 path").to_string();
    let (akey, apub) = keygen(lab.dir.path(), &format!("a{tag}.key"));
    let (bkey, bpub) = keygen(lab.dir.path(), &format!("b{tag}.key"));
    let alog = lab.dir.path().join(format!("a{tag}.log"));
    let blog = lab.dir.path().join(format!("b{tag}.log"));
    let a_app = udp_socket_in(&lab.home(1));
    let b_app = udp_socket_in(&lab.home(2));
    let b_app_addr = b_app.local_addr().expect("local addr").to_string();
    let (akey, bkey) = (
        akey.to_str().expect("utf-8 path").to_string(),
        bkey.to_str().expect("utf-8 path").to_string(),
    );
    let listen = ["--listen", "127.0.0.1:0", "--relay-map", &map];
    let mut b_args = vec![
        "tunnel",
        &apub,
        "--forward",
        &b_app_addr,
        "--key-file",
        &bkey,
    ];
    b_args.extend_from_slice(&listen);
    b_args.extend_from_slice(extra);
    let mut b = lab.ferry_logged(2, &blog, &b_args);
    let mut a_args = vec!["tunnel", &bpub, "--key-file", &akey];
    a_args.extend_from_slice(&listen);
    a_args.extend_from_slice(extra);
    let mut a = lab.ferry_logged(1, &alog, &a_args);
    let a_addr = tunnel_ready(&mut a, "A", &alog)?;
    let b_addr = tunnel_ready(&mut b, "B", &blog)?;
    Ok(Tunnels {
        a,
        b,
        a_addr,
        b_addr,
        a_app,
        b_app,
        alog,
        blog,
        bpub,
    })
}
