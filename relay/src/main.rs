//! `ferry-relay`: parse flags, environment and the config file, then run [`Server::spawn`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_relay::proto::SecretKey;
use ferry_relay::server::config_file::{CertMode, FileConfig, Listen, LogFormat};
use ferry_relay::server::{
    cert_name_pin, keyfile, AcmeConfig, Config, Limits, Server, StunConfig, TlsConfig,
    LETS_ENCRYPT_DIRECTORY,
};
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

  With certificates you manage (reloaded on SIGHUP without dropping clients):
    ferry-relay --hostname relay.example.com --cert-mode manual \\
      --cert-file /etc/ferry/fullchain.pem --cert-key-file /etc/ferry/privkey.pem

Signals: SIGTERM/SIGINT drain gracefully (clients that understand it are told to reconnect),
SIGHUP reloads manual certificate files.
Ports: DERP 443/tcp, STUN 3478/udp+tcp, captive-portal check 80/tcp, metrics 127.0.0.1:9090.
See docs/operating.md.";

#[derive(Debug, Parser)]
#[command(name = "ferry-relay", version, about = ABOUT, after_help = AFTER_HELP)]
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
        shutdown_timeout: cli
            .shutdown_timeout
            .or(l.shutdown_timeout)
            .unwrap_or(d.shutdown_timeout),
        ..d
    };
    if limits.queue_depth == 0 || limits.max_connections == 0 {
        bail!("queue_depth and max_connections must be at least 1");
    }
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
            mesh_key: None,
            hostname: hostname.clone(),
            limits,
            install_global_recorder: true,
        },
        hostname,
    ))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-relay: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
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

    wait_for_signals(&server).await?;
    info!("shutting down: draining connections");
    let hard = server.shutdown().await;
    if hard > 0 {
        warn!(hard_closed = hard, "some connections did not drain in time");
    }
    info!("stopped");
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signals(server: &Server) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => match server.reload_tls() {
                Ok(()) => info!("SIGHUP: certificate reloaded"),
                Err(e) => error!(error = %e, "SIGHUP: certificate reload failed; still serving the previous one"),
            },
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signals(_server: &Server) -> Result<()> {
    tokio::signal::ctrl_c().await?;
    Ok(())
}
