//! The one settings resolver: flags and environment over the config file over the defaults,
//! into the library's [`Config`]. `run` and `derpmap` both go through [`Resolved`], so every
//! default (ports, STUN addresses, the cert directory) is worked out once, and `derpmap` refuses
//! what `run` refuses. No I/O here besides reading the config file.
//!
//! Checks the library cannot express stay here (a hostname outside `--dev`, both manual
//! certificate files); everything else is [`Config::validate`], whose errors [`Resolved::check`]
//! turns into operator advice: which flag, or which file, line and key, and what to write.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use ferry_relay::proto::SecretKey;
use ferry_relay::server::{
    AcmeConfig, AdmissionConfig, Config, ConfigError, Limits, MeshConfig, MeshDns, MeshTls,
    Rfc5780Config, StunConfig, TlsConfig, TlsRecords, UdpRelayConfig, LETS_ENCRYPT_DIRECTORY,
};

use crate::cli::flag_and_env;
use crate::file::{ConfigFile, FileError};
use crate::settings::{CertMode, DerpmapSettings, Layer, Listen, LogFormat, RecordLayer, Settings};

/// Where the server key lives unless `--key-file` says otherwise.
pub(crate) const DEFAULT_KEY_PATH: &str = "/var/lib/ferry/relay.key";

/// What was given: flags and environment, the config file, and which arguments were given.
#[derive(Debug)]
pub(crate) struct Sources {
    cli: Settings,
    file: Option<ConfigFile>,
    /// Ids of the clap arguments given on the command line or in the environment.
    given: HashSet<String>,
}

impl Sources {
    /// Reads the config file `cli` names, if any.
    pub(crate) fn load(cli: Settings, given: HashSet<String>) -> Result<Sources, FileError> {
        let file = match &cli.config {
            Some(p) => Some(ConfigFile::load(p)?),
            None => None,
        };
        Ok(Sources { cli, file, given })
    }

    /// Flags over file.
    fn merged(&self) -> Settings {
        let file = self
            .file
            .as_ref()
            .map(|f| f.settings.clone())
            .unwrap_or_default();
        self.cli.clone().over(file)
    }

    /// The log format, and the filter: flag or environment, then `RUST_LOG`, then the file,
    /// then `info`.
    pub(crate) fn logging(&self, rust_log: Option<String>) -> (LogFormat, String) {
        let file = self.file.as_ref().map(|f| &f.settings);
        let format = self
            .cli
            .log_format
            .or(file.and_then(|f| f.log_format))
            .unwrap_or_default();
        let level = self
            .cli
            .log_level
            .clone()
            .or(rust_log)
            .or_else(|| file.and_then(|f| f.log_level.clone()))
            .unwrap_or_else(|| "info".into());
        (format, level)
    }

    /// Every default applied; the binary-only checks made. Call [`Resolved::check`] next.
    pub(crate) fn resolve(self) -> Result<Resolved> {
        let s = self.merged();
        let dev = s.dev;
        let listen = s.listen.unwrap_or_else(|| {
            if dev { "127.0.0.1:3340" } else { "0.0.0.0:443" }
                .parse()
                .expect("literal")
        });
        let key_file = match (&s.key_file, dev) {
            (None, true) => None,
            (p, _) => Some(p.clone().unwrap_or_else(|| DEFAULT_KEY_PATH.into())),
        };
        let tls = if dev {
            None
        } else {
            let Some(host) = s.hostname.clone() else {
                bail!("--hostname is required (or `hostname` in the config file): the name or IP address clients use to reach this relay. For a local trial, use --dev");
            };
            Some(tls_config(&s, host, key_file.as_deref())?)
        };
        let stun = stun_config(&s);
        let (mesh_key_file, mesh) = mesh_config(&s, listen.port());
        let config = Config {
            listen,
            tls,
            tls_records: match s.tls.record_layer.unwrap_or_default() {
                RecordLayer::Ferry => TlsRecords::Ferry,
                RecordLayer::Rustls => TlsRecords::Rustls,
            },
            http_listen: s
                .http_listen
                .unwrap_or(if dev {
                    Listen::Off
                } else {
                    Listen::On("0.0.0.0:80".parse().expect("literal"))
                })
                .addr(),
            metrics_listen: s
                .metrics_listen
                .unwrap_or(Listen::On("127.0.0.1:9090".parse().expect("literal")))
                .addr(),
            stun,
            // Placeholders until `config` gets the real keys; `check` only needs their presence.
            server_key: SecretKey::generate(),
            mesh_key: mesh_key_file.as_ref().map(|_| [0; 32]),
            mesh,
            hostname: s.hostname.clone(),
            limits: limits(&s),
            admission: admission_config(&s),
            install_global_recorder: true,
            udp_relay: udp_relay_config(&s),
        };
        Ok(Resolved {
            dev,
            key_file,
            mesh_key_file,
            derpmap: s.derpmap,
            config,
            sources: self,
        })
    }
}

