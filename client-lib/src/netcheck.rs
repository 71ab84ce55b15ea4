//! netcheck: what the network looks like from the data socket.
//!
//! STUN Binding requests go from the node's own UDP socket(s) ([`Sockets`]) to the STUN port of
//! up to two nodes of every region, over IPv4 and (if there is an IPv6 socket) IPv6: three
//! tries per server, 100 ms apart, the first answer counts, everything within a deadline (3 s
//! by default), as Tailscale's netcheck does. From the answers:
//!
//! * per-region latency (the lowest round trip of any of its servers, either family);
//! * UDP works at all, IPv4 / IPv6 work, our public (reflexive) addresses;
//! * **mapping varies by destination** (a "hard" NAT, endpoint-dependent mapping): two
//!   different STUN servers saw different public `ip:port` for the same socket. Needs answers
//!   from at least two servers; `None` when there were fewer;
//! * the home region: the lowest latency, but the previous home is kept unless the new best is
//!   at least [`HOME_HYSTERESIS`] faster (so the home does not flap between similar regions).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::relaymap::RelayMap;
use crate::stun;
use crate::udp::Sockets;

/// A new home must be at least this much faster than the current one.
pub const HOME_HYSTERESIS: Duration = Duration::from_millis(10);

/// How hard netcheck tries.
#[derive(Debug, Clone, Copy)]
pub struct NetcheckOptions {
    /// Overall deadline.
    pub timeout: Duration,
    /// Requests per server.
    pub tries: u32,
    /// Time between tries.
    pub stagger: Duration,
    /// Servers probed per region.
    pub nodes_per_region: usize,
}

impl Default for NetcheckOptions {
    fn default() -> Self {
        NetcheckOptions {
            timeout: Duration::from_secs(3),
            tries: 3,
            stagger: Duration::from_millis(100),
            nodes_per_region: 2,
        }
    }
}

/// One STUN server's result.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Probe {
    /// Region id.
    pub region: u32,
    /// Node name.
    pub node: String,
    /// The server's address.
    pub server: SocketAddr,
    /// Round-trip time of the first answer; `None` if none came.
    #[serde(serialize_with = "ser_opt_ms", rename = "latency_ms")]
    pub latency: Option<Duration>,
    /// Our address as this server saw it.
    pub mapped: Option<SocketAddr>,
}

/// What netcheck found.
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct Report {
    /// Some STUN answer came back at all.
    pub udp: bool,
    /// An IPv4 STUN answer came back.
    pub ipv4: bool,
    /// An IPv6 STUN answer came back.
    pub ipv6: bool,
    /// Whether this host could even open an IPv6 socket.
    pub ipv6_socket: bool,
    /// Our public IPv4 address and port (from the first IPv4 answer).
    pub global_v4: Option<SocketAddr>,
    /// Our public IPv6 address and port.
    pub global_v6: Option<SocketAddr>,
    /// Different servers saw different IPv4 mappings: a hard NAT. `None`: fewer than two
    /// servers answered, so it is unknown.
    pub mapping_varies_by_dest_ip: Option<bool>,
    /// Lowest latency per region.
    #[serde(serialize_with = "ser_map_ms", rename = "region_latency_ms")]
    pub region_latency: BTreeMap<u32, Duration>,
    /// The chosen home region.
    pub preferred_region: Option<u32>,
    /// Every server probed.
    pub probes: Vec<Probe>,
    /// Regions that had no STUN server to probe.
    pub unprobed_regions: Vec<u32>,
}

fn ser_opt_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_secs_f64() * 1000.0)),
        None => s.serialize_none(),
    }
}

fn ser_map_ms<S: serde::Serializer>(m: &BTreeMap<u32, Duration>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        map.serialize_entry(&k.to_string(), &(v.as_secs_f64() * 1000.0))?;
    }
    map.end()
}

/// Whether different servers saw different mappings (`None` with fewer than two answers).
pub fn mapping_varies(answers: &[(SocketAddr, SocketAddr)]) -> Option<bool> {
    let mut servers: Vec<SocketAddr> = answers.iter().map(|(s, _)| *s).collect();
    servers.sort();
    servers.dedup();
    if servers.len() < 2 {
        return None;
    }
    let first = answers[0].1;
    Some(answers.iter().any(|(_, m)| *m != first))
}

/// Picks the home region: lowest latency among `candidates`, keeping `previous` unless the
/// best is at least [`HOME_HYSTERESIS`] faster. Ties go to the lower region id.
pub fn choose_home(latency: &BTreeMap<u32, Duration>, previous: Option<u32>) -> Option<u32> {
    let (best, best_lat) = latency
        .iter()
        .min_by_key(|(id, d)| (**d, **id))
        .map(|(i, d)| (*i, *d))?;
    if let Some(prev) = previous {
        if let Some(prev_lat) = latency.get(&prev) {
            if best_lat + HOME_HYSTERESIS > *prev_lat {
                return Some(prev);
            }
        }
    }
    Some(best)
}

