//! The report: one JSON document per run (schema `report.schema.json`, version in `schema`),
//! and the text summary a person reads.
//!
//! Conventions: rates are per second of the measured window (warm-up and the end-of-run drain
//! excluded); `sent`/`received`/`lost` cover the whole run (warm-up and drain included), so
//! `sent = received + lost` exactly and `lost` can be compared with the relay's drop counters.
//! Latencies are in microseconds.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The value of the `schema` field; bumped when a field changes meaning or goes away.
pub const SCHEMA: &str = "ferry-loadtest/v1";

/// A new latency histogram in nanoseconds (1 ns .. 100 s, 3 significant digits).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static bounds are valid")
}

/// Records a duration, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, d: std::time::Duration) {
    let ns = (d.as_nanos() as u64).clamp(1, h.high());
    h.record(ns).expect("clamped into range");
}

/// A latency distribution.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hist {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// `[percentile, microseconds]` points of the distribution, for charts.
    pub percentiles: Vec<[f64; 2]>,
}

/// Percentiles drawn in charts: dense near the tail.
const CURVE: &[f64] = &[
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999, 100.0,
];

impl Hist {
    /// Summarises a histogram of nanoseconds; `None` when it is empty.
    pub fn from_ns(h: &Histogram<u64>) -> Option<Hist> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(Hist {
            count: h.len(),
            min_us: us(h.min()),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            percentiles: CURVE
                .iter()
                .map(|p| [*p, us(h.value_at_quantile(p / 100.0))])
                .collect(),
        })
    }
}

/// What was asked for.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    pub clients: Option<u64>,
    pub topology: Option<String>,
    pub packet_size: Option<u64>,
    /// Total packets/s over all senders; 0 = flood.
    pub rate: Option<u64>,
    /// derp mode: how senders sent, `flood`, `rate` (open loop) or `window` (closed loop,
    /// at most `window` packets in flight per sender).
    pub send_mode: Option<String>,
    pub echo: Option<bool>,
    pub concurrency: Option<u64>,
    pub sockets: Option<u64>,
    /// stun: requests in flight per socket; derp with `send_mode` `window`: packets in flight
    /// per sender.
    pub window: Option<u64>,
    /// derp `window`: how long a full window may see no progress before its packets are
    /// written off.
    pub window_timeout_seconds: Option<f64>,
    pub warmup_seconds: f64,
    pub duration_seconds: f64,
}

/// DERP packet counts and rates.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Packets {
    /// SendPacket frames written, whole run (data and echoes; end markers excluded).
    pub sent: u64,
    /// RecvPacket frames read, whole run (data and echoes; end markers excluded).
    pub received: u64,
    /// `sent - received`: what the relay dropped (or, if `drain_complete` is false, still held).
    pub lost: u64,
    pub loss_ratio: f64,
    /// Packets sent within the measured window.
    pub sent_in_window: u64,
    /// Packets delivered (read by a client) within the measured window.
    pub delivered_in_window: u64,
    pub sent_per_second: f64,
    pub delivered_per_second: f64,
    /// Payload bytes delivered per second (packet size × delivered/s).
    pub delivered_bytes_per_second: f64,
    /// PeerGone frames received until the measured window ended (a destination that was not
    /// connected; once the run is over the clients close, and those that follow are not
    /// counted).
    pub peer_gone: u64,
    /// Whether every receiver saw its end marker, so `lost` is exact.
    pub drain_complete: bool,
    /// `window` mode: times a full window saw no progress for the window timeout and was
    /// opened again (null in other modes).
    pub window_timeouts: Option<u64>,
    /// `window` mode: packets outstanding when their window timed out, written off as lost by
    /// the sender (a packet that arrives later still counts as received; `lost` is exact).
    pub written_off: Option<u64>,
}

/// Latency distributions that apply to the mode.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub one_way: Option<Hist>,
    pub round_trip: Option<Hist>,
    pub handshake: Option<Hist>,
    pub stun: Option<Hist>,
}

/// Connection setup counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Handshakes {
    /// Completed in the measured window (connect mode) or in total (idle mode).
    pub completed: u64,
    pub failed: u64,
    pub per_second: f64,
    /// Failures by kind (refused, tls, not_derp, timeout, fd_limit, addr_not_avail, tcp, io).
    pub failures: BTreeMap<String, u64>,
}

/// Idle-connection memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Idle {
    pub connections: u64,
    /// Seconds from the first connect to the last handshake completed (the accept storm).
    pub open_seconds: Option<f64>,
    /// The relay's KeepAlive frames as the held connections saw them.
    pub keepalive: Option<Keepalive>,
    pub server_rss_before_bytes: Option<u64>,
    pub server_rss_after_bytes: Option<u64>,
    /// (after − before) / connections.
    pub server_rss_per_connection_bytes: Option<f64>,
}

