//! [`Config`], [`Limits`] and [`Config::validate`]: what a relay needs, and the checks that
//! need no I/O. [`Server::spawn`](super::Server::spawn) runs them first, so every embedder gets
//! them; messages name the `Config` field and say what is wrong (operator advice, such as which
//! flag or file key to change, is the binary's).

use std::net::SocketAddr;
use std::time::Duration;

use super::{registry, AdmissionConfig, MeshConfig, StunConfig, TlsConfig};
use crate::proto::SecretKey;

/// Timeouts, queue depths and caps. The defaults match derper where derper has one.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most DERP-listener connections at once (TLS, HTTP and DERP); more are closed at accept.
    pub max_connections: usize,
    /// From TCP accept to a completed DERP handshake (TLS + request head + ClientInfo).
    pub handshake_timeout: Duration,
    /// A write that makes no progress for this long closes the connection (derper: 2 s).
    pub write_timeout: Duration,
    /// A frame whose first bytes arrived must be whole within this (time the client's
    /// receive rate limit held reads back not counted); else the connection is closed
    /// (`frame_timeout`): a client dripping frames a byte at a time after its handshake (a
    /// slowloris past the handshake timeout) holds a buffer and a connection. Idle time between
    /// frames is not limited (clients idle for minutes between packets).
    pub frame_timeout: Duration,
    /// Between requests on a kept-alive plain HTTP connection.
    pub http_idle_timeout: Duration,
    /// KeepAlive frame interval (derper: 60 s) ...
    pub keepalive_interval: Duration,
    /// ... plus a random jitter up to this (derper: 5 s).
    pub keepalive_jitter: Duration,
    /// Packets queued per receiver, per queue (disco and data; derper: 32) ...
    pub queue_depth: usize,
    /// ... and bytes: the oldest packet is dropped only when a queue is over both (payload +
    /// 64 per packet; 0: over `queue_depth` alone, derper's rule).
    pub queue_bytes: usize,
    /// Packets waiting to go out on one mesh link: at most 8,192 and, beyond 32 of them, at most
    /// this many bytes (payload + 64 per packet); the oldest are dropped (`mesh_queue`).
    pub mesh_queue_bytes: usize,
    /// Presence changes a watcher (mesh peer) may fall behind by, beyond one per connected
    /// client; a watcher further behind is disconnected (it resubscribes and gets a fresh
    /// snapshot). Bounds a stalled watcher's memory at ~72 bytes per entry.
    pub watcher_backlog: usize,
    /// How long [`Server::shutdown`] waits for connections to drain before closing them.
    pub shutdown_timeout: Duration,
    /// Restarting frame: clients reconnect after a random delay up to this (spreads the herd) ...
    pub restart_reconnect_spread: Duration,
    /// ... and keep trying for this long.
    pub restart_try_for: Duration,
    /// Per-client receive rate in bytes/s (0 = off). Reads pause when a client exceeds it, so
    /// TCP flow control slows the sender; advertised in ServerInfo; mesh peers are exempt.
    pub client_rate_limit: u64,
    /// Burst of the receive rate, in bytes (raised to at least 65,568, as derper does).
    pub client_rate_burst: u64,
    /// New DERP-listener connections accepted per second (0 = off); more are closed at accept.
    pub accept_rate: f64,
    /// Burst of the accept rate (0: the rate rounded up, at least 1).
    pub accept_burst: u32,
    /// DERP-listener connections at once from one source IP (0 = off).
    pub max_connections_per_ip: u32,
    /// Manual certificate mode: how often the certificate files are checked for changes.
    pub cert_reload_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(2),
            frame_timeout: Duration::from_secs(30),
            http_idle_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(60),
            keepalive_jitter: Duration::from_secs(5),
            queue_depth: 32,
            queue_bytes: 128 << 10,
            mesh_queue_bytes: 16 << 20,
            watcher_backlog: registry::DEFAULT_WATCHER_BACKLOG,
            shutdown_timeout: Duration::from_secs(10),
            restart_reconnect_spread: Duration::from_secs(5),
            restart_try_for: Duration::from_secs(60),
            client_rate_limit: 0,
            client_rate_burst: 0,
            accept_rate: 0.0,
            accept_burst: 0,
            max_connections_per_ip: 0,
            cert_reload_interval: Duration::from_secs(10),
        }
    }
}

