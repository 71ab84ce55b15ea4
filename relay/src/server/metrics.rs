//! The relay's Prometheus metrics.
//!
//! Every handle is registered once at start-up on the server's own recorder, so the hot path is a
//! relaxed atomic add and two servers in one process (tests) never share counters. The binary
//! additionally installs that recorder globally, so the STUN crate's `metrics::counter!` calls
//! land in the same scrape.
//!
//! Conventions: base units, counters end in `_total`, drops and failures labelled by reason,
//! never a node key or an address as a label.

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

macro_rules! reasons {
    ($name:ident { $($variant:ident => $label:literal),* $(,)? }) => {
        /// Label values of one reason dimension.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(missing_docs)]
        pub enum $name { $($variant),* }
        impl $name {
            const ALL: &'static [$name] = &[$($name::$variant),*];
            /// The label value.
            pub fn label(self) -> &'static str {
                match self { $($name::$variant => $label),* }
            }
        }
    };
}

reasons!(DropReason {
    UnknownDest => "unknown_dest",
    UnknownDestOnFwd => "unknown_dest_on_fwd",
    GoneDisconnected => "gone_disconnected",
    QueueHead => "queue_head",
    QueueTail => "queue_tail",
    WriteError => "write_error",
    DupClient => "dup_client",
    MeshQueue => "mesh_queue",
});

reasons!(HandshakeFailure {
    Tls => "tls",
    HttpTimeout => "http_timeout",
    HttpMalformed => "http_malformed",
    HandshakeTimeout => "handshake_timeout",
    ClientInfo => "client_info",
    MeshKey => "mesh_key",
    Io => "io",
});

reasons!(CloseReason {
    ClientClosed => "client_closed",
    ReadError => "read_error",
    ProtocolError => "protocol_error",
    NotPermitted => "not_permitted",
    WriteTimeout => "write_timeout",
    WriteError => "write_error",
    ClosedByMesh => "closed_by_mesh",
    Shutdown => "shutdown",
    WatcherOverflow => "watcher_overflow",
    FrameTimeout => "frame_timeout",
});

reasons!(AdmissionResult {
    Allowed => "allowed",
    RefusedAllowlist => "refused_allowlist",
    RefusedVerify => "refused_verify",
    VerifyErrorOpen => "verify_error_open",
    VerifyErrorClosed => "verify_error_closed",
});

impl AdmissionResult {
    /// Whether the client is let in.
    pub(crate) fn admits(self) -> bool {
        matches!(
            self,
            AdmissionResult::Allowed | AdmissionResult::VerifyErrorOpen
        )
    }
}

reasons!(UdpRelayAlloc {
    Granted => "granted",
    RefusedTotal => "refused_total",
    RefusedPerClient => "refused_per_client",
    RefusedBadPair => "refused_bad_pair",
    RefusedNotMember => "refused_not_member",
});

/// The UDP relay path's metrics (issue 15).
#[derive(Debug, Clone)]
pub(crate) struct UdpRelayMetrics {
    pub(crate) forwarded_packets: Counter,
    pub(crate) forwarded_bytes: Counter,
    pub(crate) challenges: Counter,
    pub(crate) binds: Counter,
    pub(crate) expired: Counter,
    pub(crate) send_errors: Counter,
    pub(crate) connecting: Gauge,
    pub(crate) open: Gauge,
    drops: Vec<Counter>,
    allocations: Vec<Counter>,
}

impl UdpRelayMetrics {
    /// Counts a dropped datagram.
    pub(crate) fn dropped(&self, why: super::udprelay::Drop) {
        self.drops[why as usize].increment(1);
    }

    /// Counts an allocation decision.
    pub(crate) fn allocation(&self, r: UdpRelayAlloc) {
        self.allocations[r as usize].increment(1);
    }
}

const NAME_DROPS: &str = "ferry_relay_packets_dropped_total";
const NAME_ADMISSION: &str = "ferry_relay_admission_total";
const NAME_RATE_DELAY: &str = "ferry_relay_rate_limit_delay_seconds";

