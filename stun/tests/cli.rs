//! The `ferry-stun` binary: help text, errors, and a real run.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use common::*;
use ferry_stun::proto;
use stun_codec::rfc5389::attributes::XorMappedAddress;
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-stun");

fn run_sync(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("binary runs")
}

#[test]
fn help_teaches_usage() {
    let out = run_sync(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--listen",
        "FERRY_STUN_LISTEN",
        "0.0.0.0:3478",
        "[::]:3478",
        "--no-tcp",
        "--software",
        "--rfc5780-alternate",
        "--log-format",
        "FERRY_STUN_LOG_FORMAT",
        "Examples:",
        "turnutils_stunclient",
    ] {
        assert!(help.contains(needle), "help lacks {needle}:\n{help}");
    }
}

#[test]
fn port_in_use_is_explained() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_sync(&["--listen", &addr, "--no-tcp"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains(&addr), "{err}");
    assert!(err.contains("already in use"), "{err}");
    assert!(err.contains("another port"), "{err}");
}

/// The library says what is wrong; the binary adds which flag to change.
#[test]
fn refused_settings_name_the_flag() {
    for (args, what, flag) in [
        (
            &["--udp-workers", "0"][..],
            "udp_workers is 0",
            "--udp-workers 1",
        ),
        (
            &["--tcp-idle-timeout", "0"][..],
            "tcp_idle_timeout is 0",
            "--tcp-idle-timeout",
        ),
        (
            &["--tcp-max-connections", "0"][..],
            "tcp_max_connections is 0",
            "--no-tcp",
        ),
    ] {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend(args);
        let out = run_sync(&all);
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(what) && err.contains(flag), "{args:?}: {err}");
    }
}

#[test]
fn rfc5780_needs_a_specific_primary() {
    let out = run_sync(&[
        "--listen",
        "0.0.0.0:0",
        "--rfc5780-alternate",
        "127.0.0.2:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--rfc5780-alternate"), "{err}");
    assert!(err.contains("specific IP"), "{err}");
}

#[test]
fn bad_address_is_rejected_by_the_parser() {
    let out = run_sync(&["--listen", "localhost"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--listen"), "{err}");
}

/// Start the binary on an ephemeral port (configured through the environment, with JSON
/// logs), read the address it prints, and ask it for our address.
#[tokio::test]
async fn binary_serves_udp_and_tcp() {
    let mut child = tokio::process::Command::new(BIN)
        .env("FERRY_STUN_LISTEN", "127.0.0.1:0")
        .env("FERRY_STUN_LOG_FORMAT", "json")
        .env("FERRY_STUN_SOFTWARE", "ferry-test")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(GUARD, stdout.next_line())
        .await
        .expect("no listening line")
        .unwrap()
        .expect("stdout closed");
    // "ferry-stun listening: udp [127.0.0.1:P] tcp [127.0.0.1:Q]"
    let addrs: Vec<SocketAddr> = line
        .split(['[', ']', ',', ' '])
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(addrs.len(), 2, "{line}");

    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (reply, _) = udp_exchange(
        &sock,
        addrs[0],
        &proto::binding_request(txid(1), None, false),
    )
    .await;
    let m = decode(&reply);
    assert_eq!(
        m.get_attribute::<XorMappedAddress>().unwrap().address(),
        sock.local_addr().unwrap()
    );
    assert_eq!(
        m.get_attribute::<stun_codec::rfc5389::attributes::Software>()
            .unwrap()
            .description(),
        "ferry-test"
    );

    let mut tcp = tokio::net::TcpStream::connect(addrs[1]).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &proto::binding_request(txid(2), None, false))
        .await
        .unwrap();
    decode(&read_stun(&mut tcp).await);

    // The JSON log line announcing the listener.
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let log = tokio::time::timeout(GUARD, stderr.next_line())
        .await
        .expect("no log line")
        .unwrap()
        .expect("stderr closed");
    assert!(
        log.starts_with('{') && log.contains("STUN server listening"),
        "{log}"
    );

    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// SIGTERM right after the "listening" line stops the server cleanly (exit 0): the handler is
/// in place before the line is printed. Repeated, since the old race lost about 1 run in 6.
#[cfg(unix)]
#[test]
fn sigterm_right_after_listening_exits_cleanly() {
    use std::io::BufRead;
    for _ in 0..20 {
        let mut child = std::process::Command::new(BIN)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("ferry-stun listening"), "{line}");
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let status = child.wait().unwrap();
        assert!(status.success(), "{status:?}");
    }
}
