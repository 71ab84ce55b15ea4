//! The optional TOML config file of `ferry-relay` (see `relay/ferry-relay.example.toml`).
//!
//! Every key is optional; flags and `FERRY_*` environment variables override the file, and the
//! file overrides the built-in defaults. Unknown keys are errors, so a typo fails at start with
//! the file, the line and the list of valid keys, instead of being silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// An address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Serve on this address.
    On(SocketAddr),
    /// Don't serve.
    Off,
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        s.parse().map(Listen::On).map_err(|_| {
            format!(
                "`{s}` is not an address; write IP:PORT (e.g. 0.0.0.0:443 or [::]:443), or `off`"
            )
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
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::On(a) => Some(a),
            Listen::Off => None,
        }
    }
}

/// Where the certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CertMode {
    /// A self-signed certificate, created once and kept; pin it in the DERP map (`CertName`).
    SelfSigned,
    /// PEM files you provide (`cert_file`, `key_file`); reloaded on SIGHUP.
    Manual,
    /// A certificate from an ACME CA (Let's Encrypt by default) over HTTP-01 on port 80,
    /// cached in `dir` and renewed automatically.
    Acme,
}

/// `[tls]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// `self-signed` (default), `manual` or `acme`.
    pub mode: Option<CertMode>,
    /// Manual mode: PEM certificate chain.
    pub cert_file: Option<PathBuf>,
    /// Manual mode: PEM private key.
    pub key_file: Option<PathBuf>,
    /// Self-signed and ACME modes: directory for the generated or issued pair (and the ACME
    /// account); default: the key file's directory.
    pub dir: Option<PathBuf>,
    /// ACME mode: contact address for the CA.
    pub acme_email: Option<String>,
    /// ACME mode: the CA's directory URL (default: Let's Encrypt production).
    pub acme_directory: Option<String>,
    /// ACME mode: extra PEM trust anchor for the CA's HTTPS endpoint (private CA, pebble).
    pub acme_ca_file: Option<PathBuf>,
}

/// `[stun]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StunSection {
    /// Run STUN beside the relay (default true).
    pub enabled: Option<bool>,
    /// UDP (and TCP) addresses.
    pub listen: Option<Vec<SocketAddr>>,
    /// Also serve STUN over TCP (default true).
    pub tcp: Option<bool>,
    /// SOFTWARE attribute in replies (default: none).
    pub software: Option<String>,
    /// RFC 5780 alternate address (a second IP and port); enables behaviour discovery.
    pub rfc5780_alternate: Option<SocketAddr>,
}

/// `[limits]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Most connections at once.
    pub max_connections: Option<usize>,
    /// TCP accept to completed DERP handshake.
    #[serde(default, with = "humantime_serde")]
    pub handshake_timeout: Option<Duration>,
    /// No write progress for this long closes a connection.
    #[serde(default, with = "humantime_serde")]
    pub write_timeout: Option<Duration>,
    /// KeepAlive interval.
    #[serde(default, with = "humantime_serde")]
    pub keepalive_interval: Option<Duration>,
    /// Packets queued per receiver and queue ...
    pub queue_depth: Option<usize>,
    /// ... and bytes (dropped only when over both).
    pub queue_bytes: Option<usize>,
    /// Bytes queued per mesh link (beyond 32 packets).
    pub mesh_queue_bytes: Option<usize>,
    /// Presence changes a mesh watcher may lag by (beyond one per client) before it is cut off.
    pub watcher_backlog: Option<usize>,
    /// Graceful shutdown bound.
    #[serde(default, with = "humantime_serde")]
    pub shutdown_timeout: Option<Duration>,
    /// Per-client receive rate, bytes/s (0 = off).
    pub client_rate_limit: Option<u64>,
    /// Burst of the receive rate, bytes.
    pub client_rate_burst: Option<u64>,
    /// New connections accepted per second (0 = off).
    pub accept_rate: Option<f64>,
    /// Burst of the accept rate.
    pub accept_burst: Option<u32>,
    /// Connections at once from one source IP (0 = off).
    pub max_connections_per_ip: Option<u32>,
}

/// `[admission]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionSection {
    /// File of allowed node keys (`nodekey:<hex>` per line), re-read when it changes.
    pub allowlist_file: Option<PathBuf>,
    /// derper-compatible verify URL (`--verify-client-url`).
    pub verify_url: Option<String>,
    /// Bound on one verify request (default 2s).
    #[serde(default, with = "humantime_serde")]
    pub verify_timeout: Option<Duration>,
    /// `closed` (default) or `open`: what happens when the verify URL cannot answer.
    pub verify_fail: Option<super::admission::VerifyFail>,
}