/// All of the relay's metric handles (a clone shares them: it reads the same counters).
#[derive(Debug, Clone)]
pub struct RelayMetrics {
    handle: PrometheusHandle,
    pub(crate) connections: Gauge,
    pub(crate) home_connections: Gauge,
    pub(crate) accepts: Counter,
    pub(crate) rejected_capacity: Counter,
    pub(crate) rejected_accept_rate: Counter,
    pub(crate) rejected_per_ip: Counter,
    /// Each time a client's reads were paused by its receive rate limit: for how long.
    pub(crate) rate_limit_delay: Histogram,
    pub(crate) handshakes: Counter,
    pub(crate) handshake_duration: Histogram,
    pub(crate) packets_forwarded: Counter,
    pub(crate) bytes_forwarded: Counter,
    pub(crate) frames_ignored: Counter,
    pub(crate) peer_gone_sent: Counter,
    pub(crate) http_requests: Counter,
    pub(crate) restarting_sent: Counter,
    pub(crate) mesh_forwarded: Counter,
    pub(crate) mesh_connect_failures: Counter,
    pub(crate) mesh_links: Gauge,
    pub(crate) mesh_remote_keys: Gauge,
    pub(crate) mesh_resyncs: Counter,
    pub(crate) watchers: Gauge,
    pub(crate) queued_packets: Gauge,
    pub(crate) queued_bytes: Gauge,
    /// Live tasks of the runtime that renders the scrape (the relay's), read at each render.
    tasks: Gauge,
    pub(crate) udp_relay: UdpRelayMetrics,
    drops: Vec<Counter>,
    handshake_failures: Vec<Counter>,
    closes: Vec<Counter>,
    admissions: Vec<Counter>,
}

