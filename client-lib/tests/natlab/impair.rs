//! A slow, lossy link inside a NAT lab router, for a kernel without `netem` (this one has
//! neither `sch_netem` nor `sch_fq`, so `tc` can add neither delay nor timed loss).
//!
//! [`Impairment::start`] appends an `NFQUEUE` rule to a namespace's `FORWARD` chain and
//! serves that queue from a thread inside the namespace: every forwarded packet, either
//! way, is dropped with probability `loss` or else released `delay` after it was read,
//! first in first out (a constant delay keeps the order, as a cable does). The kernel cuts a
//! GSO/TSO super-packet into wire-sized packets before queueing it (the queue is not asked
//! for GSO), so the loss applies per packet on the wire, to TCP segments and UDP datagrams
//! alike. Only metadata is copied to user space.
//!
//! The thread polls its queue every [`TICK`] rather than blocking (the `nfq` crate keeps its
//! socket private), so a packet waits up to about one tick longer than `delay` before it is
//! even read; [`ImpairStats::late_max`] says how late a release came after the due time
//! counted from that read (the wait before the read is not in it). The kernel's own drop
//! counters (queue full, reader too slow) are read back before the queue goes, so that no
//! loss goes unseen.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;

/// How often the thread looks at its queue when nothing is due sooner.
pub const TICK: Duration = Duration::from_micros(100);
const TAG: &str = "ferry-impair";

/// What the link did.
#[derive(Debug, Default, Clone)]
pub struct ImpairStats {
    /// Packets the queue handed to the thread.
    pub packets: u64,
    /// Of those, dropped on purpose (the `loss`).
    pub dropped: u64,
    /// The most packets held at once.
    pub max_held: usize,
    /// The most a packet was released after its due time.
    pub late_max: Duration,
    /// The kernel's counts for the queue (`/proc/net/netfilter/nfnetlink_queue`): dropped
    /// because the queue was full, and because the thread could not take them.
    pub kernel_queue_dropped: u64,
    pub kernel_user_dropped: u64,
}

/// A running impairment; [`Impairment::stop`] (or drop) removes the rule and releases what
/// is held.
pub struct Impairment {
    ns: String,
    queue: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<ImpairStats, String>>>,
}

fn rule<'a>(op: &'a str, queue: &'a str) -> Vec<&'a str> {
    vec![
        "iptables",
        op,
        "FORWARD",
        "-m",
        "comment",
        "--comment",
        TAG,
        "-j",
        "NFQUEUE",
        "--queue-num",
        queue,
    ]
}

impl Impairment {
    /// Delays every packet that namespace `ns` forwards by `delay` and drops a share `loss`
    /// (0.0–1.0) of them, both ways.
    pub fn start(ns: &str, delay: Duration, loss: f64) -> Result<Impairment, String> {
        Self::start_with_queue(ns, delay, loss, 65_536)
    }

    /// [`Impairment::start`] with a kernel queue of `max_len` packets (beyond it the kernel
    /// drops, and counts in [`ImpairStats::kernel_queue_dropped`]).
    pub fn start_with_queue(
        ns: &str,
        delay: Duration,
        loss: f64,
        max_len: u32,
    ) -> Result<Impairment, String> {
        assert!((0.0..=1.0).contains(&loss), "loss is a share: {loss}");
        let queue: u16 = 7;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (ns, stop) = (ns.to_string(), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("impair".into())
                .spawn(move || serve(&ns, queue, max_len, delay, loss, &stop, ready_tx))
                .map_err(|e| e.to_string())?
        };
        let mut me = Impairment {
            ns: ns.to_string(),
            queue,
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(me.join().err().unwrap_or_else(|| "impair thread".into())),
        }
        // Only now that a reader is bound: a queue without one drops everything.
        super::Lab::exec(&me.ns, &rule("-A", &queue.to_string()))?;
        Ok(me)
    }