/// `[derpmap]`: what `ferry-relay derpmap` prints (the public view of this relay).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DerpmapSection {
    /// Region ID (default 900; Tailscale's own regions are below 900).
    pub region_id: Option<u32>,
    /// Region code (default "ferry").
    pub region_code: Option<String>,
    /// Region name (default: the region code).
    pub region_name: Option<String>,
    /// Node name (default "<region_id>a").
    pub node_name: Option<String>,
    /// The node's IPv4 address (clients then need no DNS for it).
    pub ipv4: Option<std::net::Ipv4Addr>,
    /// The node's IPv6 address.
    pub ipv6: Option<std::net::Ipv6Addr>,
    /// Public DERP port (default: the listen port; differs behind a load balancer).
    pub derp_port: Option<u16>,
    /// Public STUN port (default: the first STUN listen port; -1 when STUN is off).
    pub stun_port: Option<i32>,
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// DERP listener.
    pub listen: Option<SocketAddr>,
    /// Name (or IP) clients use to reach this relay.
    pub hostname: Option<String>,
    /// Server private key file.
    pub key_file: Option<PathBuf>,
    /// Port-80 listener or `off`.
    pub http_listen: Option<Listen>,
    /// Metrics listener or `off`.
    pub metrics_listen: Option<Listen>,
    /// `text` or `json`.
    pub log_format: Option<LogFormat>,
    /// A tracing filter such as `info` or `ferry_relay=debug`.
    pub log_level: Option<String>,
    /// Certificates.
    #[serde(default)]
    pub tls: TlsSection,
    /// STUN.
    #[serde(default)]
    pub stun: StunSection,
    /// Limits.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Admission control.
    #[serde(default)]
    pub admission: AdmissionSection,
    /// The DERP map `ferry-relay derpmap` prints.
    #[serde(default)]
    pub derpmap: DerpmapSection,
    /// Mesh with the other relays of the region.
    #[serde(default)]
    pub mesh: MeshSection,
}

/// `[mesh]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSection {
    /// File holding the region's mesh key (64 hex characters; derper's `--mesh-psk-file`).
    pub key_file: Option<PathBuf>,
    /// Static peers, `host:port` (derper's `--mesh-with`); listing this relay is harmless.
    pub peers: Option<Vec<String>>,
    /// A DNS name whose A/AAAA records are the peers (a headless Kubernetes Service).
    pub dns: Option<String>,
    /// The peers' DERP port for `dns` (default: this relay's listen port).
    pub dns_port: Option<u16>,
    /// How often `dns` is resolved again (default 30s).
    #[serde(default, with = "humantime_serde")]
    pub dns_interval: Option<Duration>,
    /// The name peers' certificates must carry (default: a static peer's host; for DNS peers,
    /// this relay's hostname).
    pub tls_name: Option<String>,
    /// Extra PEM trust anchors for peers' certificates (private CA, shared self-signed cert).
    pub ca_file: Option<PathBuf>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A config file that could not be used. The message names the file, the line and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {msg}")]
    Parse { path: PathBuf, msg: String },
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|msg| ConfigError::Parse {
            path: path.into(),
            msg,
        })
    }

    /// Parses config text; the error carries the line, the column and what is expected.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
            let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
            let mut msg = format!("{at}{}", e.message());
            if msg.contains("unknown field") {
                msg.push_str(" (see relay/ferry-relay.example.toml for every key)");
            }
            msg
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_parses_and_says_what_it_shows() {
        let text = include_str!("../../ferry-relay.example.toml");
        let c = FileConfig::parse(text).unwrap();
        assert_eq!(c.listen, Some("0.0.0.0:443".parse().unwrap()));
        assert_eq!(c.tls.mode, Some(CertMode::SelfSigned));
        assert_eq!(
            c.metrics_listen,
            Some(Listen::On("127.0.0.1:9090".parse().unwrap()))
        );
        assert_eq!(c.limits.write_timeout, Some(Duration::from_secs(2)));
        assert_eq!(c.stun.enabled, Some(true));
        assert_eq!(c.limits.client_rate_limit, Some(0));
        assert_eq!(c.limits.accept_rate, Some(0.0));
        assert_eq!(
            c.admission.verify_fail,
            Some(super::super::admission::VerifyFail::Closed)
        );
        assert_eq!(c.admission.verify_timeout, Some(Duration::from_secs(2)));
        assert_eq!(c.derpmap.region_id, Some(900));
    }

    #[test]
    fn admission_and_limits_keys_parse_and_bad_values_name_the_line() {
        let c = FileConfig::parse(
            "[limits]\naccept_rate = 2.5\nmax_connections_per_ip = 8\n[admission]\nverify_fail = \"open\"\nverify_timeout = \"500ms\"\n",
        )
        .unwrap();
        assert_eq!(c.limits.accept_rate, Some(2.5));
        assert_eq!(c.limits.max_connections_per_ip, Some(8));
        assert_eq!(
            c.admission.verify_fail,
            Some(super::super::admission::VerifyFail::Open)
        );
        let e = FileConfig::parse("[admission]\n\nverify_fail = \"sometimes\"\n").unwrap_err();
        assert!(
            e.starts_with("line 3:") && e.contains("closed") && e.contains("open"),
            "{e}"
        );
        let e = FileConfig::parse("[limits]\nclient_rate_limit = -5\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        let e = FileConfig::parse("[derpmap]\nregion = 3\n").unwrap_err();
        assert!(e.contains("region_id"), "{e}");
    }

    #[test]
    fn bad_files_name_the_line_and_the_fix() {
        let e = FileConfig::parse("listen = \"0.0.0.0:443\"\nlisen = 1\n").unwrap_err();
        assert!(
            e.starts_with("line 2:")
                && e.contains("unknown field `lisen`")
                && e.contains("example.toml"),
            "{e}"
        );
        let e = FileConfig::parse("\n\nhttp_listen = \"port eighty\"\n").unwrap_err();
        assert!(e.starts_with("line 3:") && e.contains("IP:PORT"), "{e}");
        let e = FileConfig::parse("[limits]\nwrite_timeout = \"2 parsecs\"\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        let e = FileConfig::parse("[tls]\nmode = \"acme-ish\"\n").unwrap_err();
        assert!(e.contains("self-signed") && e.contains("manual"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("relay.toml");
        std::fs::write(&p, "[stun]\nenabled = \"yes\"\n").unwrap();
        let e = FileConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("relay.toml") && e.contains("line 2"), "{e}");
    }
}
