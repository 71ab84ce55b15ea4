//! `ferry tunnel`: two real tunnel processes against an in-process relay; the test plays the
//! UDP programs on both ends with plain UDP sockets.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};

use common::*;
use ferry_client::endpoint::MAX_PAYLOAD;
use ferry_client::{keys, SecretKey};
use ferry_relay::server::Server;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::timeout;

/// The tunnel's datagram limit (main.rs `TUNNEL_MAX`): what fits one E2E packet in an IPv4
/// UDP datagram.
const TUNNEL_MAX: usize = MAX_PAYLOAD;

fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env_remove("FERRY_RELAY_MAP")
        .env_remove("FERRY_RELAY")
        .env_remove("FERRY_LOG");
    c
}

/// Forwards each line of a child's pipe into a channel (closed at EOF).
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running `ferry tunnel`; killed when dropped (also when a test fails).
struct Tunnel {
    name: &'static str,
    child: Child,
    stdout: mpsc::UnboundedReceiver<String>,
    stderr: mpsc::UnboundedReceiver<String>,
    /// Every stdout line read so far.
    seen: Vec<String>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tunnel {
    fn spawn(name: &'static str, args: &[&str]) -> Tunnel {
        let mut child = ferry()
            .arg("tunnel")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        Tunnel {
            name,
            child,
            stdout,
            stderr,
            seen: Vec::new(),
        }
    }

    /// The next stdout line satisfying `pred` (earlier ones are kept in `seen`).
    async fn line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        loop {
            match timeout(T, self.stdout.recv()).await {
                Ok(Some(l)) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Ok(None) => {
                    let stderr = self.rest_of_stderr().await;
                    panic!(
                        "tunnel {}: stdout closed before {what}; stdout: {:?}; stderr: {stderr:?}",
                        self.name, self.seen
                    )
                }
                Err(_) => panic!(
                    "tunnel {}: no {what} within {T:?}; stdout: {:?}",
                    self.name, self.seen
                ),
            }
        }
    }

    /// Waits for the ready line; returns it and the --listen socket's address.
    async fn ready(&mut self) -> (String, SocketAddr) {
        let l = self
            .line("ready line", |l| l.starts_with("tunnel ready: "))
            .await;
        let addr = l
            .strip_prefix("tunnel ready: udp ")
            .and_then(|r| r.split(' ').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {l:?}"));
        (l, addr)
    }

    /// The next stderr line containing `needle`.
    async fn stderr_line(&mut self, needle: &str) -> String {
        loop {
            match timeout(T, self.stderr.recv()).await {
                Ok(Some(l)) if l.contains(needle) => return l,
                Ok(Some(_)) => {}
                _ => panic!("tunnel {}: no stderr line with {needle:?}", self.name),
            }
        }
    }

    /// Stderr until it closes (the process exits).
    async fn rest_of_stderr(&mut self) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(Some(l)) = timeout(T, self.stderr.recv()).await {
            v.push(l);
        }
        v
    }

    /// Sends `signal` (`TERM`, `INT`); returns the exit status and the rest of stdout
    /// (summary included).
    async fn stop(&mut self, signal: &str) -> (ExitStatus, Vec<String>) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} failed");
        let mut rest = Vec::new();
        while let Ok(Some(l)) = timeout(T, self.stdout.recv()).await {
            rest.push(l);
        }
        let status = self.child.wait().unwrap();
        (status, rest)
    }
}

/// A relay with STUN, a map file and two key files.
struct Net {
    _relay: Server,
    _dir: tempfile::TempDir,
    map: String,
    a_key: String,
    a_pub: String,
    b_key: String,
    b_pub: String,
}

async fn net() -> Net {
    let relay = plain_relay(true).await;
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("derpmap.json");
    std::fs::write(&map, map_for(&relay).to_json()).unwrap();
    let key = |name: &str| -> (String, String) {
        let path: PathBuf = dir.path().join(name);
        let k = SecretKey::generate();
        keys::write_secret(&path, &k).unwrap();
        (
            path.to_str().unwrap().into(),
            keys::display_public(&k.public()),
        )
    };
    let (a_key, a_pub) = key("a.key");
    let (b_key, b_pub) = key("b.key");
    Net {
        map: map.to_str().unwrap().into(),
        _relay: relay,
        _dir: dir,
        a_key,
        a_pub,
        b_key,
        b_pub,
    }
}

/// Tunnel A (no --forward: replies go to the last local sender) and tunnel B (--forward to
/// `b_app`), both ready; returns them with their --listen addresses.
async fn tunnels(n: &Net, b_app: SocketAddr) -> (Tunnel, SocketAddr, Tunnel, SocketAddr) {
    tunnels_with(n, b_app, &[]).await
}

