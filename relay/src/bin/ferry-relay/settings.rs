//! Every setting of `ferry-relay`, declared once: one field carries its flag, its `FERRY_*`
//! environment variable, its help text and its config-file key (see
//! `relay/ferry-relay.example.toml`).
//!
//! The same tree is parsed twice: by clap from flags and environment, and by serde from the
//! optional TOML file. [`Layer::over`] lays the first over the second, field by field (the
//! `layered!` macro writes that from the field list), and `resolve` adds the defaults. Every
//! value is an `Option` here, so "not given" is never confused with a default.
//!
//! File-only keys are `#[arg(skip)]`; flag-only settings are `#[serde(skip)]`, so
//! `deny_unknown_fields` keeps refusing them in the file. Flags whose name differs from the
//! file key carry an explicit clap `id` (the ids must be unique across the flattened sections).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ferry_relay::server::VerifyFail;
use serde::Deserialize;

/// `self` over `lower`: what `self` gives wins.
pub(crate) trait Layer {
    fn over(self, lower: Self) -> Self;
}

impl<T> Layer for Option<T> {
    fn over(self, lower: Self) -> Self {
        self.or(lower)
    }
}

impl Layer for bool {
    fn over(self, lower: Self) -> Self {
        self || lower
    }
}

/// A struct whose [`Layer`] impl lays every field over the same field of the lower layer.
macro_rules! layered {
    ($(#[$m:meta])* $v:vis struct $n:ident {
        $($(#[$fm:meta])* $fv:vis $f:ident : $t:ty),* $(,)?
    }) => {
        $(#[$m])* $v struct $n { $($(#[$fm])* $fv $f: $t),* }
        impl Layer for $n {
            fn over(self, lower: Self) -> Self {
                $n { $($f: Layer::over(self.$f, lower.$f)),* }
            }
        }
    };
}

/// An address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listen {
    /// Serve on this address.
    On(SocketAddr),
    /// Don't serve.
    Off,
}

/// Not an address and not `off`.
#[derive(Debug, thiserror::Error)]
#[error("`{text}` is not an address; write IP:PORT (e.g. 0.0.0.0:443 or [::]:443), or `off`")]
pub(crate) struct ListenParseError {
    text: String,
    #[source]
    source: std::net::AddrParseError,
}

impl std::str::FromStr for Listen {
    type Err = ListenParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        s.parse()
            .map(Listen::On)
            .map_err(|source| ListenParseError {
                text: s.into(),
                source,
            })
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Listen {
    /// The address, if on.
    pub(crate) fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::On(a) => Some(a),
            Listen::Off => None,
        }
    }
}

/// Where the certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum CertMode {
    /// A self-signed certificate, created once and kept; pin it in the DERP map (`CertName`).
    SelfSigned,
    /// PEM files you provide (`cert_file`, `key_file`); reloaded on SIGHUP.
    Manual,
    /// A certificate from an ACME CA (Let's Encrypt by default) over HTTP-01 on port 80,
    /// cached in `dir` and renewed automatically.
    Acme,
}

/// Who seals and opens TLS records after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RecordLayer {
    /// The relay's own record layer (rustls does the handshake and the key schedule).
    #[default]
    Ferry,
    /// tokio-rustls for the whole connection.
    Rustls,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