/// Who seals and opens TLS records once the handshake is done (issue 17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsRecords {
    /// ferry's own record layer (`server::tls::records`): rustls does the handshake and the key
    /// schedule, ring's AEADs seal and open in place in the connection's buffers. The default.
    #[default]
    Ferry,
    /// tokio-rustls for the whole connection (the relay before issue 17; kept as a switch and
    /// as the benchmark's side-by-side).
    Rustls,
}

/// Everything [`Server::spawn`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The DERP listener (TLS unless `tls` is `None`).
    pub listen: SocketAddr,
    /// Certificate source; `None` serves plain HTTP (development only).
    pub tls: Option<TlsConfig>,
    /// Who seals and opens TLS records after the handshake.
    pub tls_records: TlsRecords,
    /// Port-80 listener: captive-portal check (`/generate_204`) and redirects to HTTPS.
    pub http_listen: Option<SocketAddr>,
    /// Prometheus listener (`/metrics`).
    pub metrics_listen: Option<SocketAddr>,
    /// STUN beside the relay.
    pub stun: Option<StunConfig>,
    /// The UDP relay path (issue 15); `None`: off.
    pub udp_relay: Option<UdpRelayConfig>,
    /// The server's private key (persist it: clients pin the public half).
    pub server_key: SecretKey,
    /// Mesh key: clients presenting it may use mesh frames.
    pub mesh_key: Option<[u8; 32]>,
    /// Mesh peers to forward to (needs `mesh_key`).
    pub mesh: Option<MeshConfig>,
    /// Host name, for redirects and logs.
    pub hostname: Option<String>,
    /// Timeouts and caps.
    pub limits: Limits,
    /// Allowlist and verify URL; `None` admits every client.
    pub admission: Option<AdmissionConfig>,
    /// Install this server's metrics recorder as the process-global one (the binary does, so
    /// the STUN server's counters land in the same scrape; tests don't).
    pub install_global_recorder: bool,
}

impl Config {
    /// A plain-HTTP config on 127.0.0.1 port 0 with an ephemeral key and no STUN (for tests).
    pub fn dev_loopback() -> Self {
        Config {
            listen: "127.0.0.1:0".parse().expect("literal"),
            tls: None,
            tls_records: TlsRecords::default(),
            http_listen: None,
            metrics_listen: None,
            stun: None,
            udp_relay: None,
            server_key: SecretKey::generate(),
            mesh_key: None,
            mesh: None,
            hostname: None,
            limits: Limits::default(),
            admission: None,
            install_global_recorder: false,
        }
    }
}

/// The UDP relay path: a UDP socket that forwards Geneve-framed datagrams between two clients
/// that bound a session allocated over their DERP connections (see `server::udprelay`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpRelayConfig {
    /// The UDP socket's address.
    pub listen: SocketAddr,
    /// Addresses to tell clients (the relay's public address and this port); empty: clients
    /// use the DERP node's address with the bound port.
    pub advertise: Vec<SocketAddr>,
    /// Caps on sessions.
    pub limits: crate::server::udprelay::Limits,
    /// UDP GRO on receive and GSO on send (Linux): runs of datagrams of one flow cross the
    /// kernel as one; the datagrams on the wire are the same. Default on; off only if a
    /// kernel or device misbehaves with it (a refused GSO send turns it off by itself).
    pub gso: bool,
}

impl UdpRelayConfig {
    /// On `listen`, nothing advertised, default caps.
    pub fn new(listen: SocketAddr) -> Self {
        UdpRelayConfig {
            listen,
            advertise: Vec::new(),
            limits: crate::server::udprelay::Limits::default(),
            gso: true,
        }
    }
}

