//! `abuse` mode: hostile clients at scale, to run beside honest traffic (`derp --echo`).
//!
//! - handshake-never: `--conns` connections that stop at TCP, after TLS, or half-way through
//!   the HTTP request head, and wait for the relay to close them; each is then opened again.
//! - drip: one byte a second, of an endless request head or (after a full DERP handshake) of a
//!   frame that never ends.
//! - garbage: one DERP client writing `--bytes` of unknown-type frames or SendPackets to keys
//!   nobody has, as fast as the relay reads them, then a Ping whose Pong proves the relay has
//!   read them all.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{BufMut, BytesMut};
use ferry_proto::derp::{self as proto, frame_type as ft, FrameDecoder, KEY_LEN};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

use crate::cli::{AbuseArgs, AbuseMode, DripPhase, Garbage, StallAt};
use crate::target::{BoxIo, Target};

/// The frame type garbage and drip frames use: not a DERP frame type (the relay skips it).
pub const UNKNOWN_TYPE: u8 = 0x7f;

/// What `abuse` measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AbuseReport {
    pub mode: String,
    pub detail: String,
    pub target: String,
    pub seconds: f64,
    /// handshake-never, drip: connections asked for.
    pub conns: u64,
    /// Connections opened (TCP, or as far as the mode goes) over the run.
    pub opened: u64,
    /// Connections the relay closed (EOF or error while we waited).
    pub closed_by_relay: u64,
    /// Failed opens, by kind.
    pub open_failures: BTreeMap<String, u64>,
    /// The first failure of each kind.
    pub failure_examples: BTreeMap<String, String>,
    /// Seconds from the start until `conns` were open at once (if ever).
    pub all_open_after_seconds: Option<f64>,
    /// Connections open at once, sampled every second after all were open: least and mean.
    pub open_min: u64,
    pub open_mean: f64,
    /// How long the relay let a connection live, over those it closed (seconds).
    pub lifetime_min_seconds: Option<f64>,
    pub lifetime_p50_seconds: Option<f64>,
    pub lifetime_max_seconds: Option<f64>,
    /// Bytes written by the abusive clients (application bytes, before TLS).
    pub bytes_sent: u64,
    /// garbage: frames written, write rate, time from the last byte written to the Pong.
    pub frames_sent: u64,
    pub bytes_per_second: f64,
    pub pong_after_seconds: Option<f64>,
}

impl AbuseReport {
    /// The JSON document.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data")
    }

    /// The text summary.
    pub fn summary(&self) -> String {
        let mut w = String::new();
        let _ = writeln!(
            w,
            "ferry-loadtest abuse {} ({}) against {}, {:.1} s",
            self.mode, self.detail, self.target, self.seconds
        );
        if self.mode == "garbage" {
            let _ = writeln!(
                w,
                "  {} bytes in {} frames, {:.1} MB/s; Pong {} s after the last byte",
                self.bytes_sent,
                self.frames_sent,
                self.bytes_per_second / 1e6,
                self.pong_after_seconds
                    .map_or("never".into(), |s| format!("{s:.3}"))
            );
        } else {
            let _ = writeln!(
                w,
                "  {} connections asked; all open after {}; open at once min {} mean {:.0}",
                self.conns,
                self.all_open_after_seconds
                    .map_or("never".into(), |s| format!("{s:.2} s")),
                self.open_min,
                self.open_mean
            );
            let _ = writeln!(
                w,
                "  opened {}, closed by the relay {}, lifetime min/p50/max {} s, {} bytes sent",
                self.opened,
                self.closed_by_relay,
                [
                    self.lifetime_min_seconds,
                    self.lifetime_p50_seconds,
                    self.lifetime_max_seconds
                ]
                .iter()
                .map(|x| x.map_or("-".into(), |s| format!("{s:.2}")))
                .collect::<Vec<_>>()
                .join("/"),
                self.bytes_sent
            );
        }
        for (k, n) in &self.open_failures {
            let _ = writeln!(
                w,
                "  {n} failed opens ({k}), e.g. {}",
                self.failure_examples.get(k).map_or("", |s| s.as_str())
            );
        }
        w
    }
}

