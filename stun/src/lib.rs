//! `ferry-stun`: the STUN binding server of ferry.
//!
//! Answers "what IP address and port do you see me at?" (RFC 8489/5389 Binding), over UDP and
//! TCP, IPv4 and IPv6, with RFC 3489 (cookie-less) compatibility and opt-in RFC 5780 NAT
//! behaviour discovery. The protocol logic lives in the sans-IO [`proto`] module; this crate
//! root binds the sockets and runs the tasks.
//!
//! ```no_run
//! # async fn f() -> Result<(), ferry_stun::StunError> {
//! let server = ferry_stun::StunServer::spawn(ferry_stun::StunConfig {
//!     udp_addrs: vec!["127.0.0.1:3478".parse().unwrap()],
//!     tcp_addrs: vec!["127.0.0.1:3478".parse().unwrap()],
//!     ..Default::default()
//! })
//! .await?;
//! println!("STUN on {:?}", server.udp_addrs());
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Fast path
//!
//! On Linux each UDP socket is served by a task that reads up to [`UDP_BATCH`] datagrams with
//! one `recvmmsg`, answers them with [`proto::handle`] (whose first branch is a hand-written
//! path for the plain 20-byte Binding request) and sends all replies with one `sendmmsg`.
//! Counters are updated once per batch. Elsewhere it falls back to `recv_from`/`send_to`.
//! [`StunConfig::udp_workers`] > 1 binds several sockets per address with `SO_REUSEPORT`
//! so the kernel spreads clients over several tasks.
//!
//! # Metrics
//!
//! `ferry_stun_requests_total{transport="udp|tcp", result="success|error_response|malformed|ignored|bad_fingerprint"}`
//! and `ferry_stun_tcp_connections_rejected_total`, through the `metrics` facade; see
//! [`describe_metrics`] and [`StunMetrics`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod proto;
mod sock;
mod stats;
mod tcp;
mod udp;
#[cfg(target_os = "linux")]
pub use udp::mmsg;

pub use proto::SoftwareTooLong;
pub use stats::{describe_metrics, StunMetrics, REQUESTS_TOTAL, TCP_REJECTED_TOTAL};
pub use udp::UDP_BATCH;

use proto::{Ctx, Grid, GridPos, Transport};

/// The IANA STUN port.
pub const DEFAULT_PORT: u16 = 3478;

/// What to listen on and how to answer.
///
/// Build it with struct-update syntax so that fields added later keep your code compiling:
/// `StunConfig { udp_addrs: vec![..], ..Default::default() }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StunConfig {
    /// UDP addresses to serve, each bound (port 0 picks a free port; see
    /// [`StunServer::udp_addrs`]). IPv6 sockets are `IPV6_V6ONLY`, so `0.0.0.0:3478` and
    /// `[::]:3478` can both be listed. Default: `0.0.0.0:3478` and `[::]:3478`.
    pub udp_addrs: Vec<SocketAddr>,
    /// TCP addresses to serve (RFC 8489 §12: a basic server supports TCP too). Default: as UDP.
    pub tcp_addrs: Vec<SocketAddr>,
    /// SOFTWARE attribute in every reply, at most 127 characters. `None` (the default) omits it,
    /// keeping replies as small as possible (they are an amplification vector).
    pub software: Option<String>,
    /// RFC 5780 NAT behaviour discovery over UDP; `None` (the default) disables it.
    pub rfc5780: Option<Rfc5780Config>,
    /// Sockets (and tasks) per UDP address, bound with `SO_REUSEPORT` when more than one.
    /// Default 1. Does not apply to the RFC 5780 sockets.
    pub udp_workers: usize,
    /// A TCP connection that sends nothing for this long is closed. Default 30 s.
    pub tcp_idle_timeout: Duration,
    /// Open TCP connections allowed per listener; more are closed on accept. Default 1024.
    pub tcp_max_connections: usize,
}

