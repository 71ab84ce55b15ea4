//! `ferry-relay`: parse flags, environment and the config file, then run [`Server::spawn`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_relay::proto::SecretKey;
use ferry_relay::server::config_file::{CertMode, FileConfig, Listen, LogFormat};
use ferry_relay::server::derpmap::RegionEntry;
use ferry_relay::server::{
    cert_name_pin, keyfile, AcmeConfig, Config, Limits, MeshConfig, MeshDns, MeshTls, Server,
    StunConfig, TlsConfig, LETS_ENCRYPT_DIRECTORY,
};
use ferry_relay::server::{AdmissionConfig, VerifyFail};
use tracing::{error, info, warn};

const ABOUT: &str =
    "A DERP v2 relay (wire-compatible with Tailscale's clients) with a STUN server beside it.";

const AFTER_HELP: &str = "\
Precedence: flags > FERRY_* environment variables > --config file > defaults.

Examples:
  Try it on this machine (plain HTTP on 127.0.0.1:3340, STUN on 127.0.0.1:3478, nothing written):
    ferry-relay --dev

  A production relay with a self-signed certificate (prints the CertName pin for the DERP map):
    ferry-relay --hostname relay.example.com --key-file /var/lib/ferry/relay.key

  With a Let's Encrypt certificate (HTTP-01: port 80 must reach this relay; cached in --cert-dir):
    ferry-relay --hostname relay.example.com --cert-mode acme --acme-email ops@example.com

  With certificates you manage (reloaded when the files change, or on SIGHUP; clients stay):
    ferry-relay --hostname relay.example.com --cert-mode manual \\
      --cert-file /etc/ferry/fullchain.pem --cert-key-file /etc/ferry/privkey.pem

Signals: SIGTERM/SIGINT drain gracefully (clients that understand it are told to reconnect),
SIGHUP reloads manual certificate files.
Ports: DERP 443/tcp, STUN 3478/udp+tcp, captive-portal check 80/tcp, metrics 127.0.0.1:9090.
See docs/operating.md.";

#[derive(Debug, Parser)]
#[command(name = "ferry-relay", version, about = ABOUT, after_help = AFTER_HELP)]
struct Top {
    #[command(flatten)]
    cli: Cli,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// Without a subcommand, ferry-relay runs the relay.
#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// GET a health URL once: exit 0 on 200, 1 with the reason otherwise (for container health
    /// checks; the image has no curl).
    Healthcheck {
        /// The URL (plain HTTP; the metrics listener serves /healthz).
        #[arg(long, default_value = "http://127.0.0.1:9090/healthz")]
        url: String,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print this relay's DERP map region (for Tailscale's policy file or Headscale's
    /// derp.paths) from the same flags, FERRY_* variables and --config file as the relay.
    /// Put server flags after `derpmap`.
    #[command(
        after_help = "Examples:\n  ferry-relay derpmap --config /etc/ferry/relay.toml\n  \
        ferry-relay derpmap --config /etc/ferry/relay.toml --format headscale --derp-port 443\n\n\
        A self-signed certificate is pinned with CertName; it is read from the cert directory \
        (start the relay once to create it)."
    )]
    Derpmap(Box<DerpmapArgs>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MapFormat {
    /// Tailscale's DERPMap JSON (policy file `derpMap`, derpprobe -derp-map).
    Json,
    /// Headscale's derp.yaml (a file under `derp.paths`).
    Headscale,
}

#[derive(Debug, clap::Args)]
struct DerpmapArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    format: MapFormat,
    /// RegionID [default: 900].
    #[arg(long, env = "FERRY_DERPMAP_REGION_ID")]
    region_id: Option<u32>,
    /// RegionCode [default: ferry].
    #[arg(long, env = "FERRY_DERPMAP_REGION_CODE")]
    region_code: Option<String>,
    /// RegionName [default: the region code].
    #[arg(long, env = "FERRY_DERPMAP_REGION_NAME")]
    region_name: Option<String>,
    /// The node's Name [default: <region id>a].
    #[arg(long, env = "FERRY_DERPMAP_NODE_NAME")]
    node_name: Option<String>,
    /// The node's IPv4 address, if clients should not resolve the host name.
    #[arg(long, env = "FERRY_DERPMAP_IPV4")]
    ipv4: Option<std::net::Ipv4Addr>,
    /// The node's IPv6 address.
    #[arg(long, env = "FERRY_DERPMAP_IPV6")]
    ipv6: Option<std::net::Ipv6Addr>,
    /// Public DERP port, if not the listen port (behind a load balancer: 443 -> 8443).
    #[arg(long, env = "FERRY_DERPMAP_DERP_PORT")]
    derp_port: Option<u16>,
    /// Public STUN port [default: the first STUN listen port; -1 with STUN off].
    #[arg(long, env = "FERRY_DERPMAP_STUN_PORT", allow_negative_numbers = true)]
    stun_port: Option<i32>,
    #[command(flatten)]
    cli: Cli,
}

