//! A region under churn, as operators run one: three `ferry-relay` processes and Tailscale's
//! `derper` meshed over TLS, 1,000 clients spread over them, every client sending to its own
//! random peer five times a second the whole time, while each ferry relay in turn is stopped
//! with SIGTERM and started again, then each with SIGKILL.
//!
//! After every restart the test waits for traffic to settle and checks:
//! - **accounting**: every packet a client wrote is delivered or counted by a relay under a drop
//!   reason (ferry's metrics; derper's `/debug/varz`; a stopped ferry relay's last counts from
//!   its "stopped" log line). After a SIGTERM the difference must be exactly 0. A SIGKILL takes
//!   with it what was in flight through the killed process: the difference must be at least 0
//!   and at most the packets sent from or to that relay's clients in the second before the kill;
//! - **no misdelivery**: every packet arrives at the key it was sent to, with the sender's key
//!   as its source, at most once;
//! - **recovery**: every flow delivers a packet sent after the signal within [`RECOVERY_BOUND`]
//!   (the measured figures are printed: `cargo test -p ferry-relay --test churn -- --nocapture`);
//! - **mesh_remote_keys**: each ferry relay's gauge equals the number of clients connected to
//!   the other relays.
//!
//! Clients of a stopped relay reconnect to the next relay of the region (ferry or derper), as a
//! client behind a region's load balancer would. Needs `derper` (scripts/test-deps.sh); skipped
//! with a note without it, except under CI.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{client_tls, require, start_derper, BoxIo, Derper, RawClient, RegionCert};
use ferry_relay::proto::client::{HttpUpgrade, Upgrade};
use ferry_relay::proto::{self, ClientInfo, FrameDecoder, PublicKey, SecretKey, ServerFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-relay");
/// Ferry relays 0..3; index 3 is derper.
const RELAYS: usize = 4;
const DERPER: usize = 3;
const NONE: usize = usize::MAX;
/// Each client sends one packet to its peer this often.
const SEND_EVERY: Duration = Duration::from_millis(200);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Every flow works again this soon after a relay is signalled. Measured well under it (the
/// printed figures); a failure here means a flow stayed broken, not a slow machine.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);
const MAGIC: &[u8; 4] = b"CHRN";

fn clients() -> usize {
    std::env::var("CHURN_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// One ferry-relay process and what it said.
struct FerryProc {
    child: Child,
    metrics: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Drop for FerryProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Region {
    rc: RegionCert,
    ports: [u16; RELAYS],
    ferry: Vec<Option<FerryProc>>,
    derper: Option<Derper>,
}

impl Region {
    fn mesh_with(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("localhost:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_ferry(&mut self, i: usize) {
        let dir = self.rc.dir.path();
        let key_file = dir.join(format!("relay{i}.key"));
        let mesh_key = dir.join("mesh.key");
        let mut child = Command::new(BIN)
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[i])])
            .args(["--hostname", "localhost", "--cert-mode", "manual"])
            .arg("--cert-file")
            .arg(self.rc.cert())
            .arg("--cert-key-file")
            .arg(self.rc.key())
            .arg("--key-file")
            .arg(&key_file)
            .arg("--mesh-psk-file")
            .arg(&mesh_key)
            .args(["--mesh-with", &self.mesh_with()])
            .arg("--mesh-ca-file")
            .arg(self.rc.cert())
            .args(["--metrics-listen", "127.0.0.1:0", "--no-stun"])
            .args(["--udp-relay-listen", "127.0.0.1:0"])
            .args(["--http-listen", "off", "--shutdown-timeout", "5s"])
            .args(["--log-format", "json", "--log-level", "info"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(
            line.contains(" ready: "),
            "relay {i}: no ready line: {line:?}"
        );
        let metrics = line
            .split("metrics http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.parse().ok())
            .expect("metrics address in the ready line");
        std::thread::spawn(move || for _ in out.lines() {});
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (err, lines) = (child.stderr.take().unwrap(), Arc::clone(&stderr));
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
        self.ferry[i] = Some(FerryProc {
            child,
            metrics,
            stderr,
        });
    }
}

/// An HTTP GET over plain TCP (ferry's metrics listener).
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The sum of every sample of `name` (any labels) in a Prometheus text exposition.
fn sum_samples(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// What the clients do and see, shared by all their tasks.
struct World {
    t0: Instant,
    secrets: Vec<SecretKey>,
    keys: Vec<PublicKey>,
    /// Flow i: client i sends to client `targets[i]`.
    targets: Vec<usize>,
    ports: [u16; RELAYS],
    /// Which relay each client is connected to (handshake done), or NONE.
    location: Vec<AtomicUsize>,
    /// A relay a client is asked to move to (a load balancer's rebalancing), or NONE.
    move_to: Vec<AtomicUsize>,
    /// Relays clients may connect to (the test's view: a relay about to be stopped is left).
    alive: [AtomicBool; RELAYS],
    sending: AtomicBool,
    stop: AtomicBool,
    tls: tokio_rustls::TlsConnector,
    sent: AtomicU64,
    delivered: AtomicU64,
    /// Delivered to the wrong key, or with a source that is not the sender's key.
    wrong: AtomicU64,
    duplicates: AtomicU64,
    flows: Vec<Mutex<Flow>>,
    /// Every packet written: (send time ms, sender's relay, receiver's relay at that moment).
    sent_log: Mutex<Vec<(u64, usize, usize)>>,
}

#[derive(Default)]
struct Flow {
    seen: HashSet<u64>,
    /// (send ms, receive ms) of each delivery.
    deliveries: Vec<(u64, u64)>,
}

impl World {
    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// Where a client that left relay `r` goes: a relay it was asked to move to, else a random
    /// other relay that is up (derper included), as a region's load balancer would pick.
    fn next_relay(&self, me: usize, r: usize) -> usize {
        let asked = self.move_to[me].swap(NONE, Ordering::SeqCst);
        if asked != NONE {
            return asked;
        }
        let up: Vec<usize> = (0..RELAYS)
            .filter(|&x| x != r && self.alive[x].load(Ordering::SeqCst))
            .collect();
        if up.is_empty() {
            (r + 1) % RELAYS
        } else {
            up[rand::random::<usize>() % up.len()]
        }
    }

    /// Connected clients per relay.
    fn census(&self) -> [usize; RELAYS] {
        let mut n = [0; RELAYS];
        for l in &self.location {
            let r = l.load(Ordering::SeqCst);
            if r != NONE {
                n[r] += 1;
            }
        }
        n
    }

    fn record(&self, me: usize, src: PublicKey, packet: &[u8]) {
        if packet.len() < 28 || &packet[..4] != MAGIC {
            self.wrong.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let from = u32::from_be_bytes(packet[4..8].try_into().unwrap()) as usize;
        let to = u32::from_be_bytes(packet[8..12].try_into().unwrap()) as usize;
        let seq = u64::from_be_bytes(packet[12..20].try_into().unwrap());
        let sent_ms = u64::from_be_bytes(packet[20..28].try_into().unwrap());
        if to != me || from >= self.keys.len() || self.keys[from] != src {
            self.wrong.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let mut f = self.flows[from].lock().unwrap();
        if !f.seen.insert(seq) {
            self.duplicates.fetch_add(1, Ordering::SeqCst);
            return;
        }
        f.deliveries.push((sent_ms, self.now_ms()));
        self.delivered.fetch_add(1, Ordering::SeqCst);
    }
}

/// TLS, upgrade, DERP handshake as a Go-like client (it understands Restarting).
async fn connect(w: &World, relay: usize, me: usize) -> std::io::Result<(BoxIo, BytesMut)> {
    let io = async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", w.ports[relay])).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let io: BoxIo = Box::new(w.tls.connect(name, tcp).await?);
        let info = ClientInfo {
            version: 2,
            can_ack_pings: true,
            ..Default::default()
        };
        let up = Upgrade::Http(HttpUpgrade::new("localhost", "churn/1"));
        let c = RawClient::try_over(io, w.secrets[me].clone(), info, up)
            .await
            .map_err(std::io::Error::other)?;
        Ok(c.into_parts())
    };
    tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("handshake timed out")))
}

/// One client for the whole test: connect, send and receive until the connection ends, move to
/// the next relay, again.
async fn client(w: Arc<World>, me: usize) {
    let mut relay = me % RELAYS;
    let mut seq = 0u64;
    let mut out = Vec::with_capacity(256);
    while !w.stop.load(Ordering::SeqCst) {
        let Ok((mut io, mut buf)) = connect(&w, relay, me).await else {
            relay = w.next_relay(me, relay);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        w.location[me].store(relay, Ordering::SeqCst);
        let mut dec = FrameDecoder::new();
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + SEND_EVERY.mul_f64(rand::random::<f64>()),
            SEND_EVERY,
        );
        // After Restarting, or when asked to move: send nothing more here, read to the end (the
        // relay's or, after our own half-close, the relay closing), then leave. Closing with
        // unread data would lose packets the relay already wrote: uncountable by anyone.
        let mut leaving = false;
        'conn: loop {
            tokio::select! {
                r = io.read_buf(&mut buf) => {
                    match r {
                        Ok(0) | Err(_) => break 'conn,
                        Ok(_) => {}
                    }
                    while let Ok(Some(f)) = dec.decode(&mut buf) {
                        match ServerFrame::parse(f) {
                            Ok(ServerFrame::RecvPacket { src, packet }) => w.record(me, src, &packet),
                            Ok(ServerFrame::Restarting { .. }) => leaving = true,
                            _ => {}
                        }
                    }
                    buf.reserve(4096);
                }
                _ = tick.tick(), if !leaving => {
                    if w.stop.load(Ordering::SeqCst) {
                        break 'conn;
                    }
                    let asked = w.move_to[me].load(Ordering::SeqCst);
                    if asked != NONE && asked != relay {
                        leaving = true;
                        if io.shutdown().await.is_err() {
                            break 'conn;
                        }
                        continue;
                    }
                    if !w.sending.load(Ordering::SeqCst) {
                        continue;
                    }
                    let to = w.targets[me];
                    seq += 1;
                    let now = w.now_ms();
                    let mut p = Vec::with_capacity(100);
                    p.extend_from_slice(MAGIC);
                    p.extend_from_slice(&(me as u32).to_be_bytes());
                    p.extend_from_slice(&(to as u32).to_be_bytes());
                    p.extend_from_slice(&seq.to_be_bytes());
                    p.extend_from_slice(&now.to_be_bytes());
                    p.resize(100, 0xab);
                    out.clear();
                    proto::put_send_packet(&mut out, &w.keys[to], &p);
                    let to_relay = w.location[to].load(Ordering::SeqCst);
                    // Counted as sent once the kernel has it: a relay that reads its socket
                    // sees it. A failed write reached no live relay.
                    if io.write_all(&out).await.is_ok() && io.flush().await.is_ok() {
                        w.sent.fetch_add(1, Ordering::SeqCst);
                        w.sent_log.lock().unwrap().push((now, relay, to_relay));
                    } else {
                        break 'conn;
                    }
                }
            }
        }
        w.location[me].store(NONE, Ordering::SeqCst);
        drop(io);
        relay = w.next_relay(me, relay);
    }
}

/// Counters of the whole region at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    sent: u64,
    delivered: u64,
    /// Drops counted by each relay's current process.
    dropped: [u64; RELAYS],
}

fn ferry_dropped(p: &FerryProc) -> u64 {
    sum_samples(
        &http_get(p.metrics, "/metrics"),
        "ferry_relay_packets_dropped_total",
    )
}

fn ferry_gauge(p: &FerryProc, name: &str) -> u64 {
    sum_samples(&http_get(p.metrics, "/metrics"), name)
}

/// derper's drop counters, from its debug page (allowed from loopback).
fn derper_dropped(port: u16, rc: &RegionCert) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let text = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut io = client_tls(&rc.der).connect(name, tcp).await.unwrap();
        io.write_all(b"GET /debug/varz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = io.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    sum_samples(&text, "derp_packets_dropped")
}

fn counts(w: &World, region: &Region) -> Counts {
    let mut c = Counts {
        sent: w.sent.load(Ordering::SeqCst),
        delivered: w.delivered.load(Ordering::SeqCst),
        ..Default::default()
    };
    for (i, p) in region.ferry.iter().enumerate() {
        if let Some(p) = p {
            c.dropped[i] = ferry_dropped(p);
        }
    }
    c.dropped[DERPER] = derper_dropped(region.ports[DERPER], &region.rc);
    c
}

/// Waits until nothing moves any more: delivered and dropped unchanged for 500 ms.
fn settle(w: &World, region: &Region) -> Counts {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = counts(w, region);
    let mut stable_since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = counts(w, region);
        let moved = now.delivered != last.delivered || now.dropped != last.dropped;
        if moved {
            stable_since = Instant::now();
            last = now;
        } else if stable_since.elapsed() >= Duration::from_millis(500) {
            return now;
        }
        assert!(Instant::now() < deadline, "traffic never settled");
    }
}

/// The "stopped" line's drop count of a ferry relay that exited after SIGTERM.
fn stopped_line_dropped(p: &FerryProc) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = p.stderr.lock().unwrap().iter().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let f = v.get("fields")?;
            (f.get("message")?.as_str()? == "stopped")
                .then(|| f.get("packets_dropped")?.as_u64())?
        });
        if let Some(n) = found {
            return n;
        }
        assert!(Instant::now() < deadline, "no \"stopped\" line with counts");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    Term,
    Kill,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn a_region_survives_rolling_restarts_with_exact_accounting() {
    let Some(derper_bin) = require("derper", "scripts/test-deps.sh") else {
        return;
    };
    let n = clients();
    let rc = RegionCert::new();
    std::fs::write(
        rc.dir.path().join("mesh.key"),
        format!("{}\n", hex::encode(rc.mesh_key)),
    )
    .unwrap();
    let ports = [0; RELAYS].map(|_| common::free_port());
    let mesh_for_derper = ports[..DERPER]
        .iter()
        .map(|p| format!("localhost:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    // ferry first: derper's first dial then finds them up (it retries only every 5 s).
    let mut region = Region {
        ferry: (0..DERPER).map(|_| None).collect(),
        derper: None,
        rc,
        ports,
    };
    for i in 0..DERPER {
        region.start_ferry(i);
    }
    region.derper = Some(start_derper(
        &derper_bin,
        ports[DERPER],
        &region.rc,
        &region.rc.dir.path().join("mesh.key"),
        &mesh_for_derper,
    ));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let secrets: Vec<SecretKey> = (0..n).map(|_| SecretKey::generate()).collect();
    let mut targets: Vec<usize> = (0..n).collect();
    {
        use rand::seq::SliceRandom;
        // A random derangement: nobody sends to itself.
        loop {
            targets.shuffle(&mut rand::thread_rng());
            if targets.iter().enumerate().all(|(i, &t)| i != t) {
                break;
            }
        }
    }
    let w = Arc::new(World {
        t0: Instant::now(),
        keys: secrets.iter().map(SecretKey::public).collect(),
        secrets,
        targets,
        ports,
        location: (0..n).map(|_| AtomicUsize::new(NONE)).collect(),
        move_to: (0..n).map(|_| AtomicUsize::new(NONE)).collect(),
        alive: [0; RELAYS].map(|_| AtomicBool::new(true)),
        sending: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        tls: client_tls(&region.rc.der),
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        wrong: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        flows: (0..n).map(|_| Mutex::new(Flow::default())).collect(),
        sent_log: Mutex::new(Vec::new()),
    });
    for me in 0..n {
        rt.spawn(client(Arc::clone(&w), me));
    }
    let all_connected = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while w.census().iter().sum::<usize>() < n {
            assert!(
                Instant::now() < deadline,
                "{what}: clients never all connected: {:?}",
                w.census()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    all_connected("start");
    // Each ferry relay's view of the rest of the region matches where the clients are.
    let remote_keys_match = |region: &Region, what: &str| -> Duration {
        let t = Instant::now();
        let deadline = t + Duration::from_secs(20);
        loop {
            let census = w.census();
            let total: usize = census.iter().sum();
            let ok = region.ferry.iter().enumerate().all(|(i, p)| {
                p.as_ref().is_none_or(|p| {
                    ferry_gauge(p, "ferry_relay_mesh_remote_keys") as usize == total - census[i]
                })
            });
            if ok && w.census() == census {
                return t.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: ferry_relay_mesh_remote_keys never matched: census {census:?}, gauges {:?}",
                region
                    .ferry
                    .iter()
                    .map(|p| p.as_ref().map(|p| ferry_gauge(p, "ferry_relay_mesh_remote_keys")))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let t = remote_keys_match(&region, "start");
    eprintln!(
        "start: {n} clients on {:?}; mesh_remote_keys matched after {t:?}",
        w.census()
    );

    let mut base = settle(&w, &region);
    // Each ferry relay's count of re-established mesh links (a fresh process starts at 0).
    let mut resyncs = [0u64; DERPER];
    let mut report = Vec::new();
    for mode in [Stop::Term, Stop::Kill] {
        for r in 0..DERPER {
            w.sending.store(true, Ordering::SeqCst);
            // Rebalance as a load balancer would: a quarter of the clients move to the relay
            // about to be stopped (churn in itself: each leaves its relay cleanly). Clients on
            // derper stay there: derper loses a packet now and then, uncounted, when a client
            // leaves it (see docs/notes-derp-interop.md), and this test counts exactly.
            let movers: Vec<usize> = (0..n)
                .filter(|&c| {
                    let at = w.location[c].load(Ordering::SeqCst);
                    at != DERPER && at != r && rand::random::<u8>() < 64
                })
                .collect();
            for &c in &movers {
                w.move_to[c].store(r, Ordering::SeqCst);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while movers.iter().any(|&c| {
                w.move_to[c].load(Ordering::SeqCst) != NONE
                    || w.location[c].load(Ordering::SeqCst) == NONE
            }) {
                assert!(
                    Instant::now() < deadline,
                    "clients never moved to relay {r}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_secs(1));
            let on_r = w.census()[r];
            w.alive[r].store(false, Ordering::SeqCst);
            // SIGKILL takes the counters since the last scrape with it: scrape just before.
            let pre_kill = ferry_dropped(region.ferry[r].as_ref().unwrap());
            let signalled_ms = w.now_ms();
            let signalled = Instant::now();
            let old = region.ferry[r].take().unwrap();
            let sig = if mode == Stop::Term {
                libc::SIGTERM
            } else {
                libc::SIGKILL
            };
            // SAFETY: kill(2) on our own child's pid.
            assert_eq!(unsafe { libc::kill(old.child.id() as libc::pid_t, sig) }, 0);
            let mut old = old;
            let status = old.child.wait().unwrap();
            let exit = signalled.elapsed();
            let old_dropped = if mode == Stop::Term {
                assert!(status.success(), "relay {r} after SIGTERM: {status:?}");
                assert!(
                    exit < SHUTDOWN_TIMEOUT + ferry_relay::server::SHUTDOWN_MARGIN,
                    "relay {r} took {exit:?} to stop"
                );
                stopped_line_dropped(&old)
            } else {
                pre_kill
            };
            drop(old);
            region.start_ferry(r);
            w.alive[r].store(true, Ordering::SeqCst);
            // Every flow delivers a packet sent after the signal.
            let deadline = signalled + RECOVERY_BOUND;
            let recovered = |f: &Flow| f.deliveries.iter().any(|&(s, _)| s >= signalled_ms);
            while !w.flows.iter().all(|f| recovered(&f.lock().unwrap())) {
                let stuck = w
                    .flows
                    .iter()
                    .filter(|f| !recovered(&f.lock().unwrap()))
                    .count();
                assert!(
                    Instant::now() < deadline,
                    "{mode:?} relay {r}: {stuck} flows still broken {RECOVERY_BOUND:?} after the signal"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            let mut rec: Vec<Duration> = w
                .flows
                .iter()
                .filter_map(|f| {
                    let f = f.lock().unwrap();
                    f.deliveries
                        .iter()
                        .filter(|&&(s, _)| s >= signalled_ms)
                        .map(|&(_, got)| Duration::from_millis(got - signalled_ms))
                        .min()
                })
                .collect();
            rec.sort();
            // While traffic still flows: every other ferry relay re-established its link to the
            // restarted one (a resync), and each relay's view of the region is exact.
            let resync_deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let now: Vec<u64> = (0..DERPER)
                    .map(|i| {
                        ferry_gauge(
                            region.ferry[i].as_ref().unwrap(),
                            "ferry_relay_mesh_resyncs_total",
                        )
                    })
                    .collect();
                if (0..DERPER).all(|i| i == r || now[i] > resyncs[i]) {
                    resyncs.copy_from_slice(&now);
                    break;
                }
                assert!(
                    Instant::now() < resync_deadline,
                    "relays never resynced with restarted relay {r}: {now:?} (before {resyncs:?})"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let resynced = signalled.elapsed();
            let keys_during = remote_keys_match(&region, "during traffic after a restart");
            std::thread::sleep(Duration::from_secs(1));
            w.sending.store(false, Ordering::SeqCst);
            let end = settle(&w, &region);
            // Accounting for this round. The restarted relay's drops: its old process's (from
            // the stopped line, or the scrape just before SIGKILL) plus its new process's.
            let mut dropped = 0i64;
            for i in 0..RELAYS {
                let d = if i == r {
                    (old_dropped - base.dropped[i]) + end.dropped[i]
                } else {
                    end.dropped[i] - base.dropped[i]
                };
                dropped += d as i64;
            }
            let sent = (end.sent - base.sent) as i64;
            let delivered = (end.delivered - base.delivered) as i64;
            let uncounted = sent - delivered - dropped;
            // What could have been in flight through the killed relay: packets sent from or to
            // its clients in the second before the signal.
            let in_flight = w
                .sent_log
                .lock()
                .unwrap()
                .iter()
                .filter(|&&(t, from, to)| {
                    t + 1000 >= signalled_ms && t <= signalled_ms && (from == r || to == r)
                })
                .count() as i64;
            let keys_after = remote_keys_match(&region, "after restart");
            let line = format!(
                "{mode:?} relay {r} ({on_r} clients): exit {exit:.2?}; every flow back in {:.2?} (p50 {:.2?}, p99 {:.2?}); \
                 sent {sent}, delivered {delivered}, dropped {dropped}, uncounted {uncounted} \
                 (in flight through it: {in_flight}); peers relinked {resynced:.2?} after the signal; \
                 mesh_remote_keys exact {keys_during:.2?} after that (traffic on), \
                 {keys_after:.2?} after settling; clients now {:?}",
                rec.last().copied().unwrap_or_default(),
                percentile(&rec, 0.5),
                percentile(&rec, 0.99),
                w.census()
            );
            eprintln!("{line}");
            report.push(line);
            match mode {
                Stop::Term => assert_eq!(
                    uncounted, 0,
                    "{mode:?} relay {r}: packets neither delivered nor counted"
                ),
                Stop::Kill => assert!(
                    (0..=in_flight).contains(&uncounted),
                    "{mode:?} relay {r}: {uncounted} uncounted, more than the {in_flight} in flight through it"
                ),
            }
            base = end;
        }
    }
    all_connected("end");
    w.stop.store(true, Ordering::SeqCst);
    assert_eq!(
        w.wrong.load(Ordering::SeqCst),
        0,
        "packets to the wrong key or from a wrong source"
    );
    assert_eq!(
        w.duplicates.load(Ordering::SeqCst),
        0,
        "packets delivered twice"
    );
    rt.shutdown_timeout(Duration::from_secs(1));
}