/// The relay's configuration with every default applied.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub dev: bool,
    /// `None`: an ephemeral key (`--dev` without `--key-file`).
    pub key_file: Option<PathBuf>,
    pub mesh_key_file: Option<PathBuf>,
    /// The `[derpmap]` settings, for `ferry-relay derpmap`.
    pub derpmap: DerpmapSettings,
    /// With placeholder keys; see [`Resolved::config`].
    config: Config,
    sources: Sources,
}

impl Resolved {
    /// The configuration as `derpmap` sees it (with placeholder keys).
    pub(crate) fn view(&self) -> &Config {
        &self.config
    }

    /// [`Config::validate`], with the advice for the operator: the flag, or the file, line and
    /// key the value came from, and what to write.
    pub(crate) fn check(&self) -> Result<()> {
        self.config.validate().map_err(|e| self.explain(e))
    }

    /// The configuration to run, with the real keys.
    pub(crate) fn config(&self, server_key: SecretKey, mesh_key: Option<[u8; 32]>) -> Config {
        Config {
            server_key,
            mesh_key,
            ..self.config.clone()
        }
    }

    fn explain(&self, e: ConfigError) -> anyhow::Error {
        let Some(s) = SETTINGS.iter().find(|s| s.field == e.field()) else {
            return e.into();
        };
        let advice = match s.advice {
            Advice::At(fix) => format!("{} {fix}", self.place(s)),
            Advice::Whole(text) => text.to_string(),
        };
        anyhow::Error::new(e).context(advice)
    }

    /// Where the setting was given: the flag, else the file and line, else both names.
    fn place(&self, s: &Setting) -> String {
        let key = match s.section {
            Some(sec) => format!("[{sec}] {}", s.key),
            None => s.key.to_string(),
        };
        let flag = s.arg.and_then(flag_and_env);
        if let (Some(id), Some((flag, env))) = (s.arg, &flag) {
            if self.sources.given.contains(id) {
                return match env {
                    Some(env) => format!("{flag} ({env})"),
                    None => flag.clone(),
                };
            }
        }
        if let Some(f) = &self.sources.file {
            if let Some(line) = f.line_of(s.section, s.key) {
                return format!("config file {}: line {line}: {key}", f.path.display());
            }
        }
        match flag {
            Some((flag, _)) => format!("{key} (in the config file, or {flag})"),
            None => format!("{key} (in the config file)"),
        }
    }
}

fn tls_config(s: &Settings, host: String, key_file: Option<&Path>) -> Result<TlsConfig> {
    let t = &s.tls;
    let dir = t.dir.clone().unwrap_or_else(|| {
        key_file
            .and_then(Path::parent)
            .unwrap_or_else(|| Path::new(DEFAULT_KEY_PATH).parent().expect("has parent"))
            .to_path_buf()
    });
    Ok(match t.mode.unwrap_or(CertMode::SelfSigned) {
        CertMode::Acme => TlsConfig::Acme(AcmeConfig {
            hostname: host,
            email: t.acme_email.clone(),
            directory: t
                .acme_directory
                .clone()
                .unwrap_or_else(|| LETS_ENCRYPT_DIRECTORY.into()),
            ca_file: t.acme_ca_file.clone(),
            dir,
        }),
        CertMode::Manual => match (t.cert_file.clone(), t.key_file.clone()) {
            (Some(cert_path), Some(key_path)) => TlsConfig::Manual {
                cert_path,
                key_path,
            },
            _ => bail!("cert mode `manual` needs both --cert-file and --cert-key-file (or [tls] cert_file and key_file in the config file); or use --cert-mode self-signed"),
        },
        CertMode::SelfSigned => TlsConfig::SelfSigned {
            names: vec![host],
            dir,
        },
    })
}