#[derive(Debug, clap::Args)]
struct Cli {
    /// TOML config file (see relay/ferry-relay.example.toml).
    #[arg(long, short = 'c', env = "FERRY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Development mode: plain HTTP on 127.0.0.1:3340, STUN on 127.0.0.1:3478, metrics on
    /// 127.0.0.1:9090, an ephemeral server key unless --key-file is given. Never for production.
    #[arg(long, env = "FERRY_DEV")]
    dev: bool,

    /// DERP listen address [default: 0.0.0.0:443; --dev: 127.0.0.1:3340].
    #[arg(long, env = "FERRY_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// Name or IP clients use to reach this relay (certificate, redirects). Required unless --dev.
    #[arg(long, env = "FERRY_HOSTNAME")]
    hostname: Option<String>,

    /// Server private key file, created on first start [default: /var/lib/ferry/relay.key].
    #[arg(long, env = "FERRY_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,

    /// Where the TLS certificate comes from [default: self-signed].
    #[arg(long, env = "FERRY_CERT_MODE", value_enum)]
    cert_mode: Option<CertMode>,

    /// Manual mode: PEM certificate chain.
    #[arg(long, env = "FERRY_CERT_FILE", value_name = "FILE")]
    cert_file: Option<PathBuf>,

    /// Manual mode: PEM private key of the certificate.
    #[arg(long, env = "FERRY_CERT_KEY_FILE", value_name = "FILE")]
    cert_key_file: Option<PathBuf>,

    /// Self-signed and ACME modes: where the certificate (and ACME account) is kept
    /// [default: the key file's directory].
    #[arg(long, env = "FERRY_CERT_DIR", value_name = "DIR")]
    cert_dir: Option<PathBuf>,

    /// ACME mode: contact e-mail for the CA (expiry notices).
    #[arg(long, env = "FERRY_ACME_EMAIL")]
    acme_email: Option<String>,

    /// ACME mode: the CA's directory URL [default: Let's Encrypt production].
    #[arg(long, env = "FERRY_ACME_DIRECTORY", value_name = "URL")]
    acme_directory: Option<String>,

    /// ACME mode: PEM CA certificate to trust for the ACME server itself (private CA, pebble).
    #[arg(long, env = "FERRY_ACME_CA_FILE", value_name = "FILE")]
    acme_ca_file: Option<PathBuf>,

    /// Port-80 listener (captive-portal check, HTTPS redirect), or `off` [default: 0.0.0.0:80; --dev: off].
    #[arg(long, env = "FERRY_HTTP_LISTEN", value_name = "ADDR|off")]
    http_listen: Option<Listen>,

    /// Prometheus metrics listener, or `off` [default: 127.0.0.1:9090].
    #[arg(long, env = "FERRY_METRICS_LISTEN", value_name = "ADDR|off")]
    metrics_listen: Option<Listen>,