layered! {
    /// The relay's settings: top-level keys and one field per `[section]`.
    #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(crate) struct Settings {
        /// TOML config file (see relay/ferry-relay.example.toml).
        #[arg(long, short = 'c', env = "FERRY_CONFIG", value_name = "FILE")]
        #[serde(skip)]
        pub config: Option<PathBuf>,

        /// Development mode: plain HTTP on 127.0.0.1:3340, STUN on 127.0.0.1:3478, metrics on
        /// 127.0.0.1:9090, an ephemeral server key unless --key-file is given. Never for production.
        #[arg(long, env = "FERRY_DEV")]
        #[serde(skip)]
        pub dev: bool,

        /// DERP listen address [default: 0.0.0.0:443; --dev: 127.0.0.1:3340].
        #[arg(long, env = "FERRY_LISTEN", value_name = "ADDR")]
        pub listen: Option<SocketAddr>,

        /// Name or IP clients use to reach this relay (certificate, redirects). Required unless --dev.
        #[arg(long, env = "FERRY_HOSTNAME")]
        pub hostname: Option<String>,

        /// Server private key file, created on first start [default: /var/lib/ferry/relay.key].
        #[arg(long, env = "FERRY_KEY_FILE", value_name = "FILE")]
        pub key_file: Option<PathBuf>,

        // `[tls]`
        #[command(flatten)]
        pub tls: TlsSettings,

        /// Port-80 listener (captive-portal check, HTTPS redirect), or `off` [default: 0.0.0.0:80; --dev: off].
        #[arg(long, env = "FERRY_HTTP_LISTEN", value_name = "ADDR|off")]
        pub http_listen: Option<Listen>,

        /// Prometheus metrics listener, or `off` [default: 127.0.0.1:9090].
        #[arg(long, env = "FERRY_METRICS_LISTEN", value_name = "ADDR|off")]
        pub metrics_listen: Option<Listen>,

        // `[mesh]`
        #[command(flatten)]
        pub mesh: MeshSettings,

        // `[stun]`
        #[command(flatten)]
        pub stun: StunSettings,

        // `[udp_relay]`
        #[command(flatten)]
        pub udp_relay: UdpRelaySettings,

        // `[limits]`
        #[command(flatten)]
        pub limits: LimitsSettings,

        // `[admission]`
        #[command(flatten)]
        pub admission: AdmissionSettings,

        /// Log format [default: text].
        #[arg(long, env = "FERRY_LOG_FORMAT", value_enum)]
        pub log_format: Option<LogFormat>,

        /// Log filter, e.g. `info` or `ferry_relay=debug` [default: info; RUST_LOG also works].
        #[arg(long, env = "FERRY_LOG_LEVEL")]
        pub log_level: Option<String>,

        /// `[derpmap]`: its flags belong to the `derpmap` subcommand only.
        #[arg(skip)]
        pub derpmap: DerpmapSettings,
    }
}

layered! {
    /// `[tls]`
    #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(crate) struct TlsSettings {
        /// Where the TLS certificate comes from [default: self-signed].
        #[arg(id = "cert_mode", long = "cert-mode", env = "FERRY_CERT_MODE", value_name = "CERT_MODE", value_enum)]
        pub mode: Option<CertMode>,

        /// Manual mode: PEM certificate chain.
        #[arg(long, env = "FERRY_CERT_FILE", value_name = "FILE")]
        pub cert_file: Option<PathBuf>,

        /// Manual mode: PEM private key of the certificate.
        #[arg(id = "cert_key_file", long = "cert-key-file", env = "FERRY_CERT_KEY_FILE", value_name = "FILE")]
        pub key_file: Option<PathBuf>,

        /// Self-signed and ACME modes: where the certificate (and ACME account) is kept
        /// [default: the key file's directory].
        #[arg(id = "cert_dir", long = "cert-dir", env = "FERRY_CERT_DIR", value_name = "DIR")]
        pub dir: Option<PathBuf>,

        /// ACME mode: contact e-mail for the CA (expiry notices).
        #[arg(long, env = "FERRY_ACME_EMAIL")]
        pub acme_email: Option<String>,

        /// ACME mode: the CA's directory URL [default: Let's Encrypt production].
        #[arg(long, env = "FERRY_ACME_DIRECTORY", value_name = "URL")]
        pub acme_directory: Option<String>,

        /// ACME mode: PEM CA certificate to trust for the ACME server itself (private CA, pebble).
        #[arg(long, env = "FERRY_ACME_CA_FILE", value_name = "FILE")]
        pub acme_ca_file: Option<PathBuf>,

        /// Who seals and opens TLS records once the handshake is done: `ferry` (the relay's own
        /// record layer: fewer copies and system calls per packet) or `rustls` (tokio-rustls for
        /// the whole connection, as before) [default: ferry].
        #[arg(id = "tls_record_layer", long = "tls-record-layer", env = "FERRY_TLS_RECORD_LAYER", value_name = "LAYER", value_enum)]
        pub record_layer: Option<RecordLayer>,
    }
}

layered! {
    /// `[mesh]`
    #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(crate) struct MeshSettings {
        /// Mesh key file (64 hex characters, the same on every relay of the region; derper's
        /// --mesh-psk-file format). Clients presenting it may watch connections and forward.
        #[arg(id = "mesh_key_file", long = "mesh-psk-file", env = "FERRY_MESH_KEY_FILE", value_name = "FILE")]
        pub key_file: Option<PathBuf>,

        /// Mesh peers, host:port, comma-separated (derper's --mesh-with). This relay may be listed.
        #[arg(id = "mesh_with", long = "mesh-with", env = "FERRY_MESH_WITH", value_name = "HOST:PORT", value_delimiter = ',')]
        pub peers: Option<Vec<String>>,

        /// Mesh peers from DNS: every A/AAAA record of this name (e.g. a headless Service).
        #[arg(id = "mesh_dns", long = "mesh-dns", env = "FERRY_MESH_DNS", value_name = "NAME")]
        pub dns: Option<String>,

        /// The peers' DERP port for `dns` (default: this relay's listen port).
        #[arg(skip)]
        pub dns_port: Option<u16>,

        /// How often `dns` is resolved again (default 30s).
        #[arg(skip)]
        #[serde(with = "humantime_serde")]
        pub dns_interval: Option<Duration>,

        /// The name mesh peers' certificates must carry [default: a static peer's host; for DNS
        /// peers, --hostname].
        #[arg(id = "mesh_tls_name", long = "mesh-tls-name", env = "FERRY_MESH_TLS_NAME", value_name = "MESH_TLS_NAME")]
        pub tls_name: Option<String>,

        /// Extra PEM trust anchors for mesh peers' certificates.
        #[arg(id = "mesh_ca_file", long = "mesh-ca-file", env = "FERRY_MESH_CA_FILE", value_name = "FILE")]
        pub ca_file: Option<PathBuf>,
    }
}

