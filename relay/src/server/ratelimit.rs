//! Rate limits: a per-client receive token bucket (reads wait, so TCP flow control slows the
//! sender; nothing is dropped), an accept-rate bucket on the DERP listener, and a cap on
//! connections per source IP.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// The smallest receive burst, as derper: one whole SendPacket frame (64 KiB packet + key) must
/// fit, and Go clients, which pace themselves with the advertised bucket, drop any packet
/// larger than the burst.
pub(crate) const MIN_CLIENT_BURST: u64 = (64 << 10) + 32;

/// A token bucket owned by one task (no lock). Tokens may go negative: [`TokenBucket::take`]
/// charges what was already received and says how long to wait until the debt is repaid.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `rate` per second.
    pub(crate) fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `n` tokens; returns how long until the balance is back to zero (zero if it is
    /// not negative).
    pub(crate) fn take(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take_one(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Open connections per source IP, with a cap.
#[derive(Debug, Default)]
pub(crate) struct PerIp {
    counts: DashMap<IpAddr, u32>,
}

/// One counted connection; dropping it uncounts it.
#[derive(Debug)]
pub(crate) struct IpSlot {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// Counts a connection from `ip`, or `None` if `ip` already has `cap`.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr, cap: u32) -> Option<IpSlot> {
        let ip = ip.to_canonical();
        let mut n = self.counts.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            owner: Arc::clone(self),
            ip,
        })
    }

    #[cfg(test)]
    fn count(&self, ip: IpAddr) -> u32 {
        self.counts.get(&ip).map(|n| *n).unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.owner.counts.remove_if_mut(&self.ip, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_charges_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 500.0, t0);
        assert_eq!(b.take(500, t0), Duration::ZERO);
        // 250 more bytes at 1000 B/s: 0.25 s of debt.
        let d = b.take(250, t0);
        assert!((d.as_secs_f64() - 0.25).abs() < 1e-9, "{d:?}");
        // After the wait the balance is zero; refill never exceeds the burst.
        assert_eq!(b.take(0, t0 + d), Duration::ZERO);
        let later = t0 + Duration::from_secs(100);
        assert_eq!(b.take(500, later), Duration::ZERO);
        assert!(b.take(1, later) > Duration::ZERO);
    }

    #[test]
    fn accept_bucket_counts_whole_tokens() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 3.0, t0);
        assert!((0..3).all(|_| b.try_take_one(t0)));
        assert!(!b.try_take_one(t0));
        assert!(b.try_take_one(t0 + Duration::from_millis(500)));
        assert!(!b.try_take_one(t0 + Duration::from_millis(500)));
    }

    #[test]
    fn per_ip_caps_and_releases() {
        let p = Arc::new(PerIp::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let a = p.acquire(ip, 2).unwrap();
        let b = p.acquire(mapped, 2).expect("same address, v4-mapped");
        assert!(p.acquire(ip, 2).is_none());
        assert!(p.acquire("192.0.2.2".parse().unwrap(), 2).is_some());
        drop(a);
        assert_eq!(p.count(ip), 1);
        drop(b);
        assert_eq!(p.count(ip), 0);
        assert!(p.counts.get(&ip).is_none(), "no entry left behind");
    }
}