/// KeepAlive timeliness over the idle connections: the gap before each KeepAlive (the first
/// one's since the handshake) against the interval + jitter the relay is configured with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Keepalive {
    /// The relay's KeepAlive interval, if given (--keepalive-interval); without it every gap is
    /// counted late against a bound of the jitter alone.
    pub interval_seconds: Option<f64>,
    pub jitter_seconds: f64,
    /// Connections that received at least one KeepAlive.
    pub connections_with_keepalives: u64,
    /// Every gap, the accept storm included.
    pub all: crate::stats::GapSummary,
    /// Gaps that began after every connection was open.
    pub after_all_open: crate::stats::GapSummary,
}

/// STUN counts and rates.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stun {
    /// Requests sent, whole run.
    pub requests: u64,
    /// Valid answers to outstanding requests, whole run.
    pub answers: u64,
    /// Datagrams that were not a Binding success for a transaction we sent.
    pub invalid: u64,
    /// Requests written off after the loss timeout.
    pub lost: u64,
    /// Valid answers that came after their request was written off.
    pub late: u64,
    pub loss_ratio: f64,
    pub answers_in_window: u64,
    pub answers_per_second: f64,
    pub tailscale_style: bool,
}

/// The server process, read from /proc over the measured window.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServerStats {
    pub pid: u32,
    pub cpu_seconds: f64,
    /// cpu_seconds / measured seconds.
    pub cores: f64,
    pub rss_bytes: u64,
    /// VmHWM: the peak RSS since the process started.
    pub peak_rss_bytes: u64,
    /// The mode's headline count (delivered packets, handshakes, STUN answers) per server
    /// CPU-second.
    pub per_cpu_second: Option<f64>,
}

/// The load generator itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClientStats {
    /// CPU seconds this process used over the whole run.
    pub cpu_seconds: f64,
    /// Distinct source addresses connections came from.
    pub source_addresses: u64,
    /// Open-files soft limit after raising it.
    pub nofile_limit: u64,
}

/// One point of the timeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// Seconds since the start of the warm-up.
    pub t: f64,
    /// The mode's headline count per second over the last interval.
    pub per_second: f64,
    /// Payload bytes per second (0 where bytes do not apply).
    pub bytes_per_second: f64,
    /// `warmup`, `measure` or `drain`.
    pub phase: String,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub schema: String,
    pub tool_version: String,
    /// `derp`, `connect`, `idle` or `stun`.
    pub mode: String,
    pub target: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub settings: Settings,
    pub measured_seconds: f64,
    pub packets: Option<Packets>,
    pub latency: Latency,
    pub handshakes: Option<Handshakes>,
    pub idle: Option<Idle>,
    pub stun: Option<Stun>,
    pub server: Option<ServerStats>,
    pub client: ClientStats,
    pub timeline: Vec<Sample>,
    pub warnings: Vec<String>,
}