layered! {
    /// `[stun]`
    #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(crate) struct StunSettings {
        /// Don't run the STUN server.
        #[arg(long = "no-stun", env = "FERRY_NO_STUN")]
        #[serde(skip)]
        pub no_stun: bool,

        /// Run STUN beside the relay (default true); `--no-stun` turns it off.
        #[arg(skip)]
        pub enabled: Option<bool>,

        /// STUN address (UDP and TCP); repeat for several [default: 0.0.0.0:3478 and [::]:3478; --dev: 127.0.0.1:3478].
        #[arg(id = "stun_listen", long = "stun-listen", env = "FERRY_STUN_LISTEN", value_name = "ADDR", value_delimiter = ',')]
        pub listen: Option<Vec<SocketAddr>>,

        /// Also serve STUN over TCP (default true).
        #[arg(skip)]
        pub tcp: Option<bool>,

        /// SOFTWARE attribute in STUN replies [default: none].
        #[arg(id = "stun_software", long = "stun-software", env = "FERRY_STUN_SOFTWARE", value_name = "STUN_SOFTWARE")]
        pub software: Option<String>,

        /// RFC 5780 alternate address (a second IP and port); enables behaviour discovery.
        #[arg(skip)]
        pub rfc5780_alternate: Option<SocketAddr>,
    }
}

layered! {
    /// `[udp_relay]`
    #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(crate) struct UdpRelaySettings {
        /// UDP relay path for clients that cannot go direct (Geneve, Tailscale's peer-relay
        /// format; sessions are allocated over DERP), or `off` [default: [::]:3480; --dev:
        /// the first STUN address's IP, port 0 (clients learn the port when they allocate)].
        #[arg(id = "udp_relay_listen", long = "udp-relay-listen", env = "FERRY_UDP_RELAY_LISTEN", value_name = "ADDR|off")]
        pub listen: Option<Listen>,

        /// Public IP:PORT(s) to tell clients for the UDP relay (behind NAT or a load balancer);
        /// default: none, clients use the DERP node's address with the relay's port.
        #[arg(id = "udp_relay_advertise", long = "udp-relay-advertise", env = "FERRY_UDP_RELAY_ADVERTISE", value_name = "IP:PORT", value_delimiter = ',')]
        pub advertise: Option<Vec<SocketAddr>>,

        /// Most UDP relay sessions in all (default 100000).
        #[arg(skip)]
        pub max_sessions: Option<usize>,

        /// Most UDP relay sessions one node may hold (default 16).
        #[arg(skip)]
        pub max_sessions_per_client: Option<usize>,

        /// UDP GRO/GSO on the UDP relay socket (default true): runs of datagrams of one flow
        /// cross the kernel as one (Linux); `false` if a kernel or NIC misbehaves with it.
        #[arg(skip)]
        pub gso: Option<bool>,
    }
}