    /// Mesh key file (64 hex characters, the same on every relay of the region; derper's
    /// --mesh-psk-file format). Clients presenting it may watch connections and forward.
    #[arg(
        long = "mesh-psk-file",
        env = "FERRY_MESH_KEY_FILE",
        value_name = "FILE"
    )]
    mesh_key_file: Option<PathBuf>,

    /// Mesh peers, host:port, comma-separated (derper's --mesh-with). This relay may be listed.
    #[arg(
        long = "mesh-with",
        env = "FERRY_MESH_WITH",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    mesh_with: Vec<String>,

    /// Mesh peers from DNS: every A/AAAA record of this name (e.g. a headless Service).
    #[arg(long, env = "FERRY_MESH_DNS", value_name = "NAME")]
    mesh_dns: Option<String>,

    /// The name mesh peers' certificates must carry [default: a static peer's host; for DNS
    /// peers, --hostname].
    #[arg(long, env = "FERRY_MESH_TLS_NAME")]
    mesh_tls_name: Option<String>,

    /// Extra PEM trust anchors for mesh peers' certificates.
    #[arg(long, env = "FERRY_MESH_CA_FILE", value_name = "FILE")]
    mesh_ca_file: Option<PathBuf>,

    /// Don't run the STUN server.
    #[arg(long, env = "FERRY_NO_STUN")]
    no_stun: bool,

    /// STUN address (UDP and TCP); repeat for several [default: 0.0.0.0:3478 and [::]:3478; --dev: 127.0.0.1:3478].
    #[arg(
        long = "stun-listen",
        env = "FERRY_STUN_LISTEN",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    stun_listen: Vec<SocketAddr>,

    /// SOFTWARE attribute in STUN replies [default: none].
    #[arg(long, env = "FERRY_STUN_SOFTWARE")]
    stun_software: Option<String>,

    /// Most connections at once [default: 100000].
    #[arg(long, env = "FERRY_MAX_CONNECTIONS")]
    max_connections: Option<usize>,

    /// Per-client receive rate in bytes/s; a faster client's reads are paused (TCP pushes
    /// back), nothing is dropped. Mesh peers are exempt. 0 = off [default: 0].
    #[arg(long, env = "FERRY_CLIENT_RATE_LIMIT", value_name = "BYTES")]
    client_rate_limit: Option<u64>,

    /// Burst of the receive rate in bytes [default and minimum: 65568, one packet].
    #[arg(long, env = "FERRY_CLIENT_RATE_BURST", value_name = "BYTES")]
    client_rate_burst: Option<u64>,

    /// New DERP connections accepted per second; the excess is closed at accept. 0 = off [default: 0].
    #[arg(long, env = "FERRY_ACCEPT_RATE", value_name = "PER_SECOND")]
    accept_rate: Option<f64>,

    /// Burst of the accept rate [default: the rate, at least 1].
    #[arg(long, env = "FERRY_ACCEPT_BURST")]
    accept_burst: Option<u32>,

    /// DERP connections at once from one source IP. 0 = off [default: 0].
    #[arg(long, env = "FERRY_MAX_CONNECTIONS_PER_IP")]
    max_connections_per_ip: Option<u32>,

    /// Only node keys in this file may connect (`nodekey:<hex>` per line, `#` comments);
    /// re-read when it changes.
    #[arg(long, env = "FERRY_ALLOWLIST_FILE", value_name = "FILE")]
    allowlist_file: Option<PathBuf>,

    /// Admission URL compatible with derper's --verify-client-url (e.g. Headscale's /verify):
    /// POST {"NodePublic","Source"}, admit on {"Allow":true}.
    #[arg(
        long = "verify-client-url",
        env = "FERRY_VERIFY_CLIENT_URL",
        value_name = "URL"
    )]
    verify_url: Option<String>,

    /// Bound on one verify request [default: 2s].
    #[arg(long, env = "FERRY_VERIFY_TIMEOUT", value_parser = humantime::parse_duration)]
    verify_timeout: Option<Duration>,

    /// When the verify URL cannot answer: refuse (closed) or admit (open) [default: closed].
    #[arg(long, env = "FERRY_VERIFY_FAIL", value_enum)]
    verify_fail: Option<VerifyFail>,

    /// Seconds allowed for a graceful shutdown [default: 10s].
    #[arg(long, env = "FERRY_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration)]
    shutdown_timeout: Option<Duration>,

    /// Log format [default: text].
    #[arg(long, env = "FERRY_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,

    /// Log filter, e.g. `info` or `ferry_relay=debug` [default: info; RUST_LOG also works].
    #[arg(long, env = "FERRY_LOG_LEVEL")]
    log_level: Option<String>,
}

