//! Interoperability with independent STUN clients:
//! coturn's `turnutils_stunclient` (Debian `coturn`; required when `CI` is set) and the RFC 3489
//! client `stun` (Debian `stun-client`; optional). The clients can hang, so they run under
//! `timeout` and are judged by their output, not their exit code.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;

use common::*;
use ferry_stun::{Rfc5780Config, StunConfig};

fn find_in_path(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

/// `turnutils_stunclient`, or `None` (after saying why) when it is absent outside CI.
fn coturn_client(test: &str) -> Option<PathBuf> {
    match find_in_path("turnutils_stunclient") {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("turnutils_stunclient not found but CI is set: install it with `apt-get install -y coturn`")
        }
        None => {
            eprintln!("skipped {test}: install coturn (`apt-get install -y coturn`) to run it");
            None
        }
    }
}

/// Run a client under `timeout 10` and return its stdout followed by its stderr.
async fn run_client(program: &PathBuf, args: &[String]) -> String {
    let out = tokio::time::timeout(
        GUARD + std::time::Duration::from_secs(5),
        tokio::process::Command::new("timeout")
            .arg("10")
            .arg(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("client did not finish")
    .expect("client could not be started");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

/// The address after `marker` on the first line that has it, e.g. `UDP reflexive addr: `.
fn addr_after(output: &str, marker: &str) -> Option<SocketAddr> {
    output
        .lines()
        .find_map(|l| l.split_once(marker).map(|(_, rest)| rest.trim()))
        .and_then(|a| a.parse().ok())
}

#[tokio::test]
async fn coturn_stunclient_gets_its_reflexive_address() {
    let Some(client) = coturn_client("coturn_stunclient_gets_its_reflexive_address") else {
        return;
    };
    let h = Harness::start(config(&["127.0.0.1:0"], &[])).await;
    let port = h.udp().port();
    let out = run_client(
        &client,
        &["-p".into(), port.to_string(), "127.0.0.1".into()],
    )
    .await;
    let reflexive = addr_after(&out, "UDP reflexive addr: ")
        .unwrap_or_else(|| panic!("no `UDP reflexive addr` line in:\n{out}"));
    assert_eq!(reflexive.ip().to_string(), "127.0.0.1", "{out}");
    assert_ne!(reflexive.port(), 0);
    assert_ne!(reflexive.port(), port);
    assert!(h.count("udp", "success") >= 1);
    h.server.shutdown().await;
}

/// With RFC 5780 enabled (127.0.0.1 + 127.0.0.2), coturn's client runs its behaviour tests:
/// the first reply names both addresses, the second (CHANGE-REQUEST + RESPONSE-PORT) comes
/// from the alternate address.
#[tokio::test]
async fn coturn_stunclient_rfc5780_behaviour_tests() {
    let Some(client) = coturn_client("coturn_stunclient_rfc5780_behaviour_tests") else {
        return;
    };
    let cfg = StunConfig {
        rfc5780: Some(Rfc5780Config {
            primary: "127.0.0.1:0".parse().unwrap(),
            alternate: "127.0.0.2:0".parse().unwrap(),
        }),
        ..config(&[], &[])
    };
    let h = Harness::start(cfg).await;
    let grid = h.server.rfc5780_grid().unwrap();
    let primary = SocketAddr::new(grid.ips[0], grid.ports[0]);
    let alternate = SocketAddr::new(grid.ips[1], grid.ports[1]);
    let out = run_client(
        &client,
        &["-p".into(), primary.port().to_string(), "127.0.0.1".into()],
    )
    .await;
    assert!(addr_after(&out, "UDP reflexive addr: ").is_some(), "{out}");
    assert_eq!(addr_after(&out, "Other addr: : "), Some(alternate), "{out}");
    let second = out
        .split("RFC 5780 response 2")
        .nth(1)
        .unwrap_or_else(|| panic!("no second RFC 5780 response in:\n{out}"));
    assert_eq!(
        addr_after(second, "Response origin: : "),
        Some(alternate),
        "{out}"
    );
    h.server.shutdown().await;
}

/// Debian's RFC 3489 client (no magic cookie): the mapped address from test I.
#[tokio::test]
async fn rfc3489_stun_client_gets_its_mapped_address() {
    let Some(client) = find_in_path("stun") else {
        eprintln!(
            "skipped rfc3489_stun_client_gets_its_mapped_address: install `stun-client` \
             (`apt-get install -y stun-client`) to run it"
        );
        return;
    };
    let h = Harness::start(config(&["127.0.0.1:0"], &[])).await;
    let out = run_client(&client, &["-v".into(), h.udp().to_string()]).await;
    let mapped = addr_after(&out, "MappedAddress = ")
        .unwrap_or_else(|| panic!("no MappedAddress line in:\n{out}"));
    assert_eq!(mapped.ip().to_string(), "127.0.0.1");
    h.server.shutdown().await;
}
