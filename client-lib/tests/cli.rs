//! The `ferry` binary: keygen, errors, netcheck and ping against an in-process relay.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use common::*;

fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env_remove("FERRY_RELAY_MAP").env_remove("FERRY_RELAY");
    c
}

fn run(args: &[&str]) -> (bool, String, String) {
    let o = ferry().args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn keygen_writes_a_key_file_and_prints_the_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("node.key");
    let (ok, out, err) = run(&["keygen", "--out", f.to_str().unwrap()]);
    assert!(ok, "{err}");
    let public = out.trim();
    assert!(
        public.starts_with("nodekey:") && public.len() == 8 + 64,
        "{out}"
    );
    let text = std::fs::read_to_string(&f).unwrap();
    assert!(text.starts_with("privkey:"), "{text}");
    let (ok, out, _) = run(&["pubkey", "--key-file", f.to_str().unwrap()]);
    assert!(ok);
    assert_eq!(out.trim(), public);
    // Never overwrites.
    let (ok, _, err) = run(&["keygen", "--out", f.to_str().unwrap()]);
    assert!(!ok && err.contains("File exists"), "{err}");
    // To stdout.
    let (ok, out, err) = run(&["keygen"]);
    assert!(ok && out.starts_with("privkey:") && err.contains("nodekey:"));
}

#[test]
fn help_teaches_with_examples() {
    let (ok, out, _) = run(&["--help"]);
    assert!(ok);
    assert!(
        out.contains("Examples:") && out.contains("ferry ping --listen"),
        "{out}"
    );
    let (_, out, _) = run(&["ping", "--help"]);
    assert!(out.contains("ferry ping nodekey:"), "{out}");
}

#[test]
fn clear_errors_for_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    // Bad peer key.
    let (ok, _, err) = run(&["ping", "nodekey:1234", "--relay", "http://127.0.0.1:1"]);
    assert!(
        !ok && err.contains("not a valid key") && err.contains("nodekey:"),
        "{err}"
    );
    // Bad private key file.
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "privkey:nothex").unwrap();
    let (ok, _, err) = run(&[
        "ping",
        "--listen",
        "--key-file",
        bad.to_str().unwrap(),
        "--relay",
        "http://127.0.0.1:1",
    ]);
    assert!(
        !ok && err.contains("bad.key") && err.contains("ferry keygen"),
        "{err}"
    );
    // Malformed relay map.
    let m = dir.path().join("map.json");
    std::fs::write(
        &m,
        r#"{"Regions":{"900":{"Nodes":[{"Name":"a","DERPPort":443}]}}}"#,
    )
    .unwrap();
    let (ok, _, err) = run(&["netcheck", "--relay-map", m.to_str().unwrap()]);
    assert!(
        !ok && err.contains(r#"Regions["900"].Nodes[0].HostName"#),
        "{err}"
    );
    // No relays at all.
    let (ok, _, err) = run(&["netcheck"]);
    assert!(!ok && err.contains("--relay-map"), "{err}");
    // Unreachable relay.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
    drop(l);
    let (ok, _, err) = run(&["ping", "--listen", "--relay", &url]);
    assert!(!ok && err.contains("cannot reach relay"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netcheck_and_ping_through_a_relay() {
    let relay = plain_relay(true).await;
    let dir = tempfile::tempdir().unwrap();
    let mapfile = dir.path().join("derpmap.json");
    std::fs::write(&mapfile, map_for(&relay).to_json()).unwrap();
    let mapfile = mapfile.to_str().unwrap().to_string();

    let m = mapfile.clone();
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || run(&["netcheck", "--relay-map", &m, "--json"]))
            .await
            .unwrap();
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["udp"], true, "{out}");
    assert!(v["region_latency_ms"]["900"].as_f64().is_some(), "{out}");
    let m = mapfile.clone();
    let (ok, out, _) = tokio::task::spawn_blocking(move || run(&["netcheck", "--relay-map", &m]))
        .await
        .unwrap();
    assert!(ok && out.contains("Nearest relay (home): 900"), "{out}");

    // B listens; A pings it three times.
    let bkey = dir.path().join("b.key");
    let (ok, bpub, _) = run(&["keygen", "--out", bkey.to_str().unwrap()]);
    assert!(ok);
    let mut listener = ferry()
        .args(["ping", "--listen", "--key-file", bkey.to_str().unwrap()])
        .args(["--relay-map", &mapfile])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = listener.stdout.take().unwrap();
    // Wait until B is connected (it prints its line after the relay handshake).
    let (first, mut rest) = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let mut r = BufReader::new(stdout);
        r.read_line(&mut line).unwrap();
        (line, r)
    })
    .await
    .unwrap();
    assert!(
        first.contains("listening as") && first.contains(bpub.trim()),
        "{first}"
    );
    let m = mapfile.clone();
    let b = bpub.trim().to_string();
    let b_pub = b.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        run(&[
            "ping",
            &b,
            "--relay-map",
            &m,
            "--count",
            "3",
            "--interval",
            "0.05",
            "--payload",
            "hello ferry",
        ])
    })
    .await
    .unwrap();
    // The messages --payload sent (before each ping, so before its pong) are printed by now.
    let _ = listener.kill();
    let _ = listener.wait();
    let mut heard = String::new();
    rest.read_to_string(&mut heard).unwrap();
    assert_eq!(
        heard
            .lines()
            .filter(|l| l.starts_with("message from nodekey:") && l.contains(": 11 bytes via "))
            .count(),
        3,
        "{heard}"
    );
    assert!(ok, "{out}\n{err}");
    assert_eq!(out.matches("pong from").count(), 3, "{out}");
    assert!(
        // The first pings go through the relay; on loopback disco may find the direct path
        // before the last one.
        (out.contains("via relay 900") || out.contains("via direct")) && out.contains("time="),
        "{out}"
    );
    assert!(out.contains("3 pings, 3 replies, 0% loss"), "{out}");
    // Path changes are printed: the first reply comes via the relay.
    assert!(
        out.contains(&format!("path to {b_pub}: relay 900 (after "))
            || out.contains(&format!("path to {b_pub}: direct ")),
        "{out}"
    );
}