/// [`tunnels`], with `a_extra` appended to tunnel A's arguments.
async fn tunnels_with(
    n: &Net,
    b_app: SocketAddr,
    a_extra: &[&str],
) -> (Tunnel, SocketAddr, Tunnel, SocketAddr) {
    let fwd = b_app.to_string();
    let mut b = Tunnel::spawn(
        "B",
        &[
            &n.a_pub,
            "--listen",
            "127.0.0.1:0",
            "--forward",
            &fwd,
            "--key-file",
            &n.b_key,
            "--relay-map",
            &n.map,
        ],
    );
    let mut a_args = vec![
        n.b_pub.as_str(),
        "--listen",
        "127.0.0.1:0",
        "--key-file",
        &n.a_key,
        "--relay-map",
        &n.map,
    ];
    a_args.extend_from_slice(a_extra);
    let mut a = Tunnel::spawn("A", &a_args);
    let (a_ready, a_addr) = a.ready().await;
    let (b_ready, b_addr) = b.ready().await;
    for (l, ours, theirs) in [
        (&a_ready, &n.a_pub, &n.b_pub),
        (&b_ready, &n.b_pub, &n.a_pub),
    ] {
        assert!(
            l.contains(&format!("<-> {theirs} (we are {ours}, home relay 900)")),
            "{l}"
        );
    }
    assert!(b_ready.ends_with(&format!("go to {b_app}")), "{b_ready}");
    assert!(
        a_ready.ends_with("go to the last local sender"),
        "{a_ready}"
    );
    (a, a_addr, b, b_addr)
}