impl Report {
    /// An empty report for `mode` against `target`, started now.
    pub fn new(mode: &str, target: &str, settings: Settings) -> Report {
        Report {
            schema: SCHEMA.into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            mode: mode.into(),
            target: target.into(),
            started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            settings,
            measured_seconds: 0.0,
            packets: None,
            latency: Latency::default(),
            handshakes: None,
            idle: None,
            stun: None,
            server: None,
            client: ClientStats::default(),
            timeline: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// The JSON document.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises")
    }

    /// The text summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let w = &mut s;
        let _ = writeln!(
            w,
            "ferry-loadtest {} {} — {:.1} s measured after {:.1} s warm-up",
            self.mode, self.target, self.measured_seconds, self.settings.warmup_seconds
        );
        let st = &self.settings;
        let mut knobs = vec![];
        if let Some(c) = st.clients {
            knobs.push(format!("clients {c}"));
        }
        if let Some(t) = &st.topology {
            knobs.push(t.clone());
        }
        if let Some(p) = st.packet_size {
            knobs.push(format!("{p}-byte packets"));
        }
        match (st.send_mode.as_deref(), st.rate, st.window) {
            (Some("window"), _, Some(n)) => knobs.push(format!(
                "closed loop: window {n} packets in flight per sender (timeout {})",
                dur(st.window_timeout_seconds.unwrap_or(0.0) * 1e6)
            )),
            (_, Some(0), _) => knobs.push("flood (open loop)".into()),
            (_, Some(r), _) => knobs.push(format!("{r} packets/s (open loop)")),
            _ => {}
        }
        if st.echo == Some(true) {
            knobs.push("echo".into());
        }
        if let Some(c) = st.concurrency {
            knobs.push(format!("concurrency {c}"));
        }
        if let (Some(so), Some(wi)) = (st.sockets, st.window) {
            knobs.push(format!("{so} sockets × {wi} in flight"));
        }
        if !knobs.is_empty() {
            let _ = writeln!(w, "  {}", knobs.join(", "));
        }
        if let Some(p) = &self.packets {
            let _ = writeln!(
                w,
                "  delivered  {:>14} packets/s  {:>10}/s  (sent {} packets/s)",
                thousands(p.delivered_per_second),
                bytes(p.delivered_bytes_per_second),
                thousands(p.sent_per_second)
            );
            let _ = writeln!(
                w,
                "  accounting sent {} = received {} + lost {} ({:.3} %){}",
                p.sent,
                p.received,
                p.lost,
                p.loss_ratio * 100.0,
                if p.drain_complete {
                    ""
                } else {
                    "  [drain incomplete: lost includes packets still in flight]"
                }
            );
            if let (Some(t), Some(off)) = (p.window_timeouts, p.written_off) {
                let _ = writeln!(
                    w,
                    "  window     {t} timeout(s) without progress, {off} packet(s) written off (lost counts them if they never arrived)"
                );
            }
            if p.peer_gone > 0 {
                let _ = writeln!(w, "  PeerGone frames: {}", p.peer_gone);
            }
        }
        if let Some(h) = &self.handshakes {
            let _ = writeln!(
                w,
                "  handshakes {} completed ({}/s), {} failed{}",
                h.completed,
                thousands(h.per_second),
                h.failed,
                if h.failures.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({})",
                        h.failures
                            .iter()
                            .map(|(k, v)| format!("{k} {v}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            );
        }
        if let Some(i) = &self.idle {
            let _ = writeln!(w, "  idle connections held: {}", i.connections);
            if let (Some(b), Some(a)) = (i.server_rss_before_bytes, i.server_rss_after_bytes) {
                let _ = writeln!(
                    w,
                    "  server RSS {} → {}: {} per connection",
                    bytes(b as f64),
                    bytes(a as f64),
                    bytes(i.server_rss_per_connection_bytes.unwrap_or(0.0))
                );
            }
            if let Some(t) = i.open_seconds {
                let _ = writeln!(w, "  all connections open after {t:.2} s");
            }
            if let Some(k) = &i.keepalive {
                for (name, g) in [("all gaps", &k.all), ("after all open", &k.after_all_open)] {
                    let _ = writeln!(
                        w,
                        "  keepalives, {name}: {} gaps (on {} connections), gap min {:.3} p50 {:.3} p99 {:.3} max {:.3} s; bound {:.1} s; {} late, max lateness {:.3} s",
                        g.count,
                        k.connections_with_keepalives,
                        g.min_seconds,
                        g.p50_seconds,
                        g.p99_seconds,
                        g.max_seconds,
                        g.bound_seconds,
                        g.late,
                        g.max_lateness_seconds
                    );
                }
            }
        }
        if let Some(x) = &self.stun {
            let _ = writeln!(
                w,
                "  answers    {:>14}/s  ({} requests, {} answers, {} lost, {} late, {} invalid; {:.3} % loss)",
                thousands(x.answers_per_second),
                x.requests,
                x.answers,
                x.lost,
                x.late,
                x.invalid,
                x.loss_ratio * 100.0
            );
        }
        let lat = [
            ("one-way", &self.latency.one_way),
            ("round trip", &self.latency.round_trip),
            ("handshake", &self.latency.handshake),
            ("STUN", &self.latency.stun),
        ];
        if lat.iter().any(|(_, h)| h.is_some()) {
            let _ = writeln!(
                w,
                "  latency     {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                "p50", "p90", "p99", "p99.9", "max", "count"
            );
            for (name, h) in lat {
                if let Some(h) = h {
                    let _ = writeln!(
                        w,
                        "  {:<11} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                        name,
                        dur(h.p50_us),
                        dur(h.p90_us),
                        dur(h.p99_us),
                        dur(h.p999_us),
                        dur(h.max_us),
                        h.count
                    );
                }
            }
        }
        if let Some(sv) = &self.server {
            let _ = writeln!(
                w,
                "  server pid {}: {:.2} CPU-s ({:.2} cores), RSS {}, peak {}{}",
                sv.pid,
                sv.cpu_seconds,
                sv.cores,
                bytes(sv.rss_bytes as f64),
                bytes(sv.peak_rss_bytes as f64),
                sv.per_cpu_second
                    .map(|x| format!(", {} per server CPU-second", thousands(x)))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            w,
            "  load generator: {:.2} CPU-s, {} source address(es), open-files limit {}",
            self.client.cpu_seconds, self.client.source_addresses, self.client.nofile_limit
        );
        for warning in &self.warnings {
            let _ = writeln!(w, "  warning: {warning}");
        }
        s
    }
}

/// 1234567.8 → "1,234,568".
pub fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Bytes with a binary unit.
pub fn bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v.abs() >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Microseconds in a readable unit.
pub fn dur(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(0.0), "0");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(16.0 * 1024.0), "16.0 KiB");
        assert_eq!(dur(12.3), "12 µs");
        assert_eq!(dur(1500.0), "1.50 ms");
    }

    #[test]
    fn hist_summary_has_ordered_percentiles() {
        let mut h = new_hist();
        for i in 1..=1000u64 {
            h.record(i * 1000).unwrap();
        }
        let s = Hist::from_ns(&h).unwrap();
        assert_eq!(s.count, 1000);
        assert!(s.min_us <= s.p50_us && s.p50_us <= s.p90_us && s.p90_us <= s.p99_us);
        assert!(s.p99_us <= s.p999_us && s.p999_us <= s.max_us);
        assert!((s.p50_us - 500.0).abs() < 1.0, "{}", s.p50_us);
        assert!(Hist::from_ns(&new_hist()).is_none());
    }
}
