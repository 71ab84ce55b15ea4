//! `ferry`: the command-line client. See `ferry --help`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ferry_client::endpoint::MAX_PAYLOAD;
use ferry_client::netcheck::{self, NetcheckOptions};
use ferry_client::relay::Transport;
use ferry_client::tls::TlsOptions;
use ferry_client::udp::Sockets;
use ferry_client::{
    keys, Endpoint, EndpointConfig, EndpointError, PathEvent, PublicKey, RelayMap, SecretKey,
};
use tokio::net::UdpSocket;
use tokio::sync::broadcast;
use tracing::{debug, warn};

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

  # A UDP tunnel between A and B: a UDP program on A talks to B's 127.0.0.1:8000 through
  # 127.0.0.1:7000 (each side names the other's public key):
  ferry tunnel nodekey:<B's key> --listen 127.0.0.1:7000 --key-file a.key --relay http://127.0.0.1:3340
  ferry tunnel nodekey:<A's key> --listen 127.0.0.1:7001 --forward 127.0.0.1:8000 --key-file b.key --relay http://127.0.0.1:3340
  nc -u -l 127.0.0.1 8000      # on B: the service
  nc -u 127.0.0.1 7000         # on A: lines typed here reach B's nc, its answers come back

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
        after_help = "Examples:\n  ferry ping --listen --key-file b.key --relay-map derpmap.json\n  ferry ping nodekey:3f2a... --key-file a.key --relay-map derpmap.json --count 5\n\nThe peer must run an Endpoint (e.g. `ferry ping --listen`); it answers by itself.\nEach path change is printed as `path to <peer>: direct <addr>|udp-relay <region>|relay <region> (after <s> s)`."
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
    /// Carry UDP datagrams between a local port and a peer's local port, end to end encrypted.
    #[command(after_help = TUNNEL_HELP)]
    Tunnel(TunnelArgs),
}

const TUNNEL_HELP: &str = "\
Examples:
  # On A: UDP programs on A send to 127.0.0.1:7000 to reach B.
  ferry tunnel nodekey:<B's key> --listen 127.0.0.1:7000 --key-file a.key --relay-map derpmap.json
  # On B: what arrives from A goes to the service on 127.0.0.1:8000; its answers go back to A.
  ferry tunnel nodekey:<A's key> --listen 127.0.0.1:7001 --forward 127.0.0.1:8000 --key-file b.key --relay-map derpmap.json
  # Try it with netcat:
  nc -u -l 127.0.0.1 8000      # on B
  nc -u 127.0.0.1 7000         # on A

Both sides run the same command with each other's public key (`ferry pubkey --key-file b.key`).
Each datagram that arrives on --listen is sent to the peer as one end-to-end encrypted packet
(direct UDP once disco finds a path, else through a UDP relay session if the relay offers one,
else via the relay's DERP connection); datagrams over 65,477 bytes (what
one encrypted packet carries on a direct IPv4 path) are dropped with a warning, never
truncated. Datagrams from the peer leave the --listen socket towards --forward, or, without
--forward, towards the last local address that sent a datagram to --listen. Packets from
other nodes are ignored. No retransmission, no ordering: it is UDP. Prints `tunnel ready: ...` once connected, each path change as
`path to <peer>: direct <addr>|udp-relay <region>|relay <region> (after <s> s)`, and a summary on SIGINT/SIGTERM.";

#[derive(Args, Debug)]
struct TunnelArgs {
    /// The peer's public key (`nodekey:<hex>` or 64 hex characters).
    peer: String,
    /// The local UDP address: datagrams arriving here go to the peer; the peer's datagrams
    /// are sent from here.
    #[arg(long)]
    listen: SocketAddr,
    /// Send the peer's datagrams to this address (default: the last address that sent a
    /// datagram to --listen).
    #[arg(long)]
    forward: Option<SocketAddr>,
    /// This node's private key file (`ferry keygen --out FILE`); the peer names its public key.
    #[arg(long)]
    key_file: PathBuf,
    #[command(flatten)]
    relays: RelayArgs,
    /// The relay region to reach the peer through (its home; default: ours).
    #[arg(long)]
    peer_region: Option<u32>,
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
    /// Never use a UDP relay session: peers without a direct path stay on DERP (over TCP).
    /// By default a pair that cannot go direct asks the relay for one (if the relay offers it:
    /// `ferry-relay --udp-relay-listen`), and its path shows as `udp-relay <region>`.
    #[arg(long)]
    no_udp_relay: bool,
    /// Send each UDP datagram on its own. By default a burst to one address (a tunnel under
    /// load) goes to the kernel as UDP GSO messages (Linux 4.18+): the same datagrams leave,
    /// at less CPU here and at a UDP relay. It turns itself off where the kernel refuses it;
    /// this flag is for a network that mishandles it anyway, and for comparisons.
    #[arg(long)]
    no_udp_gso: bool,
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