fn init_logging(format: LogFormat, level: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level).with_context(|| {
        format!("log level `{level}` is not a valid filter; try `info` or `ferry_relay=debug`")
    })?;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_on_stderr())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
    Ok(())
}

/// Merges flags, file and defaults into a server config.
fn build_config(cli: &Cli, file: &FileConfig) -> Result<(Config, Option<String>)> {
    let dev = cli.dev;
    let hostname = cli.hostname.clone().or_else(|| file.hostname.clone());
    let listen = cli.listen.or(file.listen).unwrap_or_else(|| {
        if dev { "127.0.0.1:3340" } else { "0.0.0.0:443" }
            .parse()
            .expect("literal")
    });
    let key_path = cli.key_file.clone().or_else(|| file.key_file.clone());

    let server_key = match (&key_path, dev) {
        (None, true) => SecretKey::generate(),
        (p, _) => {
            let p = p
                .clone()
                .unwrap_or_else(ferry_relay::server::default_key_path);
            let (k, created) = keyfile::load_or_create(&p)?;
            if created {
                info!(path = %p.display(), "created a new server key");
            }
            k
        }
    };

    let tls = if dev {
        None
    } else {
        let Some(host) = hostname.clone() else {
            bail!("--hostname is required (or `hostname` in the config file): the name or IP address clients use to reach this relay. For a local trial, use --dev");
        };
        let mode = cli
            .cert_mode
            .or(file.tls.mode)
            .unwrap_or(CertMode::SelfSigned);
        let cert_dir = cli
            .cert_dir
            .clone()
            .or_else(|| file.tls.dir.clone())
            .unwrap_or_else(|| {
                key_path
                    .as_deref()
                    .and_then(Path::parent)
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| {
                        ferry_relay::server::default_key_path()
                            .parent()
                            .expect("has parent")
                            .into()
                    })
            });
        Some(match mode {
            CertMode::Acme => TlsConfig::Acme(AcmeConfig {
                hostname: host,
                email: cli
                    .acme_email
                    .clone()
                    .or_else(|| file.tls.acme_email.clone()),
                directory: cli
                    .acme_directory
                    .clone()
                    .or_else(|| file.tls.acme_directory.clone())
                    .unwrap_or_else(|| LETS_ENCRYPT_DIRECTORY.into()),
                ca_file: cli
                    .acme_ca_file
                    .clone()
                    .or_else(|| file.tls.acme_ca_file.clone()),
                dir: cert_dir,
            }),
            CertMode::Manual => {
                let cert = cli.cert_file.clone().or_else(|| file.tls.cert_file.clone());
                let key = cli
                    .cert_key_file
                    .clone()
                    .or_else(|| file.tls.key_file.clone());
                match (cert, key) {
                    (Some(cert_path), Some(key_path)) => TlsConfig::Manual { cert_path, key_path },
                    _ => bail!("cert mode `manual` needs both --cert-file and --cert-key-file (or [tls] cert_file and key_file in the config file); or use --cert-mode self-signed"),
                }
            }
            CertMode::SelfSigned => TlsConfig::SelfSigned {
                names: vec![host],
                dir: cert_dir,
            },
        })
    };

    let stun_enabled = !cli.no_stun && file.stun.enabled.unwrap_or(true);
    // RFC 5780 answers "from the other address", so the primary must be a specific IP.
    let rfc5780 = match file.stun.rfc5780_alternate {
        None => None,
        Some(alternate) => {
            let primary = cli
                .stun_listen
                .first()
                .copied()
                .or_else(|| file.stun.listen.as_ref().and_then(|l| l.first().copied()));
            match primary {
                Some(p) if !p.ip().is_unspecified() => Some(ferry_relay::server::Rfc5780Config { primary: p, alternate }),
                _ => bail!(
                    "[stun] rfc5780_alternate needs the first STUN listen address to be a specific IP \
                     (e.g. listen = [\"192.0.2.1:3478\"]), not a wildcard: replies must come from known addresses"
                ),
            }
        }
    };
    let stun = stun_enabled.then(|| {
        let addrs = if !cli.stun_listen.is_empty() {
            cli.stun_listen.clone()
        } else if let Some(l) = &file.stun.listen {
            l.clone()
        } else if dev {
            vec!["127.0.0.1:3478".parse().expect("literal")]
        } else {
            vec![
                "0.0.0.0:3478".parse().expect("literal"),
                "[::]:3478".parse().expect("literal"),
            ]
        };
        let tcp = file.stun.tcp.unwrap_or(true);
        StunConfig {
            udp_addrs: addrs.clone(),
            tcp_addrs: if tcp { addrs } else { Vec::new() },
            software: cli
                .stun_software
                .clone()
                .or_else(|| file.stun.software.clone()),
            rfc5780,
            ..Default::default()
        }
    });

    let d = Limits::default();
    let l = &file.limits;
    let limits = Limits {
        max_connections: cli
            .max_connections
            .or(l.max_connections)
            .unwrap_or(d.max_connections),
        handshake_timeout: l.handshake_timeout.unwrap_or(d.handshake_timeout),
        write_timeout: l.write_timeout.unwrap_or(d.write_timeout),
        keepalive_interval: l.keepalive_interval.unwrap_or(d.keepalive_interval),
        queue_depth: l.queue_depth.unwrap_or(d.queue_depth),
        queue_bytes: l.queue_bytes.unwrap_or(d.queue_bytes),
        mesh_queue_bytes: l.mesh_queue_bytes.unwrap_or(d.mesh_queue_bytes),
        watcher_backlog: l.watcher_backlog.unwrap_or(d.watcher_backlog),
        shutdown_timeout: cli
            .shutdown_timeout
            .or(l.shutdown_timeout)
            .unwrap_or(d.shutdown_timeout),
        client_rate_limit: cli
            .client_rate_limit
            .or(l.client_rate_limit)
            .unwrap_or(d.client_rate_limit),
        client_rate_burst: cli
            .client_rate_burst
            .or(l.client_rate_burst)
            .unwrap_or(d.client_rate_burst),
        accept_rate: cli.accept_rate.or(l.accept_rate).unwrap_or(d.accept_rate),
        accept_burst: cli
            .accept_burst
            .or(l.accept_burst)
            .unwrap_or(d.accept_burst),
        max_connections_per_ip: cli
            .max_connections_per_ip
            .or(l.max_connections_per_ip)
            .unwrap_or(d.max_connections_per_ip),
        ..d
    };
    if !limits.accept_rate.is_finite() || limits.accept_rate < 0.0 {
        bail!(
            "accept_rate ([limits] in {}, or --accept-rate) must be a number of connections per second, at least 0 (0 turns the limit off); got {}",
            config_name(cli),
            limits.accept_rate
        );
    }
    if limits.queue_depth == 0 || limits.max_connections == 0 {
        bail!("queue_depth and max_connections must be at least 1");
    }
    let (mesh_key, mesh) = mesh_config(cli, file, listen.port(), dev)?;
    let http_listen = cli.http_listen.or(file.http_listen).unwrap_or(if dev {
        Listen::Off
    } else {
        Listen::On("0.0.0.0:80".parse().expect("literal"))
    });
    let metrics_listen = cli
        .metrics_listen
        .or(file.metrics_listen)
        .unwrap_or(Listen::On("127.0.0.1:9090".parse().expect("literal")));
    Ok((
        Config {
            listen,
            tls,
            http_listen: http_listen.addr(),
            metrics_listen: metrics_listen.addr(),
            stun,
            server_key,
            mesh_key,
            mesh,
            hostname: hostname.clone(),
            limits,
            admission: admission_config(cli, file)?,
            install_global_recorder: true,
        },
        hostname,
    ))
}

