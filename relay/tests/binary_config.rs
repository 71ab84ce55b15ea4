//! The real `ferry-relay` process refusing bad settings: each fails at start (or `derpmap`
//! refuses to print a map) naming the flag, or the file, the line and the key, and the fix.

use std::ffi::OsStr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-relay");

#[test]
fn bad_config_fails_at_start_naming_file_line_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\n[limits]\nqueue_dept = 8\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("relay.toml")
            && err.contains("line 3")
            && err.contains("queue_dept")
            && err.contains("queue_depth"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--key-file"])
        .arg(dir.path().join("k"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--hostname is required") && err.contains("--dev"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["--dev", "--metrics-listen", "port nine"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("IP:PORT"), "{err}");

    std::fs::write(&cfg, "[stun]\nrfc5780_alternate = \"127.0.0.2:3479\"\n").unwrap();
    let out = Command::new(BIN)
        .arg("--dev")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("rfc5780_alternate needs")
            && err.contains("specific IP"),
        "{err}"
    );

    // ACME from the config file: an IP hostname cannot pass HTTP-01; the error says what to do.
    std::fs::write(
        &cfg,
        "hostname = \"192.0.2.7\"\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nmetrics_listen = \"off\"\n[tls]\nmode = \"acme\"\nacme_email = \"ops@example.com\"\n[stun]\nenabled = false\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("--key-file")
        .arg(dir.path().join("k"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("DNS name") && err.contains("self-signed"),
        "{err}"
    );

    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("Examples:") && help.contains("--dev") && help.contains("SIGHUP"),
        "{help}"
    );
}

/// Bad admission and limit settings stop the relay at start, saying what to fix.
#[test]
fn bad_admission_and_limit_values_fail_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    let run = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args([
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--no-stun",
                "--metrics-listen",
                "off",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = run(&["--accept-rate=-1"]);
    assert!(
        err.contains("accept_rate") && err.contains("0 turns"),
        "{err}"
    );
    let missing = dir.path().join("keys.txt");
    let err = run(&["--allowlist-file", missing.to_str().unwrap()]);
    assert!(
        err.contains("keys.txt") && err.contains("allowlist"),
        "{err}"
    );
    std::fs::write(&missing, "nodekey:00\n").unwrap();
    let err = run(&["--allowlist-file", missing.to_str().unwrap()]);
    assert!(
        err.contains("line 1") && err.contains("nodekey:<64 hex>"),
        "{err}"
    );
    std::fs::write(&cfg, "[admission]\nverify_url = \"headscale/verify\"\n").unwrap();
    let err = run(&["--config", cfg.to_str().unwrap()]);
    assert!(err.contains("http://"), "{err}");
    std::fs::write(
        &cfg,
        "[admission]\nverify_url = \"http://h/verify\"\nverify_timeout = \"0s\"\n",
    )
    .unwrap();
    let err = run(&["--config", cfg.to_str().unwrap()]);
    assert!(
        err.contains("relay.toml") && err.contains("verify_timeout"),
        "{err}"
    );
}

/// Runs the binary with `args`, which must exit (not start serving) within 20 s; its stderr.
fn run_to_exit(args: &[&OsStr]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).to_string())
}

/// `derpmap` refuses exactly the configurations the relay refuses (one resolver, one
/// validation), with the same message, instead of printing a map for a relay that cannot start.
#[test]
fn derpmap_refuses_what_the_relay_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    let key = dir.path().join("relay.key");
    let cases: &[(&str, &[&str])] = &[
        // An empty STUN list: the relay cannot serve STUN; derpmap printed STUNPort 3478.
        (
            "hostname = \"relay.example.com\"\nhttp_listen = \"off\"\n[stun]\nlisten = []\n",
            &["[stun] listen", "is empty", "enabled = false"],
        ),
        // Manual mode without a key file.
        (
            "hostname = \"relay.example.com\"\nhttp_listen = \"off\"\n[tls]\nmode = \"manual\"\ncert_file = \"/nonexistent/c.pem\"\n",
            &["--cert-key-file"],
        ),
        // ACME for an IP address.
        (
            "hostname = \"192.0.2.7\"\nhttp_listen = \"127.0.0.1:0\"\n[tls]\nmode = \"acme\"\n",
            &["DNS name", "self-signed"],
        ),
        // ACME with the port-80 listener off.
        (
            "hostname = \"relay.example.com\"\nhttp_listen = \"off\"\n[tls]\nmode = \"acme\"\n",
            &["http_listen", "HTTP-01"],
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&cfg, text).unwrap();
        let common = [
            "--config".as_ref(),
            cfg.as_os_str(),
            "--key-file".as_ref(),
            key.as_os_str(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--metrics-listen".as_ref(),
            "off".as_ref(),
        ];
        let (status, run_err) = run_to_exit(&common);
        assert!(!status.success(), "{text}: the relay started");
        let mut dm: Vec<&OsStr> = vec!["derpmap".as_ref()];
        dm.extend(common);
        let (status, map_err) = run_to_exit(&dm);
        assert!(!status.success(), "{text}: derpmap printed a map");
        for w in *want {
            assert!(run_err.contains(w), "{text}: run: {run_err}");
            assert!(map_err.contains(w), "{text}: derpmap: {map_err}");
        }
    }
}

/// Values that would make the relay spin, never time out, or refuse everything fail at start,
/// naming the file, the line and the fix (or the flag when the value came from one).
#[test]
fn bad_values_fail_at_start_naming_file_line_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    let dev = [
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--no-stun",
        "--metrics-listen",
        "off",
    ];
    let cases: &[(&str, &[&str])] = &[
        (
            "[limits]\nqueue_depth = 0\n",
            &["relay.toml", "line 2", "[limits] queue_depth", "at least 1"],
        ),
        (
            "# comment\n[limits]\nmax_connections = 0\n",
            &[
                "relay.toml",
                "line 3",
                "[limits] max_connections",
                "at least 1",
            ],
        ),
        (
            "[limits]\nwrite_timeout = \"2s\"\nkeepalive_interval = \"0s\"\n",
            &["relay.toml", "line 3", "[limits] keepalive_interval", "0"],
        ),
        (
            "[limits]\nhandshake_timeout = \"0s\"\n",
            &["relay.toml", "line 2", "[limits] handshake_timeout"],
        ),
        (
            "[mesh]\npeers = [\"a.example:443\"]\n",
            &["mesh", "key", "--mesh-psk-file"],
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&cfg, text).unwrap();
        let mut args: Vec<&OsStr> = dev.iter().map(|a| a.as_ref()).collect();
        args.extend(["--config".as_ref(), cfg.as_os_str()]);
        let (status, err) = run_to_exit(&args);
        assert!(!status.success(), "{text}: the relay started");
        for w in *want {
            assert!(err.contains(w), "{text}: want {w:?} in: {err}");
        }
    }
    // From a flag: the flag is named.
    let mut args: Vec<&OsStr> = dev.iter().map(|a| a.as_ref()).collect();
    args.extend([OsStr::new("--max-connections"), OsStr::new("0")]);
    let (status, err) = run_to_exit(&args);
    assert!(
        !status.success() && err.contains("--max-connections") && err.contains("at least 1"),
        "{err}"
    );
}