    /// Binds an endpoint with this node's key on `map` (from [`RelayArgs::map`]) with these
    /// relay options.
    async fn bind(&self, secret: SecretKey, map: RelayMap) -> Result<Endpoint> {
        let mut cfg = EndpointConfig::new(secret, map);
        cfg.tls = self.tls()?;
        cfg.transport = self.transport();
        cfg.direct.udp_relay = !self.no_udp_relay;
        cfg.udp_gso = !self.no_udp_gso;
        Ok(Endpoint::bind(cfg).await?)
    }
}

/// Writes one line to stdout and flushes it (readers may be on a pipe). A closed stdout is
/// ignored rather than a panic.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints every path change (only `peer`'s, if given) as
/// `path to nodekey:…: direct 203.0.113.6:41641 (after 0.412 s)`, seconds since `t0`.
fn spawn_path_printer(
    mut events: broadcast::Receiver<PathEvent>,
    peer: Option<PublicKey>,
    t0: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(ev) if peer.is_none_or(|p| p == ev.peer) => say(&format!(
                    "path to {}: {} (after {:.3} s)",
                    keys::display_public(&ev.peer),
                    ev.new,
                    t0.elapsed().as_secs_f64()
                )),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_on_stderr())
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
            let ep = relays.bind(secret, map).await?;
            let events = ep.path_events();
            let home = ep.home_region().unwrap_or_default();
            eprintln!(
                "ferry: node {} on relay region {home}",
                keys::display_public(&ep.public_key())
            );
            // Every path change, with the seconds since the first ping (or since listening).
            spawn_path_printer(events, None, Instant::now());
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
        Command::Tunnel(args) => tunnel(args).await,
    }
}

fn secs(v: f64, flag: &str) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v < 86_400.0) {
        bail!("{flag} must be a positive number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// The largest datagram a tunnel carries: `MAX_PAYLOAD`, 65,477 bytes (its E2E packet,
/// payload + 30, is the largest a UDP datagram over IPv4 carries). Larger ones are dropped with
/// a warning, never truncated.
const TUNNEL_MAX: usize = MAX_PAYLOAD;

/// Counters of one tunnel, printed as the summary line on exit.
#[derive(Debug, Default)]
struct TunnelStats {
    /// Datagrams (and bytes) from --listen sent to the peer.
    up: AtomicU64,
    up_bytes: AtomicU64,
    /// Datagrams (and bytes) from the peer sent out of --listen.
    down: AtomicU64,
    down_bytes: AtomicU64,
    /// Local datagrams over MAX_PAYLOAD.
    too_big: AtomicU64,
    /// Local datagrams the endpoint refused.
    send_failed: AtomicU64,
    /// Packets from nodes other than the peer.
    other_node: AtomicU64,
    /// Peer datagrams without --forward before any local program sent one.
    no_return: AtomicU64,
    /// Peer datagrams the local socket could not send.
    local_failed: AtomicU64,
}

impl TunnelStats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The summary line; `ep`: the endpoint's counters (how its UDP datagrams left).
    fn summary(&self, ep: &ferry_client::EndpointStats) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "tunnel summary: to peer {} datagrams / {} bytes, from peer {} datagrams / {} bytes; \
             dropped: {} over {TUNNEL_MAX} bytes, {} refused by the endpoint, {} from other nodes, \
             {} with no local return address, {} failed local sends, \
             {} dropped by a full relay send queue or an unreachable relay, \
             {} read from UDP and dropped by a busy endpoint; \
             UDP out: {} datagrams in {} sends, in: {} datagrams in {} reads (GSO/GRO runs count once)",
            g(&self.up),
            g(&self.up_bytes),
            g(&self.down),
            g(&self.down_bytes),
            g(&self.too_big),
            g(&self.send_failed),
            g(&self.other_node),
            g(&self.no_return),
            g(&self.local_failed),
            ep.relay_dropped,
            ep.udp_in_dropped,
            ep.udp_out_datagrams,
            ep.udp_out_messages,
            ep.udp_in_datagrams,
            ep.udp_in_messages,
        )
    }
}

