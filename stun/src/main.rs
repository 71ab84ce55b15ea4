//! `ferry-stun`: run ferry's STUN server on its own.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use ferry_stun::{Rfc5780Config, StunConfig, StunError, StunServer};

const ABOUT: &str = "STUN server: tells clients behind NAT which public IP address and port \
                     their packets come from";

const LONG_ABOUT: &str = "\
ferry-stun answers STUN Binding requests (RFC 8489/5389) over UDP and TCP, on IPv4 and IPv6.
Clients learn their reflexive (public) address from the XOR-MAPPED-ADDRESS in the reply; this is
the first step of NAT traversal for ferry, WebRTC/ICE, Tailscale-style clients and others.

Also answered: cookie-less RFC 3489 requests (with MAPPED-ADDRESS), and with
--rfc5780-alternate the RFC 5780 NAT behaviour tests (CHANGE-REQUEST, OTHER-ADDRESS).
Not a TURN server: other methods get 400, and nothing is relayed.

Every option can also be set through the environment variable shown next to it.
Log verbosity follows RUST_LOG (default: info), e.g. RUST_LOG=ferry_stun=debug.";

const AFTER_HELP: &str = "\
Examples:
  ferry-stun
      UDP and TCP on 0.0.0.0:3478 and [::]:3478.
  ferry-stun --listen 127.0.0.1:3478 --no-tcp
      Loopback only, UDP only.
  ferry-stun --listen 192.0.2.1:3478 --rfc5780-alternate 192.0.2.2:3479
      RFC 5780 behaviour discovery on a host with two public IPv4 addresses.
  FERRY_STUN_LISTEN=0.0.0.0:3478,[::]:3478 FERRY_STUN_LOG_FORMAT=json ferry-stun

Check it from another machine:  turnutils_stunclient -p 3478 <server-ip>
(Debian package coturn); the line `UDP reflexive addr: IP:port` is your public address.";