/// The UDP relay: on by default ([::]:3480, dual-stack; in --dev beside the first STUN address, on an
/// ephemeral port, so that dev relays and tests never collide), `off` turns it off.
fn udp_relay_config(s: &Settings) -> Option<UdpRelayConfig> {
    let u = &s.udp_relay;
    let listen = match u.listen {
        Some(l) => l.addr()?,
        None if s.dev => {
            let ip = s
                .stun
                .listen
                .as_ref()
                .and_then(|l| l.first())
                .map_or([127, 0, 0, 1].into(), |a| a.ip());
            SocketAddr::new(ip, 0)
        }
        // One dual-stack socket (not one per family: a session's two sides may differ in family,
        // and a datagram is forwarded from the socket it came in on).
        None => "[::]:3480".parse().expect("literal"),
    };
    let defaults = ferry_relay::server::udprelay::Limits::default();
    Some(UdpRelayConfig {
        listen,
        advertise: u.advertise.clone().unwrap_or_default(),
        limits: ferry_relay::server::udprelay::Limits {
            total: u.max_sessions.unwrap_or(defaults.total),
            per_client: u.max_sessions_per_client.unwrap_or(defaults.per_client),
        },
        gso: u.gso.unwrap_or(true),
    })
}

fn stun_config(s: &Settings) -> Option<StunConfig> {
    let st = &s.stun;
    if st.no_stun || !st.enabled.unwrap_or(true) {
        return None;
    }
    let addrs = st.listen.clone().unwrap_or_else(|| {
        if s.dev {
            vec!["127.0.0.1:3478".parse().expect("literal")]
        } else {
            vec![
                "0.0.0.0:3478".parse().expect("literal"),
                "[::]:3478".parse().expect("literal"),
            ]
        }
    });
    // RFC 5780 answers "from the other address", so the primary must be a specific IP, listed
    // first; without a list of its own it is the wildcard, which validation refuses.
    let rfc5780 = st.rfc5780_alternate.map(|alternate| Rfc5780Config {
        primary: st
            .listen
            .as_ref()
            .and_then(|l| l.first().copied())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 3478))),
        alternate,
    });
    let tcp = st.tcp.unwrap_or(true);
    Some(StunConfig {
        udp_addrs: addrs.clone(),
        tcp_addrs: if tcp { addrs } else { Vec::new() },
        software: st.software.clone(),
        rfc5780,
        ..Default::default()
    })
}

fn limits(s: &Settings) -> Limits {
    let l = &s.limits;
    let d = Limits::default();
    Limits {
        max_connections: l.max_connections.unwrap_or(d.max_connections),
        handshake_timeout: l.handshake_timeout.unwrap_or(d.handshake_timeout),
        write_timeout: l.write_timeout.unwrap_or(d.write_timeout),
        frame_timeout: l.frame_timeout.unwrap_or(d.frame_timeout),
        keepalive_interval: l.keepalive_interval.unwrap_or(d.keepalive_interval),
        queue_depth: l.queue_depth.unwrap_or(d.queue_depth),
        queue_bytes: l.queue_bytes.unwrap_or(d.queue_bytes),
        mesh_queue_bytes: l.mesh_queue_bytes.unwrap_or(d.mesh_queue_bytes),
        watcher_backlog: l.watcher_backlog.unwrap_or(d.watcher_backlog),
        shutdown_timeout: l.shutdown_timeout.unwrap_or(d.shutdown_timeout),
        client_rate_limit: l.client_rate_limit.unwrap_or(d.client_rate_limit),
        client_rate_burst: l.client_rate_burst.unwrap_or(d.client_rate_burst),
        accept_rate: l.accept_rate.unwrap_or(d.accept_rate),
        accept_burst: l.accept_burst.unwrap_or(d.accept_burst),
        max_connections_per_ip: l.max_connections_per_ip.unwrap_or(d.max_connections_per_ip),
        ..d
    }
}

/// The mesh key file and the peers; `None` peers when neither a list nor a DNS name is given.
fn mesh_config(s: &Settings, listen_port: u16) -> (Option<PathBuf>, Option<MeshConfig>) {
    let m = &s.mesh;
    let peers = m.peers.clone().unwrap_or_default();
    if peers.is_empty() && m.dns.is_none() {
        return (m.key_file.clone(), None);
    }
    let tls = if s.dev {
        MeshTls::Plain
    } else {
        MeshTls::Verify {
            ca_file: m.ca_file.clone(),
            name: m.tls_name.clone(),
        }
    };
    let dns = m.dns.clone().map(|name| MeshDns {
        name,
        port: m.dns_port.unwrap_or(listen_port),
        interval: m.dns_interval.unwrap_or(Duration::from_secs(30)),
    });
    (m.key_file.clone(), Some(MeshConfig { peers, dns, tls }))
}

