//! The JSON report's schema (`report.schema.json`) is valid, and it is strict enough to catch
//! drift between the code and the documented format.

mod common;

use common::*;
use ferry_loadtest::report::{new_hist, Hist, Packets, Report, Settings};

fn sample_report() -> Report {
    let mut r = Report::new(
        "derp",
        "http://127.0.0.1:3340/derp",
        Settings {
            clients: Some(2),
            topology: Some("pairs".into()),
            packet_size: Some(1200),
            rate: Some(0),
            echo: Some(false),
            warmup_seconds: 1.0,
            duration_seconds: 2.0,
            ..Default::default()
        },
    );
    r.packets = Some(Packets {
        sent: 10,
        received: 9,
        lost: 1,
        loss_ratio: 0.1,
        drain_complete: true,
        ..Default::default()
    });
    let mut h = new_hist();
    h.record(12_345).unwrap();
    r.latency.one_way = Hist::from_ns(&h);
    r.client.source_addresses = 1;
    r
}

#[test]
fn a_report_follows_the_schema() {
    assert_report_schema(&sample_report());
}

#[test]
fn the_schema_rejects_drift() {
    let v = schema();
    let good: serde_json::Value = serde_json::from_str(&sample_report().to_json()).unwrap();
    assert!(v.is_valid(&good));

    let mut extra = good.clone();
    extra["packets"]["surprise"] = 1.into();
    assert!(!v.is_valid(&extra), "unknown fields are rejected");

    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("timeline");
    assert!(!v.is_valid(&missing), "missing fields are rejected");

    let mut wrong_mode = good.clone();
    wrong_mode["mode"] = "bench".into();
    assert!(!v.is_valid(&wrong_mode));

    let mut wrong_version = good;
    wrong_version["schema"] = "ferry-loadtest/v0".into();
    assert!(!v.is_valid(&wrong_version));
}