/// Command line (and environment) of `ferry-stun`.
#[derive(Debug, Parser)]
#[command(name = "ferry-stun", version, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
struct Args {
    /// Address to serve on, UDP and (unless --no-tcp) TCP. Repeat the flag, or separate with
    /// commas, for several. IPv6 sockets are IPv6-only, so 0.0.0.0:P and [::]:P coexist.
    #[arg(
        short,
        long = "listen",
        value_name = "IP:PORT",
        env = "FERRY_STUN_LISTEN",
        value_delimiter = ',',
        default_values = ["0.0.0.0:3478", "[::]:3478"]
    )]
    listen: Vec<SocketAddr>,

    /// Serve UDP only (RFC 8489 §12 expects TCP too; disable it only if you must).
    #[arg(long, env = "FERRY_STUN_NO_TCP")]
    no_tcp: bool,

    /// Put a SOFTWARE attribute with this text in every reply (at most 127 characters). Off by
    /// default: replies stay minimal, which limits amplification.
    #[arg(long, value_name = "TEXT", env = "FERRY_STUN_SOFTWARE")]
    software: Option<String>,

    /// Enable RFC 5780 NAT behaviour discovery: the second IP address (and port) of this host.
    /// The primary is the first --listen address of the same family with a specific IP; the
    /// server binds the four UDP sockets primary/alternate IP x primary/alternate port.
    #[arg(long, value_name = "IP:PORT", env = "FERRY_STUN_RFC5780_ALTERNATE")]
    rfc5780_alternate: Option<SocketAddr>,

    /// UDP sockets per listen address (SO_REUSEPORT; the kernel spreads clients over them).
    /// One socket already answers hundreds of thousands of requests per second.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_STUN_UDP_WORKERS",
        default_value_t = 1
    )]
    udp_workers: usize,

    /// Close a TCP connection after this many seconds without a request.
    #[arg(
        long,
        value_name = "SECONDS",
        env = "FERRY_STUN_TCP_IDLE_TIMEOUT",
        default_value_t = 30
    )]
    tcp_idle_timeout: u64,

    /// Open TCP connections allowed per listen address; further ones are closed on accept.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_STUN_TCP_MAX_CONNECTIONS",
        default_value_t = 1024
    )]
    tcp_max_connections: usize,

    /// Log line format on stderr.
    #[arg(long, value_enum, env = "FERRY_STUN_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let format = args.log_format;
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e = report(&e);
            match format {
                LogFormat::Text => eprintln!("error: {e}"),
                LogFormat::Json => tracing::error!("{e}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-separated (as `{:#}` prints them), then the advice after `; `.
fn report(e: &anyhow::Error) -> String {
    ferry_proto::report(e.as_ref(), |_| false)
}

/// What to change, in this binary's flags, for a [`StunError`] (the library's message says what
/// went wrong).
fn explain(error: StunError) -> anyhow::Error {
    let advice = match &error {
        StunError::Bind { addr, source, .. } => Some(bind_advice(source, addr)),
        StunError::NoAddress => {
            Some("give at least one --listen address (e.g. 0.0.0.0:3478)".into())
        }
        StunError::NoUdpWorkers => Some("use --udp-workers 1 (the default) or more".into()),
        StunError::NoTcpConnections => {
            Some("raise --tcp-max-connections, or serve UDP only with --no-tcp".into())
        }
        StunError::ZeroTcpIdleTimeout => {
            Some("use a --tcp-idle-timeout of a few seconds or more (default 30)".into())
        }
        StunError::Rfc5780Wildcard { .. } => {
            Some("give --rfc5780-alternate a specific IP address of this host".into())
        }
        StunError::Rfc5780SameIp(_) => Some(
            "--rfc5780-alternate needs a second IP address of this host, not the --listen one"
                .into(),
        ),
        StunError::Rfc5780SamePort(_) => {
            Some("give --rfc5780-alternate another port (e.g. 3479)".into())
        }
        // `config` picks a primary of the alternate's family; the library's message says what
        // to shorten.
        StunError::Rfc5780Families { .. } | StunError::Software(_) => None,
    };
    match advice {
        Some(advice) => ferry_proto::Advised {
            advice,
            error: Box::new(error),
        }
        .into(),
        None => error.into(),
    }
}

/// The advice for a socket that could not be bound.
fn bind_advice(err: &std::io::Error, addr: &SocketAddr) -> String {
    use std::io::ErrorKind;
    const EAFNOSUPPORT: i32 = 97;
    match err.kind() {
        ErrorKind::AddrInUse => "the port is already in use (by another STUN/TURN server such as \
                                 coturn, or a second ferry-stun?); stop that process or listen on \
                                 another port"
            .to_owned(),
        ErrorKind::PermissionDenied => format!(
            "ports below 1024 need root or CAP_NET_BIND_SERVICE; use a port of 1024 or more \
             instead of {}, or grant the capability (setcap cap_net_bind_service=+ep)",
            addr.port()
        ),
        ErrorKind::AddrNotAvailable => format!(
            "{} is not an address of this host; listen on 0.0.0.0 / [::] or on an address shown \
             by `ip addr`",
            addr.ip()
        ),
        _ if err.raw_os_error() == Some(EAFNOSUPPORT) => format!(
            "this host does not support {} sockets; remove {addr} from the listen addresses",
            if addr.is_ipv6() { "IPv6" } else { "IPv4" }
        ),
        _ => "check that the address is valid on this host".to_owned(),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_on_stderr())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Turn the arguments into a [`StunConfig`].
fn config(args: &Args) -> anyhow::Result<StunConfig> {
    let rfc5780 = match args.rfc5780_alternate {
        None => None,
        Some(alternate) => {
            let primary =
                args.listen
                    .iter()
                    .copied()
                    .find(|a| a.is_ipv4() == alternate.is_ipv4() && !a.ip().is_unspecified())
                    .with_context(|| {
                        format!(
                        "--rfc5780-alternate {alternate} needs a --listen address of the same IP \
                         family with a specific IP (e.g. --listen {}), because RFC 5780 \
                         replies report the server's real addresses",
                        if alternate.is_ipv4() { "192.0.2.1:3478" } else { "[2001:db8::1]:3478" }
                    )
                    })?;
            Some(Rfc5780Config { primary, alternate })
        }
    };
    Ok(StunConfig {
        udp_addrs: args.listen.clone(),
        tcp_addrs: if args.no_tcp {
            Vec::new()
        } else {
            args.listen.clone()
        },
        software: args.software.clone(),
        rfc5780,
        udp_workers: args.udp_workers,
        tcp_idle_timeout: Duration::from_secs(args.tcp_idle_timeout),
        tcp_max_connections: args.tcp_max_connections,
    })
}

/// Whether the listen list is the built-in default (so a missing IPv6 stack is not fatal).
fn is_default_listen(listen: &[SocketAddr]) -> bool {
    listen
        == [
            "0.0.0.0:3478".parse().unwrap(),
            "[::]:3478".parse().unwrap(),
        ]
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = config(&args)?;
    let stop = shutdown_signal();
    let server = match StunServer::spawn(cfg.clone()).await {
        Ok(s) => s,
        // With the default listen list on a host without IPv6, serve IPv4 alone.
        Err(StunError::Bind {
            addr, ref source, ..
        }) if addr.is_ipv6()
            && is_default_listen(&args.listen)
            && (source.raw_os_error() == Some(97)
                || source.kind() == std::io::ErrorKind::AddrNotAvailable) =>
        {
            tracing::warn!(%addr, "IPv6 is not available on this host; serving IPv4 only");
            cfg.udp_addrs.retain(SocketAddr::is_ipv4);
            cfg.tcp_addrs.retain(SocketAddr::is_ipv4);
            StunServer::spawn(cfg).await.map_err(explain)?
        }
        Err(e) => return Err(explain(e)),
    };
    println!(
        "ferry-stun listening: udp {:?} tcp {:?}",
        server.udp_addrs(),
        server.tcp_addrs()
    );
    stop.await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// Registers SIGTERM/SIGINT handlers now (before the "listening" line, so a signal right after
/// it never meets the default action) and returns a future that completes on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            match (term, int) {
                (Some(mut term), Some(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Colour in log lines only on a terminal, and never with `NO_COLOR` set (no-color.org): a log
/// written to a file or a pipe carries no escape codes.
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