/// The latencies of the regions that may be home (not `Avoid`, not `NoMeasureNoHome`).
pub fn home_latencies(
    map: &RelayMap,
    latency: &BTreeMap<u32, Duration>,
) -> BTreeMap<u32, Duration> {
    latency
        .iter()
        .filter(|(id, _)| {
            map.region(**id)
                .is_some_and(|r| !r.avoid && !r.no_measure_no_home)
        })
        .map(|(i, d)| (*i, *d))
        .collect()
}

/// Runs one netcheck from `sockets` against every region of `map`.
pub async fn run(
    map: &RelayMap,
    sockets: &Sockets,
    previous_home: Option<u32>,
    opts: NetcheckOptions,
) -> Report {
    run_with_progress(map, sockets, previous_home, opts, None).await
}

/// The latency per region of the STUN answers so far, while a netcheck runs.
pub type Progress = tokio::sync::watch::Sender<BTreeMap<u32, Duration>>;

/// [`run`], also publishing each region's latency on `progress` as its first answer arrives
/// (so a caller can act on the answers so far before the deadline).
pub async fn run_with_progress(
    map: &RelayMap,
    sockets: &Sockets,
    previous_home: Option<u32>,
    opts: NetcheckOptions,
    progress: Option<&Progress>,
) -> Report {
    let deadline = tokio::time::Instant::now() + opts.timeout;
    let mut report = Report {
        ipv6_socket: sockets.v6.is_some(),
        ..Report::default()
    };
    let mut targets = Vec::new();
    let mut home_ok = BTreeMap::new();
    for region in map.regions() {
        if region.no_measure_no_home {
            continue;
        }
        home_ok.insert(region.id, !region.avoid);
        let mut any = false;
        for node in region
            .nodes
            .iter()
            .filter(|n| n.stun_port.is_some())
            .take(opts.nodes_per_region)
        {
            let addrs = node.stun_addrs().await.unwrap_or_default();
            for a in addrs {
                if sockets.for_addr(&a).is_some() {
                    targets.push((region.id, node.name.clone(), a));
                    any = true;
                }
            }
        }
        if !any {
            report.unprobed_regions.push(region.id);
        }
    }
    let probes =
        futures_util::future::join_all(targets.into_iter().map(|(region, node, server)| {
            probe(sockets, region, node, server, opts, deadline, progress)
        }))
        .await;
    let mut v4_answers = Vec::new();
    for p in &probes {
        let (Some(lat), Some(mapped)) = (p.latency, p.mapped) else {
            continue;
        };
        report.udp = true;
        if p.server.is_ipv4() {
            report.ipv4 = true;
            report.global_v4.get_or_insert(mapped);
            v4_answers.push((p.server, mapped));
        } else {
            report.ipv6 = true;
            report.global_v6.get_or_insert(mapped);
        }
        let e = report.region_latency.entry(p.region).or_insert(lat);
        *e = (*e).min(lat);
    }
    report.mapping_varies_by_dest_ip = mapping_varies(&v4_answers);
    let homes: BTreeMap<u32, Duration> = report
        .region_latency
        .iter()
        .filter(|(id, _)| home_ok.get(id).copied().unwrap_or(false))
        .map(|(i, d)| (*i, *d))
        .collect();
    report.preferred_region = choose_home(&homes, previous_home);
    report.probes = probes;
    report
}

async fn probe(
    sockets: &Sockets,
    region: u32,
    node: String,
    server: SocketAddr,
    opts: NetcheckOptions,
    deadline: tokio::time::Instant,
    progress: Option<&Progress>,
) -> Probe {
    let mut result = Probe {
        region,
        node,
        server,
        latency: None,
        mapped: None,
    };
    let Some(sock) = sockets.for_addr(&server) else {
        return result;
    };
    let (tx, mut rx) = mpsc::channel(4);
    let mut sent: Vec<(stun::TxId, Instant)> = Vec::new();
    let mut answer = None;
    'tries: for attempt in 0..opts.tries.max(1) {
        let txid = stun::new_txid();
        sockets.stun.register(txid, tx.clone());
        sent.push((txid, Instant::now()));
        // A send error (no route, e.g. IPv6 without a default route) just means no answer.
        let _ = sock.send_to(&stun::binding_request(&txid), server).await;
        let wait_until = if attempt + 1 == opts.tries.max(1) {
            deadline
        } else {
            (tokio::time::Instant::now() + opts.stagger).min(deadline)
        };
        match tokio::time::timeout_at(wait_until, rx.recv()).await {
            Ok(Some(a)) => {
                answer = Some(a);
                break 'tries;
            }
            Ok(None) => break 'tries,
            Err(_) if tokio::time::Instant::now() >= deadline => break 'tries,
            Err(_) => continue 'tries,
        }
    }
    for (t, _) in &sent {
        sockets.stun.remove(t);
    }
    if let Some(a) = answer {
        // The round trip is measured from the request this answer belongs to; the answer does
        // not say which, so use the latest request sent before it arrived (a lower bound that
        // never inflates latency by the stagger).
        let sent_at = sent
            .iter()
            .rev()
            .map(|(_, t)| *t)
            .find(|t| *t <= a.at)
            .unwrap_or(sent[0].1);
        let lat = a.at.saturating_duration_since(sent_at);
        result.latency = Some(lat);
        result.mapped = Some(a.mapped);
        if let Some(p) = progress {
            p.send_modify(|m| {
                let e = m.entry(region).or_insert(lat);
                *e = (*e).min(lat);
            });
        }
    }
    result
}

