//! `soak` mode: many clients for a long time, with churn and traffic, and the relay's resources
//! sampled so growth shows.
//!
//! - `--pairs` pairs run `derp` mode (`--echo`, `--rate`) for the whole `--duration`, ending with
//!   its exact drain, so `sent = received + lost` and `lost` is checked against the relay's drop
//!   counters (read from its metrics listener before and after);
//! - the other `--clients - 2 x --pairs` are idle; after they are all open, `--churn` a second
//!   are closed (TLS close_notify, then FIN) and as many new ones opened;
//! - every `--sample-every` the relay's VmRSS and open fds (/proc/PID) and its `ferry_relay_tasks`,
//!   `ferry_relay_queued_bytes` and `ferry_relay_connections` gauges are written to the CSV; at
//!   the end each series' least-squares slope over the samples after `--settle` says whether it
//!   is flat.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_proto::derp::frame_type as ft;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, Semaphore};

use crate::cli::{DerpArgs, RunArgs, SoakArgs, Topology};
use crate::report::Packets;
use crate::stats;
use crate::target::{DerpConn, Target};

/// One sample of the relay.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Sample {
    /// Seconds since the soak started.
    pub t_seconds: f64,
    pub rss_kib: Option<u64>,
    pub fds: Option<u64>,
    pub tasks: Option<f64>,
    pub queued_bytes: Option<f64>,
    pub relay_connections: Option<f64>,
    /// Idle connections this process holds now.
    pub idle_open: u64,
    /// Churn so far: connects and disconnects done.
    pub connects: u64,
    pub disconnects: u64,
    pub connect_failures: u64,
}

impl Sample {
    /// The CSV header.
    pub const CSV_HEADER: &'static str = "t_seconds,rss_kib,fds,tasks,queued_bytes,relay_connections,idle_open,connects,disconnects,connect_failures";

    /// One CSV line (empty fields for what could not be read).
    pub fn csv(&self) -> String {
        fn o<T: std::fmt::Display>(x: &Option<T>) -> String {
            x.as_ref().map_or(String::new(), |v| v.to_string())
        }
        format!(
            "{:.1},{},{},{},{},{},{},{},{},{}",
            self.t_seconds,
            o(&self.rss_kib),
            o(&self.fds),
            o(&self.tasks),
            o(&self.queued_bytes),
            o(&self.relay_connections),
            self.idle_open,
            self.connects,
            self.disconnects,
            self.connect_failures
        )
    }
}

/// Slopes per minute over the samples after the settle time.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Slopes {
    pub samples_used: u64,
    pub rss_kib_per_minute: Option<f64>,
    pub fds_per_minute: Option<f64>,
    pub tasks_per_minute: Option<f64>,
    pub queued_bytes_per_minute: Option<f64>,
}

/// Least-squares slopes (per minute) of each series over the samples at or after `settle` s.
pub fn slopes(samples: &[Sample], settle: f64) -> Slopes {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t_seconds >= settle).collect();
    let per_min = |f: &dyn Fn(&Sample) -> Option<f64>| {
        let pts: Vec<(f64, f64)> = after
            .iter()
            .filter_map(|s| f(s).map(|y| (s.t_seconds / 60.0, y)))
            .collect();
        stats::slope(&pts)
    };
    Slopes {
        samples_used: after.len() as u64,
        rss_kib_per_minute: per_min(&|s| s.rss_kib.map(|x| x as f64)),
        fds_per_minute: per_min(&|s| s.fds.map(|x| x as f64)),
        tasks_per_minute: per_min(&|s| s.tasks),
        queued_bytes_per_minute: per_min(&|s| s.queued_bytes),
    }
}

