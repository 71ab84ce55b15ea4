//! Metrics: `ferry_stun_*` counters through the `metrics` facade.
//!
//! Counter handles are resolved once (at [`StunMetrics::register`]) and incremented per batch,
//! so the hot path does one atomic add per result seen in a batch, not a registry look-up per
//! packet.

use metrics::{counter, describe_counter, Counter, Unit};

use crate::proto::{RequestResult, Transport};

/// Name of the per-message counter.
pub const REQUESTS_TOTAL: &str = "ferry_stun_requests_total";
/// Name of the counter of TCP connections closed at once because the cap was reached.
pub const TCP_REJECTED_TOTAL: &str = "ferry_stun_tcp_connections_rejected_total";

/// Describe the crate's metrics to the installed recorder (call once, after installing it).
pub fn describe_metrics() {
    describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "STUN messages received, by transport (udp, tcp) and result: success and \
         error_response were answered; malformed, ignored (indications, responses) and \
         bad_fingerprint were dropped"
    );
    describe_counter!(
        TCP_REJECTED_TOTAL,
        Unit::Count,
        "STUN TCP connections closed on accept because the connection cap was reached"
    );
}

/// Counter handles for one transport, indexed by [`RequestResult::index`].
#[derive(Clone)]
pub(crate) struct TransportCounters {
    by_result: [Counter; 5],
}

impl TransportCounters {
    fn register(transport: Transport) -> TransportCounters {
        let t = transport.as_str();
        TransportCounters {
            by_result: RequestResult::ALL
                .map(|r| counter!(REQUESTS_TOTAL, "transport" => t, "result" => r.as_str())),
        }
    }

    /// Add a per-batch tally (indexed by [`RequestResult::index`]).
    pub(crate) fn add(&self, tally: &[u64; 5]) {
        for (c, &n) in self.by_result.iter().zip(tally) {
            if n != 0 {
                c.increment(n);
            }
        }
    }
}

/// Handles to the server's counters, bound to the recorder that was current when
/// [`StunMetrics::register`] ran.
///
/// [`StunServer::spawn`](crate::StunServer::spawn) registers them with the global recorder.
/// Tests that want to read the counters register them under a local recorder
/// (`metrics::with_local_recorder`) and pass them to
/// [`StunServer::spawn_with_metrics`](crate::StunServer::spawn_with_metrics).
#[derive(Clone)]
pub struct StunMetrics {
    pub(crate) udp: TransportCounters,
    pub(crate) tcp: TransportCounters,
    pub(crate) tcp_rejected: Counter,
}

impl StunMetrics {
    /// Resolve the counter handles from the current recorder (thread-local if set, else the
    /// global one; a no-op recorder if none is installed).
    pub fn register() -> StunMetrics {
        StunMetrics {
            udp: TransportCounters::register(Transport::Udp),
            tcp: TransportCounters::register(Transport::Tcp),
            tcp_rejected: counter!(TCP_REJECTED_TOTAL),
        }
    }
}

impl std::fmt::Debug for StunMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StunMetrics").finish_non_exhaustive()
    }
}
