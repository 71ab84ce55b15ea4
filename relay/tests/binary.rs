//! The real `ferry-relay` process: Tailscale's `derpprobe`, `promtool`, signals, `derpmap`,
//! `healthcheck` (config errors: binary_config.rs).
//!
//! Foreign tools come from `scripts/test-deps.sh` (into `<repo>/.tools/bin`) or PATH. When one is
//! missing the test says so and is skipped, except under CI (`CI` set), where it fails.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require, T};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-relay");

/// A running `ferry-relay` and what its ready line said.
struct Proc {
    child: Child,
    derp_port: u16,
    stun_port: Option<u16>,
    metrics: Option<SocketAddr>,
    server_key: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field<'a>(line: &'a str, after: &str, until: &[char]) -> Option<&'a str> {
    let i = line.find(after)? + after.len();
    let rest = &line[i..];
    Some(rest.split(|c| until.contains(&c)).next().unwrap_or(rest))
}

/// Starts the binary with `args` and waits for its ready line on stdout.
fn start(args: &[&str]) -> Proc {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains(" ready: "), "no ready line, got {line:?}");
    // "... DERP https://localhost:PORT/derp, STUN udp+tcp [127.0.0.1:PORT], UDP relay ADDR, metrics http://ADDR/metrics, server key HEX"
    let derp = field(&line, "/derp", &[]).map(|_| ()).and_then(|_| {
        let url = field(&line, "DERP ", &[' ', ','])?;
        url.rsplit_once(':')?.1.split('/').next()?.parse().ok()
    });
    let stun_port = field(&line, "STUN udp+tcp [", &[']', ','])
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.port());
    let metrics = field(&line, "metrics http://", &['/']).and_then(|a| a.parse().ok());
    let server_key = field(&line, "server key ", &['\n', ' '])
        .unwrap()
        .to_string();
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    Proc {
        child,
        derp_port: derp.expect("DERP port in ready line"),
        stun_port,
        metrics,
        server_key,
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0);
}

fn tls_args(dir: &str) -> Vec<&str> {
    vec![
        "--listen",
        "127.0.0.1:0",
        "--hostname",
        "localhost",
        "--key-file",
        dir,
        "--http-listen",
        "off",
        "--metrics-listen",
        "127.0.0.1:0",
        "--stun-listen",
        "127.0.0.1:0",
        // Not the default 0.0.0.0:3480: tests run relays in parallel.
        "--udp-relay-listen",
        "127.0.0.1:0",
    ]
}

