//! Shared test support: in-process ferry relays on 127.0.0.1:0 and the report schema.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;

use clap::Parser;
use ferry_loadtest::{Cli, Report};
use ferry_relay::server::Limits;
use ferry_relay::testing::{Options, TestRelay};

/// A relay for a test, with the load tests' views of its counters.
pub struct Relay(pub TestRelay);

impl std::ops::Deref for Relay {
    type Target = TestRelay;
    fn deref(&self) -> &TestRelay {
        &self.0
    }
}

impl Relay {
    /// `sha256-raw:<hex>` of the TLS leaf, as a DERP map's CertName.
    pub fn pin(&self) -> String {
        self.0.pin().expect("a TLS relay")
    }

    pub fn stun_addr(&self) -> SocketAddr {
        self.0.stun_addr().expect("a relay with STUN")
    }

    fn sample(&self, name: &str, reason: &str) -> u64 {
        self.server
            .metrics()
            .sample(name, &format!("reason=\"{reason}\"")) as u64
    }

    /// Packets the relay counted as dropped while the run was live: every reason but
    /// `write_error`.
    ///
    /// ferry counts one `write_error` drop per failed write, even when the batch held only
    /// control frames: at the end of a run, when the clients close, a PeerGone written to a
    /// client that is closing too counts one, though no packet of ours was in it. A write error
    /// during the run would have closed a connection and failed the run, so
    /// [`Relay::assert_write_errors_only_at_teardown`] checks that each such drop belongs to a
    /// connection closed by a write error.
    pub fn drops(&self) -> u64 {
        [
            "unknown_dest",
            "unknown_dest_on_fwd",
            "gone_disconnected",
            "queue_head",
            "queue_tail",
            "dup_client",
        ]
        .iter()
        .map(|r| self.sample("ferry_relay_packets_dropped_total", r))
        .sum()
    }

    pub fn assert_write_errors_only_at_teardown(&self) {
        let dropped = self.sample("ferry_relay_packets_dropped_total", "write_error");
        let closed = self.sample("ferry_relay_connections_closed_total", "write_error");
        assert!(
            dropped <= closed,
            "{dropped} write_error drops but {closed} connections closed by write errors"
        );
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.server.metrics().sample(name, "") as u64
    }
}

/// A relay; `tls` gives it a self-signed certificate for localhost and 127.0.0.1; `stun` adds
/// a STUN server on 127.0.0.1 (UDP only).
pub async fn relay(tls: bool, stun: bool, limits: Limits) -> Relay {
    let o = if tls {
        Options::tls()
    } else {
        Options::plain()
    };
    Relay(o.stun(stun).limits(limits).start().await)
}

/// Runs ferry-loadtest in this process with these arguments (after the program name).
pub async fn run(args: &[&str]) -> Report {
    let mut argv = vec!["ferry-loadtest"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).expect("valid arguments");
    ferry_loadtest::run(&cli).await.expect("the run succeeds")
}

/// The report schema, compiled.
pub fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/report.schema.json"))
        .expect("report.schema.json");
    let schema: serde_json::Value = serde_json::from_str(&text).expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("schema compiles")
}

/// Panics with every violation if `json` does not follow the schema.
pub fn assert_schema(json: &serde_json::Value) {
    let v = schema();
    let errors: Vec<String> = v
        .iter_errors(json)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "schema violations: {errors:#?}\n{json:#}"
    );
}

pub fn assert_report_schema(r: &Report) {
    assert_schema(&serde_json::from_str(&r.to_json()).unwrap());
}
