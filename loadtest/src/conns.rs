//! Connection-level modes: the connect storm (handshakes/s and their latency) and idle
//! connections (server memory per connection).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_proto::derp::{frame_type as ft, ServerFrame};
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::cli::{ConnectArgs, IdleArgs};
use crate::procfs;
use crate::progress::{Meter, Sampler, Span};
use crate::report::{self, Handshakes, Hist, Idle, Keepalive, Report, ServerStats, Settings};
use crate::stats;
use crate::target::{ConnectError, Target};

#[derive(Debug)]
struct StormStats {
    completed_in_window: u64,
    completed: u64,
    failures: BTreeMap<String, u64>,
    hist: Histogram<u64>,
    /// The first failure of each kind, for the warnings.
    examples: BTreeMap<String, String>,
}

/// Runs `connect` mode.
pub async fn run_connect(a: &ConnectArgs) -> Result<Report> {
    if a.concurrency == 0 {
        anyhow::bail!("--concurrency must be at least 1");
    }
    if let Some(pid) = a.run.server_pid {
        procfs::check_pid(pid)?;
    }
    let (nofile, _) = crate::limits::raise_nofile();
    let target = Arc::new(crate::target::Target::resolve(&a.target).await?);
    let mut rep = Report::new(
        "connect",
        &target.url,
        Settings {
            concurrency: Some(a.concurrency as u64),
            warmup_seconds: a.run.warmup.as_secs_f64(),
            duration_seconds: a.run.duration.as_secs_f64(),
            ..Default::default()
        },
    );
    let cpu_start = procfs::own_cpu_seconds();
    // One connection first: a wrong target fails here with its own error, not as a count.
    let probe = target
        .connect()
        .await
        .with_context(|| format!("first connection to {}", target.url))?;
    drop(probe);

    let epoch = Instant::now();
    let measure_from = epoch + a.run.warmup;
    let stop_at = measure_from + a.run.duration;
    let meter = Arc::new(Meter::default());
    let sampler = Sampler::timed(Arc::clone(&meter), epoch, &a.run, "handshakes");
    let mut set = JoinSet::new();
    for _ in 0..a.concurrency {
        let (t, meter) = (Arc::clone(&target), Arc::clone(&meter));
        set.spawn(async move {
            let mut st = StormStats {
                completed_in_window: 0,
                completed: 0,
                failures: BTreeMap::new(),
                hist: report::new_hist(),
                examples: BTreeMap::new(),
            };
            loop {
                let t0 = Instant::now();
                if t0 >= stop_at {
                    break;
                }
                match t.connect().await {
                    Ok(mut c) => {
                        let took = t0.elapsed();
                        st.completed += 1;
                        if t0 >= measure_from && t0 < stop_at {
                            st.completed_in_window += 1;
                            report::record(&mut st.hist, took);
                        }
                        meter.add(1, 0);
                        let _ = c.io.shutdown().await;
                    }
                    Err(e) => {
                        let kind = e.kind().to_string();
                        *st.failures.entry(kind.clone()).or_default() += 1;
                        st.examples.entry(kind).or_insert_with(|| e.to_string());
                        if e.is_fatal() {
                            break;
                        }
                        // Out of ports or descriptors: give the kernel a moment, don't spin.
                        if matches!(
                            e,
                            ConnectError::AddrNotAvail { .. } | ConnectError::FdLimit { .. }
                        ) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
            st
        });
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_window_start = a.run.server_pid.map(procfs::cpu_seconds).transpose()?;
    tokio::time::sleep_until(stop_at.into()).await;
    let server_cpu = a.run.server_pid.map(procfs::cpu_seconds).transpose()?;
    let mut total = StormStats {
        completed_in_window: 0,
        completed: 0,
        failures: BTreeMap::new(),
        hist: report::new_hist(),
        examples: BTreeMap::new(),
    };
    while let Some(r) = set.join_next().await {
        let st = r.context("connect task panicked")?;
        total.completed += st.completed;
        total.completed_in_window += st.completed_in_window;
        total.hist.add(&st.hist).expect("same bounds");
        for (k, v) in st.failures {
            *total.failures.entry(k).or_default() += v;
        }
        for (k, v) in st.examples {
            total.examples.entry(k).or_insert(v);
        }
    }
    rep.timeline = sampler.finish().await;
    let secs = a.run.duration.as_secs_f64();
    rep.measured_seconds = secs;
    for (kind, example) in &total.examples {
        rep.warnings.push(format!(
            "{} connection(s) failed ({kind}), e.g.: {example}",
            total.failures[kind]
        ));
    }
    rep.handshakes = Some(Handshakes {
        completed: total.completed_in_window,
        failed: total.failures.values().sum(),
        per_second: total.completed_in_window as f64 / secs,
        failures: total.failures,
    });
    rep.latency.handshake = Hist::from_ns(&total.hist);
    if let (Some(pid), Some(c0), Some(c1)) = (a.run.server_pid, cpu_window_start, server_cpu) {
        let cpu = c1 - c0;
        rep.server = Some(ServerStats {
            pid,
            cpu_seconds: cpu,
            cores: cpu / secs,
            rss_bytes: procfs::status_bytes(pid, "VmRSS")?,
            peak_rss_bytes: procfs::status_bytes(pid, "VmHWM")?,
            per_cpu_second: (cpu > 0.0).then(|| total.completed_in_window as f64 / cpu),
        });
    }
    rep.client.cpu_seconds = procfs::own_cpu_seconds() - cpu_start;
    rep.client.source_addresses = target.source_count() as u64;
    rep.client.nofile_limit = nofile;
    Ok(rep)
}

/// Holds one connection: reads (and discards) what the server sends, answers Pings. Returns
/// each KeepAlive's arrival time and its gap since the previous one (the first since `since`,
/// when the handshake completed).
async fn hold(
    mut c: crate::target::DerpConn,
    since: Instant,
    mut finish: watch::Receiver<bool>,
) -> Vec<(Instant, Duration)> {
    let mut gaps = Vec::new();
    let mut last = since;
    loop {
        tokio::select! {
            f = c.read_frame() => match f {
                Ok(Some(f)) => {
                    if f.frame_type == ft::KEEP_ALIVE {
                        let now = Instant::now();
                        gaps.push((now, now - last));
                        last = now;
                    } else if f.frame_type == ft::PING {
                        if let Ok(ServerFrame::Ping(data)) = ServerFrame::parse(f) {
                            let mut out = Vec::with_capacity(13);
                            ferry_proto::derp::put_frame(&mut out, ft::PONG, &[&data]);
                            if c.io.write_all(&out).await.is_err() {
                                return gaps;
                            }
                        }
                    }
                }
                _ => return gaps,
            },
            _ = finish.changed() => return gaps,
        }
    }
}

/// Runs `idle` mode.
pub async fn run_idle(a: &IdleArgs) -> Result<Report> {
    if a.concurrency == 0 || a.clients == 0 {
        anyhow::bail!("--clients and --concurrency must be at least 1");
    }
    if let Some(pid) = a.server_pid {
        procfs::check_pid(pid)?;
    }
    let (nofile, _) = crate::limits::raise_nofile();
    let target = Arc::new(Target::resolve(&a.target).await?);
    let mut rep = Report::new(
        "idle",
        &target.url,
        Settings {
            clients: Some(a.clients as u64),
            concurrency: Some(a.concurrency as u64),
            warmup_seconds: 0.0,
            duration_seconds: a.hold.as_secs_f64(),
            ..Default::default()
        },
    );
    if let Some(w) = crate::limits::check_nofile(a.clients as u64) {
        rep.warnings.push(w);
    }
    let cpu_start = procfs::own_cpu_seconds();
    let rss_before = a
        .server_pid
        .map(|p| procfs::status_bytes(p, "VmRSS"))
        .transpose()?;
    let server_cpu0 = a.server_pid.map(procfs::cpu_seconds).transpose()?;

    let epoch = Instant::now();
    let meter = Arc::new(Meter::default());
    let sampler = Sampler::start(
        Arc::clone(&meter),
        epoch,
        Span::Count(a.clients as u64),
        !a.no_progress,
        "connections",
    );
    let (finish_tx, finish) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(a.concurrency));
    let mut opening = JoinSet::new();
    for i in 0..a.clients {
        let (t, sem, meter) = (Arc::clone(&target), Arc::clone(&sem), Arc::clone(&meter));
        opening.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("never closed");
            let t0 = Instant::now();
            let c = t.connect().await;
            if c.is_ok() {
                meter.add(1, 0);
            }
            (i, t0.elapsed(), Instant::now(), c)
        });
    }
    let mut holders = JoinSet::new();
    let mut hist = report::new_hist();
    let mut opened = 0u64;
    let mut first_error: Option<anyhow::Error> = None;
    while let Some(r) = opening.join_next().await {
        let (i, took, done_at, c) = r.context("connect task panicked")?;
        match c {
            Ok(c) => {
                opened += 1;
                report::record(&mut hist, took);
                holders.spawn(hold(c, done_at, finish.clone()));
            }
            Err(e) => {
                if first_error.is_none() {
                    first_error = Some(
                        anyhow::Error::new(e)
                            .context(format!("opening idle connection {i} of {}", a.clients)),
                    );
                    opening.abort_all();
                }
            }
        }
    }
    let all_open = Instant::now();
    let open_secs = (all_open - epoch).as_secs_f64();
    if let Some(e) = first_error {
        let _ = finish_tx.send(true);
        sampler.finish().await;
        return Err(e.context(format!("{opened} connections were open when it failed")));
    }
    tokio::time::sleep(a.hold).await;
    let server = match a.server_pid {
        Some(pid) => Some((
            pid,
            procfs::status_bytes(pid, "VmRSS")?,
            procfs::status_bytes(pid, "VmHWM")?,
            procfs::cpu_seconds(pid)?,
        )),
        None => None,
    };
    let mut gaps: Vec<(Instant, Duration)> = Vec::new();
    let mut with_keepalives = 0u64;
    let still_open = holders.len() - {
        // Holders that returned already lost their connection.
        let mut gone = 0;
        while let Some(r) = holders.try_join_next() {
            let g = r.context("holder task panicked")?;
            with_keepalives += u64::from(!g.is_empty());
            gaps.extend(g);
            gone += 1;
        }
        gone
    };
    let _ = finish_tx.send(true);
    while let Some(r) = holders.join_next().await {
        let g = r.context("holder task panicked")?;
        with_keepalives += u64::from(!g.is_empty());
        gaps.extend(g);
    }
    rep.timeline = sampler.finish().await;
    if still_open < a.clients {
        rep.warnings.push(format!(
            "{} of {} connections were closed by the server during the hold",
            a.clients - still_open,
            a.clients
        ));
    }
    rep.measured_seconds = a.hold.as_secs_f64();
    rep.handshakes = Some(Handshakes {
        completed: opened,
        failed: 0,
        per_second: opened as f64 / open_secs,
        failures: BTreeMap::new(),
    });
    rep.latency.handshake = Hist::from_ns(&hist);
    let after = server.map(|(_, rss, _, _)| rss);
    let interval = a.keepalive_interval.unwrap_or_default();
    // Gaps that began once every connection was open: the storm's own delays excluded.
    let mut steady: Vec<Duration> = gaps
        .iter()
        .filter(|(at, gap)| *at - *gap >= all_open)
        .map(|(_, g)| *g)
        .collect();
    let mut all: Vec<Duration> = gaps.iter().map(|(_, g)| *g).collect();
    rep.idle = Some(Idle {
        open_seconds: Some(open_secs),
        keepalive: Some(Keepalive {
            interval_seconds: a.keepalive_interval.map(|d| d.as_secs_f64()),
            jitter_seconds: a.keepalive_jitter.as_secs_f64(),
            connections_with_keepalives: with_keepalives,
            all: stats::summarize_gaps(&mut all, interval, a.keepalive_jitter),
            after_all_open: stats::summarize_gaps(&mut steady, interval, a.keepalive_jitter),
        }),
        connections: still_open as u64,
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: after,
        server_rss_per_connection_bytes: match (rss_before, after) {
            (Some(b), Some(a)) if still_open > 0 => Some((a as f64 - b as f64) / still_open as f64),
            _ => None,
        },
    });
    if let (Some((pid, rss, hwm, cpu)), Some(cpu0)) = (server, server_cpu0) {
        // Over the whole run: opening and holding.
        let cpu = cpu - cpu0;
        rep.server = Some(ServerStats {
            pid,
            cpu_seconds: cpu,
            cores: cpu / epoch.elapsed().as_secs_f64(),
            rss_bytes: rss,
            peak_rss_bytes: hwm,
            per_cpu_second: None,
        });
    }
    rep.client.cpu_seconds = procfs::own_cpu_seconds() - cpu_start;
    rep.client.source_addresses = target.source_count() as u64;
    rep.client.nofile_limit = nofile;
    Ok(rep)
}