/// A [`Config`] that cannot work. Each names the field ([`ConfigError::field`]) and what is
/// wrong with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// More UDP relay sessions than session ids.
    #[error("udp_relay.max_sessions is {0}: at most 16777215 sessions (24-bit ids) can exist")]
    UdpRelaySessions(usize),
    /// A count or a duration that must not be zero is zero.
    #[error("{field} is 0: {why}")]
    Zero {
        /// The field, e.g. `limits.queue_depth`.
        field: &'static str,
        /// What a zero would do.
        why: &'static str,
    },
    /// `limits.accept_rate` is negative, NaN or infinite.
    #[error("limits.accept_rate is {0}, not a number of connections per second of at least 0")]
    AcceptRate(f64),
    /// The ACME settings cannot get a certificate.
    #[error("{} cannot work for ACME", .0.field())]
    Acme(#[source] super::AcmeConfigError),
    /// ACME answers HTTP-01 on the port-80 listener, which is off.
    #[error("tls is ACME but http_listen is None: the CA's HTTP-01 challenge is answered on the port-80 listener")]
    AcmeWithoutHttpListen,
    /// A self-signed certificate for no name.
    #[error("tls is self-signed with an empty names list")]
    NoCertNames,
    /// Mesh peers, but no key to authenticate to them.
    #[error("mesh is set but mesh_key is None: mesh links authenticate with the mesh key")]
    MeshWithoutKey,
    /// A static mesh peer that is not `host:port`.
    #[error(
        "mesh.peers: {peer:?} is not host:port (e.g. derp1b.example.com:443 or [2001:db8::1]:443)"
    )]
    MeshPeer {
        /// The peer as written.
        peer: String,
        /// What is wrong with it.
        #[source]
        source: super::mesh::PeerAddrError,
    },
    /// The verify URL is not usable.
    #[error("admission.verify_url {url:?} is not an http:// or https:// URL with a host")]
    VerifyUrl {
        /// The URL as written.
        url: String,
        /// What is wrong with it.
        #[source]
        source: super::admission::VerifyUrlError,
    },
    /// STUN is on with no address to serve.
    #[error("stun has no address: udp_addrs and tcp_addrs are empty and rfc5780 is None")]
    NoStunAddress,
    /// RFC 5780 replies must come from known addresses.
    #[error("stun.rfc5780.primary {0} is a wildcard address; RFC 5780 replies must come from a specific IP")]
    Rfc5780Wildcard(SocketAddr),
}

impl ConfigError {
    /// The [`Config`] field at fault, as a path: `limits.queue_depth`, `tls`, `mesh_key`,
    /// `admission.verify_url`, `stun.udp_addrs`, ...
    pub fn field(&self) -> &'static str {
        match self {
            ConfigError::Zero { field, .. } => field,
            ConfigError::AcceptRate(_) => "limits.accept_rate",
            ConfigError::Acme(e) => e.field(),
            ConfigError::AcmeWithoutHttpListen => "http_listen",
            ConfigError::NoCertNames => "tls.names",
            ConfigError::MeshWithoutKey => "mesh_key",
            ConfigError::MeshPeer { .. } => "mesh.peers",
            ConfigError::VerifyUrl { .. } => "admission.verify_url",
            ConfigError::NoStunAddress => "stun.udp_addrs",
            ConfigError::Rfc5780Wildcard(_) => "stun.rfc5780.primary",
            ConfigError::UdpRelaySessions(_) => "udp_relay.max_sessions",
        }
    }
}

