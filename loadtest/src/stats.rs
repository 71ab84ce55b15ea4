//! Small numeric helpers of the long-run modes: least-squares slopes (is a soak flat?),
//! keepalive lateness (are the relay's KeepAlives on time?), and reading a Prometheus text
//! scrape (the relay's own counters and gauges).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Least-squares slope of `y` over `x` (units of y per unit of x). `None` with fewer than two
/// points or when every x is the same.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// How late a KeepAlive that came `gap` after the previous one (or after the handshake) is,
/// when the relay promises one every `interval` plus a random jitter of up to `jitter`.
pub fn lateness(gap: Duration, interval: Duration, jitter: Duration) -> Duration {
    gap.saturating_sub(interval + jitter)
}

/// KeepAlive gaps of many connections, summarised.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GapSummary {
    /// Gaps measured (KeepAlives received).
    pub count: u64,
    pub min_seconds: f64,
    pub p50_seconds: f64,
    pub p99_seconds: f64,
    pub max_seconds: f64,
    /// interval + jitter: the longest gap the relay promises.
    pub bound_seconds: f64,
    /// Gaps longer than the bound.
    pub late: u64,
    /// The longest gap minus the bound (0 when none is late).
    pub max_lateness_seconds: f64,
}

/// Summarises `gaps` (sorted in place) against `interval` + `jitter`.
pub fn summarize_gaps(gaps: &mut [Duration], interval: Duration, jitter: Duration) -> GapSummary {
    gaps.sort_unstable();
    let bound = interval + jitter;
    let q = |p: f64| -> f64 {
        if gaps.is_empty() {
            return 0.0;
        }
        let i = ((gaps.len() - 1) as f64 * p).round() as usize;
        gaps[i].as_secs_f64()
    };
    let late = gaps.iter().filter(|g| **g > bound).count() as u64;
    let max = gaps.last().copied().unwrap_or_default();
    GapSummary {
        count: gaps.len() as u64,
        min_seconds: gaps.first().copied().unwrap_or_default().as_secs_f64(),
        p50_seconds: q(0.5),
        p99_seconds: q(0.99),
        max_seconds: max.as_secs_f64(),
        bound_seconds: bound.as_secs_f64(),
        late,
        max_lateness_seconds: lateness(max, interval, jitter).as_secs_f64(),
    }
}

/// Parses a Prometheus text exposition into `series -> value`, the series written as in the
/// text (`name` or `name{label="v"}`). Comments and unparsable lines are skipped.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.trim().to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Sum of every series of metric `name` whose labels are not in `except` (label values of
/// `reason`), e.g. all drop reasons but `write_error`.
pub fn sum_reasons(m: &BTreeMap<String, f64>, name: &str, except: &[&str]) -> f64 {
    let prefix = format!("{name}{{");
    m.iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .filter(|(k, _)| {
            !except
                .iter()
                .any(|e| k.contains(&format!("reason=\"{e}\"")))
        })
        .map(|(_, v)| *v)
        .sum()
}

/// `GET /metrics` from a relay's metrics listener (`host:port`, plain HTTP on this host).
pub async fn scrape(addr: &str) -> Result<BTreeMap<String, f64>> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the metrics listener {addr}"))?;
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await?;
        let text = String::from_utf8_lossy(&body);
        let Some((head, rest)) = text.split_once("\r\n\r\n") else {
            bail!("{addr}: no HTTP response head");
        };
        if !head.starts_with("HTTP/1.1 200") {
            bail!(
                "{addr}/metrics answered {}",
                head.lines().next().unwrap_or("")
            );
        }
        Ok(parse_prometheus(rest))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("scraping {addr} took over 10 s"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&line).unwrap() - 3.0).abs() < 1e-9);
        let flat = [(0.0, 5.0), (1.0, 6.0), (2.0, 5.0), (3.0, 6.0), (4.0, 5.5)];
        assert!(slope(&flat).unwrap().abs() < 0.2);
        // Hand-computed: x 0,1,2 ; y 1,3,2 → mean (1,2), sxy = (-1)(-1)+0+(1)(0) = 1, sxx = 2.
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)]), Some(0.5));
        assert_eq!(slope(&[(1.0, 1.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }

    #[test]
    fn lateness_is_beyond_interval_plus_jitter() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(lateness(s(5), s(5), s(5)), Duration::ZERO);
        assert_eq!(lateness(s(10), s(5), s(5)), Duration::ZERO);
        assert_eq!(lateness(ms(10_250), s(5), s(5)), ms(250));
        assert_eq!(lateness(s(1), s(5), s(5)), Duration::ZERO);
        let mut gaps = vec![ms(5_100), ms(9_900), ms(10_300), ms(7_000), ms(10_050)];
        let g = summarize_gaps(&mut gaps, s(5), s(5));
        assert_eq!(g.count, 5);
        assert_eq!(g.late, 2);
        assert!((g.max_lateness_seconds - 0.3).abs() < 1e-9);
        assert!((g.max_seconds - 10.3).abs() < 1e-9);
        assert!((g.min_seconds - 5.1).abs() < 1e-9);
        assert!((g.p50_seconds - 9.9).abs() < 1e-9);
        assert_eq!(g.bound_seconds, 10.0);
        assert_eq!(summarize_gaps(&mut [], s(5), s(5)).count, 0);
    }

    #[test]
    fn prometheus_text() {
        let text = "# HELP x y\n# TYPE ferry_relay_tasks gauge\nferry_relay_tasks 42\n\
            ferry_relay_packets_dropped_total{reason=\"unknown_dest\"} 3\n\
            ferry_relay_packets_dropped_total{reason=\"write_error\"} 2\n\
            ferry_relay_packets_dropped_total{reason=\"queue_head\"} 5\n\nbogus line\n";
        let m = parse_prometheus(text);
        assert_eq!(m["ferry_relay_tasks"], 42.0);
        assert_eq!(
            sum_reasons(&m, "ferry_relay_packets_dropped_total", &["write_error"]),
            8.0
        );
        assert_eq!(
            sum_reasons(&m, "ferry_relay_packets_dropped_total", &[]),
            10.0
        );
        assert_eq!(m.len(), 4);
    }
}