/// The mesh key and peers from flags and file.
fn mesh_config(
    cli: &Cli,
    file: &FileConfig,
    listen_port: u16,
    dev: bool,
) -> Result<(Option<[u8; 32]>, Option<MeshConfig>)> {
    let f = &file.mesh;
    let key_path = cli.mesh_key_file.clone().or_else(|| f.key_file.clone());
    let mesh_key = match &key_path {
        None => None,
        Some(p) => Some(read_mesh_key(p)?),
    };
    let peers = if cli.mesh_with.is_empty() {
        f.peers.clone().unwrap_or_default()
    } else {
        cli.mesh_with.clone()
    };
    let dns = cli.mesh_dns.clone().or_else(|| f.dns.clone());
    if peers.is_empty() && dns.is_none() {
        return Ok((mesh_key, None));
    }
    if mesh_key.is_none() {
        bail!("mesh peers are configured but no mesh key: set --mesh-psk-file (or [mesh] key_file) to a file with 64 hex characters, the same on every relay of the region (e.g. `openssl rand -hex 32 > mesh.key`)");
    }
    let tls = if dev {
        MeshTls::Plain
    } else {
        MeshTls::Verify {
            ca_file: cli.mesh_ca_file.clone().or_else(|| f.ca_file.clone()),
            name: cli.mesh_tls_name.clone().or_else(|| f.tls_name.clone()),
        }
    };
    Ok((
        mesh_key,
        Some(MeshConfig {
            peers,
            dns: dns.map(|name| MeshDns {
                name,
                port: f.dns_port.unwrap_or(listen_port),
                interval: f.dns_interval.unwrap_or(Duration::from_secs(30)),
            }),
            tls,
        }),
    ))
}