/// `None` when neither an allowlist nor a verify URL is set (an empty URL is none).
fn admission_config(s: &Settings) -> Option<AdmissionConfig> {
    let a = &s.admission;
    let d = AdmissionConfig::default();
    let cfg = AdmissionConfig {
        allowlist_file: a.allowlist_file.clone(),
        verify_url: a.verify_url.clone().filter(|u| !u.is_empty()),
        verify_timeout: a.verify_timeout.unwrap_or(d.verify_timeout),
        verify_fail: a.verify_fail.unwrap_or(d.verify_fail),
        ..d
    };
    (cfg.allowlist_file.is_some() || cfg.verify_url.is_some()).then_some(cfg)
}

/// A library field and the setting an operator changes for it.
struct Setting {
    /// [`ConfigError::field`].
    field: &'static str,
    /// The clap argument id, if the setting has a flag.
    arg: Option<&'static str>,
    /// The file section (`None`: top level) and key.
    section: Option<&'static str>,
    key: &'static str,
    advice: Advice,
}

enum Advice {
    /// Follows where the value was given ("config file F: line N: [limits] queue_depth").
    At(&'static str),
    /// A whole sentence (for a setting that is missing rather than wrong).
    Whole(&'static str),
}

const fn at(
    field: &'static str,
    arg: Option<&'static str>,
    section: Option<&'static str>,
    key: &'static str,
    fix: &'static str,
) -> Setting {
    Setting {
        field,
        arg,
        section,
        key,
        advice: Advice::At(fix),
    }
}

const LIMITS: Option<&str> = Some("limits");

/// Every [`ConfigError::field`] the binary's settings can produce.
const SETTINGS: &[Setting] = &[
    at("limits.max_connections", Some("max_connections"), LIMITS, "max_connections",
        "must be at least 1 (default 100000)"),
    at("limits.queue_depth", None, LIMITS, "queue_depth", "must be at least 1 (default 32)"),
    at("limits.accept_rate", Some("accept_rate"), LIMITS, "accept_rate",
        "must be a number of connections per second, at least 0 (0 turns the limit off)"),
    at("limits.handshake_timeout", None, LIMITS, "handshake_timeout",
        "must be more than 0 (default \"10s\")"),
    at("limits.write_timeout", None, LIMITS, "write_timeout", "must be more than 0 (default \"2s\")"),
    at("limits.frame_timeout", None, LIMITS, "frame_timeout", "must be more than 0 (default \"30s\")"),
    at("limits.keepalive_interval", None, LIMITS, "keepalive_interval",
        "must be more than 0 (default \"60s\")"),
    at("tls.acme.hostname", Some("hostname"), None, "hostname",
        "cannot get an ACME certificate: point a DNS name at this relay and use it as the hostname, or use --cert-mode self-signed (clients pin it with CertName)"),
    at("tls.acme.directory", Some("acme_directory"), Some("tls"), "acme_directory",
        "must be an https:// URL (the default is Let's Encrypt's)"),
    at("http_listen", Some("http_listen"), None, "http_listen",
        "is off, but ACME answers the CA's HTTP-01 challenge on the port-80 listener: set it to e.g. 0.0.0.0:80 (the CA must reach it on port 80)"),
    Setting {
        field: "mesh_key",
        arg: Some("mesh_key_file"),
        section: Some("mesh"),
        key: "key_file",
        advice: Advice::Whole("mesh peers are configured but no mesh key: set --mesh-psk-file (or [mesh] key_file) to a file with 64 hex characters, the same on every relay of the region (e.g. `openssl rand -hex 32 > mesh.key`)"),
    },
    at("mesh.peers", Some("mesh_with"), Some("mesh"), "peers",
        "must list host:port peers, e.g. derp1b.example.com:443 or [2001:db8::1]:443"),
    at("mesh.dns.interval", None, Some("mesh"), "dns_interval",
        "must be more than 0 (default \"30s\")"),
    at("admission.verify_url", Some("verify_url"), Some("admission"), "verify_url",
        "must be an http:// or https:// URL, e.g. http://headscale:8080/verify"),
    at("admission.verify_timeout", Some("verify_timeout"), Some("admission"), "verify_timeout",
        "is 0: give the verify URL a bound such as \"2s\""),
    at("udp_relay.max_sessions", None, Some("udp_relay"), "max_sessions",
        "must be 1 to 16777215 (default 100000), or turn the UDP relay off with listen = \"off\" (--udp-relay-listen off)"),
    at("udp_relay.max_sessions_per_client", None, Some("udp_relay"), "max_sessions_per_client",
        "must be at least 1 (default 16)"),
    at("stun.udp_addrs", Some("stun_listen"), Some("stun"), "listen",
        "is empty: list at least one address (e.g. listen = [\"0.0.0.0:3478\"]), or set enabled = false (--no-stun) to run without STUN"),
    at("stun.rfc5780.primary", None, Some("stun"), "rfc5780_alternate",
        "needs the first STUN listen address to be a specific IP (e.g. listen = [\"192.0.2.1:3478\"]), not a wildcard: replies must come from known addresses"),
];

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{given, Top};

    fn sources(args: &[&str], file: &str) -> Sources {
        let matches = <Top as clap::CommandFactory>::command()
            .no_binary_name(true)
            .try_get_matches_from(args)
            .unwrap();
        let top = <Top as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
        let file = (!file.is_empty()).then(|| ConfigFile::for_test("relay.toml", file));
        Sources {
            cli: top.settings,
            file,
            given: given(&matches),
        }
    }

    fn resolve(args: &[&str], file: &str) -> Result<Resolved> {
        sources(args, file).resolve()
    }

    #[test]
    fn dev_and_production_defaults() {
        let r = resolve(&["--dev"], "").unwrap();
        let c = r.view();
        assert_eq!(c.listen, "127.0.0.1:3340".parse().unwrap());
        assert!(c.tls.is_none() && c.http_listen.is_none());
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(
            c.stun.as_ref().unwrap().udp_addrs,
            vec!["127.0.0.1:3478".parse().unwrap()]
        );
        assert!(r.key_file.is_none(), "ephemeral key in --dev");

        let r = resolve(&["--hostname", "relay.example.com"], "").unwrap();
        let c = r.view();
        assert_eq!(c.listen, "0.0.0.0:443".parse().unwrap());
        assert_eq!(c.http_listen, Some("0.0.0.0:80".parse().unwrap()));
        assert_eq!(c.stun.as_ref().unwrap().udp_addrs.len(), 2);
        assert_eq!(r.key_file.as_deref(), Some(Path::new(DEFAULT_KEY_PATH)));
        match &c.tls {
            Some(TlsConfig::SelfSigned { names, dir }) => {
                assert_eq!(names, &["relay.example.com".to_string()]);
                assert_eq!(dir, Path::new("/var/lib/ferry"));
            }
            other => panic!("{other:?}"),
        }
        r.check().unwrap();
    }

    #[test]
    fn the_udp_relay_is_on_by_default_ephemeral_in_dev_and_can_be_turned_off() {
        let udp = |args: &[&str], file: &str| resolve(args, file).unwrap().view().udp_relay.clone();
        let prod = udp(&["--hostname", "r.example"], "").unwrap();
        assert_eq!(prod.listen, "[::]:3480".parse().unwrap());
        assert!(prod.advertise.is_empty());
        assert_eq!(
            prod.limits,
            ferry_relay::server::udprelay::Limits::default()
        );
        // --dev: beside STUN, on a port of its own choosing (clients learn it when allocating).
        assert_eq!(
            udp(&["--dev"], "").unwrap().listen,
            "127.0.0.1:0".parse().unwrap()
        );
        assert_eq!(
            udp(&["--dev", "--stun-listen", "203.0.113.1:3478"], "")
                .unwrap()
                .listen,
            "203.0.113.1:0".parse().unwrap()
        );
        assert_eq!(udp(&["--dev", "--udp-relay-listen", "off"], ""), None);
        let f = udp(
            &["--dev", "--udp-relay-advertise", "198.51.100.1:3480"],
            "[udp_relay]\nlisten = \"0.0.0.0:4000\"\nmax_sessions = 50\nmax_sessions_per_client = 2\n",
        )
        .unwrap();
        assert_eq!(f.listen, "0.0.0.0:4000".parse().unwrap());
        assert_eq!(f.advertise, vec!["198.51.100.1:3480".parse().unwrap()]);
        assert_eq!((f.limits.total, f.limits.per_client), (50, 2));
        assert_eq!(udp(&["--dev"], "[udp_relay]\nlisten = \"off\"\n"), None);
        let e = resolve(&["--dev"], "[udp_relay]\nmax_sessions_per_client = 0\n")
            .unwrap()
            .check()
            .unwrap_err();
        assert!(
            format!("{e:#}").starts_with(
                "config file relay.toml: line 2: [udp_relay] max_sessions_per_client must be at least 1"
            ),
            "{e:#}"
        );
    }

    #[test]
    fn flags_win_over_the_file_and_the_cert_dir_follows_the_key_file() {
        let r = resolve(
            &["--hostname", "b.example", "--key-file", "/srv/k/relay.key", "--max-connections", "7"],
            "hostname = \"a.example\"\nlisten = \"127.0.0.1:8443\"\n[limits]\nmax_connections = 9\nqueue_depth = 4\n[stun]\nlisten = [\"192.0.2.1:3478\"]\ntcp = false\n",
        )
        .unwrap();
        let c = r.view();
        assert_eq!(c.hostname.as_deref(), Some("b.example"));
        assert_eq!(c.listen.port(), 8443);
        assert_eq!((c.limits.max_connections, c.limits.queue_depth), (7, 4));
        let stun = c.stun.as_ref().unwrap();
        assert_eq!(stun.udp_addrs, vec!["192.0.2.1:3478".parse().unwrap()]);
        assert!(stun.tcp_addrs.is_empty());
        match &c.tls {
            Some(TlsConfig::SelfSigned { dir, .. }) => assert_eq!(dir, Path::new("/srv/k")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_tls_record_layer_is_ferrys_unless_the_file_or_a_flag_says_rustls() {
        let layer = |args: &[&str], file: &str| resolve(args, file).unwrap().view().tls_records;
        let host = ["--hostname", "a.example"];
        assert_eq!(layer(&host, ""), TlsRecords::Ferry);
        assert_eq!(
            layer(&host, "[tls]\nrecord_layer = \"rustls\"\n"),
            TlsRecords::Rustls
        );
        let flag = ["--hostname", "a.example", "--tls-record-layer", "ferry"];
        assert_eq!(
            layer(&flag, "[tls]\nrecord_layer = \"rustls\"\n"),
            TlsRecords::Ferry
        );
    }

    #[test]
    fn log_filter_order_is_flag_rust_log_file() {
        let s = sources(&["--dev"], "log_level = \"warn\"\n");
        assert_eq!(s.logging(Some("debug".into())).1, "debug");
        assert_eq!(s.logging(None).1, "warn");
        let s = sources(&["--dev", "--log-level", "error"], "log_level = \"warn\"\n");
        assert_eq!(s.logging(Some("debug".into())).1, "error");
        assert_eq!(sources(&["--dev"], "").logging(None).1, "info");
    }

    #[test]
    fn refusals_name_the_flag_or_the_file_line_and_key() {
        let e = resolve(&["--dev", "--max-connections", "0"], "")
            .unwrap()
            .check()
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with("--max-connections (FERRY_MAX_CONNECTIONS) must be at least 1")
                && msg.contains("limits.max_connections is 0"),
            "{msg}"
        );
        let e = resolve(&["--dev"], "\n[limits]\nmax_connections = 0\n")
            .unwrap()
            .check()
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with(
                "config file relay.toml: line 3: [limits] max_connections must be at least 1"
            ),
            "{msg}"
        );
        let e = resolve(&["--dev", "--mesh-with", "a.example:443"], "")
            .unwrap()
            .check()
            .unwrap_err();
        assert!(format!("{e:#}").contains("--mesh-psk-file"), "{e:#}");
    }

    #[test]
    fn every_explained_field_names_a_real_flag() {
        for s in SETTINGS {
            if let Some(id) = s.arg {
                assert!(flag_and_env(id).is_some(), "{}: no argument {id}", s.field);
            }
        }
    }

    #[test]
    fn help_parses() {
        Top::try_parse_from(["ferry-relay", "--help"]).unwrap_err();
        <Top as clap::CommandFactory>::command().debug_assert();
    }
}