async fn recv(sock: &UdpSocket, what: &str) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 70_000];
    let (len, from) = timeout(T, sock.recv_from(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {T:?}"))
        .unwrap();
    buf.truncate(len);
    (buf, from)
}

/// Datagram `i`: its number, then a pattern whose length varies with `i` (4..=1204 bytes).
fn datagram(i: u32) -> Vec<u8> {
    let mut d = i.to_be_bytes().to_vec();
    d.extend((0..(i * 37) % 1201).map(|j| (i + j) as u8));
    d
}

fn number(d: &[u8]) -> u32 {
    let i = u32::from_be_bytes(d[..4].try_into().unwrap());
    assert_eq!(d, datagram(i), "datagram {i} changed on the way");
    i
}

fn summary(lines: &[String]) -> &str {
    lines
        .iter()
        .find(|l| l.starts_with("tunnel summary: "))
        .unwrap_or_else(|| panic!("no summary in {lines:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tunnels_carry_200_datagrams_each_way_exactly_once() {
    let n = net().await;
    let a_app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b_app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (mut a, a_addr, mut b, b_addr) = tunnels(&n, b_app.local_addr().unwrap()).await;

    const N: u32 = 200;
    const WINDOW: u32 = 10;
    let mut at_b = BTreeMap::<u32, u32>::new();
    let mut at_a = BTreeMap::<u32, u32>::new();
    let mut bytes = 0;
    for w in (0..N).step_by(WINDOW as usize) {
        // A window of datagrams A-app → tunnel A → tunnel B → B-app, ...
        for i in w..w + WINDOW {
            let d = datagram(i);
            bytes += d.len();
            a_app.send_to(&d, a_addr).await.unwrap();
        }
        for _ in 0..WINDOW {
            let (d, from) = recv(&b_app, &format!("B-app, window {w}, got {at_b:?}")).await;
            // ... which come from tunnel B's --listen socket; B-app answers to that source
            // (the same bytes), back through both tunnels to A's last local sender: A-app.
            assert_eq!(from, b_addr);
            *at_b.entry(number(&d)).or_default() += 1;
            b_app.send_to(&d, from).await.unwrap();
        }
        for _ in 0..WINDOW {
            let (d, from) = recv(&a_app, &format!("A-app, window {w}, got {at_a:?}")).await;
            assert_eq!(from, a_addr);
            *at_a.entry(number(&d)).or_default() += 1;
        }
    }
    let once: BTreeMap<u32, u32> = (0..N).map(|i| (i, 1)).collect();
    assert_eq!(at_b, once, "B-app: every datagram exactly once");
    assert_eq!(at_a, once, "A-app: every reply exactly once");

    // SIGTERM / SIGINT: exit 0 with a summary that counted exactly what passed, both ways.
    for (t, peer, signal) in [(&mut a, &n.b_pub, "TERM"), (&mut b, &n.a_pub, "INT")] {
        let (status, rest) = t.stop(signal).await;
        assert!(status.success(), "tunnel {}: {status}", t.name);
        let all = [t.seen.clone(), rest].concat();
        let s = summary(&all);
        assert!(
            s.contains(&format!(
                "to peer {N} datagrams / {bytes} bytes, from peer {N} datagrams / {bytes} bytes; dropped: 0 over"
            )),
            "tunnel {}: {s}",
            t.name
        );
        // The path the peer was reached on, in `ferry ping`'s format.
        let path = format!("path to {peer}: ");
        assert!(
            all.iter().any(|l| l.starts_with(&path)
                && (l.contains(": relay 900 (after ") || l.contains(": direct "))),
            "tunnel {}: {all:?}",
            t.name
        );
    }
    // Nothing extra was delivered.
    let mut buf = [0u8; 2048];
    assert!(b_app.try_recv_from(&mut buf).is_err());
    assert!(a_app.try_recv_from(&mut buf).is_err());
}

/// `--no-udp-gso`: every datagram tunnel A's endpoint sends is a message of its own. By
/// default, bursts of equal-size datagrams on the direct path leave in fewer messages (GSO
/// runs), so the control run shows that the counts can tell the two apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_udp_gso_sends_datagram_by_datagram() {
    const BURSTS: u8 = 8;
    const BURST: usize = 64;
    for (extra, gso) in [(&["--no-udp-gso"][..], false), (&[][..], true)] {
        let n = net().await;
        let a_app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b_app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (mut a, a_addr, _b, _) = tunnels_with(&n, b_app.local_addr().unwrap(), extra).await;
        // The counts are the main UDP socket's: wait for the direct path (loopback has one),
        // which traffic starts.
        let direct = format!("path to {}: direct ", n.b_pub);
        let warm = {
            let a_app = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            tokio::spawn(async move {
                loop {
                    let _ = a_app.send_to(b"warm", a_addr);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            })
        };
        a.line("a direct path", |l| l.starts_with(&direct)).await;
        warm.abort();
        for burst in 0..BURSTS {
            for _ in 0..BURST {
                a_app.send_to(&[burst; 1000], a_addr).await.unwrap();
            }
            let mut got = 0;
            while got < BURST {
                let (d, _) = recv(&b_app, &format!("burst {burst}")).await;
                if d != b"warm" {
                    assert_eq!(d, [burst; 1000]);
                    got += 1;
                }
            }
        }
        let (status, rest) = a.stop("TERM").await;
        assert!(status.success(), "{status}");
        let all = [a.seen.clone(), rest].concat();
        let s = summary(&all);
        println!("{}: {s}", if gso { "default" } else { "--no-udp-gso" });
        let out = s.split("UDP out: ").nth(1).unwrap_or_else(|| panic!("{s}"));
        let nums: Vec<u64> = out
            .split_whitespace()
            .take(4)
            .filter_map(|w| w.parse().ok())
            .collect();
        let [datagrams, sends] = nums[..] else {
            panic!("no UDP counts in {s}")
        };
        assert!(
            datagrams >= u64::from(BURSTS) * BURST as u64,
            "the bursts went directly: {s}"
        );
        if gso {
            assert!(sends < datagrams, "GSO on, yet no run coalesced: {s}");
        } else {
            assert_eq!(sends, datagrams, "--no-udp-gso, yet runs coalesced: {s}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_unaddressed_datagrams_are_dropped_and_counted() {
    let n = net().await;
    let a_app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b_app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (mut a, a_addr, _b, b_addr) = tunnels(&n, b_app.local_addr().unwrap()).await;

    // B-app speaks first: tunnel A has no --forward and no local sender yet, so it drops it.
    b_app.send_to(b"too early", b_addr).await.unwrap();
    let w = a.stderr_line("no local program has sent").await;
    assert!(w.contains("--forward"), "{w}");

    // Over the limit (Endpoint's MAX_PAYLOAD + 1, and the tunnel's own, lower limit + 1, see
    // TUNNEL_MAX in main.rs): dropped with a warning each, never truncated. (The second
    // warning is suppressed by the rate limit; the summary counts both.)
    for size in [MAX_PAYLOAD + 1, TUNNEL_MAX + 1] {
        let big = vec![7u8; size];
        assert_eq!(a_app.send_to(&big, a_addr).await.unwrap(), big.len());
    }
    let w = a.stderr_line("-byte datagram from").await;
    assert!(
        w.contains(&format!("dropped a {}-byte datagram", MAX_PAYLOAD + 1))
            && w.contains(&format!("at most {TUNNEL_MAX} bytes")),
        "{w}"
    );
    // Exactly the limit arrives whole (on a direct path as on the relay).
    let max: Vec<u8> = (0..TUNNEL_MAX).map(|i| (i % 251) as u8).collect();
    a_app.send_to(&max, a_addr).await.unwrap();
    let (d, from) = recv(&b_app, "B-app, largest datagram").await;
    assert!(d == max && from == b_addr, "{} bytes from {from}", d.len());
    // The tunnel carries on, both ways (A-app is now A's return address).
    a_app.send_to(b"after", a_addr).await.unwrap();
    let (d, from) = recv(&b_app, "B-app").await;
    assert_eq!((d.as_slice(), from), (&b"after"[..], b_addr));
    b_app.send_to(b"reply", b_addr).await.unwrap();
    let (d, from) = recv(&a_app, "A-app").await;
    assert_eq!((d.as_slice(), from), (&b"reply"[..], a_addr));

    let (status, rest) = a.stop("TERM").await;
    assert!(status.success(), "{status}");
    let s = summary(&rest);
    assert!(
        s.contains(&format!(
            "to peer 2 datagrams / {} bytes, from peer 1 datagrams / 5 bytes",
            TUNNEL_MAX + 5
        )) && s.contains(&format!("dropped: 2 over {TUNNEL_MAX} bytes"))
            && s.contains("1 with no local return address"),
        "{s}"
    );
}

fn run(args: &[&str]) -> (bool, String) {
    let o = ferry().args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn clear_errors_for_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let key = |name: &str| {
        let path = dir.path().join(name);
        let k = SecretKey::generate();
        keys::write_secret(&path, &k).unwrap();
        (path, keys::display_public(&k.public()))
    };
    let (a_key, a_pub) = key("a.key");
    let (_, b_pub) = key("b.key");
    let a_key = a_key.to_str().unwrap();
    let tunnel = |peer: &str, listen: &str, extra: &[&str]| {
        let mut args = vec!["tunnel", peer, "--listen", listen, "--key-file", a_key];
        args.extend_from_slice(extra);
        run(&args)
    };
    let relay = ["--relay", "http://127.0.0.1:1"];

    // A bad peer key.
    let (ok, err) = tunnel("nodekey:1234", "127.0.0.1:0", &relay);
    assert!(
        !ok && err.contains("not a valid key") && err.contains("nodekey:"),
        "{err}"
    );
    // Our own key as the peer's.
    let (ok, err) = tunnel(&a_pub, "127.0.0.1:0", &relay);
    assert!(
        !ok && err.contains("own key") && err.contains("ferry pubkey"),
        "{err}"
    );
    // A --listen address in use.
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    let (ok, err) = tunnel(&b_pub, &busy, &relay);
    assert!(
        !ok && err.contains(&format!("cannot listen on UDP {busy}"))
            && err.contains("pick another --listen port"),
        "{err}"
    );
    // A malformed relay map.
    let m = dir.path().join("map.json");
    std::fs::write(
        &m,
        r#"{"Regions":{"900":{"Nodes":[{"Name":"a","DERPPort":443}]}}}"#,
    )
    .unwrap();
    let (ok, err) = tunnel(&b_pub, "127.0.0.1:0", &["--relay-map", m.to_str().unwrap()]);
    assert!(
        !ok && err.contains(r#"Regions["900"].Nodes[0].HostName"#),
        "{err}"
    );
    // A missing key file names the file.
    let (ok, err) = run(&[
        "tunnel",
        &b_pub,
        "--listen",
        "127.0.0.1:0",
        "--key-file",
        "/nonexistent/x.key",
        "--relay",
        "http://127.0.0.1:1",
    ]);
    assert!(!ok && err.contains("/nonexistent/x.key"), "{err}");
    // An unreachable relay (a map without STUN, so netcheck does not wait).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let m2 = dir.path().join("dead.json");
    std::fs::write(
        &m2,
        map(&[(900, node_json(900, port, None, false, None))]).to_json(),
    )
    .unwrap();
    let (ok, err) = tunnel(
        &b_pub,
        "127.0.0.1:0",
        &["--relay-map", m2.to_str().unwrap()],
    );
    assert!(
        !ok && err.contains("cannot reach relay") && err.contains("is the relay running"),
        "{err}"
    );
}

#[test]
fn help_has_examples() {
    let out = |args: &[&str]| {
        let o = ferry().args(args).output().unwrap();
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let top = out(&["--help"]);
    assert!(
        top.contains("ferry tunnel nodekey:") && top.contains("nc -u 127.0.0.1 7000"),
        "{top}"
    );
    let t = out(&["tunnel", "--help"]);
    assert!(
        t.contains("Examples:") && t.contains("--forward 127.0.0.1:8000") && t.contains("nc -u"),
        "{t}"
    );
}