/// Reads a mesh key file: 64 hex characters (surrounding whitespace ignored). Read-only files
/// of any mode are fine (Kubernetes Secrets mount 0440).
fn read_mesh_key(p: &Path) -> Result<[u8; 32]> {
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read the mesh key file {}", p.display()))?;
    let hex_text = text.trim();
    let mut key = [0u8; 32];
    if hex_text.len() != 64 || hex::decode_to_slice(hex_text, &mut key).is_err() {
        bail!(
            "{}: a mesh key is 64 hex characters (32 bytes), e.g. made with `openssl rand -hex 32`; this file holds {} characters",
            p.display(),
            hex_text.len()
        );
    }
    Ok(key)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Top::command().get_matches();
    let top = match Top::from_arg_matches(&matches) {
        Ok(t) => t,
        Err(e) => e.exit(),
    };
    let result = match top.command {
        None => run(top.cli).await,
        Some(Cmd::Healthcheck { url, timeout }) => {
            return match ferry_relay::server::healthcheck::check(&url, timeout) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(why) => {
                    eprintln!("ferry-relay healthcheck: unhealthy: {why}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Some(Cmd::Derpmap(args)) => {
            // Flags before `derpmap` belong to the relay's own parser and would be ignored.
            let before: Vec<String> = Top::command()
                .get_arguments()
                .filter(|a| {
                    matches.value_source(a.get_id().as_str())
                        == Some(clap::parser::ValueSource::CommandLine)
                })
                .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
                .collect();
            if before.is_empty() {
                derpmap(*args)
            } else {
                Err(anyhow::anyhow!(
                    "put the relay's flags after `derpmap` (ferry-relay derpmap {} ...), so they are read",
                    before.join(" ")
                ))
            }
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-relay: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// "the config file PATH" or "the config file" (for messages about file keys).
fn config_name(cli: &Cli) -> String {
    match &cli.config {
        Some(p) => format!("the config file {}", p.display()),
        None => "the config file".into(),
    }
}

/// `[admission]` from flags and file; `None` when neither an allowlist nor a URL is set.
fn admission_config(cli: &Cli, file: &FileConfig) -> Result<Option<AdmissionConfig>> {
    let a = &file.admission;
    let d = AdmissionConfig::default();
    let cfg = AdmissionConfig {
        allowlist_file: cli
            .allowlist_file
            .clone()
            .or_else(|| a.allowlist_file.clone()),
        verify_url: cli
            .verify_url
            .clone()
            .or_else(|| a.verify_url.clone())
            .filter(|u| !u.is_empty()),
        verify_timeout: cli
            .verify_timeout
            .or(a.verify_timeout)
            .unwrap_or(d.verify_timeout),
        verify_fail: cli.verify_fail.or(a.verify_fail).unwrap_or(d.verify_fail),
        ..d
    };
    if cfg.verify_timeout.is_zero() {
        bail!(
            "verify_timeout ([admission] in {}, or --verify-timeout) is 0: give the verify URL a bound such as \"2s\"",
            config_name(cli)
        );
    }
    Ok((cfg.allowlist_file.is_some() || cfg.verify_url.is_some()).then_some(cfg))
}

/// `ferry-relay derpmap`: this relay's region, from the same sources as the server. Reads the
/// self-signed certificate if there is one; creates nothing.
fn derpmap(args: DerpmapArgs) -> Result<()> {
    let cli = &args.cli;
    let file = match &cli.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let dm = &file.derpmap;
    let dev = cli.dev;
    let Some(host) = cli.hostname.clone().or_else(|| file.hostname.clone()) else {
        bail!("the DERP map needs the name clients use: set --hostname (FERRY_HOSTNAME, or `hostname` in the config file)");
    };
    let listen_port = cli
        .listen
        .or(file.listen)
        .map(|a| a.port())
        .unwrap_or(if dev { 3340 } else { 443 });
    let stun_enabled = !cli.no_stun && file.stun.enabled.unwrap_or(true);
    let stun_listen_port = cli
        .stun_listen
        .first()
        .copied()
        .or_else(|| file.stun.listen.as_ref().and_then(|l| l.first().copied()))
        .map(|a| a.port() as i32)
        .unwrap_or(3478);
    let stun_port =
        args.stun_port
            .or(dm.stun_port)
            .unwrap_or(if stun_enabled { stun_listen_port } else { -1 });
    let region_id = args.region_id.or(dm.region_id).unwrap_or(900);
    let region_code = args
        .region_code
        .clone()
        .or_else(|| dm.region_code.clone())
        .unwrap_or_else(|| "ferry".into());
    let cert_name = if dev {
        eprintln!("ferry-relay derpmap: --dev serves plain HTTP; Tailscale clients expect TLS, so this map is for local tests only");
        None
    } else {
        match cli
            .cert_mode
            .or(file.tls.mode)
            .unwrap_or(CertMode::SelfSigned)
        {
            CertMode::SelfSigned => {
                let key_path = cli.key_file.clone().or_else(|| file.key_file.clone());
                let dir = cli
                    .cert_dir
                    .clone()
                    .or_else(|| file.tls.dir.clone())
                    .or_else(|| {
                        key_path
                            .as_deref()
                            .and_then(Path::parent)
                            .map(Path::to_path_buf)
                    })
                    .unwrap_or_else(|| {
                        ferry_relay::server::default_key_path()
                            .parent()
                            .expect("has parent")
                            .into()
                    });
                let p = dir.join("self-signed-cert.pem");
                let pem = match std::fs::read(&p) {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                        "the self-signed certificate {} does not exist yet: start the relay once to create it, then run derpmap again (its CertName pin goes into the map)",
                        p.display()
                    ),
                    Err(e) => bail!("cannot read the self-signed certificate {}: {e}", p.display()),
                };
                let der = rustls_pemfile::certs(&mut &pem[..])
                    .next()
                    .and_then(|c| c.ok())
                    .with_context(|| format!("{} holds no PEM certificate; delete it and start the relay to create a new one (the pin changes)", p.display()))?;
                Some(cert_name_pin(&der))
            }
            CertMode::Manual | CertMode::Acme => None,
        }
    };
    let entry = RegionEntry {
        region_id,
        region_name: args
            .region_name
            .clone()
            .or_else(|| dm.region_name.clone())
            .unwrap_or_else(|| region_code.clone()),
        region_code,
        node_name: args
            .node_name
            .clone()
            .or_else(|| dm.node_name.clone())
            .unwrap_or_else(|| format!("{region_id}a")),
        ipv4: args
            .ipv4
            .map(|ip| ip.to_string())
            .or_else(|| dm.ipv4.map(|ip| ip.to_string()))
            .or_else(|| {
                host.parse::<std::net::Ipv4Addr>()
                    .ok()
                    .map(|ip| ip.to_string())
            }),
        ipv6: args
            .ipv6
            .map(|ip| ip.to_string())
            .or_else(|| dm.ipv6.map(|ip| ip.to_string()))
            .or_else(|| {
                host.parse::<std::net::Ipv6Addr>()
                    .ok()
                    .map(|ip| ip.to_string())
            }),
        host_name: host,
        derp_port: args.derp_port.or(dm.derp_port).unwrap_or(listen_port),
        stun_port,
        cert_name,
    };
    match args.format {
        MapFormat::Json => println!("{}", entry.to_json()),
        MapFormat::Headscale => print!("{}", entry.to_headscale_yaml()),
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let file = match &cli.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let format = cli.log_format.or(file.log_format).unwrap_or_default();
    let level = cli
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .or_else(|| file.log_level.clone())
        .unwrap_or_else(|| "info".into());
    init_logging(format, &level)?;

    let (config, hostname) = build_config(&cli, &file)?;
    if cli.dev {
        warn!("development mode: plain HTTP, no TLS. Never expose this to a network");
    }
    // Signal handlers before the relay says it is ready: a SIGTERM or SIGHUP that follows the
    // ready line must never meet the default action (which kills the process).
    let signals = Signals::install()?;
    let server = Server::spawn(config).await?;

    if let Some(der) = server.cert_der() {
        let pin = cert_name_pin(&der);
        info!(cert_name = %pin, "TLS certificate in use (for a self-signed certificate, put this CertName in the DERP map)");
    }
    let stun_port = server
        .stun_udp_addrs()
        .first()
        .map(|a| a.port() as i32)
        .unwrap_or(-1);
    let host = hostname.unwrap_or_else(|| server.listen_addr().ip().to_string());
    println!(
        "ferry-relay {} ready: DERP {}://{}:{}/derp, STUN {}, metrics {}, server key {}",
        env!("CARGO_PKG_VERSION"),
        if server.tls_enabled() {
            "https"
        } else {
            "http"
        },
        host,
        server.listen_addr().port(),
        if stun_port < 0 {
            "off".to_string()
        } else {
            format!("udp+tcp {:?}", server.stun_udp_addrs())
        },
        server
            .metrics_addr()
            .map(|a| format!("http://{a}/metrics"))
            .unwrap_or_else(|| "off".into()),
        server.public_key(),
    );

    signals.wait(&server).await;
    info!("shutting down: draining connections");
    let metrics = server.metrics().clone();
    let hard = server.shutdown().await;
    if hard > 0 {
        warn!(hard_closed = hard, "some connections did not drain in time");
    }
    // The last word on what this process forwarded and dropped: counted after the last scrape
    // (the drain), it would otherwise be lost with the process.
    let (forwarded, dropped, drops) = metrics.packet_totals();
    info!(
        packets_forwarded = forwarded,
        packets_dropped = dropped,
        drops = %drops,
        "stopped"
    );
    Ok(())
}

/// SIGTERM/SIGINT (drain and stop) and SIGHUP (reload certificates).
#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Returns when the relay should stop; reloads certificates on SIGHUP meanwhile.
    async fn wait(mut self, server: &Server) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => match server.reload_tls() {
                    Ok(()) => info!("SIGHUP: certificate reloaded"),
                    Err(e) => error!(error = %e, "SIGHUP: certificate reload failed; still serving the previous one"),
                },
            }
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> Result<Self> {
        Ok(Signals)
    }

    async fn wait(self, _server: &Server) {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Colour in log lines only on a terminal, and never with `NO_COLOR` set (no-color.org): a log
/// written to a file or a pipe carries no escape codes.
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
