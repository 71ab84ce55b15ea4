//! `ferry`: the command-line client. See `ferry --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ferry_client::netcheck::{self, NetcheckOptions};
use ferry_client::relay::Transport;
use ferry_client::tls::TlsOptions;
use ferry_client::udp::Sockets;
use ferry_client::{keys, Endpoint, EndpointConfig, RelayMap, SecretKey};

const EXAMPLES: &str = "\
Examples:
  # A dev relay on this machine (plain HTTP on 127.0.0.1:3340, STUN on 127.0.0.1:3478):
  cargo run -p ferry-relay -- --dev

  # Keys for two nodes (the private key goes to the file, the public key to stdout):
  ferry keygen --out a.key        # prints nodekey:<hex>
  ferry keygen --out b.key

  # What does the network look like? (latency to every relay region, NAT type, home relay)
  ferry netcheck --relay http://127.0.0.1:3340
  ferry netcheck --relay-map derpmap.json --json

  # Node B answers pings; node A pings it through the relay (end-to-end encrypted):
  ferry ping --listen --key-file b.key --relay http://127.0.0.1:3340
  ferry ping nodekey:<B's public key> --key-file a.key --relay http://127.0.0.1:3340

The relay map is Tailscale's DERP map JSON (the same file Tailscale and Headscale use); see
docs/client.md. `--relay URL` is a shortcut for a one-relay map.";

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "ferry client: reach other nodes by public key through ferry (DERP v2) relays, end-to-end encrypted",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
    /// Log level filter (e.g. `info`, `ferry_client=debug`); logs go to stderr.
    #[arg(long, global = true, env = "FERRY_LOG", default_value = "warn")]
    log: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a node private key; print its public key.
    #[command(
        after_help = "Examples:\n  ferry keygen                 # private key to stdout, public key to stderr\n  ferry keygen --out node.key  # private key to node.key (mode 0600), public key to stdout"
    )]
    Keygen {
        /// Write the private key to this file (mode 0600; never overwrites) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the public key of a private key file.
    Pubkey {
        /// The private key file.
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Measure the network: STUN to every relay region from one UDP socket.
    #[command(
        after_help = "Examples:\n  ferry netcheck --relay-map derpmap.json\n  ferry netcheck --relay http://127.0.0.1:3340 --json"
    )]
    Netcheck {
        #[command(flatten)]
        relays: RelayArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Give up on STUN answers after this many seconds.
        #[arg(long, default_value_t = 3.0)]
        timeout: f64,
    },
    /// Ping a peer end to end through the relay; or, with --listen, answer pings.
    #[command(
        after_help = "Examples:\n  ferry ping --listen --key-file b.key --relay-map derpmap.json\n  ferry ping nodekey:3f2a... --key-file a.key --relay-map derpmap.json --count 5\n\nThe peer must run an Endpoint (e.g. `ferry ping --listen`); it answers by itself.\nEach path change is printed as `path to <peer>: direct <addr>|relay <region> (after <s> s)`."
    )]
    Ping {
        /// The peer's public key (`nodekey:<hex>` or 64 hex characters).
        #[arg(required_unless_present = "listen")]
        peer: Option<String>,
        /// Answer pings (and print received messages) until interrupted.
        #[arg(long, conflicts_with = "peer")]
        listen: bool,
        /// This node's private key file (default: a fresh key for this run).
        #[arg(long)]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        relays: RelayArgs,
        /// Number of pings (0: until interrupted).
        #[arg(long, short = 'c', default_value_t = 4)]
        count: u32,
        /// Seconds between pings.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Seconds to wait for each reply.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        /// The relay region to reach the peer through (its home; default: ours).
        #[arg(long)]
        peer_region: Option<u32>,
        /// Also send this text to the peer as an application message (end-to-end encrypted)
        /// before every ping; the listener prints `message from <peer>: <n> bytes via <path>`.
        #[arg(long, conflicts_with = "listen")]
        payload: Option<String>,
    },
}

#[derive(Args, Debug)]
struct RelayArgs {
    /// The relay map: Tailscale DERP map JSON.
    #[arg(long, env = "FERRY_RELAY_MAP", conflicts_with = "relay")]
    relay_map: Option<PathBuf>,
    /// One relay by URL instead of a map: `http://127.0.0.1:3340` (dev) or `https://host[:port]`.
    #[arg(long, env = "FERRY_RELAY")]
    relay: Option<String>,
    /// With --relay: the certificate pin (`sha256-raw:<hex>`) of a self-signed relay.
    #[arg(long, requires = "relay")]
    cert_name: Option<String>,
    /// Extra CA certificates (PEM) to trust for relays.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Relay transport: auto (DERP upgrade, WebSocket if refused), derp, or websocket.
    #[arg(long, default_value = "auto", value_parser = ["auto", "derp", "websocket"])]
    transport: String,
}

impl RelayArgs {
    fn map(&self) -> Result<RelayMap> {
        match (&self.relay_map, &self.relay) {
            (Some(p), _) => Ok(RelayMap::from_file(p)?),
            (None, Some(u)) => Ok(RelayMap::from_url(u, self.cert_name.as_deref())?),
            (None, None) => bail!(
                "no relays given: pass --relay-map FILE (a Tailscale DERP map) or --relay URL (e.g. http://127.0.0.1:3340 for `ferry-relay --dev`)"
            ),
        }
    }