/// Buckets for the rate-limit delay histogram, in seconds.
const RATE_DELAY_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// Buckets for the handshake duration histogram, in seconds.
const HANDSHAKE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl RelayMetrics {
    /// Builds a fresh recorder and registers every relay metric on it.
    pub(crate) fn new() -> (Self, PrometheusRecorder) {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    "ferry_relay_handshake_duration_seconds".into(),
                ),
                HANDSHAKE_BUCKETS,
            )
            .expect("bucket list is non-empty")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(NAME_RATE_DELAY.into()),
                RATE_DELAY_BUCKETS,
            )
            .expect("bucket list is non-empty")
            .build_recorder();
        let me = Self::register(&recorder);
        (me, recorder)
    }

    /// A set of handles on a recorder of their own (tests of parts below the server).
    #[cfg(test)]
    pub(crate) fn detached() -> Self {
        Self::new().0
    }

    fn register(r: &PrometheusRecorder) -> Self {
        let meta = Metadata::new(module_path!(), Level::INFO, None);
        let describe = |name: &'static str, unit: Option<metrics::Unit>, help: &'static str| {
            r.describe_counter(name.into(), unit, help.into());
        };
        let describe_g = |name: &'static str, help: &'static str| {
            r.describe_gauge(name.into(), None, help.into())
        };
        let counter = |name: &'static str| r.register_counter(&Key::from_static_name(name), &meta);
        let labelled = |name: &'static str, label: &'static str, value: &'static str| {
            r.register_counter(
                &Key::from_parts(name, vec![Label::new(label, value)]),
                &meta,
            )
        };

        describe(
            "ferry_relay_accepts_total",
            None,
            "TCP connections accepted on the DERP listener.",
        );
        describe(
            "ferry_relay_rejected_total",
            None,
            "Connections refused at accept, by reason.",
        );
        describe(
            "ferry_relay_handshakes_total",
            None,
            "DERP handshakes completed.",
        );
        describe(
            "ferry_relay_handshake_failures_total",
            None,
            "Connections that never completed the DERP handshake, by reason.",
        );
        describe(
            "ferry_relay_packets_forwarded_total",
            None,
            "Packets queued for a connected receiver.",
        );
        describe(
            "ferry_relay_bytes_forwarded_total",
            Some(metrics::Unit::Bytes),
            "Payload bytes queued for a connected receiver.",
        );
        describe(
            NAME_DROPS,
            None,
            "Packets dropped, by reason (derper's reasons).",
        );
        describe(
            "ferry_relay_frames_ignored_total",
            None,
            "Client frames of unknown type, skipped as derper skips them.",
        );
        describe(
            "ferry_relay_connections_closed_total",
            None,
            "DERP connections closed, by reason.",
        );
        describe(
            "ferry_relay_peer_gone_sent_total",
            None,
            "PeerGone frames queued to clients.",
        );
        describe(
            "ferry_relay_http_requests_total",
            None,
            "Plain HTTP requests served (probes, health, home page).",
        );
        describe(
            "ferry_relay_restarting_sent_total",
            None,
            "Restarting frames sent during graceful shutdown.",
        );
        describe(
            "ferry_relay_mesh_forwarded_packets_total",
            None,
            "Packets sent on to a mesh peer (ForwardPacket) for a client connected there.",
        );
        describe(
            "ferry_relay_mesh_connect_failures_total",
            None,
            "Failed attempts to connect to a mesh peer.",
        );
        describe_g(
            "ferry_relay_mesh_links",
            "Mesh peers this relay has a working link to.",
        );
        describe_g(
            "ferry_relay_mesh_remote_keys",
            "Distinct client keys known to be connected to mesh peers.",
        );
        describe_g(
            "ferry_relay_watchers",
            "Mesh peers subscribed to this relay's presence changes (WatchConns), sampled every 5 s.",
        );
        describe_g(
            "ferry_relay_queued_packets",
            "Packets waiting in receivers' queues, sampled every 5 s.",
        );
        r.describe_gauge(
            "ferry_relay_queued_bytes".into(),
            Some(metrics::Unit::Bytes),
            "Bytes waiting in receivers' queues (payload + 64 per packet, what the queue budget counts), sampled every 5 s.".into(),
        );
        describe_g(
            "ferry_relay_tasks",
            "Live tokio tasks in the relay's runtime (every connection has a few), read at each scrape.",
        );
        describe(
            "ferry_relay_mesh_resyncs_total",
            None,
            "Mesh links re-established after a loss (each starts from a fresh snapshot of the peer's clients).",
        );
        describe_g(
            "ferry_relay_connections",
            "DERP connections currently established.",
        );
        describe_g(
            "ferry_relay_home_connections",
            "Connections whose client says this relay is its home.",
        );
        describe(
            NAME_ADMISSION,
            None,
            "Admission decisions (allowlist, verify URL) for non-mesh clients, by result.",
        );
        r.describe_histogram(
            NAME_RATE_DELAY.into(),
            Some(metrics::Unit::Seconds),
            "Pauses of a client's reads by its receive rate limit (back-pressure); _sum is the total time.".into(),
        );
        describe_g("ferry_build_info", "Always 1; labels carry the version.");
        for (name, help) in [
            (
                "ferry_relay_udp_relay_forwarded_packets_total",
                "UDP relay: datagrams forwarded between the two bound sides of a session.",
            ),
            (
                "ferry_relay_udp_relay_forwarded_bytes_total",
                "UDP relay: bytes of the datagrams forwarded (Geneve header included).",
            ),
            (
                "ferry_relay_udp_relay_challenges_total",
                "UDP relay: Challenges sent in answer to a valid Bind (each as large as the Bind).",
            ),
            (
                "ferry_relay_udp_relay_binds_total",
                "UDP relay: sides bound by a valid Answer.",
            ),
            (
                "ferry_relay_udp_relay_sessions_expired_total",
                "UDP relay: sessions ended (30 s unbound, or 5 min idle).",
            ),
            (
                "ferry_relay_udp_relay_send_errors_total",
                "UDP relay: datagrams the socket refused to send.",
            ),
            (
                "ferry_relay_udp_relay_dropped_total",
                "UDP relay: datagrams dropped, by reason (never answered).",
            ),
            (
                "ferry_relay_udp_relay_allocations_total",
                "UDP relay: allocation requests over DERP, by result.",
            ),
        ] {
            describe(name, None, help);
        }
        describe_g(
            "ferry_relay_udp_relay_sessions",
            "UDP relay sessions by state: connecting (fewer than two sides bound) or open.",
        );
        r.describe_histogram(
            "ferry_relay_handshake_duration_seconds".into(),
            Some(metrics::Unit::Seconds),
            "Time from TCP accept to a completed DERP handshake.".into(),
        );

        let build = r.register_gauge(
            &Key::from_parts(
                "ferry_build_info",
                vec![Label::new("version", env!("CARGO_PKG_VERSION"))],
            ),
            &meta,
        );
        build.set(1.0);

        RelayMetrics {
            handle: r.handle(),
            connections: r.register_gauge(&Key::from_static_name("ferry_relay_connections"), &meta),
            home_connections: r.register_gauge(
                &Key::from_static_name("ferry_relay_home_connections"),
                &meta,
            ),
            accepts: counter("ferry_relay_accepts_total"),
            rejected_capacity: labelled("ferry_relay_rejected_total", "reason", "capacity"),
            rejected_accept_rate: labelled("ferry_relay_rejected_total", "reason", "accept_rate"),
            rejected_per_ip: labelled("ferry_relay_rejected_total", "reason", "per_ip"),
            rate_limit_delay: r.register_histogram(&Key::from_static_name(NAME_RATE_DELAY), &meta),
            handshakes: counter("ferry_relay_handshakes_total"),
            handshake_duration: r.register_histogram(
                &Key::from_static_name("ferry_relay_handshake_duration_seconds"),
                &meta,
            ),
            packets_forwarded: counter("ferry_relay_packets_forwarded_total"),
            bytes_forwarded: counter("ferry_relay_bytes_forwarded_total"),
            frames_ignored: counter("ferry_relay_frames_ignored_total"),
            peer_gone_sent: counter("ferry_relay_peer_gone_sent_total"),
            http_requests: counter("ferry_relay_http_requests_total"),
            restarting_sent: counter("ferry_relay_restarting_sent_total"),
            mesh_forwarded: counter("ferry_relay_mesh_forwarded_packets_total"),
            mesh_connect_failures: counter("ferry_relay_mesh_connect_failures_total"),
            mesh_links: r.register_gauge(&Key::from_static_name("ferry_relay_mesh_links"), &meta),
            mesh_remote_keys: r.register_gauge(
                &Key::from_static_name("ferry_relay_mesh_remote_keys"),
                &meta,
            ),
            mesh_resyncs: counter("ferry_relay_mesh_resyncs_total"),
            watchers: r.register_gauge(&Key::from_static_name("ferry_relay_watchers"), &meta),
            queued_packets: r
                .register_gauge(&Key::from_static_name("ferry_relay_queued_packets"), &meta),
            queued_bytes: r
                .register_gauge(&Key::from_static_name("ferry_relay_queued_bytes"), &meta),
            tasks: r.register_gauge(&Key::from_static_name("ferry_relay_tasks"), &meta),
            udp_relay: UdpRelayMetrics {
                forwarded_packets: counter("ferry_relay_udp_relay_forwarded_packets_total"),
                forwarded_bytes: counter("ferry_relay_udp_relay_forwarded_bytes_total"),
                challenges: counter("ferry_relay_udp_relay_challenges_total"),
                binds: counter("ferry_relay_udp_relay_binds_total"),
                expired: counter("ferry_relay_udp_relay_sessions_expired_total"),
                send_errors: counter("ferry_relay_udp_relay_send_errors_total"),
                connecting: r.register_gauge(
                    &Key::from_parts(
                        "ferry_relay_udp_relay_sessions",
                        vec![Label::new("state", "connecting")],
                    ),
                    &meta,
                ),
                open: r.register_gauge(
                    &Key::from_parts(
                        "ferry_relay_udp_relay_sessions",
                        vec![Label::new("state", "open")],
                    ),
                    &meta,
                ),
                drops: super::udprelay::Drop::ALL
                    .iter()
                    .map(|d| labelled("ferry_relay_udp_relay_dropped_total", "reason", d.label()))
                    .collect(),
                allocations: UdpRelayAlloc::ALL
                    .iter()
                    .map(|d| {
                        r.register_counter(
                            &Key::from_parts(
                                "ferry_relay_udp_relay_allocations_total",
                                vec![Label::new("result", d.label())],
                            ),
                            &meta,
                        )
                    })
                    .collect(),
            },
            drops: DropReason::ALL
                .iter()
                .map(|d| labelled(NAME_DROPS, "reason", d.label()))
                .collect(),
            handshake_failures: HandshakeFailure::ALL
                .iter()
                .map(|d| labelled("ferry_relay_handshake_failures_total", "reason", d.label()))
                .collect(),
            closes: CloseReason::ALL
                .iter()
                .map(|d| labelled("ferry_relay_connections_closed_total", "reason", d.label()))
                .collect(),
            admissions: AdmissionResult::ALL
                .iter()
                .map(|d| {
                    r.register_counter(
                        &Key::from_parts(NAME_ADMISSION, vec![Label::new("result", d.label())]),
                        &meta,
                    )
                })
                .collect(),
        }
    }

    /// Counts one dropped packet.
    pub(crate) fn drop(&self, why: DropReason) {
        self.drops[why as usize].increment(1);
    }

    /// Counts `n` dropped packets.
    pub(crate) fn drop_n(&self, why: DropReason, n: u64) {
        if n > 0 {
            self.drops[why as usize].increment(n);
        }
    }

    /// Counts a failed handshake.
    pub(crate) fn handshake_failed(&self, why: HandshakeFailure) {
        self.handshake_failures[why as usize].increment(1);
    }

    /// Counts a closed connection.
    pub(crate) fn closed(&self, why: CloseReason) {
        self.closes[why as usize].increment(1);
    }

    /// Counts an admission decision.
    pub(crate) fn admission(&self, r: AdmissionResult) {
        self.admissions[r as usize].increment(1);
    }

    /// The Prometheus text exposition of everything on this recorder.
    pub fn render(&self) -> String {
        // Outside a runtime (a test reading counters) the gauge keeps its last value.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.tasks.set(rt.metrics().num_alive_tasks() as f64);
        }
        self.handle.render()
    }

    /// Runs the exporter's periodic housekeeping (histogram maintenance).
    pub(crate) fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Reads one sample from [`RelayMetrics::render`]: `name` with exactly the given labels
    /// (`""` for none, else e.g. `reason="queue_head"`). 0 if absent. For tests and tools.
    pub fn sample(&self, name: &str, labels: &str) -> f64 {
        let want = if labels.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{labels}}}")
        };
        self.render()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                (series == want).then(|| value.parse().ok()).flatten()
            })
            .unwrap_or(0.0)
    }

    /// Packets forwarded and dropped so far, and the drops by reason as `reason=N` words (the
    /// binary logs this when it stops: after the last scrape, this is the only record of what
    /// the drain did).
    pub fn packet_totals(&self) -> (u64, u64, String) {
        let text = self.render();
        let value = |series: &str| -> u64 {
            text.lines()
                .find_map(|l| {
                    let (s, v) = l.rsplit_once(' ')?;
                    (s == series).then(|| v.parse::<f64>().ok()).flatten()
                })
                .unwrap_or(0.0) as u64
        };
        let forwarded = value("ferry_relay_packets_forwarded_total");
        let mut total = 0;
        let mut by_reason = Vec::new();
        for d in DropReason::ALL {
            let n = value(&format!("{NAME_DROPS}{{reason=\"{}\"}}", d.label()));
            total += n;
            if n > 0 {
                by_reason.push(format!("{}={n}", d.label()));
            }
        }
        (forwarded, total, by_reason.join(" "))
    }

    #[cfg(test)]
    pub(crate) fn drops_for(&self, why: DropReason) -> u64 {
        self.sample(NAME_DROPS, &format!("reason=\"{}\"", why.label())) as u64
    }
}