impl Report {
    /// A readable multi-line report.
    pub fn to_text(&self, map: &RelayMap) -> String {
        use std::fmt::Write;
        let yn = |b: bool| if b { "yes" } else { "no" };
        let mut s = String::new();
        let _ = writeln!(s, "Report:");
        let _ = writeln!(s, "  * UDP: {}", yn(self.udp));
        match self.global_v4 {
            Some(a) => drop(writeln!(s, "  * IPv4: yes, {a}")),
            None => drop(writeln!(s, "  * IPv4: no")),
        }
        match (self.global_v6, self.ipv6_socket) {
            (Some(a), _) => drop(writeln!(s, "  * IPv6: yes, {a}")),
            (None, true) => drop(writeln!(s, "  * IPv6: no (no answer over IPv6)")),
            (None, false) => drop(writeln!(s, "  * IPv6: no (no IPv6 socket on this host)")),
        }
        let nat = match self.mapping_varies_by_dest_ip {
            Some(true) => {
                "yes: hard NAT (endpoint-dependent mapping); direct only to easy-NAT peers (birthday probing), else via the relay"
            }
            Some(false) => "no: easy NAT or none (endpoint-independent mapping)",
            None => "unknown (fewer than two STUN servers answered)",
        };
        let _ = writeln!(s, "  * MappingVariesByDestIP: {nat}");
        match self.preferred_region.and_then(|id| map.region(id)) {
            Some(r) => drop(writeln!(s, "  * Nearest relay (home): {}", r.label())),
            None => drop(writeln!(
                s,
                "  * Nearest relay (home): none reachable over UDP"
            )),
        }
        let _ = writeln!(s, "  * Relay latencies:");
        for r in map.regions() {
            let lat = match self.region_latency.get(&r.id) {
                Some(d) => format!("{:.1} ms", d.as_secs_f64() * 1000.0),
                None if self.unprobed_regions.contains(&r.id) => "- (no STUN server)".into(),
                None if r.no_measure_no_home => "- (NoMeasureNoHome)".into(),
                None => "- (no answer)".into(),
            };
            let _ = writeln!(s, "    - {:<24} {lat}", r.label());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn mapping_varies_needs_two_servers() {
        assert_eq!(mapping_varies(&[]), None);
        assert_eq!(
            mapping_varies(&[(a("1.1.1.1:3478"), a("5.5.5.5:1000"))]),
            None
        );
        // The same server twice is still one server.
        assert_eq!(
            mapping_varies(&[
                (a("1.1.1.1:3478"), a("5.5.5.5:1000")),
                (a("1.1.1.1:3478"), a("5.5.5.5:1001"))
            ]),
            None
        );
        assert_eq!(
            mapping_varies(&[
                (a("1.1.1.1:3478"), a("5.5.5.5:1000")),
                (a("2.2.2.2:3478"), a("5.5.5.5:1000"))
            ]),
            Some(false)
        );
        assert_eq!(
            mapping_varies(&[
                (a("1.1.1.1:3478"), a("5.5.5.5:1000")),
                (a("2.2.2.2:3478"), a("5.5.5.5:2000"))
            ]),
            Some(true)
        );
    }

    #[test]
    fn home_has_hysteresis() {
        let ms = Duration::from_millis;
        let lat: BTreeMap<u32, Duration> = [(900, ms(30)), (901, ms(25)), (902, ms(50))].into();
        assert_eq!(choose_home(&lat, None), Some(901));
        // 5 ms better is not enough to leave 900.
        assert_eq!(choose_home(&lat, Some(900)), Some(900));
        // 25 ms better is.
        assert_eq!(choose_home(&lat, Some(902)), Some(901));
        // The old home is gone (no answer): move.
        assert_eq!(choose_home(&lat, Some(999)), Some(901));
        assert_eq!(choose_home(&BTreeMap::new(), Some(900)), None);
        // Ties: lower id.
        let tie: BTreeMap<u32, Duration> = [(905, ms(10)), (903, ms(10))].into();
        assert_eq!(choose_home(&tie, None), Some(903));
    }
}