    fn tls(&self) -> Result<TlsOptions> {
        let mut t = TlsOptions::default();
        if let Some(p) = &self.ca_file {
            t.add_ca_file(p)?;
        }
        Ok(t)
    }

    fn transport(&self) -> Transport {
        match self.transport.as_str() {
            "derp" => Transport::Derp,
            "websocket" => Transport::WebSocket,
            _ => Transport::Auto,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Keygen { out } => {
            let k = SecretKey::generate();
            match out {
                Some(path) => {
                    keys::write_secret(&path, &k)?;
                    println!("{}", keys::display_public(&k.public()));
                }
                None => {
                    println!("{}", k.to_privkey_string());
                    eprintln!("public key: {}", keys::display_public(&k.public()));
                }
            }
            Ok(())
        }
        Command::Pubkey { key_file } => {
            let k = keys::read_secret(&key_file)?;
            println!("{}", keys::display_public(&k.public()));
            Ok(())
        }
        Command::Netcheck {
            relays,
            json,
            timeout,
        } => {
            let map = relays.map()?;
            let sockets = Sockets::bind(
                "0.0.0.0:0".parse().expect("literal"),
                Some("[::]:0".parse().expect("literal")),
                None,
            )
            .await
            .context("opening the UDP socket")?;
            let opts = NetcheckOptions {
                timeout: secs(timeout, "--timeout")?,
                ..NetcheckOptions::default()
            };
            let report = netcheck::run(&map, &sockets, None, opts).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text(&map));
            }
            Ok(())
        }
        Command::Ping {
            peer,
            listen,
            key_file,
            relays,
            count,
            interval,
            timeout,
            peer_region,
            payload,
        } => {
            // Check the arguments before any network activity.
            let peer = peer.map(|p| keys::parse_public(&p)).transpose()?;
            let map = relays.map()?;
            let secret = match &key_file {
                Some(p) => keys::read_secret(p)?,
                None => SecretKey::generate(),
            };
            let interval = secs(interval, "--interval")?;
            let timeout = secs(timeout, "--timeout")?;
            let mut cfg = EndpointConfig::new(secret, map);
            cfg.tls = relays.tls()?;
            cfg.transport = relays.transport();
            let ep = Endpoint::bind(cfg).await?;
            let mut events = ep.path_events();
            let home = ep.home_region().unwrap_or_default();
            eprintln!(
                "ferry: node {} on relay region {home}",
                keys::display_public(&ep.public_key())
            );
            // Every path change, with the seconds since the first ping (or since listening):
            // `path to nodekey:…: direct 203.0.113.6:41641 (after 0.412 s)`.
            let t0 = Instant::now();
            tokio::spawn(async move {
                loop {
                    match events.recv().await {
                        Ok(ev) => println!(
                            "path to {}: {} (after {:.3} s)",
                            keys::display_public(&ev.peer),
                            ev.new,
                            t0.elapsed().as_secs_f64()
                        ),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
            });
            if listen {
                println!(
                    "listening as {} (home relay region {home}); answering pings",
                    keys::display_public(&ep.public_key())
                );
                loop {
                    let (from, data) = ep.recv().await?;
                    println!(
                        "message from {}: {} bytes via {}",
                        keys::display_public(&from),
                        data.len(),
                        ep.path(&from).map(|p| p.to_string()).unwrap_or_default()
                    );
                }
            }
            let peer = peer.expect("clap requires a peer without --listen");
            if let Some(r) = peer_region {
                ep.set_peer_region(peer, r).await;
            }
            let (mut sent, mut got) = (0u32, 0u32);
            let mut rtts = Vec::new();
            loop {
                sent += 1;
                let start = Instant::now();
                if let Some(p) = &payload {
                    ep.send(peer, p.as_bytes().to_vec()).await?;
                }
                match tokio::time::timeout(timeout, ep.ping(peer)).await {
                    Ok(Ok(r)) => {
                        got += 1;
                        rtts.push(r.rtt);
                        println!(
                            "pong from {} via {}: seq={sent} time={:.2} ms",
                            keys::display_public(&peer),
                            r.path,
                            r.rtt.as_secs_f64() * 1000.0
                        );
                    }
                    Ok(Err(e)) => bail!("ping failed: {e}"),
                    Err(_) => println!(
                        "no reply from {} within {:.1} s (seq={sent}); is the peer running `ferry ping --listen` on this relay map?",
                        keys::display_public(&peer),
                        timeout.as_secs_f64()
                    ),
                }
                if count != 0 && sent >= count {
                    break;
                }
                tokio::time::sleep(interval.saturating_sub(start.elapsed())).await;
            }
            let loss = 100.0 * f64::from(sent - got) / f64::from(sent);
            print!("{sent} pings, {got} replies, {loss:.0}% loss");
            if let (Some(min), Some(max)) = (rtts.iter().min(), rtts.iter().max()) {
                let avg = rtts.iter().sum::<Duration>() / rtts.len() as u32;
                print!(
                    ", rtt min/avg/max = {:.2}/{:.2}/{:.2} ms",
                    min.as_secs_f64() * 1000.0,
                    avg.as_secs_f64() * 1000.0,
                    max.as_secs_f64() * 1000.0
                );
            }
            println!();
            if got == 0 {
                bail!("no replies");
            }
            Ok(())
        }
    }
}

fn secs(v: f64, flag: &str) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v < 86_400.0) {
        bail!("{flag} must be a positive number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}
