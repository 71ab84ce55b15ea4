//! The address book (node-wide, no I/O after construction): which peer a UDP source address
//! belongs to (proven by a disco message; the fallback that attributes handshake
//! initiations), our own addresses as peers saw them in pongs, and the endpoints we offer in
//! CallMeMaybe ([`AddrBook::my_endpoints`]).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_proto::PublicKey;

use crate::disco;
use crate::netcheck::Report;

/// Most UDP source addresses remembered as some peer's.
pub(super) const MAX_ADDR_PEER: usize = 4096;
/// Most of our own addresses learned from pongs.
pub(super) const MAX_OBSERVED: usize = 8;
/// Candidates and observed addresses not offered or seen again for this long are forgotten.
pub(super) const ADDR_TTL: Duration = Duration::from_secs(120);

/// Records `a` as seen `now`; evicts the stalest entry beyond `max`. True if `a` was new.
pub(super) fn remember(
    m: &mut HashMap<SocketAddr, Instant>,
    a: SocketAddr,
    now: Instant,
    max: usize,
) -> bool {
    let new = m.insert(a, now).is_none();
    if m.len() > max {
        if let Some(oldest) = m.iter().min_by_key(|(_, t)| **t).map(|(a, _)| *a) {
            m.remove(&oldest);
        }
    }
    new
}

/// Addresses: theirs (by source) and ours.
#[derive(Debug, Default)]
pub(super) struct AddrBook {
    /// UDP source address → the peer a disco message from it proved.
    /// Bounded ([`MAX_ADDR_PEER`], [`ADDR_TTL`]). Only a fallback: E2E data names its session.
    addr_peer: HashMap<SocketAddr, (PublicKey, Instant)>,
    /// Our socket addresses as offered to peers.
    local_endpoints: Vec<SocketAddr>,
    /// Our addresses as peers saw them (from pongs).
    /// Bounded (`MAX_OBSERVED`, `ADDR_TTL`): a peer can claim anything in a pong.
    observed: HashMap<SocketAddr, Instant>,
}

impl AddrBook {
    /// An empty book offering the addresses of our sockets (see [`local_endpoints`]).
    pub(super) fn new(socket_addrs: &[SocketAddr]) -> AddrBook {
        AddrBook {
            local_endpoints: local_endpoints(socket_addrs),
            ..AddrBook::default()
        }
    }

    /// Records that a disco message from `addr` proved `peer` (bounded: the stalest goes).
    pub(super) fn map_addr(&mut self, addr: SocketAddr, peer: PublicKey, now: Instant) {
        self.addr_peer.insert(addr, (peer, now));
        if self.addr_peer.len() > MAX_ADDR_PEER {
            if let Some(oldest) = self
                .addr_peer
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(a, _)| *a)
            {
                self.addr_peer.remove(&oldest);
            }
        }
    }

    /// The peer a disco message from `addr` proved, if any.
    pub(super) fn peer_at(&self, addr: &SocketAddr) -> Option<PublicKey> {
        self.addr_peer.get(addr).map(|(p, _)| *p)
    }

    /// A peer saw us at `addr`.
    pub(super) fn observe(&mut self, addr: SocketAddr, now: Instant) {
        remember(&mut self.observed, addr, now, MAX_OBSERVED);
    }

    /// Forgets observed addresses older than [`ADDR_TTL`] (every tick).
    pub(super) fn expire_observed(&mut self, now: Instant) {
        self.observed
            .retain(|_, t| now.saturating_duration_since(*t) < ADDR_TTL);
    }

    /// Forgets address → peer mappings older than [`ADDR_TTL`] (every prune).
    pub(super) fn expire_mappings(&mut self, now: Instant) {
        self.addr_peer
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < ADDR_TTL);
    }

    /// Our candidate endpoints for CallMeMaybe: the STUN-mapped addresses, our sockets'
    /// addresses, what peers observed; at most [`disco::MAX_ENDPOINTS`].
    pub(super) fn my_endpoints(&self, report: Option<&Report>) -> Vec<SocketAddr> {
        let mut set: BTreeSet<SocketAddr> = BTreeSet::new();
        if let Some(r) = report {
            set.extend(r.global_v4);
            set.extend(r.global_v6);
        }
        set.extend(self.local_endpoints.iter().copied());
        set.extend(self.observed.keys().copied());
        set.into_iter().take(disco::MAX_ENDPOINTS).collect()
    }
}