impl Default for StunConfig {
    fn default() -> StunConfig {
        let both = vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), DEFAULT_PORT),
        ];
        StunConfig {
            udp_addrs: both.clone(),
            tcp_addrs: both,
            software: None,
            rfc5780: None,
            udp_workers: 1,
            tcp_idle_timeout: Duration::from_secs(30),
            tcp_max_connections: 1024,
        }
    }
}

/// RFC 5780 needs two IP addresses × two ports. The server binds four UDP sockets:
///
/// | socket | address |
/// | --- | --- |
/// | A1:P1 | `primary` |
/// | A1:P2 | `primary.ip()` : `alternate.port()` |
/// | A2:P1 | `alternate.ip()` : `primary.port()` |
/// | A2:P2 | `alternate` |
///
/// A request to any of them may carry CHANGE-REQUEST and is answered from the socket the flags
/// select (and RESPONSE-PORT, which redirects the reply to another port of the requester's
/// IP); every reply carries MAPPED-ADDRESS, XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN and
/// OTHER-ADDRESS. PADDING is not supported (420). The two IPs must be distinct, specific (not `0.0.0.0`/`::`, since they are
/// reported to clients) and of one family; on a real deployment, two public addresses of the
/// host. Ports may be 0 (tests): the server then picks P1 and P2 free on both IPs. These
/// sockets are in addition to [`StunConfig::udp_addrs`] (an identical entry there is not bound
/// twice). TCP never does RFC 5780: a TCP reply cannot come from another address, so over TCP
/// CHANGE-REQUEST gets 420 like on a server without the option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rfc5780Config {
    /// A1:P1, e.g. `192.0.2.1:3478` (`127.0.0.1:0` in tests).
    pub primary: SocketAddr,
    /// A2:P2, e.g. `192.0.2.2:3479` (`127.0.0.2:0` in tests).
    pub alternate: SocketAddr,
}

/// Errors from [`StunServer::spawn`]. The messages say what went wrong; advice (which flag or
/// setting to change) is the caller's.
#[derive(Debug, thiserror::Error)]
pub enum StunError {
    /// A socket could not be created or bound.
    #[error("cannot bind the STUN {transport} socket on {addr}")]
    Bind {
        /// The address that failed.
        addr: SocketAddr,
        /// "UDP" or "TCP".
        transport: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No UDP or TCP address and no RFC 5780 grid.
    #[error("no listen address: at least one UDP or TCP address (or an RFC 5780 grid) is needed")]
    NoAddress,
    /// `udp_workers` is 0 with UDP addresses to serve.
    #[error("udp_workers is 0: each UDP address needs at least one socket")]
    NoUdpWorkers,
    /// `tcp_max_connections` is 0 with TCP addresses to serve.
    #[error("tcp_max_connections is 0, so TCP could serve nobody")]
    NoTcpConnections,
    /// `tcp_idle_timeout` is 0.
    #[error("tcp_idle_timeout is 0, so every TCP connection would time out at once")]
    ZeroTcpIdleTimeout,
    /// An RFC 5780 address is a wildcard (0.0.0.0 or ::).
    #[error(
        "RFC 5780: primary {primary} and alternate {alternate} must be specific IP addresses \
         (not 0.0.0.0 or ::), because RESPONSE-ORIGIN and OTHER-ADDRESS report them to clients"
    )]
    Rfc5780Wildcard {
        /// A1:P1.
        primary: SocketAddr,
        /// A2:P2.
        alternate: SocketAddr,
    },
    /// The RFC 5780 addresses are of different IP families.
    #[error("RFC 5780: primary {primary} and alternate {alternate} are of different IP families")]
    Rfc5780Families {
        /// A1:P1.
        primary: SocketAddr,
        /// A2:P2.
        alternate: SocketAddr,
    },
    /// The RFC 5780 primary and alternate have the same IP.
    #[error("RFC 5780: primary and alternate have the same IP {0}; they must be two different IP addresses of this host")]
    Rfc5780SameIp(std::net::IpAddr),
    /// The RFC 5780 primary and alternate have the same (non-zero) port.
    #[error("RFC 5780: primary and alternate have the same port {0}; the ports must differ")]
    Rfc5780SamePort(u16),
    /// The SOFTWARE value is too long.
    #[error(transparent)]
    Software(#[from] SoftwareTooLong),
}

