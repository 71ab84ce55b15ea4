//! `ferry-relay` without a subcommand: resolve, check, load the keys, spawn the relay, print
//! the ready line, and drain on SIGTERM.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ferry_relay::proto::SecretKey;
use ferry_relay::server::{cert_name_pin, keyfile, Server};
use tracing::{error, info, warn};

use crate::resolve::Sources;
use crate::settings::LogFormat;

pub(crate) async fn run(sources: Sources) -> Result<()> {
    let (format, level) = sources.logging(std::env::var("RUST_LOG").ok());
    init_logging(format, &level)?;

    let resolved = sources.resolve()?;
    // Before anything is created on disk: a refused config leaves no new key file behind.
    resolved.check()?;
    let server_key = match &resolved.key_file {
        None => SecretKey::generate(),
        Some(p) => {
            let (k, created) = keyfile::load_or_create(p).map_err(crate::advice::key_file)?;
            if created {
                info!(path = %p.display(), "created a new server key");
            }
            k
        }
    };
    let mesh_key = match &resolved.mesh_key_file {
        Some(p) => Some(read_mesh_key(p)?),
        None => None,
    };
    let config = resolved.config(server_key, mesh_key);
    let hostname = config.hostname.clone();
    if resolved.dev {
        warn!("development mode: plain HTTP, no TLS. Never expose this to a network");
    }
    // Signal handlers before the relay says it is ready: a SIGTERM or SIGHUP that follows the
    // ready line must never meet the default action (which kills the process).
    let signals = Signals::install()?;
    let server = Server::spawn(config).await.map_err(crate::advice::spawn)?;

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
        "ferry-relay {} ready: DERP {}://{}:{}/derp, STUN {}, UDP relay {}, metrics {}, server key {}",
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
            .udp_relay_addr()
            .map_or_else(|| "off".to_string(), |a| a.to_string()),
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
                    Err(e) => error!(error = %crate::chain(&crate::advice::tls(e)), "SIGHUP: certificate reload failed; still serving the previous one"),
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
