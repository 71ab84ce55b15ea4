//! Live counters, the timeline behind the throughput chart, and the progress bar.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cli::RunArgs;
use crate::report::{thousands, Sample};

/// Counters the workers bump and the sampler reads.
#[derive(Debug, Default)]
pub struct Meter {
    /// The headline count (packets delivered, handshakes, STUN answers).
    pub count: AtomicU64,
    /// Payload bytes (where they apply).
    pub bytes: AtomicU64,
}

impl Meter {
    /// Adds to both counters.
    pub fn add(&self, count: u64, bytes: u64) {
        self.count.fetch_add(count, Ordering::Relaxed);
        if bytes > 0 {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

/// How the bar fills.
#[derive(Debug, Clone, Copy)]
pub enum Span {
    /// Warm-up then measurement, by the clock.
    Timed {
        warmup: Duration,
        duration: Duration,
    },
    /// Up to this many counted events (idle mode: connections opened).
    Count(u64),
}

/// Samples a [`Meter`] every 250 ms into a timeline and draws the progress bar.
pub struct Sampler {
    stop: watch::Sender<bool>,
    task: JoinHandle<Vec<Sample>>,
}

const TICK: Duration = Duration::from_millis(250);

impl Sampler {
    /// A sampler over a timed run: `run.warmup`, then `run.duration` measured.
    pub fn timed(meter: Arc<Meter>, epoch: Instant, run: &RunArgs, unit: &'static str) -> Sampler {
        let span = Span::Timed {
            warmup: run.warmup,
            duration: run.duration,
        };
        Sampler::start(meter, epoch, span, !run.no_progress, unit)
    }

    /// Starts sampling `meter`; `unit` names the count in the bar ("packets", "handshakes").
    pub fn start(
        meter: Arc<Meter>,
        epoch: Instant,
        span: Span,
        show: bool,
        unit: &'static str,
    ) -> Sampler {
        let (stop, mut stopped) = watch::channel(false);
        let bar = if show && std::io::stderr().is_terminal() {
            let len = match span {
                Span::Timed { warmup, duration } => (warmup + duration).as_millis() as u64,
                Span::Count(n) => n,
            };
            let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
            let template = match span {
                Span::Timed { .. } => "{spinner} [{elapsed_precise}] {bar:30} {msg}",
                Span::Count(_) => "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            };
            bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
            Some(bar)
        } else {
            None
        };
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut last_n, mut last_b, mut last_t) = (0u64, 0u64, Instant::now());
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let now = Instant::now();
                let n = meter.count.load(Ordering::Relaxed);
                let b = meter.bytes.load(Ordering::Relaxed);
                let dt = now.duration_since(last_t).as_secs_f64();
                if dt <= 0.0 {
                    continue;
                }
                let rate = (n - last_n) as f64 / dt;
                let brate = (b - last_b) as f64 / dt;
                (last_n, last_b, last_t) = (n, b, now);
                let t = now.duration_since(epoch);
                let phase = match span {
                    Span::Timed { warmup, .. } if t < warmup => "warmup",
                    Span::Timed { warmup, duration } if t < warmup + duration => "measure",
                    Span::Timed { .. } => "drain",
                    Span::Count(_) => "open",
                };
                samples.push(Sample {
                    t: t.as_secs_f64(),
                    per_second: rate,
                    bytes_per_second: brate,
                    phase: phase.into(),
                });
                if let Some(bar) = &bar {
                    match span {
                        Span::Timed { .. } => bar.set_position(t.as_millis() as u64),
                        Span::Count(_) => bar.set_position(n),
                    }
                    bar.set_message(format!("{phase}: {} {unit}/s", thousands(rate)));
                }
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            samples
        });
        Sampler { stop, task }
    }

    /// Stops sampling and returns the timeline.
    pub async fn finish(self) -> Vec<Sample> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}