/// Tailscale's derpprobe, pointed at ferry through a DERP map, reports TLS, STUN and delivery OK;
/// then the metrics scrape passes `promtool check metrics`.
#[test]
fn derpprobe_reports_every_probe_ok_and_metrics_pass_promtool() {
    let Some(derpprobe) = require("derpprobe", "scripts/test-deps.sh") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("relay.key");
    let key_s = key.to_str().unwrap().to_string();
    let p = start(&tls_args(&key_s));
    let stun = p.stun_port.expect("STUN on");
    let map = serde_json::json!({"Regions": {"900": {"RegionID": 900, "RegionCode": "ferry", "RegionName": "ferry test",
        "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": "localhost", "IPv4": "127.0.0.1",
                   "STUNPort": stun, "DERPPort": p.derp_port}]}}});
    let map_path = dir.path().join("derpmap.json");
    std::fs::write(&map_path, map.to_string()).unwrap();
    let out = Command::new(derpprobe)
        .args(["-once", "-spread=false", "-derp-map"])
        .arg(format!("file://{}", map_path.display()))
        .env("SSL_CERT_FILE", dir.path().join("self-signed-cert.pem"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    eprintln!("{log}");
    assert!(out.status.success(), "derpprobe failed:\n{log}");
    for probe in [
        "derp/ferry/900a/tls",
        "derp/ferry/900a/udp",
        "derp/ferry/900a/900a/mesh",
    ] {
        assert!(
            log.contains(&format!("good: {probe}:")),
            "{probe} not good:\n{log}"
        );
    }
    assert!(!log.contains("bad:"), "{log}");

    let scrape = http_get(p.metrics.expect("metrics on"), "/metrics");
    assert!(
        scrape.contains("ferry_relay_handshakes_total 2"),
        "the mesh probe's two clients:\n{scrape}"
    );
    assert!(
        scrape.contains("ferry_stun_requests_total{transport=\"udp\",result=\"success\"} 1"),
        "{scrape}"
    );
    if let Some(promtool) = require(
        "promtool",
        "scripts/test-deps.sh (Debian package prometheus)",
    ) {
        let mut c = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut c.stdin.take().unwrap(), scrape.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        let msg = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{msg}"
        );
        assert!(msg.trim().is_empty(), "promtool has complaints:\n{msg}");
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// SIGTERM drains and exits within the bound; a restart with the same key file has the same key.
#[test]
fn sigterm_drains_in_time_and_restart_keeps_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("relay.key");
    let key_s = key.to_str().unwrap().to_string();
    let mut args = tls_args(&key_s);
    args.extend(["--shutdown-timeout", "3s"]);
    let mut p = start(&args);
    let first_key = p.server_key.clone();
    // Hold a real DERP connection open across the signal.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let port = p.derp_port;
    let cert = std::fs::read(dir.path().join("self-signed-cert.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut &cert[..])
        .next()
        .unwrap()
        .unwrap()
        .to_vec();
    let conn = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = common::client_tls(&der).connect(name, tcp).await.unwrap();
        use tokio::io::AsyncWriteExt;
        tls.write_all(b"GET /derp HTTP/1.1\r\nHost: localhost\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n").await.unwrap();
        let head = common::read_head(&mut tls).await;
        assert!(head.starts_with("HTTP/1.1 101"));
        let kp = ts_keys::NodeKeyPair::random();
        ts_derp::Client::handshake(tls, &kp).await.unwrap()
    });
    let t0 = Instant::now();
    signal(&p.child, libc::SIGTERM);
    let status = wait_exit(&mut p.child, Duration::from_secs(6));
    assert!(status.success(), "{status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "drained in {:?}",
        t0.elapsed()
    );
    // The client saw the connection end (no Restarting: ts_derp would not understand it).
    assert!(rt
        .block_on(async { tokio::time::timeout(T, conn.recv_one()).await.unwrap() })
        .is_err());

    let again = start(&args);
    assert_eq!(
        again.server_key, first_key,
        "same key file, same server key"
    );
}

/// SIGHUP reloads manual certificate files; established connections keep working.
#[test]
fn sighup_reloads_manual_certs_without_dropping_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, kp) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let write_cert = |name: &str| {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), name.to_string()])
            .unwrap();
        std::fs::write(&cp, c.cert.pem()).unwrap();
        std::fs::write(&kp, c.key_pair.serialize_pem()).unwrap();
        c.cert.der().to_vec()
    };
    let first = write_cert("one.test");
    let key = dir.path().join("relay.key");
    let key_s = key.to_str().unwrap().to_string();
    let mut args = tls_args(&key_s);
    let (cps, kps) = (
        cp.to_str().unwrap().to_string(),
        kp.to_str().unwrap().to_string(),
    );
    args.extend([
        "--cert-mode",
        "manual",
        "--cert-file",
        &cps,
        "--cert-key-file",
        &kps,
    ]);
    let p = start(&args);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let port = p.derp_port;
    let connect = |der: Vec<u8>| {
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            common::client_tls(&der).connect(name, tcp).await
        })
    };
    let mut old_conn = connect(first.clone()).expect("first cert trusted");
    let second = write_cert("two.test");
    signal(&p.child, libc::SIGHUP);
    // The reload is asynchronous to us: wait until a new handshake sees the new certificate.
    let deadline = Instant::now() + T;
    while connect(second.clone()).is_err() {
        assert!(
            Instant::now() < deadline,
            "new certificate not served after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(connect(first).is_err(), "old certificate no longer served");
    // The connection made before the reload still works.
    rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        old_conn
            .write_all(b"GET /derp/probe HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let head = common::read_head(&mut old_conn).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    });
}

/// `healthcheck` exits 0 against a running relay's metrics listener and 1, saying why, when
/// nothing listens there.
#[test]
fn healthcheck_subcommand_reports_up_and_down() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("relay.key");
    let key_s = key.to_str().unwrap().to_string();
    let p = start(&tls_args(&key_s));
    let metrics = p.metrics.expect("metrics on");
    let out = Command::new(BIN)
        .args(["healthcheck", "--url"])
        .arg(format!("http://{metrics}/healthz"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = Command::new(BIN)
        .args(["healthcheck", "--timeout", "2s", "--url"])
        .arg(format!("http://{dead}/healthz"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.lines().count() == 1 && err.contains("unhealthy") && err.contains("cannot connect"),
        "{err}"
    );
    // A path that answers, but not 200.
    let out = Command::new(BIN)
        .args(["healthcheck", "--url"])
        .arg(format!("http://{metrics}/nope"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("404"), "{err}");
}

/// `derpmap` prints the relay's region from the same flags, environment and file as the relay,
/// with the self-signed certificate's pin; Tailscale's derpprobe consumes it as it is.
#[test]
fn derpmap_prints_a_map_derpprobe_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("relay.key");
    let key_s = key.to_str().unwrap().to_string();

    // Before the first start there is no certificate to pin: say so, create nothing.
    let out = Command::new(BIN)
        .args(["derpmap", "--key-file", &key_s])
        .env("FERRY_HOSTNAME", "localhost")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("start the relay once"),
        "{err}"
    );
    assert!(!key.exists(), "derpmap created nothing");

    let p = start(&tls_args(&key_s));
    let stun = p.stun_port.expect("STUN on");
    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        format!("[derpmap]\nregion_id = 901\nregion_code = \"test\"\nregion_name = \"ferry test\"\nderp_port = {}\nipv4 = \"127.0.0.1\"\n", p.derp_port),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["derpmap", "--config"])
        .arg(&cfg)
        .args(["--key-file", &key_s, "--stun-listen"])
        .arg(format!("127.0.0.1:{stun}"))
        .env("FERRY_HOSTNAME", "localhost")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let node = &map["Regions"]["901"]["Nodes"][0];
    let pem = std::fs::read(dir.path().join("self-signed-cert.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut &pem[..])
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(node["CertName"], ferry_relay::server::cert_name_pin(&der));
    assert_eq!(node["HostName"], "localhost");
    assert_eq!(node["Name"], "901a");
    assert_eq!(node["DERPPort"], p.derp_port);
    assert_eq!(node["STUNPort"], stun);
    assert_eq!(map["Regions"]["901"]["RegionCode"], "test");

    let out = Command::new(BIN)
        .args([
            "derpmap",
            "--format",
            "headscale",
            "--no-stun",
            "--key-file",
            &key_s,
        ])
        .env("FERRY_HOSTNAME", "localhost")
        .output()
        .unwrap();
    let yaml = String::from_utf8_lossy(&out.stdout);
    // The UDP relay (on by default) has no field in a DERP map: its port is said beside it,
    // so the operator opens it too.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the UDP relay listens on 3480/udp"), "{err}");
    let off = Command::new(BIN)
        .args(["derpmap", "--udp-relay-listen", "off", "--key-file", &key_s])
        .env("FERRY_HOSTNAME", "localhost")
        .output()
        .unwrap();
    assert!(off.status.success());
    assert!(
        !String::from_utf8_lossy(&off.stderr).contains("UDP relay"),
        "{}",
        String::from_utf8_lossy(&off.stderr)
    );
    assert!(
        yaml.starts_with("regions:\n  900:\n")
            && yaml.contains("        certname: \"sha256-raw:")
            && yaml.contains("        stunport: -1\n")
            && yaml.contains("        derpport: 443\n"),
        "{yaml}"
    );

    let Some(derpprobe) = require("derpprobe", "scripts/test-deps.sh") else {
        return;
    };
    let map_path = dir.path().join("derpmap.json");
    std::fs::write(&map_path, map.to_string()).unwrap();
    // No SSL_CERT_FILE: nothing trusts the self-signed certificate except the CertName pin.
    // The mesh probe's DERP clients (derphttp) honour the pin, so "good" there proves it right.
    // derpprobe's separate TLS probe checks the chain against system roots and ignores
    // CertName (it is meant for CA-issued certificates), so it is the one expected "bad".
    let out = Command::new(derpprobe)
        .args(["-once", "-spread=false", "-derp-map"])
        .arg(format!("file://{}", map_path.display()))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    eprintln!("{log}");
    for probe in [
        "derpmap-probe",
        "derp/test/901a/udp",
        "derp/test/901a/901a/mesh",
    ] {
        assert!(
            log.contains(&format!("good: {probe}:")),
            "{probe} not good:\n{log}"
        );
    }
    let bad: Vec<&str> = log.lines().filter(|l| l.contains(" bad: ")).collect();
    assert!(
        bad.iter().all(|l| l.contains("bad: derp/test/901a/tls: ")),
        "{log}"
    );
}

/// SIGTERM right after the ready line drains and exits 0: the handlers are installed before the
/// line is printed. Repeated, since the old race lost about 1 run in 8.
#[test]
fn sigterm_right_after_ready_exits_cleanly() {
    use std::io::BufRead;
    for _ in 0..10 {
        let mut child = Command::new(BIN)
            .args([
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--stun-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "off",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains(" ready: "), "{line}");
        signal(&child, libc::SIGTERM);
        let status = child.wait().unwrap();
        assert!(status.success(), "{status:?}");
    }
}

/// A kept-alive HTTP connection that sends `path` every `every` (or once, then idles) until
/// the server ends it. Returns after the first response; the thread ends with the connection.
fn keep_alive_client(
    addr: SocketAddr,
    path: &'static str,
    every: Option<Duration>,
) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            if write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
                return;
            }
            // One response: head, then the body by Content-Length.
            let mut got = Vec::new();
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
                let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    if body.len() >= len {
                        break;
                    }
                }
            }
            let _ = tx.send(());
            match every {
                Some(d) => std::thread::sleep(d),
                None => {
                    let _ = s.read(&mut buf);
                    return;
                }
            }
        }
    });
    rx.recv_timeout(T).expect("first response");
    h
}

