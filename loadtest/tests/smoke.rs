//! The binary itself, run briefly against an in-process relay (keeps the tool from rotting),
//! and its errors for targets that are wrong.

mod common;

use common::*;
use ferry_relay::server::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ferry-loadtest");

async fn loadtest(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_prints_json_that_follows_the_schema_and_draws_a_chart() {
    let relay = relay(true, false, Limits::default()).await;
    let (url, pin) = (relay.url(), relay.pin());
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("run.svg");
    let (ok, stdout, stderr) = loadtest(&[
        "derp",
        &url,
        "--pin",
        &pin,
        "--tls-name",
        "localhost",
        "--clients",
        "4",
        "--size",
        "1200",
        "--warmup",
        "500ms",
        "--duration",
        "2s",
        "--json",
        "--svg",
        svg.to_str().unwrap(),
    ])
    .await;
    assert!(ok, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is the JSON report");
    assert_schema(&json);
    assert_eq!(json["mode"], "derp");
    let p = &json["packets"];
    assert!(p["delivered_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(
        p["sent"].as_u64().unwrap(),
        p["received"].as_u64().unwrap() + relay.drops()
    );
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("Latency by percentile"));

    // The text summary is the default.
    let (ok, stdout, stderr) = loadtest(&[
        "derp",
        &url,
        "--insecure",
        "--clients",
        "2",
        "--warmup",
        "0s",
        "--duration",
        "300ms",
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("delivered") && stdout.contains("accounting sent"),
        "{stdout}"
    );
}

#[tokio::test]
async fn help_teaches_with_examples() {
    let (ok, stdout, _) = loadtest(&["--help"]).await;
    assert!(ok);
    for needle in [
        "Examples:",
        "ferry-loadtest derp",
        "--pin sha256-raw:",
        "idle",
        "stun",
    ] {
        assert!(
            stdout.contains(needle),
            "--help lacks {needle:?}:\n{stdout}"
        );
    }
    let (ok, stdout, _) = loadtest(&["derp", "--help"]).await;
    assert!(ok && stdout.contains("--topology") && stdout.contains("Examples:"));
}

#[tokio::test]
async fn a_closed_port_is_reported_as_refused() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/derp");
    let (ok, _, stderr) = loadtest(&["derp", &url, "--duration", "1s"]).await;
    assert!(!ok);
    assert!(stderr.contains("connection refused"), "{stderr}");
}

/// A TCP server that answers every connection with `reply` and then closes.
async fn fake_server(reply: &'static [u8]) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}/derp")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_server_is_not_a_derp_server() {
    let url = fake_server(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
    let (ok, _, stderr) = loadtest(&["derp", &url, "--clients", "2", "--duration", "1s"]).await;
    assert!(!ok);
    assert!(
        stderr.contains("is not a DERP server") && stderr.contains("404 Not Found"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_first_frame_is_not_server_key_is_not_a_derp_server() {
    // A 101, then a KeepAlive frame (type 0x06) where ServerKey must be.
    let url = fake_server(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n\x06\x00\x00\x00\x00",
    )
    .await;
    let (ok, _, stderr) = loadtest(&["connect", &url, "--duration", "1s"]).await;
    assert!(!ok);
    assert!(
        stderr.contains("is not a DERP server") && stderr.contains("not ServerKey"),
        "{stderr}"
    );
}

#[tokio::test]
async fn tls_options_are_checked_before_any_traffic() {
    let (ok, _, stderr) = loadtest(&[
        "derp",
        "https://127.0.0.1:1/derp",
        "--pin",
        "sha256-raw:1234",
        "--duration",
        "1s",
    ])
    .await;
    assert!(!ok && stderr.contains("--pin must be"), "{stderr}");
    let (ok, _, stderr) = loadtest(&[
        "derp",
        "https://127.0.0.1:1/derp",
        "--insecure",
        "--ca-file",
        "/nonexistent.pem",
    ])
    .await;
    assert!(!ok && stderr.contains("alternatives"), "{stderr}");
}

/// `--connect-retries`: against a relay that sheds connects at accept (`accept_rate` 5/s,
/// burst 1), 6 clients cannot all connect at once; without retries the run fails at the first
/// refusal, with them every client gets in (as real clients retry) and the run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_retries_get_every_client_past_an_accept_rate_limit() {
    let limits = Limits {
        accept_rate: 5.0,
        accept_burst: 1,
        ..Limits::default()
    };
    let relay = relay(false, false, limits).await;
    let url = relay.url();
    let args = |retries: &'static str| {
        vec![
            "derp",
            "",
            "--clients",
            "6",
            "--size",
            "100",
            "--rate",
            "100",
            "--warmup",
            "0s",
            "--duration",
            "1s",
            "--connect-retries",
            retries,
        ]
    };
    let mut no_retry = args("0");
    no_retry[1] = &url;
    let (ok, _, stderr) = loadtest(&no_retry).await;
    assert!(!ok && stderr.contains("connected so far"), "{stderr}");
    let mut with_retry = args("20");
    with_retry[1] = &url;
    let (ok, _, stderr) = loadtest(&with_retry).await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("connects failed and were retried"),
        "{stderr}"
    );
}