layered! {
    /// `[limits]`
    #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(crate) struct LimitsSettings {
        /// Most connections at once [default: 100000].
        #[arg(long, env = "FERRY_MAX_CONNECTIONS")]
        pub max_connections: Option<usize>,

        /// TCP accept to completed DERP handshake.
        #[arg(skip)]
        #[serde(with = "humantime_serde")]
        pub handshake_timeout: Option<Duration>,

        /// No write progress for this long closes a connection.
        #[arg(skip)]
        #[serde(with = "humantime_serde")]
        pub write_timeout: Option<Duration>,

        /// A frame begun must be whole within this (slowloris past the handshake).
        #[arg(skip)]
        #[serde(with = "humantime_serde")]
        pub frame_timeout: Option<Duration>,

        /// KeepAlive interval.
        #[arg(skip)]
        #[serde(with = "humantime_serde")]
        pub keepalive_interval: Option<Duration>,

        /// Packets queued per receiver and queue ...
        #[arg(skip)]
        pub queue_depth: Option<usize>,

        /// ... and bytes (dropped only when over both).
        #[arg(skip)]
        pub queue_bytes: Option<usize>,

        /// Bytes queued per mesh link (beyond 32 packets).
        #[arg(skip)]
        pub mesh_queue_bytes: Option<usize>,

        /// Presence changes a mesh watcher may lag by (beyond one per client) before it is cut off.
        #[arg(skip)]
        pub watcher_backlog: Option<usize>,

        /// Per-client receive rate in bytes/s; a faster client's reads are paused (TCP pushes
        /// back), nothing is dropped. Mesh peers are exempt. 0 = off [default: 0].
        #[arg(long, env = "FERRY_CLIENT_RATE_LIMIT", value_name = "BYTES")]
        pub client_rate_limit: Option<u64>,

        /// Burst of the receive rate in bytes [default and minimum: 65568, one packet].
        #[arg(long, env = "FERRY_CLIENT_RATE_BURST", value_name = "BYTES")]
        pub client_rate_burst: Option<u64>,

        /// New DERP connections accepted per second; the excess is closed at accept. 0 = off [default: 0].
        #[arg(long, env = "FERRY_ACCEPT_RATE", value_name = "PER_SECOND")]
        pub accept_rate: Option<f64>,

        /// Burst of the accept rate [default: the rate, at least 1].
        #[arg(long, env = "FERRY_ACCEPT_BURST")]
        pub accept_burst: Option<u32>,

        /// DERP connections at once from one source IP. 0 = off [default: 0].
        #[arg(long, env = "FERRY_MAX_CONNECTIONS_PER_IP")]
        pub max_connections_per_ip: Option<u32>,

        /// Time allowed for a graceful shutdown, e.g. `10s` [default: 10s].
        #[arg(long, env = "FERRY_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration)]
        #[serde(with = "humantime_serde")]
        pub shutdown_timeout: Option<Duration>,
    }
}

layered! {
    /// `[admission]`
    #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(crate) struct AdmissionSettings {
        /// Only node keys in this file may connect (`nodekey:<hex>` per line, `#` comments);
        /// re-read when it changes.
        #[arg(long, env = "FERRY_ALLOWLIST_FILE", value_name = "FILE")]
        pub allowlist_file: Option<PathBuf>,

        /// Admission URL compatible with derper's --verify-client-url (e.g. Headscale's /verify):
        /// POST {"NodePublic","Source"}, admit on {"Allow":true}.
        #[arg(id = "verify_url", long = "verify-client-url", env = "FERRY_VERIFY_CLIENT_URL", value_name = "URL")]
        pub verify_url: Option<String>,

        /// Bound on one verify request [default: 2s].
        #[arg(long, env = "FERRY_VERIFY_TIMEOUT", value_parser = humantime::parse_duration)]
        #[serde(with = "humantime_serde")]
        pub verify_timeout: Option<Duration>,

        /// When the verify URL cannot answer: refuse (closed) or admit (open) [default: closed].
        #[arg(long, env = "FERRY_VERIFY_FAIL", value_enum)]
        pub verify_fail: Option<VerifyFail>,
    }
}

layered! {
    /// `[derpmap]`: what `ferry-relay derpmap` prints (the public view of this relay).
    #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(crate) struct DerpmapSettings {
        /// RegionID [default: 900].
        #[arg(long, env = "FERRY_DERPMAP_REGION_ID")]
        pub region_id: Option<u32>,

        /// RegionCode [default: ferry].
        #[arg(long, env = "FERRY_DERPMAP_REGION_CODE")]
        pub region_code: Option<String>,

        /// RegionName [default: the region code].
        #[arg(long, env = "FERRY_DERPMAP_REGION_NAME")]
        pub region_name: Option<String>,

        /// The node's Name [default: <region id>a].
        #[arg(long, env = "FERRY_DERPMAP_NODE_NAME")]
        pub node_name: Option<String>,

        /// The node's IPv4 address, if clients should not resolve the host name.
        #[arg(long, env = "FERRY_DERPMAP_IPV4")]
        pub ipv4: Option<Ipv4Addr>,

        /// The node's IPv6 address.
        #[arg(long, env = "FERRY_DERPMAP_IPV6")]
        pub ipv6: Option<Ipv6Addr>,

        /// Public DERP port, if not the listen port (behind a load balancer: 443 -> 8443).
        #[arg(long, env = "FERRY_DERPMAP_DERP_PORT")]
        pub derp_port: Option<u16>,

        /// Public STUN port [default: the first STUN listen port; -1 with STUN off].
        #[arg(long, env = "FERRY_DERPMAP_STUN_PORT", allow_negative_numbers = true)]
        pub stun_port: Option<i32>,
    }
}
