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
            send_mode: Some("flood".into()),
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

    let mut wrong_version = good.clone();
    wrong_version["schema"] = "ferry-loadtest/v0".into();
    assert!(!v.is_valid(&wrong_version));

    let mut wrong_send_mode = good.clone();
    wrong_send_mode["settings"]["send_mode"] = "closed".into();
    assert!(
        !v.is_valid(&wrong_send_mode),
        "send_mode is flood, rate or window"
    );

    let mut window_without_size = good;
    window_without_size["settings"]["send_mode"] = "window".into();
    assert!(
        !v.is_valid(&window_without_size),
        "a window run says how big its window was"
    );
}

#[test]
fn a_window_report_follows_the_schema_and_says_so() {
    let mut r = sample_report();
    r.settings.send_mode = Some("window".into());
    r.settings.window = Some(16);
    r.settings.window_timeout_seconds = Some(0.2);
    let p = r.packets.as_mut().unwrap();
    p.window_timeouts = Some(1);
    p.written_off = Some(3);
    assert_report_schema(&r);
    let text = r.summary();
    assert!(text.contains("closed loop: window 16"), "{text}");
    assert!(
        text.contains("1 timeout(s)") && text.contains("3 packet(s) written off"),
        "{text}"
    );
    assert!(sample_report().summary().contains("flood (open loop)"));
}