/// The addresses to offer peers for our sockets: specified local addresses as they are; for
/// a wildcard socket, the source address the OS would pick towards the internet (a routing
/// lookup; `connect` on UDP sends nothing). Listing every interface is not done yet.
fn local_endpoints(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for a in addrs {
        if !a.ip().is_unspecified() {
            out.push(*a);
            continue;
        }
        let (bind, probe): (SocketAddr, SocketAddr) = if a.is_ipv4() {
            (([0, 0, 0, 0], 0).into(), ([192, 0, 2, 1], 9).into())
        } else {
            (
                "[::]:0".parse().expect("literal"),
                "[2001:db8::1]:9".parse().expect("literal"),
            )
        };
        let ip = std::net::UdpSocket::bind(bind)
            .and_then(|s| s.connect(probe).and_then(|()| s.local_addr()))
            .map(|l| l.ip());
        if let Ok(ip) = ip {
            if !ip.is_unspecified() {
                out.push(SocketAddr::new(ip, a.port()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;

    #[test]
    fn remembered_addresses_are_bounded_and_the_stalest_goes() {
        let mut m = HashMap::new();
        let t0 = Instant::now();
        let addr = |p: u16| SocketAddr::from(([10, 0, 0, 1], p));
        for p in 0..4 {
            assert!(remember(
                &mut m,
                addr(p),
                t0 + Duration::from_secs(p.into()),
                4
            ));
        }
        assert!(!remember(&mut m, addr(0), t0 + Duration::from_secs(10), 4));
        assert!(remember(&mut m, addr(9), t0 + Duration::from_secs(11), 4));
        assert_eq!(m.len(), 4);
        assert!(!m.contains_key(&addr(1)), "the stalest entry is evicted");
        assert!(m.contains_key(&addr(0)), "a refreshed entry stays");
    }

    #[test]
    fn local_endpoints_keep_specified_addresses_and_resolve_wildcards() {
        let lo: SocketAddr = "127.0.0.1:4242".parse().unwrap();
        assert_eq!(local_endpoints(&[lo]), vec![lo]);
        // A wildcard socket is offered under the routed source address (if there is a
        // route at all), never as 0.0.0.0, and keeps its port.
        for a in local_endpoints(&["0.0.0.0:4243".parse().unwrap()]) {
            assert!(!a.ip().is_unspecified());
            assert_eq!(a.port(), 4243);
        }
    }

    #[test]
    fn mappings_and_observed_addresses_expire_and_endpoints_are_capped() {
        let t0 = Instant::now();
        let p = SecretKey::generate().public();
        let lo: SocketAddr = "127.0.0.1:4242".parse().unwrap();
        let mut b = AddrBook::new(&[lo]);
        let a: SocketAddr = "198.51.100.1:7".parse().unwrap();
        b.map_addr(a, p, t0);
        assert_eq!(b.peer_at(&a), Some(p));
        b.expire_mappings(t0 + ADDR_TTL);
        assert_eq!(b.peer_at(&a), None);
        for i in 0..20u16 {
            b.observe(SocketAddr::from(([203, 0, 113, 1], 1000 + i)), t0);
        }
        assert_eq!(b.my_endpoints(None).len(), 1 + MAX_OBSERVED);
        assert!(b.my_endpoints(None).contains(&lo));
        b.expire_observed(t0 + ADDR_TTL);
        assert_eq!(b.my_endpoints(None), vec![lo]);
    }
}
