//! The relays (I/O): the home region (chosen at bind, moved by netcheck), the connected relay
//! per region, connections made on demand for a peer's region (packets wait meanwhile, in a
//! bounded queue), and which region each peer is reached through. Nothing here waits: a full
//! queue drops its oldest packets, counted in `EndpointStats::relay_dropped` and logged.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_proto::queue::DropOldest;
use ferry_proto::{PublicKey, SecretKey};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Cmd, EndpointConfig, EndpointError, SharedState};
use crate::netcheck::Report;
use crate::relay::{
    Queued, RelayClient, RelayError, RelayEvent, RelayEvents, RelayOptions, SEND_QUEUE_LIMITS,
};
use crate::relaymap::RelayMap;

/// Connects the home relay at bind: the forced home region, then netcheck's preferred one,
/// then by latency, then the rest by id; the first that connects (with `preferred: true`).
/// A forced home that fails ends the search.
pub(super) async fn connect_home(
    cfg: &EndpointConfig,
    report: &Report,
) -> Result<(RelayClient, RelayEvents), EndpointError> {
    let mut order: Vec<u32> = Vec::new();
    order.extend(cfg.home_region);
    order.extend(report.preferred_region);
    let mut by_lat: Vec<(Duration, u32)> = report
        .region_latency
        .iter()
        .map(|(r, d)| (*d, *r))
        .collect();
    by_lat.sort();
    order.extend(by_lat.into_iter().map(|(_, r)| r));
    order.extend(cfg.relay_map.regions().map(|r| r.id));
    let mut seen = HashSet::new();
    order.retain(|r| seen.insert(*r));
    let opts = RelayOptions {
        tls: cfg.tls.clone(),
        transport: cfg.transport,
        backoff: cfg.backoff,
        preferred: true,
    };
    let mut errors = Vec::new();
    for id in order {
        let Some(region) = cfg.relay_map.region(id) else {
            continue;
        };
        if region.relay_nodes().next().is_none() {
            continue;
        }
        match RelayClient::connect(region, cfg.secret_key.clone(), opts.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                warn!(region = id, "relay unreachable: {e}");
                errors.push((id, e));
                if cfg.home_region == Some(id) {
                    // A forced home that fails is an error of its own.
                    break;
                }
            }
        }
    }
    Err(EndpointError::NoRelay(errors))
}

/// Forwards a relay's events to the actor, tagged with the region.
pub(super) fn spawn_forwarder(
    region: u32,
    mut events: RelayEvents,
    tx: mpsc::Sender<(u32, RelayEvent)>,
) {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if tx.send((region, ev)).await.is_err() {
                return;
            }
        }
    });
}

/// The relay connections and the region per peer.
#[derive(Debug)]
pub(super) struct RelaySet {
    map: RelayMap,
    /// Options for on-demand connections (`preferred` set per connection).
    opts: RelayOptions,
    secret: SecretKey,
    relays: HashMap<u32, RelayClient>,
    /// Packets waiting for a region's relay to connect.
    connecting: HashMap<u32, DropOldest<Queued>>,
    /// Per region: packets dropped since the last warning about it, and when that was.
    drops: HashMap<u32, (u64, Option<Instant>)>,
    peer_region: HashMap<PublicKey, u32>,
    home: u32,
    shared: Arc<SharedState>,
    cmd_tx: mpsc::Sender<Cmd>,
    relay_tx: mpsc::Sender<(u32, RelayEvent)>,
}

impl RelaySet {
    /// The connected home relay; later connections report to `cmd_tx` (`Cmd::RelayUp`) and
    /// forward their events to `relay_tx`.
    pub(super) fn new(
        cfg: &EndpointConfig,
        home: RelayClient,
        shared: Arc<SharedState>,
        cmd_tx: mpsc::Sender<Cmd>,
        relay_tx: mpsc::Sender<(u32, RelayEvent)>,
    ) -> RelaySet {
        let home_id = home.region();
        RelaySet {
            map: cfg.relay_map.clone(),
            opts: RelayOptions {
                tls: cfg.tls.clone(),
                transport: cfg.transport,
                backoff: cfg.backoff,
                preferred: false,
            },
            secret: cfg.secret_key.clone(),
            relays: HashMap::from([(home_id, home)]),
            connecting: HashMap::new(),
            drops: HashMap::new(),
            peer_region: HashMap::new(),
            home: home_id,
            shared,
            cmd_tx,
            relay_tx,
        }
    }

    /// The home region.
    pub(super) fn home(&self) -> u32 {
        self.home
    }

    /// The region `peer` is reached through: where it was last heard from via a relay, or
    /// set by the API, else home.
    pub(super) fn region_for(&self, peer: &PublicKey) -> u32 {
        self.peer_region.get(peer).copied().unwrap_or(self.home)
    }