/// What a soak measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakReport {
    pub target: String,
    pub clients: u64,
    pub pairs: u64,
    pub churn_per_second: u32,
    pub rate: u64,
    pub packet_size: u64,
    pub duration_seconds: f64,
    pub settle_seconds: f64,
    pub seconds: f64,
    pub samples: Vec<Sample>,
    pub slopes: Slopes,
    /// Churn over the run: connects and disconnects done, and per second of churn.
    pub connects: u64,
    pub disconnects: u64,
    pub churn_seconds: f64,
    pub connect_failures: BTreeMap<String, u64>,
    /// Idle connections the relay closed on its own (not churned by us).
    pub idle_closed_by_relay: u64,
    /// The pairs' packets (derp mode's exact accounting).
    pub packets: Option<Packets>,
    pub round_trip_p99_us: Option<f64>,
    /// The relay's drop counters over the run (all reasons but write_error), and write_error.
    pub relay_drops: Option<u64>,
    pub relay_write_error_drops: Option<u64>,
    /// drain complete and packets lost = relay drops.
    pub accounting_exact: Option<bool>,
    /// The relay process still exists at the end (no crash).
    pub server_alive: Option<bool>,
    pub warnings: Vec<String>,
}

impl SoakReport {
    /// The JSON document.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data")
    }

    /// The text summary.
    pub fn summary(&self) -> String {
        let mut w = String::new();
        let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:+.2}"));
        let _ = writeln!(
            w,
            "ferry-loadtest soak against {}: {} clients, {} pairs at {} packets/s (+ echoes), churn {}/s, {:.0} s",
            self.target, self.clients, self.pairs, self.rate, self.churn_per_second, self.seconds
        );
        let _ = writeln!(
            w,
            "  churn: {} connects, {} disconnects in {:.0} s ({:.1}/s, {:.1}/s); failures {:?}; idle closed by the relay {}",
            self.connects,
            self.disconnects,
            self.churn_seconds,
            self.connects as f64 / self.churn_seconds.max(1e-9),
            self.disconnects as f64 / self.churn_seconds.max(1e-9),
            self.connect_failures,
            self.idle_closed_by_relay
        );
        if let (Some(first), Some(last)) = (self.samples.first(), self.samples.last()) {
            let _ = writeln!(w, "  first sample: {}", first.csv());
            let _ = writeln!(w, "  last sample:  {}", last.csv());
        }
        let s = &self.slopes;
        let _ = writeln!(
            w,
            "  slopes after {:.0} s ({} samples): RSS {} KiB/min, fds {} /min, tasks {} /min, queued {} B/min",
            self.settle_seconds,
            s.samples_used,
            f(s.rss_kib_per_minute),
            f(s.fds_per_minute),
            f(s.tasks_per_minute),
            f(s.queued_bytes_per_minute)
        );
        if let Some(p) = &self.packets {
            let _ = writeln!(
                w,
                "  pairs: sent {} received {} lost {} (drain complete: {}); relay drops {} (+{} write_error); accounting exact: {}; RTT p99 {} us",
                p.sent,
                p.received,
                p.lost,
                p.drain_complete,
                self.relay_drops.map_or("-".into(), |d| d.to_string()),
                self.relay_write_error_drops.map_or("-".into(), |d| d.to_string()),
                self.accounting_exact.map_or("-".into(), |d| d.to_string()),
                self.round_trip_p99_us.map_or("-".into(), |d| format!("{d:.0}"))
            );
        }
        if let Some(alive) = self.server_alive {
            let _ = writeln!(w, "  relay process alive at the end: {alive}");
        }
        for x in &self.warnings {
            let _ = writeln!(w, "  warning: {x}");
        }
        w
    }
}

#[derive(Debug, Default)]
struct Churn {
    open: AtomicU64,
    connects: AtomicU64,
    disconnects: AtomicU64,
    failures: AtomicU64,
    closed_by_relay: AtomicU64,
    failure_kinds: Mutex<BTreeMap<String, u64>>,
}