/// A running STUN server. Owns its tasks: dropping it aborts them (use
/// [`StunServer::shutdown`] to also wait until every socket is closed).
#[derive(Debug)]
pub struct StunServer {
    udp_addrs: Vec<SocketAddr>,
    tcp_addrs: Vec<SocketAddr>,
    grid: Option<Grid>,
    cancel: CancellationToken,
    udp_tasks: Vec<JoinHandle<()>>,
    tcp_tasks: Vec<JoinHandle<()>>,
}

impl StunServer {
    /// Bind every socket, then start serving. Registers the metrics with the global recorder.
    pub async fn spawn(cfg: StunConfig) -> Result<StunServer, StunError> {
        StunServer::spawn_with_metrics(cfg, StunMetrics::register()).await
    }

    /// [`StunServer::spawn`] with counter handles registered elsewhere (e.g. under a local
    /// test recorder).
    pub async fn spawn_with_metrics(
        cfg: StunConfig,
        metrics: StunMetrics,
    ) -> Result<StunServer, StunError> {
        if cfg.udp_addrs.is_empty() && cfg.tcp_addrs.is_empty() && cfg.rfc5780.is_none() {
            return Err(StunError::NoAddress);
        }
        if cfg.udp_workers == 0 {
            return Err(StunError::NoUdpWorkers);
        }
        if cfg.tcp_max_connections == 0 && !cfg.tcp_addrs.is_empty() {
            return Err(StunError::NoTcpConnections);
        }
        if cfg.tcp_idle_timeout.is_zero() {
            return Err(StunError::ZeroTcpIdleTimeout);
        }
        let udp_ctx = Ctx::new(Transport::Udp).with_software(cfg.software.as_deref())?;
        let tcp_ctx = Ctx::new(Transport::Tcp).with_software(cfg.software.as_deref())?;

        // Bind everything first: an error leaves nothing running.
        let grid = match &cfg.rfc5780 {
            Some(r) => Some(sock::bind_grid(r)?),
            None => None,
        };
        let mut udp_groups: Vec<(SocketAddr, Vec<std::net::UdpSocket>)> = Vec::new();
        for &addr in &cfg.udp_addrs {
            let in_grid = grid
                .as_ref()
                .is_some_and(|(g, _)| GridPos::ALL.iter().any(|&p| g.addr(p) == addr));
            let duplicate = addr.port() != 0 && udp_groups.iter().any(|(a, _)| *a == addr);
            if in_grid || duplicate {
                continue;
            }
            let group = sock::bind_udp_group(addr, cfg.udp_workers)?;
            let bound = group[0].local_addr().map_err(|source| StunError::Bind {
                addr,
                transport: "UDP",
                source,
            })?;
            udp_groups.push((bound, group));
        }
        let mut listeners = Vec::new();
        for &addr in &cfg.tcp_addrs {
            if addr.port() != 0 && listeners.iter().any(|(a, _)| *a == addr) {
                continue;
            }
            let l = sock::bind_tcp(addr)?;
            let bound = l.local_addr().map_err(|source| StunError::Bind {
                addr,
                transport: "TCP",
                source,
            })?;
            listeners.push((bound, l));
        }

        // Hand the sockets to tokio and start the tasks.
        let cancel = CancellationToken::new();
        let mut udp_addrs = Vec::new();
        let to_tokio = |s: std::net::UdpSocket, addr: SocketAddr| {
            tokio::net::UdpSocket::from_std(s).map_err(|source| StunError::Bind {
                addr,
                transport: "UDP",
                source,
            })
        };
        let mut workers = Vec::new();
        for (addr, group) in udp_groups {
            udp_addrs.push(addr);
            for s in group {
                let sockets: Arc<[tokio::net::UdpSocket]> = Arc::new([to_tokio(s, addr)?]);
                workers.push(udp::Worker {
                    sockets,
                    me: 0,
                    pos: None,
                    ctx: udp_ctx.clone(),
                    counters: metrics.udp.clone(),
                });
            }
        }
        let mut grid_info = None;
        if let Some((g, socks)) = grid {
            let mut tokio_socks = Vec::with_capacity(4);
            for (pos, s) in GridPos::ALL.iter().zip(socks) {
                tokio_socks.push(to_tokio(s, g.addr(*pos))?);
            }
            let sockets: Arc<[tokio::net::UdpSocket]> = tokio_socks.into();
            for pos in GridPos::ALL {
                let addr = g.addr(pos);
                if !udp_addrs.contains(&addr) {
                    udp_addrs.push(addr);
                }
                workers.push(udp::Worker {
                    sockets: sockets.clone(),
                    me: pos.index(),
                    pos: Some(pos),
                    ctx: udp_ctx.clone().with_rfc5780(g, pos),
                    counters: metrics.udp.clone(),
                });
            }
            grid_info = Some(g);
        }
        let mut tcp_addrs = Vec::new();
        let mut tcp_listeners = Vec::new();
        for (addr, l) in listeners {
            let l = tokio::net::TcpListener::from_std(l).map_err(|source| StunError::Bind {
                addr,
                transport: "TCP",
                source,
            })?;
            tcp_addrs.push(addr);
            tcp_listeners.push(l);
        }
        let udp_tasks = workers
            .into_iter()
            .map(|w| tokio::spawn(udp::serve(w)))
            .collect();
        let tcp_ctx = Arc::new(tcp_ctx);
        let mut tcp_tasks = Vec::new();
        for l in tcp_listeners {
            tcp_tasks.push(tokio::spawn(tcp::serve(
                l,
                tcp::Limits {
                    idle: cfg.tcp_idle_timeout,
                    max_connections: cfg.tcp_max_connections,
                },
                tcp_ctx.clone(),
                metrics.clone(),
                cancel.clone(),
            )));
        }
        tracing::info!(udp = ?udp_addrs, tcp = ?tcp_addrs, rfc5780 = grid_info.is_some(), "STUN server listening");
        Ok(StunServer {
            udp_addrs,
            tcp_addrs,
            grid: grid_info,
            cancel,
            udp_tasks,
            tcp_tasks,
        })
    }

    /// The bound UDP addresses (actual ports): one per configured address, then the RFC 5780
    /// sockets not already listed.
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.udp_addrs.clone()
    }

    /// The bound TCP addresses (actual ports).
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp_addrs.clone()
    }

    /// The RFC 5780 grid actually bound, if enabled.
    pub fn rfc5780_grid(&self) -> Option<Grid> {
        self.grid
    }

    /// Stop serving and wait until every task has ended and every socket (including open TCP
    /// connections) is closed.
    pub async fn shutdown(mut self) {
        // TCP acceptors see the token, close their connections and return; UDP tasks hold
        // nothing but their sockets, so aborting them is a clean stop.
        self.cancel.cancel();
        let udp = std::mem::take(&mut self.udp_tasks);
        let tcp = std::mem::take(&mut self.tcp_tasks);
        for t in &udp {
            t.abort();
        }
        for t in udp.into_iter().chain(tcp) {
            let _ = t.await;
        }
    }
}

impl Drop for StunServer {
    fn drop(&mut self) {
        self.cancel.cancel();
        for t in self.udp_tasks.iter().chain(&self.tcp_tasks) {
            t.abort();
        }
    }
}