impl Config {
    /// Checks what can be checked without I/O: counts and durations that would refuse every
    /// client, spin or never fire; TLS, mesh, admission and STUN settings that cannot work.
    /// [`Server::spawn`](super::Server::spawn) calls it before anything else. Files and
    /// addresses are checked when the server opens or binds them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.limits.validate()?;
        if let Some(u) = &self.udp_relay {
            if u.limits.total == 0 {
                return Err(zero(
                    "udp_relay.max_sessions",
                    "no session could ever be allocated",
                ));
            }
            if u.limits.total > ferry_proto::udprelay::MAX_VNI as usize {
                return Err(ConfigError::UdpRelaySessions(u.limits.total));
            }
            if u.limits.per_client == 0 {
                return Err(zero(
                    "udp_relay.max_sessions_per_client",
                    "no client could ever allocate a session",
                ));
            }
        }
        match &self.tls {
            Some(TlsConfig::Acme(acme)) => {
                acme.validate().map_err(ConfigError::Acme)?;
                if self.http_listen.is_none() {
                    return Err(ConfigError::AcmeWithoutHttpListen);
                }
            }
            Some(TlsConfig::SelfSigned { names, .. }) if names.is_empty() => {
                return Err(ConfigError::NoCertNames)
            }
            _ => {}
        }
        if let Some(mesh) = &self.mesh {
            if self.mesh_key.is_none() {
                return Err(ConfigError::MeshWithoutKey);
            }
            for peer in &mesh.peers {
                super::mesh::split_host_port(peer).map_err(|source| ConfigError::MeshPeer {
                    peer: peer.clone(),
                    source,
                })?;
            }
            if let Some(dns) = &mesh.dns {
                if dns.interval.is_zero() {
                    return Err(zero(
                        "mesh.dns.interval",
                        "the name would be resolved in a loop",
                    ));
                }
            }
        }
        if let Some(a) = &self.admission {
            if let Some(url) = &a.verify_url {
                super::admission::check_verify_url(url).map_err(|source| {
                    ConfigError::VerifyUrl {
                        url: url.clone(),
                        source,
                    }
                })?;
                if a.verify_timeout.is_zero() {
                    return Err(zero(
                        "admission.verify_timeout",
                        "every verify request would time out at once",
                    ));
                }
            }
            if a.allowlist_file.is_some() && a.reload_interval.is_zero() {
                return Err(zero(
                    "admission.reload_interval",
                    "the allowlist file would be polled in a loop",
                ));
            }
        }
        if let Some(s) = &self.stun {
            if s.udp_addrs.is_empty() && s.tcp_addrs.is_empty() && s.rfc5780.is_none() {
                return Err(ConfigError::NoStunAddress);
            }
            if let Some(r) = &s.rfc5780 {
                if r.primary.ip().is_unspecified() {
                    return Err(ConfigError::Rfc5780Wildcard(r.primary));
                }
            }
        }
        Ok(())
    }
}

fn zero(field: &'static str, why: &'static str) -> ConfigError {
    ConfigError::Zero { field, why }
}