    /// A UDP relay allocation on `region`'s connected relay (`None`: not connected).
    pub(super) fn allocate_udp_relay(
        &self,
        region: u32,
        keys: [PublicKey; 2],
    ) -> Option<
        impl std::future::Future<Output = Result<ferry_proto::udprelay::Endpoint, RelayError>>
            + Send
            + 'static,
    > {
        self.relays.get(&region).map(|c| c.allocate_udp_relay(keys))
    }

    /// The connected region whose relay has this server key.
    pub(super) fn region_of_server(&self, key: &PublicKey) -> Option<u32> {
        self.relays
            .iter()
            .find(|(_, c)| c.server_key() == *key)
            .map(|(r, _)| *r)
    }

    /// Reach `peer` through `region` from now on.
    pub(super) fn set_peer_region(&mut self, peer: PublicKey, region: u32) {
        self.peer_region.insert(peer, region);
    }

    /// Queues a packet to `peer` on the relay of its region; never waits.
    pub(super) fn send(&mut self, peer: PublicKey, pkt: Bytes) {
        let mut region = self.region_for(&peer);
        if !self.relays.contains_key(&region) && self.map.region(region).is_none() {
            warn!(region, "peer's region is not in the relay map; using home");
            self.peer_region.remove(&peer);
            region = self.home;
        }
        let dropped = match self.relays.get(&region) {
            Some(c) => match c.send(peer, pkt) {
                Ok(n) => n,
                Err(e) => {
                    warn!(region, "relay send failed: {e}");
                    0
                }
            },
            None => {
                self.connect_region(region, false);
                let q = self.connecting.entry(region).or_default();
                q.push(
                    Queued {
                        dst: peer,
                        data: pkt,
                    },
                    SEND_QUEUE_LIMITS,
                )
            }
        };
        self.count_dropped(region, dropped, "its queue is full");
    }

    /// Counts packets to `region` that were dropped, and says so at most every 5 s per region
    /// (debug for each).
    fn count_dropped(&mut self, region: u32, n: u64, why: &str) {
        if n == 0 {
            return;
        }
        self.shared.relay_dropped.fetch_add(n, Ordering::Relaxed);
        debug!(region, dropped = n, "relay packets dropped: {why}");
        let (since, last) = self.drops.entry(region).or_default();
        *since += n;
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(5)) {
            warn!(
                region,
                dropped = *since,
                "relay region {region}: packets dropped ({why}; the relay is slow or unreachable)"
            );
            *since = 0;
            *last = Some(now);
        }
    }

    /// Netcheck moved the home region: NotePreferred moves with it.
    pub(super) fn change_home(&mut self, new: u32) {
        info!(old = self.home, new, "home relay changes");
        if let Some(old) = self.relays.get(&self.home) {
            old.note_preferred(false);
        }
        self.home = new;
        *self.shared.home.lock().expect("lock") = Some(new);
        match self.relays.get(&new) {
            Some(c) => c.note_preferred(true),
            None => self.connect_region(new, true),
        }
    }

    /// Connects `region`'s relay in the background (once), reporting `Cmd::RelayUp`.
    fn connect_region(&mut self, region: u32, preferred: bool) {
        if self.connecting.contains_key(&region) {
            return;
        }
        self.connecting.entry(region).or_default();
        let Some(r) = self.map.region(region).cloned() else {
            return;
        };
        let opts = RelayOptions {
            preferred,
            ..self.opts.clone()
        };
        let secret = self.secret.clone();
        let cmd_tx = self.cmd_tx.clone();
        let relay_tx = self.relay_tx.clone();
        tokio::spawn(async move {
            let r = match RelayClient::connect(&r, secret, opts).await {
                Ok((client, events)) => {
                    spawn_forwarder(region, events, relay_tx);
                    Ok(client)
                }
                Err(e) => Err(e),
            };
            let _ = cmd_tx.send(Cmd::RelayUp(region, r)).await;
        });
    }

    /// A connection started by [`RelaySet::connect_region`] is up (the waiting packets go
    /// out) or failed (they are dropped).
    pub(super) fn on_relay_up(&mut self, region: u32, r: Result<RelayClient, RelayError>) {
        let mut waiting = self.connecting.remove(&region).unwrap_or_default();
        match r {
            Ok(client) => {
                self.shared
                    .relay_status
                    .lock()
                    .expect("lock")
                    .insert(region, client.status());
                // Home may have moved while it connected (either way).
                client.note_preferred(region == self.home);
                let mut dropped = 0;
                for p in waiting.drain() {
                    dropped += client.send(p.dst, p.data).unwrap_or(0);
                }
                self.relays.insert(region, client);
                self.count_dropped(region, dropped, "its queue is full");
            }
            Err(e) => {
                warn!(region, "cannot reach the peer's relay region: {e}");
                let n = waiting.len() as u64;
                self.count_dropped(region, n, "the region's relay cannot be reached");
            }
        }
    }
}