/// SIGTERM ends the process within `shutdown_timeout` + 1 s whatever is connected: idle
/// keep-alive connections and scrapers on port 80 and on the metrics port are closed at once
/// (they once held the process 30 s and indefinitely), and DERP clients that neither read nor
/// leave, or a slowloris, are cut at the deadline.
#[test]
fn sigterm_exits_in_time_whatever_is_connected() {
    use std::io::Write;
    let shutdown = Duration::from_secs(4);
    type Hold<'a> = &'a dyn Fn(&Proc, SocketAddr) -> Box<dyn FnOnce()>;
    let run = |case: &str, hold: Hold| {
        let http = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
        let http_s = http.to_string();
        let mut p = start(&[
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--stun-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--http-listen",
            &http_s,
            "--shutdown-timeout",
            "4s",
        ]);
        let release = hold(&p, http);
        let t0 = Instant::now();
        signal(&p.child, libc::SIGTERM);
        let status = wait_exit(&mut p.child, shutdown + Duration::from_secs(10));
        let took = t0.elapsed();
        eprintln!("{case}: exited {status:?} in {took:?}");
        assert!(status.success(), "{case}: {status:?}");
        release();
        took
    };
    // HTTP keep-alive alone: closed at the signal, so the exit does not wait for the deadline.
    for (case, port80, every) in [
        ("idle keep-alive on port 80", true, None),
        ("scraper on port 80", true, Some(Duration::from_millis(300))),
        ("idle keep-alive on metrics", false, None),
        (
            "scraper on metrics",
            false,
            Some(Duration::from_millis(300)),
        ),
    ] {
        let took = run(case, &|p, http| {
            let (addr, path) = if port80 {
                (http, "/generate_204")
            } else {
                (p.metrics.unwrap(), "/metrics")
            };
            let h = keep_alive_client(addr, path, every);
            Box::new(move || h.join().unwrap())
        });
        assert!(
            took < shutdown,
            "{case}: took {took:?}, not closed at the signal"
        );
    }
    // DERP clients that neither read nor leave, and a slowloris: cut at the deadline.
    let took = run("stuck DERP clients and a slowloris", &|p, _| {
        let mut held: Vec<std::net::TcpStream> = Vec::new();
        let derp = SocketAddr::from(([127, 0, 0, 1], p.derp_port));
        let rt = tokio::runtime::Runtime::new().unwrap();
        for _ in 0..3 {
            let io = rt.block_on(tokio::net::TcpStream::connect(derp)).unwrap();
            let std_io = io.into_std().unwrap();
            std_io.set_nonblocking(false).unwrap();
            let mut s = std_io;
            s.write_all(
                b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
            )
            .unwrap();
            held.push(s);
        }
        let mut slow = std::net::TcpStream::connect(derp).unwrap();
        slow.write_all(b"GET /de").unwrap();
        held.push(slow);
        Box::new(move || drop(held))
    });
    assert!(
        took < shutdown + ferry_relay::server::SHUTDOWN_MARGIN + Duration::from_millis(500),
        "took {took:?}"
    );
}