/// Holds an idle connection until told to close (then closes it cleanly) or the relay does.
async fn hold(mut c: DerpConn, close: oneshot::Receiver<()>, churn: Arc<Churn>) {
    tokio::pin!(close);
    loop {
        tokio::select! {
            f = c.read_frame() => match f {
                Ok(Some(f)) if f.frame_type != ft::PING => {}
                Ok(Some(_)) => {
                    // ferry never pings clients; answer anyway as a client would.
                }
                _ => {
                    churn.open.fetch_sub(1, Ordering::Relaxed);
                    churn.closed_by_relay.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            _ = &mut close => {
                let _ = tokio::time::timeout(Duration::from_secs(5), c.io.shutdown()).await;
                churn.open.fetch_sub(1, Ordering::Relaxed);
                churn.disconnects.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

type Slots = Arc<Mutex<Vec<Option<oneshot::Sender<()>>>>>;

/// Opens one idle connection into `slot`.
async fn open_into(t: Arc<Target>, slots: Slots, slot: usize, churn: Arc<Churn>) -> bool {
    match t.connect().await {
        Ok(c) => {
            let (tx, rx) = oneshot::channel();
            churn.open.fetch_add(1, Ordering::Relaxed);
            churn.connects.fetch_add(1, Ordering::Relaxed);
            slots.lock().expect("not poisoned")[slot] = Some(tx);
            tokio::spawn(hold(c, rx, churn));
            true
        }
        Err(e) => {
            churn.failures.fetch_add(1, Ordering::Relaxed);
            *churn
                .failure_kinds
                .lock()
                .expect("not poisoned")
                .entry(e.kind().to_string())
                .or_default() += 1;
            false
        }
    }
}

fn fd_count(pid: u32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

/// Runs `soak` mode.
pub async fn run(a: &SoakArgs) -> Result<SoakReport> {
    if a.pairs == 0 || a.clients < 2 * a.pairs {
        bail!(
            "--clients ({}) must hold the --pairs ({}) x 2 and at least 1 pair",
            a.clients,
            a.pairs
        );
    }
    if a.sample_every.is_zero() || a.duration.is_zero() {
        bail!("--duration and --sample-every must be more than 0");
    }
    if let Some(pid) = a.server_pid {
        crate::procfs::check_pid(pid)?;
    }
    crate::limits::raise_nofile();
    if let Some(w) = crate::limits::check_nofile(a.clients as u64 + a.churn as u64 * 2) {
        bail!("{w}");
    }
    let target = Arc::new(Target::resolve(&a.target).await?);
    let before = match &a.metrics_addr {
        Some(m) => Some(stats::scrape(m).await?),
        None => None,
    };
    let mut csv = match &a.csv {
        Some(p) => {
            let mut f = std::fs::File::create(p)
                .with_context(|| format!("cannot create {}", p.display()))?;
            writeln!(f, "{}", Sample::CSV_HEADER)?;
            Some(f)
        }
        None => None,
    };
    let start = Instant::now();
    let churn = Arc::new(Churn::default());
    let idle = a.clients - 2 * a.pairs;
    let slots: Slots = Arc::new(Mutex::new((0..idle).map(|_| None).collect()));

    // The pairs: derp mode, echo, for the whole run.
    let derp_args = DerpArgs {
        target: a.target.clone(),
        run: RunArgs {
            warmup: Duration::ZERO,
            duration: a.duration,
            server_pid: a.server_pid,
            json: false,
            svg: None,
            no_progress: true,
            threads: None,
        },
        clients: 2 * a.pairs,
        topology: Topology::Pairs,
        size: a.size,
        rate: a.rate,
        window: None,
        window_timeout: Duration::from_millis(200),
        echo: true,
        connect_retries: 0,
    };
    let mut pairs = tokio::spawn(async move { crate::derp::run(&derp_args).await });

    // The idle pool, then churn.
    let churner = {
        let (t, slots, churn) = (Arc::clone(&target), Arc::clone(&slots), Arc::clone(&churn));
        let rate = a.churn;
        tokio::spawn(async move {
            let sem = Arc::new(Semaphore::new(64));
            let mut opening = tokio::task::JoinSet::new();
            for slot in 0..idle {
                let (t, slots, churn, sem) = (
                    Arc::clone(&t),
                    Arc::clone(&slots),
                    Arc::clone(&churn),
                    Arc::clone(&sem),
                );
                opening.spawn(async move {
                    let _p = sem.acquire_owned().await.expect("never closed");
                    open_into(t, slots, slot, churn).await
                });
            }
            while opening.join_next().await.is_some() {}
            let churn_start = Instant::now();
            if rate == 0 || idle == 0 {
                return churn_start;
            }
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let conn_sem = Arc::new(Semaphore::new(64));
            loop {
                tick.tick().await;
                let slot = rand::random::<u64>() as usize % idle;
                let old = slots.lock().expect("not poisoned")[slot].take();
                if let Some(tx) = old {
                    let _ = tx.send(());
                }
                let (t, slots, churn) = (Arc::clone(&t), Arc::clone(&slots), Arc::clone(&churn));
                let Ok(permit) = Arc::clone(&conn_sem).try_acquire_owned() else {
                    // 64 connects in flight already: the relay is behind; count, don't pile up.
                    churn.failures.fetch_add(1, Ordering::Relaxed);
                    *churn
                        .failure_kinds
                        .lock()
                        .expect("not poisoned")
                        .entry("behind".into())
                        .or_default() += 1;
                    continue;
                };
                tokio::spawn(async move {
                    open_into(t, slots, slot, churn).await;
                    drop(permit);
                });
            }
        })
    };

    let mut samples = Vec::new();
    let mut warnings = Vec::new();
    let mut tick = tokio::time::interval(a.sample_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let derp_result = loop {
        tokio::select! {
            r = &mut pairs => break r,
            _ = tick.tick() => {
                let mut s = Sample {
                    t_seconds: start.elapsed().as_secs_f64(),
                    idle_open: churn.open.load(Ordering::Relaxed),
                    connects: churn.connects.load(Ordering::Relaxed),
                    disconnects: churn.disconnects.load(Ordering::Relaxed),
                    connect_failures: churn.failures.load(Ordering::Relaxed),
                    ..Default::default()
                };
                if let Some(pid) = a.server_pid {
                    s.rss_kib = crate::procfs::status_bytes(pid, "VmRSS").ok().map(|b| b / 1024);
                    s.fds = fd_count(pid);
                }
                if let Some(m) = &a.metrics_addr {
                    match stats::scrape(m).await {
                        Ok(m) => {
                            s.tasks = m.get("ferry_relay_tasks").copied();
                            s.queued_bytes = m.get("ferry_relay_queued_bytes").copied();
                            s.relay_connections = m.get("ferry_relay_connections").copied();
                        }
                        Err(e) => warnings.push(format!("t={:.0} s: {e:#}", s.t_seconds)),
                    }
                }
                if let Some(f) = csv.as_mut() {
                    writeln!(f, "{}", s.csv())?;
                    f.flush()?;
                }
                samples.push(s);
            }
        }
    };
    let churn_start = if churner.is_finished() {
        churner.await.ok()
    } else {
        churner.abort();
        None
    };
    let _ = churn_start;
    let seconds = start.elapsed().as_secs_f64();
    let connects = churn.connects.load(Ordering::Relaxed);
    let disconnects = churn.disconnects.load(Ordering::Relaxed);
    // Close the idle pool cleanly.
    let txs: Vec<_> = slots
        .lock()
        .expect("not poisoned")
        .iter_mut()
        .filter_map(|s| s.take())
        .collect();
    for tx in txs {
        let _ = tx.send(());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while churn.open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut rep = SoakReport {
        target: target.url.clone(),
        clients: a.clients as u64,
        pairs: a.pairs as u64,
        churn_per_second: a.churn,
        rate: a.rate,
        packet_size: a.size as u64,
        duration_seconds: a.duration.as_secs_f64(),
        settle_seconds: a.settle.as_secs_f64(),
        seconds,
        slopes: slopes(&samples, a.settle.as_secs_f64()),
        samples,
        connects,
        disconnects,
        // The churn ran from when the pool was full to the end of the pairs' run.
        churn_seconds: 0.0,
        connect_failures: churn.failure_kinds.lock().expect("not poisoned").clone(),
        idle_closed_by_relay: churn.closed_by_relay.load(Ordering::Relaxed),
        server_alive: a
            .server_pid
            .map(|p| std::path::Path::new(&format!("/proc/{p}")).exists()),
        warnings,
        ..Default::default()
    };
    // Churn seconds: from the first sample where the pool was full to the end; approximated by
    // the samples' connect counter (connects beyond the pool's initial fill).
    if let Some(first_full) = rep
        .samples
        .iter()
        .find(|s| s.connects >= idle as u64)
        .map(|s| s.t_seconds)
    {
        rep.churn_seconds = (seconds - first_full).max(0.0);
        // Count only churn connects: the initial fill is not churn.
        rep.connects = connects.saturating_sub(idle as u64);
    }
    match derp_result {
        Ok(Ok(r)) => {
            rep.round_trip_p99_us = r.latency.round_trip.as_ref().map(|h| h.p99_us);
            rep.warnings.extend(r.warnings.iter().cloned());
            rep.packets = r.packets;
        }
        Ok(Err(e)) => rep.warnings.push(format!("the pairs' run failed: {e:#}")),
        Err(e) => rep.warnings.push(format!("the pairs' run panicked: {e}")),
    }
    if let (Some(m), Some(before)) = (&a.metrics_addr, before) {
        match stats::scrape(m).await {
            Ok(after) => {
                let name = "ferry_relay_packets_dropped_total";
                let d = |m: &BTreeMap<String, f64>| stats::sum_reasons(m, name, &["write_error"]);
                let w = |m: &BTreeMap<String, f64>| {
                    m.get(&format!("{name}{{reason=\"write_error\"}}"))
                        .copied()
                        .unwrap_or(0.0)
                };
                let drops = (d(&after) - d(&before)) as u64;
                rep.relay_drops = Some(drops);
                rep.relay_write_error_drops = Some((w(&after) - w(&before)) as u64);
                rep.accounting_exact = rep
                    .packets
                    .as_ref()
                    .map(|p| p.drain_complete && p.lost == drops);
            }
            Err(e) => rep.warnings.push(format!("final scrape: {e:#}")),
        }
    }
    if let Some(p) = &a.svg {
        std::fs::write(p, render_svg(&rep))
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(rep)
}

/// Four panels (RSS, fds, tasks, queued bytes) over minutes, the settle time dashed.
pub fn render_svg(r: &SoakReport) -> String {
    const W: f64 = 1000.0;
    const H: f64 = 620.0;
    const PW: f64 = 400.0;
    const PH: f64 = 190.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="20" y="28" font-size="16" font-weight="bold">ferry-loadtest soak: {} clients, {} pairs, churn {}/s, {:.0} min</text>"#,
        r.clients,
        r.pairs,
        r.churn_per_second,
        r.seconds / 60.0
    );
    let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:+.2}"));
    let _ = writeln!(
        s,
        r##"<text x="20" y="50" fill="#444">slopes after {:.0} s: RSS {} KiB/min · fds {} /min · tasks {} /min · queued {} B/min (dashed: end of warm-up)</text>"##,
        r.settle_seconds,
        f(r.slopes.rss_kib_per_minute),
        f(r.slopes.fds_per_minute),
        f(r.slopes.tasks_per_minute),
        f(r.slopes.queued_bytes_per_minute)
    );
    type Get = fn(&Sample) -> Option<f64>;
    let panels: [(&str, Get); 4] = [
        ("relay RSS (MiB)", |x| x.rss_kib.map(|v| v as f64 / 1024.0)),
        ("relay open fds", |x| x.fds.map(|v| v as f64)),
        ("relay tokio tasks", |x| x.tasks),
        ("queued bytes (KiB)", |x| x.queued_bytes.map(|v| v / 1024.0)),
    ];
    let tmax = r
        .samples
        .last()
        .map_or(1.0, |x| x.t_seconds / 60.0)
        .max(1e-9);
    for (i, (title, get)) in panels.iter().enumerate() {
        let x0 = 80.0 + (i % 2) as f64 * 490.0;
        let y0 = 90.0 + (i / 2) as f64 * 260.0;
        let _ = writeln!(
            s,
            r#"<text x="{x0}" y="{}" font-weight="bold">{title}</text>"#,
            y0 - 8.0
        );
        let _ = writeln!(
            s,
            r##"<rect x="{x0}" y="{y0}" width="{PW}" height="{PH}" fill="none" stroke="#888"/>"##
        );
        let pts: Vec<(f64, f64)> = r
            .samples
            .iter()
            .filter_map(|x| get(x).map(|v| (x.t_seconds / 60.0, v)))
            .collect();
        let ymax = pts.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
        let px = |t: f64| x0 + t / tmax * PW;
        let py = |v: f64| y0 + PH - v / ymax * PH;
        for k in 0..=4 {
            let v = ymax * k as f64 / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{x2}" y2="{y:.1}" stroke="#eee"/><text x="{tx}" y="{ty:.1}" text-anchor="end" fill="#444">{v:.0}</text>"##,
                y = py(v),
                x2 = x0 + PW,
                tx = x0 - 6.0,
                ty = py(v) + 4.0
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#444">minutes (0 – {tmax:.1})</text>"##,
            x0 + PW / 2.0,
            y0 + PH + 18.0
        );
        let settle = r.settle_seconds / 60.0;
        if settle < tmax {
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{}" stroke="#999" stroke-dasharray="4 3"/>"##,
                y0 + PH,
                x = px(settle)
            );
        }
        if !pts.is_empty() {
            let path: Vec<String> = pts
                .iter()
                .map(|(t, v)| format!("{:.1},{:.1}", px(*t), py(*v)))
                .collect();
            let _ = writeln!(
                s,
                r##"<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>"##,
                path.join(" ")
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, rss: u64, tasks: f64) -> Sample {
        Sample {
            t_seconds: t,
            rss_kib: Some(rss),
            fds: Some(10_000),
            tasks: Some(tasks),
            queued_bytes: None,
            ..Default::default()
        }
    }

    #[test]
    fn slopes_skip_the_warm_up_and_are_per_minute() {
        // Warm-up: RSS climbs fast; after 120 s it grows 60 KiB per minute (1 KiB/s).
        let mut v: Vec<Sample> = (0..12)
            .map(|i| sample(i as f64 * 10.0, 1000 * i as u64, 5.0))
            .collect();
        v.extend((12..60).map(|i| sample(i as f64 * 10.0, 20_000 + i as u64 * 10, 5.0)));
        let s = slopes(&v, 120.0);
        assert_eq!(s.samples_used, 48);
        assert!((s.rss_kib_per_minute.unwrap() - 60.0).abs() < 1e-6, "{s:?}");
        assert_eq!(s.fds_per_minute, Some(0.0));
        assert_eq!(s.tasks_per_minute, Some(0.0));
        assert_eq!(s.queued_bytes_per_minute, None, "never read");
        assert_eq!(slopes(&v, 1e9).samples_used, 0);
    }

    #[test]
    fn csv_lines_match_the_header_and_the_chart_renders() {
        let s = sample(10.0, 2048, 7.0);
        assert_eq!(
            s.csv().split(',').count(),
            Sample::CSV_HEADER.split(',').count()
        );
        assert!(s.csv().starts_with("10.0,2048,10000,7,,"));
        let r = SoakReport {
            samples: vec![s, sample(20.0, 2050, 7.0)],
            settle_seconds: 15.0,
            ..Default::default()
        };
        let svg = render_svg(&r);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 3, "no queued-bytes line");
    }
}