/// Runs `abuse` mode.
pub async fn run(a: &AbuseArgs) -> Result<AbuseReport> {
    let (nofile, _) = crate::limits::raise_nofile();
    let target = Arc::new(Target::resolve(&a.target).await?);
    match a.mode {
        AbuseMode::Garbage => garbage(a, &target).await,
        _ => {
            if a.conns == 0 || a.concurrency == 0 {
                bail!("--conns and --concurrency must be at least 1");
            }
            if a.conns as u64 + 64 > nofile {
                bail!(
                    "{} connections need more file descriptors than the limit of {nofile}",
                    a.conns
                );
            }
            holders(a, &target).await
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    open: AtomicU64,
    opened: AtomicU64,
    closed: AtomicU64,
    bytes: AtomicU64,
    failures: std::sync::Mutex<(BTreeMap<String, u64>, BTreeMap<String, String>)>,
    lifetimes: std::sync::Mutex<Vec<Duration>>,
}

impl Shared {
    fn failed(&self, kind: &str, e: &dyn std::fmt::Display) {
        let mut f = self.failures.lock().expect("not poisoned");
        *f.0.entry(kind.to_string()).or_default() += 1;
        f.1.entry(kind.to_string()).or_insert_with(|| e.to_string());
    }
}

/// Reads and discards until EOF or an error (the relay closing us).
async fn drain(mut r: impl AsyncRead + Unpin) {
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// One abusive connection, opened again each time the relay closes it.
async fn one(a: AbuseArgs, t: Arc<Target>, sh: Arc<Shared>, sem: Arc<Semaphore>, i: usize) {
    let host = format!("{}", t.addr);
    loop {
        let permit = sem.acquire().await.expect("never closed");
        let opened: Result<BoxIo, String> = match (a.mode, a.stall_at, a.drip_phase) {
            (AbuseMode::HandshakeNever, StallAt::Tcp, _) => t
                .dial_tcp()
                .await
                .map(|s| Box::new(s) as BoxIo)
                .map_err(|e| e.to_string()),
            (AbuseMode::Drip, _, DripPhase::Frames) => {
                t.connect().await.map(|c| c.io).map_err(|e| e.to_string())
            }
            _ => t.dial().await.map_err(|e| e.to_string()),
        };
        drop(permit);
        let mut io = match opened {
            Ok(io) => io,
            Err(e) => {
                sh.failed(
                    if e.contains("open-files") {
                        "fd_limit"
                    } else if e.contains("timed out") {
                        "timeout"
                    } else {
                        "other"
                    },
                    &e,
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let t0 = Instant::now();
        sh.opened.fetch_add(1, Ordering::Relaxed);
        sh.open.fetch_add(1, Ordering::Relaxed);
        match a.mode {
            AbuseMode::HandshakeNever => {
                if a.stall_at == StallAt::Http {
                    let head = format!("GET /derp HTTP/1.1\r\nHost: {host}\r\n");
                    if io.write_all(head.as_bytes()).await.is_ok() && io.flush().await.is_ok() {
                        sh.bytes.fetch_add(head.len() as u64, Ordering::Relaxed);
                    }
                }
                drain(&mut io).await;
            }
            AbuseMode::Drip => {
                let (rd, mut wr) = tokio::io::split(io);
                let reader = drain(rd);
                tokio::pin!(reader);
                // Head: an endless header line; frames: a frame of an unknown type whose length
                // says 1 MiB − 1, written a byte a second (it would take 12 days).
                let mut prefix = Vec::new();
                match a.drip_phase {
                    DripPhase::Head => prefix.extend_from_slice(b"GET /derp HTTP/1.1\r\nX-Drip: "),
                    DripPhase::Frames => {
                        proto::put_header(&mut prefix, UNKNOWN_TYPE, proto::MAX_FRAME_SIZE - 1)
                    }
                }
                let mut k = 0usize;
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                // Spread the connections' ticks over the second.
                tick.reset_at(
                    tokio::time::Instant::now() + Duration::from_millis((i % 1000) as u64),
                );
                loop {
                    tokio::select! {
                        _ = &mut reader => break,
                        _ = tick.tick() => {
                            let b = prefix.get(k).copied().unwrap_or(b'a');
                            k += 1;
                            if wr.write_all(&[b]).await.is_err() || wr.flush().await.is_err() {
                                break;
                            }
                            sh.bytes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            AbuseMode::Garbage => unreachable!("one client, see garbage()"),
        }
        sh.open.fetch_sub(1, Ordering::Relaxed);
        sh.closed.fetch_add(1, Ordering::Relaxed);
        sh.lifetimes
            .lock()
            .expect("not poisoned")
            .push(t0.elapsed());
    }
}

async fn holders(a: &AbuseArgs, target: &Arc<Target>) -> Result<AbuseReport> {
    let sh = Arc::new(Shared::default());
    let sem = Arc::new(Semaphore::new(a.concurrency));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..a.conns {
        set.spawn(one(
            a.clone(),
            Arc::clone(target),
            Arc::clone(&sh),
            Arc::clone(&sem),
            i,
        ));
    }
    let mut all_open_after = None;
    let mut samples = Vec::new();
    let end = start + a.duration;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut next_sample = start;
    while Instant::now() < end {
        tick.tick().await;
        let open = sh.open.load(Ordering::Relaxed);
        if all_open_after.is_none() && open >= a.conns as u64 {
            all_open_after = Some(start.elapsed().as_secs_f64());
        }
        if all_open_after.is_some() && Instant::now() >= next_sample {
            samples.push(open);
            next_sample = Instant::now() + Duration::from_secs(1);
        }
    }
    set.abort_all();
    while set.join_next().await.is_some() {}
    let mut lifetimes = std::mem::take(&mut *sh.lifetimes.lock().expect("not poisoned"));
    lifetimes.sort_unstable();
    let q = |p: f64| {
        (!lifetimes.is_empty())
            .then(|| lifetimes[((lifetimes.len() - 1) as f64 * p).round() as usize].as_secs_f64())
    };
    let (failures, examples) = std::mem::take(&mut *sh.failures.lock().expect("not poisoned"));
    Ok(AbuseReport {
        mode: mode_name(a.mode).into(),
        detail: match a.mode {
            AbuseMode::HandshakeNever => format!("stall at {:?}", a.stall_at).to_lowercase(),
            AbuseMode::Drip => format!("drip {:?}", a.drip_phase).to_lowercase(),
            AbuseMode::Garbage => String::new(),
        },
        target: target.url.clone(),
        seconds: start.elapsed().as_secs_f64(),
        conns: a.conns as u64,
        opened: sh.opened.load(Ordering::Relaxed),
        closed_by_relay: sh.closed.load(Ordering::Relaxed),
        open_failures: failures,
        failure_examples: examples,
        all_open_after_seconds: all_open_after,
        open_min: samples.iter().copied().min().unwrap_or(0),
        open_mean: if samples.is_empty() {
            0.0
        } else {
            samples.iter().sum::<u64>() as f64 / samples.len() as f64
        },
        lifetime_min_seconds: q(0.0),
        lifetime_p50_seconds: q(0.5),
        lifetime_max_seconds: q(1.0),
        bytes_sent: sh.bytes.load(Ordering::Relaxed),
        ..Default::default()
    })
}

fn mode_name(m: AbuseMode) -> &'static str {
    match m {
        AbuseMode::HandshakeNever => "handshake-never",
        AbuseMode::Drip => "drip",
        AbuseMode::Garbage => "garbage",
    }
}

/// A batch of garbage frames, about 1 MiB, each `frame_size` payload bytes.
pub fn garbage_batch(kind: Garbage, frame_size: usize) -> BytesMut {
    let frames = ((1 << 20) / (frame_size + 5 + KEY_LEN)).max(1);
    let mut out = BytesMut::with_capacity(frames * (frame_size + 5 + KEY_LEN));
    for _ in 0..frames {
        match kind {
            Garbage::UnknownType => {
                proto::put_header(&mut out, UNKNOWN_TYPE, frame_size);
            }
            Garbage::UnknownDest => {
                proto::put_header(&mut out, ft::SEND_PACKET, KEY_LEN + frame_size);
                out.put_slice(&rand::random::<[u8; KEY_LEN]>());
            }
        }
        let at = out.len();
        out.put_bytes(0, frame_size);
        for b in out[at..].chunks_mut(8) {
            let r = rand::random::<u64>().to_le_bytes();
            b.copy_from_slice(&r[..b.len()]);
        }
    }
    out
}

async fn garbage(a: &AbuseArgs, target: &Arc<Target>) -> Result<AbuseReport> {
    let max = match a.garbage {
        Garbage::UnknownType => proto::MAX_FRAME_SIZE,
        Garbage::UnknownDest => proto::MAX_PACKET_SIZE,
    };
    if a.frame_size == 0 || a.frame_size > max {
        bail!("--frame-size must be 1..={max} for {:?}", a.garbage);
    }
    let c = target
        .connect()
        .await
        .context("the garbage client's connection")?;
    let (mut rd, mut wr) = tokio::io::split(c.io);
    let mut buf = c.buf;
    let pong = Arc::new(Notify::new());
    let pong_rx = Arc::clone(&pong);
    // Reads what the relay sends (KeepAlives, PeerGone, our Pong).
    let reader = tokio::spawn(async move {
        let mut dec = FrameDecoder::new();
        loop {
            while let Ok(Some(f)) = dec.decode(&mut buf) {
                if f.frame_type == ft::PONG {
                    pong_rx.notify_one();
                }
            }
            buf.reserve(64 << 10);
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    let batch = garbage_batch(a.garbage, a.frame_size);
    let per_frame = match a.garbage {
        Garbage::UnknownType => a.frame_size + 5,
        Garbage::UnknownDest => a.frame_size + 5 + KEY_LEN,
    };
    let frames_per_batch = batch.len() / per_frame;
    let start = Instant::now();
    let (mut sent, mut frames) = (0u64, 0u64);
    while sent < a.bytes {
        wr.write_all(&batch)
            .await
            .with_context(|| format!("writing garbage after {sent} bytes"))?;
        sent += batch.len() as u64;
        frames += frames_per_batch as u64;
    }
    wr.flush().await?;
    let written = Instant::now();
    let mut ping = Vec::new();
    proto::put_frame(&mut ping, ft::PING, &[b"garbage!"]);
    wr.write_all(&ping).await?;
    wr.flush().await?;
    let pong_after = tokio::time::timeout(Duration::from_secs(60), pong.notified())
        .await
        .ok()
        .map(|_| written.elapsed().as_secs_f64());
    let secs = start.elapsed().as_secs_f64();
    let _ = wr.shutdown().await;
    reader.abort();
    Ok(AbuseReport {
        mode: "garbage".into(),
        detail: format!("{:?}, {} B frames", a.garbage, a.frame_size).to_lowercase(),
        target: target.url.clone(),
        seconds: secs,
        conns: 1,
        opened: 1,
        bytes_sent: sent,
        frames_sent: frames,
        bytes_per_second: sent as f64 / (written - start).as_secs_f64(),
        pong_after_seconds: pong_after,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::net::{IpAddr, Ipv4Addr};

    /// The TCP-only stall connects from the addresses --source-first/--source-ips name, as
    /// every other abuse mode does: a per-IP cap must see the abuser alone there, not on the
    /// honest clients' 127.0.0.1-.32 (the soak's abuse run with `max_connections_per_ip`).
    #[tokio::test]
    async fn tcp_only_stall_connects_from_the_chosen_source() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/derp", l.local_addr().unwrap());
        let cli = crate::cli::Cli::try_parse_from([
            "ferry-loadtest",
            "abuse",
            &url,
            "--mode",
            "handshake-never",
            "--stall-at",
            "tcp",
            "--source-first",
            "200",
            "--source-ips",
            "1",
        ])
        .unwrap();
        let crate::cli::Command::Abuse(a) = cli.command else {
            unreachable!()
        };
        let t = Target::resolve(&a.target).await.unwrap();
        for i in 0..3 {
            let _c = t.dial_tcp().await.unwrap();
            let (_s, peer) = l.accept().await.unwrap();
            assert_eq!(
                peer.ip(),
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 200)),
                "connection {i}"
            );
        }
    }

    #[test]
    fn garbage_batches_decode_as_whole_frames() {
        for (kind, size) in [(Garbage::UnknownType, 65536), (Garbage::UnknownDest, 1200)] {
            let mut b = garbage_batch(kind, size);
            let total = b.len();
            let mut dec = FrameDecoder::new();
            let mut n = 0;
            while let Some(f) = dec.decode(&mut b).unwrap() {
                match kind {
                    Garbage::UnknownType => {
                        assert_eq!((f.frame_type, f.payload.len()), (UNKNOWN_TYPE, size))
                    }
                    Garbage::UnknownDest => assert_eq!(
                        (f.frame_type, f.payload.len()),
                        (ft::SEND_PACKET, KEY_LEN + size)
                    ),
                }
                n += 1;
            }
            assert!(b.is_empty() && n > 0);
            assert!(total <= (1 << 20) + size + 64, "about 1 MiB, got {total}");
        }
    }
}
