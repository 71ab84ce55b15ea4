//! `ferry-loadtest turn` against a real TURN server: coturn's `turnserver` (Debian `coturn`;
//! required when `CI` is set, skipped with a message otherwise), started by each test on a free
//! loopback port.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use ferry_loadtest::{Cli, Command};

fn find_in_path(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

/// coturn's `turnserver` on a free loopback port, killed on drop.
struct Turn {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `turnserver` on 127.0.0.1 with `extra` arguments, or `None` (after saying why) when
/// it is absent outside CI. Returns once it answers a STUN Binding request.
fn turnserver(test: &str, extra: &[&str]) -> Option<Turn> {
    turnserver_on("127.0.0.1", test, extra)
}

fn turnserver_on(ip: &str, test: &str, extra: &[&str]) -> Option<Turn> {
    let Some(bin) = find_in_path("turnserver") else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "turnserver not found but CI is set: install it with `apt-get install -y coturn`"
            );
        }
        eprintln!("skipped {test}: install coturn (`apt-get install -y coturn`) to run it");
        return None;
    };
    let ip: std::net::IpAddr = ip.parse().expect("an IP");
    let port = UdpSocket::bind((ip, 0))
        .expect("a free port")
        .local_addr()
        .unwrap()
        .port();
    let child = Process::new(bin)
        .args(["-n", "-L", &ip.to_string(), "-p", &port.to_string()])
        .args([
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--no-rfc5780",
            "-m",
            "1",
        ])
        .args(["--relay-ip", &ip.to_string(), "--allow-loopback-peers"])
        // Its log to stdout (discarded), not to a new file in /var/log for every test.
        .args(["--log-file", "stdout"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("turnserver starts");
    let t = Turn {
        child,
        addr: SocketAddr::new(ip, port),
    };
    // Ready when it answers a Binding request (type 0x0001, magic cookie, any id).
    let probe = UdpSocket::bind((ip, 0)).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut req = vec![0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(&[7; 12]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    loop {
        assert!(
            Instant::now() < deadline,
            "turnserver never answered on {}",
            t.addr
        );
        let _ = probe.send_to(&req, t.addr);
        if matches!(probe.recv_from(&mut buf), Ok((n, _)) if n >= 20) {
            return Some(t);
        }
    }
}

fn turn_args(args: &[&str]) -> ferry_loadtest::cli::TurnArgs {
    let mut argv = vec!["ferry-loadtest", "turn"];
    argv.extend_from_slice(args);
    match Cli::try_parse_from(argv).expect("valid arguments").command {
        Command::Turn(a) => a,
        _ => unreachable!(),
    }
}

/// Both flows of every client carry datagrams through coturn, nothing is written off, and the
/// server's CPU time is read: the figures the benchmark compares with ferry's UDP relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coturn_relays_both_ways_and_its_cpu_time_is_measured() {
    let Some(t) = turnserver("coturn_relays_both_ways", &["--no-auth"]) else {
        return;
    };
    let addr = t.addr.to_string();
    let pid = t.child.id().to_string();
    for gso in [false, true] {
        let mut args = vec![
            addr.as_str(),
            "--clients",
            "3",
            "--size",
            "1200",
            "--window",
            "8",
            "--warmup",
            "200ms",
            "--duration",
            "1s",
            "--server-pid",
            &pid,
        ];
        if gso {
            args.push("--gso");
        }
        let r = ferry_loadtest::turn::run(&turn_args(&args))
            .await
            .unwrap_or_else(|e| panic!("gso {gso}: {e:#}"));
        assert_eq!((r.mode, r.pairs, r.size, r.gso), ("turn", 3, 1200, gso));
        // A window of 8 per direction over loopback moves thousands in a second; a relay that
        // forwarded one way only would stall every client within the first window.
        assert!(r.delivered > 1_000, "gso {gso}: delivered {}", r.delivered);
        assert!(r.sent > 1_000, "gso {gso}: sent {}", r.sent);
        assert_eq!(r.lost, 0, "gso {gso}: windows written off");
        // Nothing counted twice: what arrives in the window was sent in it, or was in flight
        // when it opened (at most a window per direction: 2 per client).
        assert!(
            r.delivered <= r.sent + 2 * 3 * 8,
            "gso {gso}: delivered {} of {} sent",
            r.delivered,
            r.sent
        );
        let s = r.server.expect("--server-pid given");
        assert!(
            s.cpu_seconds > 0.0 && s.per_cpu_second > 0.0,
            "gso {gso}: server CPU {s:?}"
        );
    }
}

/// A server that wants TURN's long-term credentials is refused with what to do about it.
#[tokio::test]
async fn a_server_that_wants_credentials_gets_an_error_that_says_so() {
    let Some(t) = turnserver(
        "a_server_that_wants_credentials",
        &["-a", "-u", "user:secret", "-r", "ferry.test"],
    ) else {
        return;
    };
    let err = ferry_loadtest::turn::run(&turn_args(&[&t.addr.to_string(), "--clients", "1"]))
        .await
        .expect_err("no credentials");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("401") && msg.contains("--no-auth"),
        "error: {msg}"
    );
}

/// Nothing listening: the error says so at once instead of timing out.
#[tokio::test]
async fn nothing_listening_is_said_plainly() {
    let port = free_udp_port();
    let err = ferry_loadtest::turn::run(&turn_args(&[&format!("127.0.0.1:{port}")]))
        .await
        .expect_err("nothing there");
    assert!(
        format!("{err:#}").contains("is the TURN server running"),
        "error: {err:#}"
    );
}

/// Over IPv6 the Allocate asks for an IPv6 relayed address (REQUESTED-ADDRESS-FAMILY), or the
/// ChannelBind to an IPv6 peer fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_server_relays_to_an_ipv6_peer() {
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped an_ipv6_server_relays_to_an_ipv6_peer: no IPv6 loopback here");
        return;
    }
    let Some(t) = turnserver_on("::1", "an_ipv6_server_relays", &["--no-auth"]) else {
        return;
    };
    let addr = t.addr.to_string();
    let r = ferry_loadtest::turn::run(&turn_args(&[
        &addr,
        "--clients",
        "2",
        "--window",
        "8",
        "--warmup",
        "200ms",
        "--duration",
        "500ms",
    ]))
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(r.delivered > 100 && r.lost == 0, "{r:?}");
}

/// A run longer than a permission lives is refused before it starts, with the reason.
#[tokio::test]
async fn a_run_longer_than_a_permission_lives_is_refused() {
    let err = ferry_loadtest::turn::run(&turn_args(&["127.0.0.1:3478", "--duration", "5m"]))
        .await
        .expect_err("too long");
    assert!(format!("{err:#}").contains("300 s"), "error: {err:#}");
}
