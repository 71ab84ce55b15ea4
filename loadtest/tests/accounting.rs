//! The load generator's accounting, checked against an in-process ferry relay's own counters:
//! every packet sent is either received or counted as dropped by the relay.

mod common;

use common::*;
use ferry_loadtest::Report;
use ferry_relay::server::Limits;

fn tiny_queues() -> Limits {
    // Depth 2 and no byte budget: a fan-in flood overflows the receiver's queue, so drops
    // happen and are counted.
    Limits {
        queue_depth: 2,
        queue_bytes: 0,
        ..Limits::default()
    }
}

/// Runs `derp` against `relay` with `args`, 200 ms of warm-up and 1 s measured, and checks
/// the report against the schema.
async fn derp(relay: &Relay, args: &[&str]) -> Report {
    let url = relay.url();
    let mut argv = vec!["derp", &url];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--warmup", "200ms", "--duration", "1s", "--no-progress"]);
    let r = run(&argv).await;
    assert_report_schema(&r);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_fan_in_sent_equals_received_plus_relay_drops() {
    let relay = relay(false, false, tiny_queues()).await;
    let r = derp(
        &relay,
        &["--topology", "fan-in", "--clients", "5", "--size", "64"],
    )
    .await;
    let p = r.packets.as_ref().unwrap();
    let drops = relay.drops();
    eprintln!("{}relay drops: {drops}", r.summary());
    relay.assert_write_errors_only_at_teardown();
    assert_eq!(r.settings.send_mode.as_deref(), Some("flood"));
    assert_eq!((p.window_timeouts, p.written_off), (None, None));
    assert!(p.drain_complete, "{}", r.summary());
    assert!(p.sent > 0 && p.received > 0, "{}", r.summary());
    assert_eq!(p.sent, p.received + drops, "{}", r.summary());
    assert_eq!(p.lost, drops);
    assert!(p.delivered_in_window <= p.received && p.sent_in_window <= p.sent);
    assert_eq!(p.peer_gone, 0);
    assert!(r.latency.one_way.is_some() && r.latency.round_trip.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_pairs_below_the_queue_depth_lose_nothing_and_say_so() {
    // Closed loop: each sender has at most 4 packets in flight (plus its end marker at the
    // end), and each receiver's queue holds 8, so the relay never has to drop one: whatever the
    // timing, lost = 0 and the relay's drop counters stay at 0. The window timeout is far
    // longer than the run: without drops no window can stall, so none may time out.
    let relay = relay(
        false,
        false,
        Limits {
            queue_depth: 8,
            ..Limits::default()
        },
    )
    .await;
    let r = derp(
        &relay,
        &[
            "--clients",
            "4",
            "--size",
            "1200",
            "--window",
            "4",
            "--window-timeout",
            "10min",
        ],
    )
    .await;
    eprintln!("{}", r.summary());
    let st = &r.settings;
    assert_eq!(st.send_mode.as_deref(), Some("window"));
    assert_eq!(
        (st.window, st.window_timeout_seconds),
        (Some(4), Some(600.0))
    );
    assert!(r.summary().contains("closed loop: window 4"));
    let p = r.packets.as_ref().unwrap();
    assert!(p.drain_complete, "{}", r.summary());
    assert!(p.received > 0, "{}", r.summary());
    assert_eq!(relay.drops(), 0, "{}", r.summary());
    assert_eq!(p.sent, p.received, "{}", r.summary());
    assert_eq!((p.lost, p.loss_ratio), (0, 0.0));
    assert_eq!((p.window_timeouts, p.written_off), (Some(0), Some(0)));
    relay.assert_write_errors_only_at_teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_fan_in_over_a_tiny_queue_accounts_for_every_drop() {
    // 4 senders x 4 in flight into one receiver whose queue holds 2: the relay drops, some
    // windows lose their last packets and can only go on after the window timeout. The run
    // still ends, and sent = received + the relay's drop counters, exactly.
    let relay = relay(false, false, tiny_queues()).await;
    let r = derp(
        &relay,
        &[
            "--topology",
            "fan-in",
            "--clients",
            "5",
            "--size",
            "64",
            "--window",
            "4",
            "--window-timeout",
            "20ms",
        ],
    )
    .await;
    let p = r.packets.as_ref().unwrap();
    let drops = relay.drops();
    eprintln!("{}relay drops: {drops}", r.summary());
    relay.assert_write_errors_only_at_teardown();
    assert_eq!(r.settings.send_mode.as_deref(), Some("window"));
    assert!(p.drain_complete, "{}", r.summary());
    assert!(p.received > 0, "{}", r.summary());
    assert_eq!(p.sent, p.received + drops, "{}", r.summary());
    assert_eq!(p.lost, drops);
    assert!(p.window_timeouts.is_some() && p.written_off.is_some());
    assert_eq!(p.peer_gone, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_pairs_over_tls_with_a_pin_account_for_both_directions() {
    let relay = relay(true, false, Limits::default()).await;
    let pin = relay.pin();
    let r = derp(
        &relay,
        &[
            "--pin",
            &pin,
            "--tls-name",
            "localhost",
            "--clients",
            "4",
            "--echo",
            "--rate",
            "2000",
            "--size",
            "200",
        ],
    )
    .await;
    assert_eq!(r.settings.send_mode.as_deref(), Some("rate"));
    let p = r.packets.as_ref().unwrap();
    assert!(p.drain_complete, "{}", r.summary());
    assert_eq!(p.sent, p.received + relay.drops(), "{}", r.summary());
    relay.assert_write_errors_only_at_teardown();
    // Data one way, echoes back: both are counted, and every echo has a round trip.
    let rtt = r.latency.round_trip.as_ref().expect("round trips");
    let one_way = r.latency.one_way.as_ref().expect("one-way latencies");
    assert!(rtt.count > 0 && one_way.count > 0);
    assert!(rtt.p50_us <= rtt.p99_us && rtt.p99_us <= rtt.max_us);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_storm_handshakes_are_the_relays_handshakes() {
    let relay = relay(true, false, Limits::default()).await;
    let url = relay.url();
    let r = run(&[
        "connect",
        &url,
        "--insecure",
        "--concurrency",
        "4",
        "--warmup",
        "0s",
        "--duration",
        "500ms",
        "--no-progress",
    ])
    .await;
    assert_report_schema(&r);
    let h = r.handshakes.as_ref().unwrap();
    assert!(h.completed > 0 && h.failed == 0, "{}", r.summary());
    assert_eq!(r.latency.handshake.as_ref().unwrap().count, h.completed);
    // The relay completed at least ours (plus the probe and any begun after the window).
    assert!(relay.counter("ferry_relay_handshakes_total") > h.completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_held_and_measured() {
    let relay = relay(false, false, Limits::default()).await;
    let url = relay.url();
    // The relay runs in this process, so this process's RSS is the server's.
    let pid = std::process::id().to_string();
    let r = run(&[
        "idle",
        &url,
        "--clients",
        "200",
        "--hold",
        "0s",
        "--server-pid",
        &pid,
        "--no-progress",
    ])
    .await;
    assert_report_schema(&r);
    let idle = r.idle.as_ref().unwrap();
    assert_eq!(idle.connections, 200, "{}", r.summary());
    assert!(
        idle.server_rss_after_bytes.is_some() && idle.server_rss_per_connection_bytes.is_some()
    );
    assert_eq!(r.handshakes.as_ref().unwrap().completed, 200);
    assert_eq!(relay.counter("ferry_relay_handshakes_total"), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_requests_are_answered_or_counted_lost() {
    let relay = relay(false, true, Limits::default()).await;
    let addr = relay.stun_addr().to_string();
    let r = run(&[
        "stun",
        &addr,
        "--sockets",
        "2",
        "--window",
        "16",
        "--warmup",
        "100ms",
        "--duration",
        "500ms",
        "--no-progress",
    ])
    .await;
    assert_report_schema(&r);
    let s = r.stun.as_ref().unwrap();
    assert!(s.answers > 0, "{}", r.summary());
    assert_eq!(s.requests, s.answers + s.lost, "{}", r.summary());
    assert_eq!(s.invalid, 0);
    assert_eq!(r.latency.stun.as_ref().unwrap().count, s.answers_in_window);
}

/// `udp-relay` mode against an in-process relay with the UDP relay on: every datagram the
/// generator counts as delivered was forwarded by the relay (its own counter, which also
/// holds the setup probes and the warm-up), none lost in a closed loop below the buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_relay_datagrams_delivered_are_datagrams_the_relay_forwarded() {
    udp_relay_accounting(false).await;
}

/// The same with `--gso`: bursts sent as GSO and read with GRO are counted datagram by
/// datagram on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_relay_gso_datagrams_delivered_are_datagrams_the_relay_forwarded() {
    udp_relay_accounting(true).await;
}

async fn udp_relay_accounting(gso: bool) {
    use ferry_relay::server::UdpRelayConfig;
    let relay = Relay(
        ferry_relay::testing::Options::plain()
            .start_with(|c| {
                c.udp_relay = Some(UdpRelayConfig::new("127.0.0.1:0".parse().unwrap()));
            })
            .await,
    );
    let url = relay.url();
    let argv = [
        "ferry-loadtest",
        "udp-relay",
        &url,
        "--pairs",
        "2",
        "--size",
        "300",
        "--window",
        "8",
        "--warmup",
        "100ms",
        "--duration",
        "500ms",
    ];
    let argv: Vec<&str> = argv.into_iter().chain(gso.then_some("--gso")).collect();
    let cli = <ferry_loadtest::Cli as clap::Parser>::try_parse_from(argv).unwrap();
    let ferry_loadtest::Command::UdpRelay(a) = &cli.command else {
        unreachable!()
    };
    let r = ferry_loadtest::udprelay::run(a)
        .await
        .expect("the run succeeds");
    assert!(r.delivered > 100, "{}", r.summary());
    assert_eq!(r.lost, 0, "{}", r.summary());
    assert_eq!(r.gso, gso);
    let forwarded = relay.counter("ferry_relay_udp_relay_forwarded_packets_total");
    assert!(
        forwarded >= r.delivered,
        "the relay forwarded {forwarded}, the generator received {}",
        r.delivered
    );
    // Datagrams in flight when the window opens are delivered in it but were sent before:
    // at most a window per direction (2 pairs, 2 directions, 8 each).
    assert!(r.delivered <= r.sent + 4 * 8, "{}", r.summary());
}

/// Against a relay without a UDP relay the mode fails at once with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_relay_mode_says_when_the_relay_has_none() {
    let relay = relay(false, false, Limits::default()).await;
    let url = relay.url();
    let argv = ["ferry-loadtest", "udp-relay", &url, "--pairs", "1"];
    let cli = <ferry_loadtest::Cli as clap::Parser>::try_parse_from(argv).unwrap();
    let ferry_loadtest::Command::UdpRelay(a) = &cli.command else {
        unreachable!()
    };
    let e = ferry_loadtest::udprelay::run(a).await.unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("does the relay run a UDP relay"), "{text}");
}