/// Log lines carry colour only on a terminal, and not with `NO_COLOR`: a log file or a pipe gets
/// no escape codes. (The terminal is a pty from util-linux's `script`.)
#[test]
fn log_colour_only_on_a_terminal() {
    let run = |via_pty: bool, no_color: bool| -> String {
        let relay = format!(
            "{BIN} --dev --listen 127.0.0.1:0 --stun-listen 127.0.0.1:0 --metrics-listen off --log-level info"
        );
        // The relay logs "relay ready" and is stopped by a SIGTERM from the shell.
        let script = format!("{relay} & p=$!; sleep 0.5; kill -TERM $p; wait $p");
        let mut cmd = if via_pty {
            let mut c = Command::new("script");
            c.args(["-qec", &script, "/dev/null"]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        };
        cmd.env_remove("RUST_LOG").env_remove("NO_COLOR");
        if no_color {
            cmd.env("NO_COLOR", "1");
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("relay ready"), "no log line: {text}");
        text
    };
    assert!(
        !run(false, false).contains('\x1b'),
        "colour codes in a pipe"
    );
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIPPED (terminal part): util-linux `script` not found");
        return;
    }
    assert!(
        run(true, false).contains("\x1b["),
        "no colour on a terminal"
    );
    assert!(!run(true, true).contains('\x1b'), "colour despite NO_COLOR");
}