    fn join(&mut self) -> Result<ImpairStats, String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| "the impair thread panicked".to_string())?,
            None => Err("already stopped".into()),
        }
    }

    /// Removes the rule, releases what is held and says what the link did.
    pub fn stop(mut self) -> Result<ImpairStats, String> {
        let removed = super::Lab::exec(&self.ns, &rule("-D", &self.queue.to_string()));
        let stats = self.join()?;
        removed?;
        Ok(stats)
    }
}

impl Drop for Impairment {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = super::Lab::exec(&self.ns, &rule("-D", &self.queue.to_string()));
            let _ = self.join();
        }
    }
}

/// The kernel's drop counters of `queue` (queue full, reader too slow), as this thread's
/// namespace sees them: they go with the queue when it is unbound, so read them before.
fn kernel_drops(queue: u16) -> Result<(u64, u64), String> {
    // thread-self: this thread's namespace (/proc/self/net is the main thread's).
    let path = "/proc/thread-self/net/netfilter/nfnetlink_queue";
    let table = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    // queue_num portid queue_total copy_mode copy_range queue_dropped user_dropped id 1
    for line in table.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() == Some(&queue.to_string().as_str()) && f.len() >= 7 {
            let n = |s: &str| s.parse().map_err(|e| format!("{path}: {s:?}: {e}"));
            return Ok((n(f[5])?, n(f[6])?));
        }
    }
    Err(format!("{path}: no line for queue {queue}: {table:?}"))
}

fn serve(
    ns: &str,
    queue: u16,
    max_len: u32,
    delay: Duration,
    loss: f64,
    stop: &AtomicBool,
    ready: mpsc::Sender<Result<(), String>>,
) -> Result<ImpairStats, String> {
    use std::os::fd::AsRawFd;
    let opened = (|| {
        let path = format!("/var/run/netns/{ns}");
        let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: a valid namespace fd; setns changes only this thread, which lives in it.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "setns({path}): {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut q = nfq::Queue::open().map_err(|e| format!("NFQUEUE socket: {e}"))?;
        q.bind(queue)
            .map_err(|e| format!("NFQUEUE bind {queue}: {e}"))?;
        q.set_copy_range(queue, 0)
            .map_err(|e| format!("NFQUEUE copy range: {e}"))?;
        q.set_queue_max_len(queue, max_len)
            .map_err(|e| format!("NFQUEUE max len: {e}"))?;
        q.set_nonblocking(true);
        Ok(q)
    })();
    let mut q = match opened {
        Ok(q) => {
            let _ = ready.send(Ok(()));
            q
        }
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            return Err(e);
        }
    };
    let mut rng = rand::thread_rng();
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    let mut stats = ImpairStats::default();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        loop {
            match q.recv() {
                Ok(mut msg) => {
                    stats.packets += 1;
                    if loss > 0.0 && rng.gen_bool(loss) {
                        stats.dropped += 1;
                        msg.set_verdict(nfq::Verdict::Drop);
                        q.verdict(msg).map_err(|e| format!("verdict: {e}"))?;
                    } else {
                        held.push_back((Instant::now() + delay, msg));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // A verdict's error comes back as a netlink error on the next read. ENOENT:
                // the kernel had already let the packet go (its device went away); nothing
                // to do.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(format!("NFQUEUE recv: {e}")),
            }
        }
        stats.max_held = stats.max_held.max(held.len());
        let now = Instant::now();
        while let Some((due, _)) = held.front() {
            if *due > now && !stopping {
                break;
            }
            if !stopping {
                stats.late_max = stats.late_max.max(now - *due);
            }
            let (_, mut msg) = held.pop_front().expect("front");
            msg.set_verdict(nfq::Verdict::Accept);
            q.verdict(msg).map_err(|e| format!("verdict: {e}"))?;
        }
        if stopping {
            (stats.kernel_queue_dropped, stats.kernel_user_dropped) = kernel_drops(queue)?;
            let _ = q.unbind(queue);
            return Ok(stats);
        }
        let wait = held.front().map_or(TICK, |(due, _)| {
            due.saturating_duration_since(now).min(TICK)
        });
        std::thread::sleep(wait);
    }
}