impl Limits {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(zero(
                "limits.max_connections",
                "every connection would be closed at accept",
            ));
        }
        if self.queue_depth == 0 {
            return Err(zero(
                "limits.queue_depth",
                "a receiver could not queue a single packet",
            ));
        }
        if !self.accept_rate.is_finite() || self.accept_rate < 0.0 {
            return Err(ConfigError::AcceptRate(self.accept_rate));
        }
        let durations = [
            (
                self.handshake_timeout,
                "limits.handshake_timeout",
                "every connection would time out before its handshake",
            ),
            (
                self.write_timeout,
                "limits.write_timeout",
                "every write would time out",
            ),
            (
                self.frame_timeout,
                "limits.frame_timeout",
                "every frame would time out before its last byte",
            ),
            (
                self.http_idle_timeout,
                "limits.http_idle_timeout",
                "every HTTP connection would time out before its first request",
            ),
            (
                self.keepalive_interval,
                "limits.keepalive_interval",
                "keep-alive frames would be sent in a loop",
            ),
            (
                self.cert_reload_interval,
                "limits.cert_reload_interval",
                "certificate files would be polled in a loop",
            ),
        ];
        for (d, field, why) in durations {
            if d.is_zero() {
                return Err(zero(field, why));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::server::{AcmeConfig, MeshDns, MeshTls, Rfc5780Config, LETS_ENCRYPT_DIRECTORY};

    fn with(edit: impl FnOnce(&mut Config)) -> Result<(), ConfigError> {
        let mut c = Config::dev_loopback();
        edit(&mut c);
        c.validate()
    }

    /// The error names `field`, in both [`ConfigError::field`] and its message.
    #[track_caller]
    fn refused(r: Result<(), ConfigError>, field: &str) -> ConfigError {
        let e = r.expect_err(field);
        assert_eq!(e.field(), field, "{e}");
        assert!(
            e.to_string().contains(field.rsplit('.').next().unwrap()),
            "{field}: {e}"
        );
        e
    }

    fn acme(hostname: &str, directory: &str) -> TlsConfig {
        TlsConfig::Acme(AcmeConfig {
            hostname: hostname.into(),
            email: None,
            directory: directory.into(),
            ca_file: None,
            dir: PathBuf::from("/tmp"),
        })
    }

    fn mesh(peers: &[&str]) -> MeshConfig {
        MeshConfig {
            peers: peers.iter().map(|p| p.to_string()).collect(),
            dns: None,
            tls: MeshTls::Plain,
        }
    }

    #[test]
    fn the_defaults_and_dev_loopback_pass() {
        Config::dev_loopback().validate().unwrap();
        with(|c| {
            c.stun = Some(StunConfig::default());
            c.admission = Some(AdmissionConfig::default());
            c.mesh_key = Some([1; 32]);
            c.mesh = Some(mesh(&["a.example:443", "[2001:db8::1]:443"]));
            c.tls = Some(acme("relay.example.com", LETS_ENCRYPT_DIRECTORY));
            c.http_listen = Some("127.0.0.1:0".parse().unwrap());
        })
        .unwrap();
    }

    #[test]
    fn zero_counts_and_durations_are_refused_by_name() {
        type Edit = fn(&mut Limits);
        let cases: [(&str, Edit); 8] = [
            ("limits.max_connections", |l| l.max_connections = 0),
            ("limits.frame_timeout", |l| l.frame_timeout = Duration::ZERO),
            ("limits.queue_depth", |l| l.queue_depth = 0),
            ("limits.handshake_timeout", |l| {
                l.handshake_timeout = Duration::ZERO
            }),
            ("limits.write_timeout", |l| l.write_timeout = Duration::ZERO),
            ("limits.http_idle_timeout", |l| {
                l.http_idle_timeout = Duration::ZERO
            }),
            ("limits.keepalive_interval", |l| {
                l.keepalive_interval = Duration::ZERO
            }),
            ("limits.cert_reload_interval", |l| {
                l.cert_reload_interval = Duration::ZERO
            }),
        ];
        for (field, edit) in cases {
            let e = refused(with(|c| edit(&mut c.limits)), field);
            assert!(e.to_string().starts_with(&format!("{field} is 0: ")), "{e}");
        }
        // Zero where zero means "off" or "none" stays allowed.
        with(|c| {
            let l = &mut c.limits;
            l.queue_bytes = 0;
            l.client_rate_limit = 0;
            l.accept_rate = 0.0;
            l.accept_burst = 0;
            l.max_connections_per_ip = 0;
            l.shutdown_timeout = Duration::ZERO;
            l.keepalive_jitter = Duration::ZERO;
        })
        .unwrap();
    }

    #[test]
    fn accept_rate_must_be_a_finite_non_negative_number() {
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let e = refused(with(|c| c.limits.accept_rate = bad), "limits.accept_rate");
            assert!(e.to_string().contains(&bad.to_string()), "{e}");
        }
        with(|c| c.limits.accept_rate = 2.5).unwrap();
    }

    #[test]
    fn acme_needs_a_dns_name_an_https_directory_and_port_80() {
        let port80 = Some("127.0.0.1:0".parse().unwrap());
        let e = refused(
            with(|c| {
                c.tls = Some(acme("192.0.2.1", LETS_ENCRYPT_DIRECTORY));
                c.http_listen = port80;
            }),
            "tls.acme.hostname",
        );
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(
            cause.contains("DNS name") && cause.contains("192.0.2.1"),
            "{cause}"
        );
        refused(
            with(|c| {
                c.tls = Some(acme("relay.example.com", "http://ca.test/dir"));
                c.http_listen = port80;
            }),
            "tls.acme.directory",
        );
        refused(
            with(|c| c.tls = Some(acme("relay.example.com", LETS_ENCRYPT_DIRECTORY))),
            "http_listen",
        );
        refused(
            with(|c| {
                c.tls = Some(TlsConfig::SelfSigned {
                    names: vec![],
                    dir: "/tmp".into(),
                })
            }),
            "tls.names",
        );
    }

    #[test]
    fn mesh_needs_a_key_and_host_port_peers() {
        refused(
            with(|c| c.mesh = Some(mesh(&["a.example:443"]))),
            "mesh_key",
        );
        for bad in ["a.example", "a.example:http", ":443", "[]:443"] {
            let e = refused(
                with(|c| {
                    c.mesh_key = Some([1; 32]);
                    c.mesh = Some(mesh(&[bad]));
                }),
                "mesh.peers",
            );
            assert!(e.to_string().contains(bad), "{e}");
        }
        let e = refused(
            with(|c| {
                c.mesh_key = Some([1; 32]);
                c.mesh = Some(MeshConfig {
                    dns: Some(MeshDns {
                        name: "relays.example".into(),
                        port: 443,
                        interval: Duration::ZERO,
                    }),
                    ..mesh(&[])
                });
            }),
            "mesh.dns.interval",
        );
        assert!(matches!(e, ConfigError::Zero { .. }));
    }

    #[test]
    fn admission_verify_url_and_intervals() {
        let verify = |url: &str, timeout: Duration| AdmissionConfig {
            verify_url: Some(url.into()),
            verify_timeout: timeout,
            ..AdmissionConfig::default()
        };
        for bad in ["headscale/verify", "ftp://h/verify", "http://", "not a url"] {
            refused(
                with(|c| c.admission = Some(verify(bad, Duration::from_secs(2)))),
                "admission.verify_url",
            );
        }
        refused(
            with(|c| c.admission = Some(verify("http://h/verify", Duration::ZERO))),
            "admission.verify_timeout",
        );
        refused(
            with(|c| {
                c.admission = Some(AdmissionConfig {
                    allowlist_file: Some("/etc/keys".into()),
                    reload_interval: Duration::ZERO,
                    ..AdmissionConfig::default()
                })
            }),
            "admission.reload_interval",
        );
        // Without a URL, its timeout is not used and not checked.
        with(|c| {
            c.admission = Some(AdmissionConfig {
                allowlist_file: Some("/etc/keys".into()),
                verify_timeout: Duration::ZERO,
                ..AdmissionConfig::default()
            })
        })
        .unwrap();
    }

    #[test]
    fn stun_needs_an_address_and_a_specific_rfc5780_primary() {
        refused(
            with(|c| {
                c.stun = Some(StunConfig {
                    udp_addrs: vec![],
                    tcp_addrs: vec![],
                    ..StunConfig::default()
                })
            }),
            "stun.udp_addrs",
        );
        let rfc = |primary: &str| Rfc5780Config {
            primary: primary.parse().unwrap(),
            alternate: "192.0.2.2:3479".parse().unwrap(),
        };
        refused(
            with(|c| {
                c.stun = Some(StunConfig {
                    rfc5780: Some(rfc("0.0.0.0:3478")),
                    ..StunConfig::default()
                })
            }),
            "stun.rfc5780.primary",
        );
        with(|c| {
            c.stun = Some(StunConfig {
                rfc5780: Some(rfc("192.0.2.1:3478")),
                ..StunConfig::default()
            })
        })
        .unwrap();
    }
}