/// Lets a repeated warning through at most once per period.
struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    fn new(every: Duration) -> Self {
        RateLimit {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(number suppressed since the last one)` if a warning may be logged now.
    fn allow(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// `ferry tunnel`: see TUNNEL_HELP and docs/client.md.
async fn tunnel(a: TunnelArgs) -> Result<()> {
    // Check the arguments before any network activity.
    let peer = keys::parse_public(&a.peer)?;
    let map = a.relays.map()?;
    let secret = keys::read_secret(&a.key_file)?;
    if peer == secret.public() {
        bail!(
            "the peer key {} is this node's own key (from {}): pass the other node's public key (`ferry pubkey --key-file <its key file>`)",
            keys::display_public(&peer),
            a.key_file.display()
        );
    }
    // Large buffers (as the endpoint's): a fast local sender's bursts wait instead of being
    // dropped by the kernel.
    let sock = ferry_client::udp::bind_udp(a.listen).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (another program, or another tunnel, uses it: stop it or pick another --listen port)"
            }
            std::io::ErrorKind::AddrNotAvailable => {
                " (not an address of this machine: use e.g. 127.0.0.1:<port>)"
            }
            std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
            _ => "",
        };
        anyhow::anyhow!("cannot listen on UDP {}: {e}{hint}", a.listen)
    })?;
    let listen = sock.local_addr().context("the --listen socket's address")?;
    let ep = a.relays.bind(secret, map).await.context(
        "starting the endpoint (is the relay running and reachable? check --relay / --relay-map)",
    )?;
    if let Some(r) = a.peer_region {
        ep.set_peer_region(peer, r).await;
    }
    // Signal handlers before the ready line: a SIGTERM right after it must not meet the
    // default action (which kills the process without the summary).
    let signals = Signals::install()?;
    let events = ep.path_events();
    say(&format!(
        "tunnel ready: udp {listen} <-> {} (we are {}, home relay {}); peer datagrams go to {}",
        keys::display_public(&peer),
        keys::display_public(&ep.public_key()),
        ep.home_region()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "?".into()),
        a.forward
            .map(|f| f.to_string())
            .unwrap_or_else(|| "the last local sender".into()),
    ));
    spawn_path_printer(events, Some(peer), Instant::now());

    let ep = Arc::new(ep);
    let sock = Arc::new(sock);
    let stats = Arc::new(TunnelStats::default());
    let last_sender: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    // Two tasks, so a send that waits (back-pressure) never holds up the other direction.
    let mut up = tokio::spawn(local_to_peer(
        Arc::clone(&ep),
        peer,
        Arc::clone(&sock),
        Arc::clone(&stats),
        Arc::clone(&last_sender),
    ));
    let mut down = tokio::spawn(peer_to_local(
        Arc::clone(&ep),
        peer,
        Arc::clone(&sock),
        a.forward,
        Arc::clone(&stats),
        last_sender,
        !a.relays.no_udp_gso,
    ));
    let result = tokio::select! {
        () = signals.wait() => Ok(()),
        r = &mut up => r.context("tunnel task").and_then(|r| r),
        r = &mut down => r.context("tunnel task").and_then(|r| r),
    };
    up.abort();
    down.abort();
    say(&stats.summary(&ep.stats()));
    result
}

/// Datagrams on --listen → the peer. What the socket holds when the first one is read (up to
/// [`ferry_client::MAX_BATCH`]) goes as one `Endpoint::send_batch`: a burst leaves in UDP GSO
/// runs instead of one system call per datagram.
async fn local_to_peer(
    ep: Arc<Endpoint>,
    peer: PublicKey,
    sock: Arc<UdpSocket>,
    stats: Arc<TunnelStats>,
    last_sender: Arc<Mutex<Option<SocketAddr>>>,
) -> Result<()> {
    // Larger than any UDP datagram (65,507 bytes over IPv4, 65,527 over IPv6), so the length
    // received is the datagram's and nothing is cut.
    let mut buf = vec![0u8; 65_536];
    let mut errors = RateLimit::new(Duration::from_secs(10));
    let mut too_big = RateLimit::new(Duration::from_secs(10));
    let mut burst: Vec<Vec<u8>> = Vec::with_capacity(ferry_client::MAX_BATCH);
    loop {
        let first = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(more) = errors.allow() {
                    warn!("receiving on the --listen socket: {e} ({more} more not shown)");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let mut next = Some(first);
        let mut read = 0;
        while let Some((n, from)) = next.take() {
            read += 1;
            *last_sender.lock().expect("lock") = Some(from);
            if n > TUNNEL_MAX {
                TunnelStats::add(&stats.too_big, 1);
                if let Some(more) = too_big.allow() {
                    warn!("dropped a {n}-byte datagram from {from}: a tunnel carries at most {TUNNEL_MAX} bytes per datagram ({more} more not shown)");
                }
            } else {
                burst.push(buf[..n].to_vec());
            }
            if read < ferry_client::MAX_BATCH {
                // Only what is already there: never wait for more.
                next = sock.try_recv_from(&mut buf).ok();
            }
        }
        if burst.is_empty() {
            continue;
        }
        let sizes: Vec<usize> = burst.iter().map(Vec::len).collect();
        let results = match ep.send_batch(peer, std::mem::take(&mut burst)).await {
            Ok(r) => r,
            Err(_) => bail!("the endpoint stopped"),
        };
        for (n, r) in sizes.into_iter().zip(results) {
            match r {
                Ok(()) => {
                    TunnelStats::add(&stats.up, 1);
                    TunnelStats::add(&stats.up_bytes, n as u64);
                }
                Err(EndpointError::Closed) => bail!("the endpoint stopped"),
                Err(e) => {
                    TunnelStats::add(&stats.send_failed, 1);
                    if let Some(more) = errors.allow() {
                        warn!(
                            "dropped a {n}-byte datagram to the peer: {e} ({more} more not shown)"
                        );
                    }
                }
            }
        }
    }
}

/// Datagrams from the peer → out of --listen, to --forward or the last local sender.
async fn peer_to_local(
    ep: Arc<Endpoint>,
    peer: PublicKey,
    sock: Arc<UdpSocket>,
    forward: Option<SocketAddr>,
    stats: Arc<TunnelStats>,
    last_sender: Arc<Mutex<Option<SocketAddr>>>,
    gso: bool,
) -> Result<()> {
    let mut no_return = RateLimit::new(Duration::from_secs(10));
    let mut errors = RateLimit::new(Duration::from_secs(10));
    let mut out = LocalOut::new(gso);
    loop {
        // What has arrived goes out in one batch (`sendmmsg`, equal-size runs as UDP GSO).
        let batch = ep
            .recv_batch(ferry_client::MAX_BATCH)
            .await
            .context("receiving from the peer")?;
        for (from, data) in batch {
            if from != peer {
                TunnelStats::add(&stats.other_node, 1);
                debug!(
                    "ignored {} bytes from {}: not the tunnel's peer",
                    data.len(),
                    keys::display_public(&from)
                );
                continue;
            }
            let Some(dst) = forward.or_else(|| *last_sender.lock().expect("lock")) else {
                TunnelStats::add(&stats.no_return, 1);
                if let Some(more) = no_return.allow() {
                    warn!("dropped a {}-byte datagram from the peer: no local program has sent to the --listen socket yet, so there is no address to send it to (use --forward ADDR to fix one) ({more} more not shown)", data.len());
                }
                continue;
            };
            if !out.push(dst, &data) {
                out.flush(&sock, &stats, &mut errors).await;
                out.push(dst, &data);
            }
        }
        out.flush(&sock, &stats, &mut errors).await;
    }
}

/// Datagrams from the peer waiting to go out of --listen together: on Linux one `sendmmsg`,
/// with runs of one size to one address as UDP GSO messages (unless --no-udp-gso); elsewhere
/// one `send_to` each.
struct LocalOut {
    #[cfg(target_os = "linux")]
    batch: ferry_proto::mmsg::GsoSendBatch,
    /// Per message of `batch`: its datagrams and bytes (for the summary's counts).
    #[cfg(target_os = "linux")]
    msgs: Vec<(u64, u64)>,
    #[cfg(not(target_os = "linux"))]
    kept: Vec<(SocketAddr, Vec<u8>)>,
}

impl LocalOut {
    #[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
    fn new(gso: bool) -> LocalOut {
        LocalOut {
            #[cfg(target_os = "linux")]
            batch: ferry_proto::mmsg::GsoSendBatch::new(
                ferry_proto::mmsg::UDP_BATCH,
                4 * TUNNEL_MAX,
                gso,
            ),
            #[cfg(target_os = "linux")]
            msgs: Vec::new(),
            #[cfg(not(target_os = "linux"))]
            kept: Vec::new(),
        }
    }

    /// Keeps `d` for `to`; false (keeping nothing) when full: flush, then push again.
    fn push(&mut self, to: SocketAddr, d: &[u8]) -> bool {
        #[cfg(target_os = "linux")]
        {
            let before = self.batch.len();
            if !self.batch.push(d, to) {
                return false;
            }
            if self.batch.len() > before {
                self.msgs.push((1, d.len() as u64));
            } else if let Some(m) = self.msgs.last_mut() {
                m.0 += 1;
                m.1 += d.len() as u64;
            }
            true
        }
        #[cfg(not(target_os = "linux"))]
        {
            self.kept.push((to, d.to_vec()));
            true
        }
    }

    /// Sends what is kept, waiting while the socket's buffer is full; counts each datagram as
    /// sent or failed. (A GSO message the kernel refuses goes datagram by datagram inside
    /// `GsoSendBatch`, where a datagram then refused is lost unseen, as a plain UDP send
    /// can be: it is counted as sent.)
    async fn flush(&mut self, sock: &UdpSocket, stats: &TunnelStats, errors: &mut RateLimit) {
        let mut failed = |n: u64, bytes: u64, e: std::io::Error| {
            TunnelStats::add(&stats.local_failed, n);
            if let Some(more) = errors.allow() {
                warn!("dropped {n} datagram(s) ({bytes} bytes) from the peer: sending to the local program: {e} ({more} more not shown)");
            }
        };
        #[cfg(target_os = "linux")]
        {
            let msgs = &self.msgs;
            ferry_client::udp::send_gso_batch(sock, &mut self.batch, |i, e| {
                let (n, bytes) = msgs[i];
                match e {
                    None => {
                        TunnelStats::add(&stats.down, n);
                        TunnelStats::add(&stats.down_bytes, bytes);
                    }
                    Some(e) => failed(n, bytes, e),
                }
            })
            .await;
            self.batch.clear();
            self.msgs.clear();
        }
        #[cfg(not(target_os = "linux"))]
        for (to, d) in self.kept.drain(..) {
            match sock.send_to(&d, to).await {
                Ok(_) => {
                    TunnelStats::add(&stats.down, 1);
                    TunnelStats::add(&stats.down_bytes, d.len() as u64);
                }
                Err(e) => failed(1, d.len() as u64, e),
            }
        }
    }
}

/// SIGINT / SIGTERM.
#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
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

    async fn wait(self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Colour in log lines only on a terminal, and never with `NO_COLOR` set (no-color.org): a log
/// written to a file or a pipe carries no escape codes.
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tunnel whose peer is reached via DERP over a slow TCP connection loses what the
    /// region's send queue drops; the summary must say so, not "dropped: 0".
    #[test]
    fn the_summary_counts_what_a_full_relay_queue_dropped() {
        let stats = TunnelStats::default();
        let ep = ferry_client::EndpointStats {
            relay_dropped: 4_321,
            udp_in_dropped: 765,
            ..Default::default()
        };
        let line = stats.summary(&ep);
        assert!(
            line.contains("4321 dropped by a full relay send queue or an unreachable relay"),
            "{line}"
        );
        assert!(
            line.contains("765 read from UDP and dropped by a busy endpoint"),
            "{line}"
        );
    }
}
