//! Command line (clap derive). `ferry-loadtest --help` and `ferry-loadtest derp --help` teach
//! by example.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

const ABOUT: &str = "Load generator for any DERP v2 relay (ferry, Tailscale's derper, anything \
wire-compatible) and any STUN server.";

const AFTER_HELP: &str = "\
Examples:
  # 8 pairs flooding 1200-byte packets through a dev relay (ferry-relay --dev), 10 s after 2 s warm-up
  ferry-loadtest derp http://127.0.0.1:3340/derp --clients 16 --size 1200

  # Capacity: the same pairs, closed loop, at most 16 packets in flight per sender
  ferry-loadtest derp http://127.0.0.1:3340/derp --clients 16 --size 1200 --window 16

  # Round-trip latency at 20,000 packets/s through a TLS relay with a private CA
  ferry-loadtest derp https://relay.lab:443/derp --ca-file ca.pem --echo --rate 20000 --svg rtt.svg

  # A self-signed relay, trusted by its CertName pin, name on the certificate given explicitly
  ferry-loadtest derp https://127.0.0.1:8443/derp --tls-name localhost \\
      --pin sha256-raw:3f1c...e9 --size 64 --json > run.json

  # Connect storm: handshakes per second with 64 dialers
  ferry-loadtest connect https://127.0.0.1:8443/derp --insecure --concurrency 64

  # 10,000 idle connections; server memory per connection from /proc (server on this host)
  ferry-loadtest idle https://127.0.0.1:8443/derp --insecure --clients 10000 --server-pid 1234

  # STUN: Binding requests over UDP, 4 sockets x 128 in flight
  ferry-loadtest stun 127.0.0.1:3478 --sockets 4 --window 128

Output: a text summary on stdout, or the JSON report with --json (schema: loadtest/report.schema.json);
--svg FILE writes a chart (latency percentiles and throughput over time). A progress bar is drawn
on stderr when it is a terminal. Against a loopback target the clients' source addresses are
spread over 127.0.0.0/8 and the open-files limit is raised to its hard limit; when a limit is hit
anyway the error says which one.";

/// ferry-loadtest
#[derive(Debug, Parser)]
#[command(name = "ferry-loadtest", version, about = ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    /// What to measure.
    #[command(subcommand)]
    pub command: Command,
}

/// The modes.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Packets through a DERP relay: delivered packets/s and bytes/s, loss, one-way and
    /// round-trip latency.
    #[command(after_help = DERP_HELP)]
    Derp(DerpArgs),
    /// Connect storm: TCP + TLS + upgrade + DERP handshake, then close, as fast as possible.
    #[command(after_help = CONNECT_HELP)]
    Connect(ConnectArgs),
    /// Open N DERP connections and hold them (server memory per connection).
    #[command(after_help = IDLE_HELP)]
    Idle(IdleArgs),
    /// STUN Binding requests over UDP (RFC 8489): answers/s, latency, loss.
    #[command(after_help = STUN_HELP)]
    Stun(StunArgs),
    /// Long run: a pool of clients with connects and disconnects every second, pairs exchanging
    /// packets, and the relay's RSS, fds, tasks and queues sampled (CSV, SVG, slopes).
    #[command(after_help = SOAK_HELP)]
    Soak(SoakArgs),
    /// Hostile clients at scale: connections that never finish the handshake, that drip one
    /// byte a second, or one client sending garbage frames.
    #[command(after_help = ABUSE_HELP)]
    Abuse(AbuseArgs),
    /// A UDP relay's forwarding capacity (ferry-relay --udp-relay-listen): pairs allocate
    /// sessions over DERP, bind UDP sockets, and send datagrams through them.
    #[command(name = "udp-relay", after_help = UDP_RELAY_HELP)]
    UdpRelay(UdpRelayArgs),
    /// A TURN relay's forwarding capacity (e.g. coturn), measured as `udp-relay` measures
    /// ferry's: clients allocate, bind a channel to a peer socket, and send through it.
    #[command(after_help = TURN_HELP)]
    Turn(TurnArgs),
}

const TURN_HELP: &str = "\
Each client: a UDP socket that asks the server for a relayed address (Allocate, without
credentials: run the server with no auth, e.g. turnserver --no-auth) and binds channel 0x4000 to
a peer, a second UDP socket of this process. Then, from one thread with sendmmsg/recvmmsg, each
client sends ChannelData (4-byte header + --size bytes) that the server relays to its peer, and
each peer sends --size-byte datagrams to the relayed address that the server relays back as
ChannelData: two flows per client, closed loop (at most --window in flight per direction) or
open loop (--rate datagrams/s in all). Every datagram that arrives is one forward by the server;
the headline is datagrams forwarded per server CPU-second (--server-pid), as in udp-relay, so the
two compare side by side. Unlike coturn's turnutils_uclient, this does not pace itself, so it can
load a server to its capacity.

Example (coturn on loopback, one relay thread):
  turnserver -n --no-auth -L 127.0.0.1 -p 3478 --relay-ip 127.0.0.1 --allow-loopback-peers -m 1 &
  ferry-loadtest turn 127.0.0.1:3478 --clients 16 --size 1200 --window 64 \\
      --server-pid $(pidof turnserver) --json";

/// `turn` mode.
#[derive(Debug, Clone, Args)]
pub struct TurnArgs {
    /// The TURN server's UDP address (IP:port).
    pub server: std::net::SocketAddr,

    #[command(flatten)]
    pub run: RunArgs,

    /// Clients, each with an allocation, a channel and a peer socket of its own.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,

    /// Payload bytes per datagram (the client's ChannelData adds a 4-byte header).
    #[arg(long, default_value_t = 1200)]
    pub size: usize,

    #[command(flatten)]
    pub flow: FlowArgs,
}

const UDP_RELAY_HELP: &str = "\
Each pair: two DERP connections; the first asks the relay for a UDP relay session for the two
(ferry's frame 0xF0; a relay without one never answers: derper has none); both sides bind a UDP
socket of their own to it (Bind, Challenge, Answer) and send Geneve-framed datagrams of --size
bytes to each other through the relay, from one thread with sendmmsg/recvmmsg. Closed loop (at
most --window in flight per direction) or open loop (--rate datagrams/s in all). The headline:
datagrams forwarded per server CPU-second (--server-pid: utime+stime from /proc).

Example (8 pairs, 1200-byte datagrams, a TLS relay with a private CA):
  ferry-loadtest udp-relay https://127.0.0.1:8443/derp --ca-file ca.pem --tls-name localhost \\
      --pairs 8 --size 1200 --window 64 --server-pid $(pidof ferry-relay) --json";

/// `udp-relay` mode.
#[derive(Debug, Clone, Args)]
pub struct UdpRelayArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    #[command(flatten)]
    pub run: RunArgs,

    /// Pairs, each with a session of its own (2 DERP connections and 2 UDP sockets each).
    #[arg(long, default_value_t = 8)]
    pub pairs: usize,

    /// Bytes per datagram on the wire (the 8-byte Geneve header included).
    #[arg(long, default_value_t = 1200)]
    pub size: usize,

    #[command(flatten)]
    pub flow: FlowArgs,
}

/// How `udp-relay` and `turn` drive their flows (one loop serves both).
#[derive(Debug, Clone, Args)]
pub struct FlowArgs {
    /// Closed loop: datagrams in flight per direction at most.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub window: u64,

    /// Open loop instead: datagrams per second in all (0: closed loop).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,

    /// A direction that receives nothing for this long writes its window off as lost.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub loss_timeout: Duration,

    /// Send each burst of a direction as one UDP GSO send and receive with UDP GRO (Linux), as
    /// WireGuard's and Tailscale's Linux clients do. What reaches the server is then up to it:
    /// ferry's UDP relay reads a run of one flow's datagrams as one (GRO); a server that does
    /// not ask for GRO (coturn) gets them one by one. Without it, bursts go out with sendmmsg,
    /// datagram by datagram.
    #[arg(long)]
    pub gso: bool,
}

const SOAK_HELP: &str = "\
Holds --clients connections: --pairs pairs send packets to each other (--rate packets/s in all,
each receiver echoes, so both directions flow) for the whole run, and the rest are idle clients of
which --churn per second are closed and replaced by new ones (connects and disconnects). Every
--sample-every it reads the relay's VmRSS and open fds from /proc/PID (--server-pid) and its
ferry_relay_tasks, ferry_relay_queued_bytes and ferry_relay_connections gauges from its metrics
listener (--metrics-addr), writes them to --csv, and at the end the slope of each (least squares
over the samples after --settle) and an SVG chart. The pairs' run ends with the exact drain of
`derp` mode, and the relay's drop counters (all reasons but write_error, read before and after)
must equal the packets lost: the report says whether accounting is exact.

Example (10,000 TLS clients, 100 connects + 100 disconnects/s, 1,000 pairs, 10 minutes):
  ferry-loadtest soak https://127.0.0.1:8443/derp --insecure --clients 10000 --pairs 1000 \\
      --churn 100 --rate 10000 --duration 10m --server-pid $(pidof ferry-relay) \\
      --metrics-addr 127.0.0.1:9090 --csv soak.csv --svg soak.svg";

const ABUSE_HELP: &str = "\
Modes (each connection that the relay closes is opened again, so --conns stay open):
  handshake-never  connect, then say nothing (--stall-at tcp: no TLS ClientHello; tls: TLS done,
                   no HTTP request; http: half an HTTP request head). The relay's handshake
                   timeout closes them.
  drip             one byte a second: of an endless HTTP request head (--drip-phase head, cut by
                   the handshake timeout) or, after a full DERP handshake, of a frame that never
                   ends (--drip-phase frames; KeepAlives are read meanwhile).
  garbage          one DERP client writes --bytes of frames of an unknown type (--garbage
                   unknown-type; the relay skips and counts them) or of SendPackets to keys
                   nobody has (--garbage unknown-dest), as fast as the relay reads them, then
                   Pings and waits for the Pong (the relay has read everything).
Run `ferry-loadtest derp ... --echo --rate R` beside it for the honest clients' round trips.

Examples:
  ferry-loadtest abuse https://127.0.0.1:8443/derp --insecure --mode handshake-never --conns 5000 --duration 60s
  ferry-loadtest abuse https://127.0.0.1:8443/derp --insecure --mode drip --drip-phase frames --conns 5000
  ferry-loadtest abuse https://127.0.0.1:8443/derp --insecure --mode garbage --bytes 1GiB --json";

/// `soak` mode.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Connections held in all (pairs included).
    #[arg(long, default_value_t = 10_000)]
    pub clients: usize,

    /// Pairs exchanging packets for the whole run (2 clients each).
    #[arg(long, default_value_t = 1000)]
    pub pairs: usize,

    /// Idle clients closed and replaced per second.
    #[arg(long, default_value_t = 100)]
    pub churn: u32,

    /// Packets per second sent by the pairs' senders in all (echoes come on top).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,

    /// Packet size in bytes.
    #[arg(long, default_value_t = 200)]
    pub size: usize,

    /// How long to run.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub duration: std::time::Duration,

    /// Time between samples.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub sample_every: std::time::Duration,

    /// Samples before this (after the start) are warm-up: left out of the slopes.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub settle: std::time::Duration,

    /// PID of the relay (RSS and open fds from /proc).
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// The relay's metrics listener, host:port (tasks, queued bytes, connections, drops).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,

    /// Write the samples to this CSV file (a line per sample, written as it is taken).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,

    /// Write a chart of the samples to this SVG file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,

    /// Print the JSON result on stdout instead of the text summary.
    #[arg(long)]
    pub json: bool,

    /// Worker threads of the load generator's runtime [default: one per core].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// What the abusive clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AbuseMode {
    /// Connect and never finish the handshake.
    HandshakeNever,
    /// Send one byte a second.
    Drip,
    /// One client sending garbage frames.
    Garbage,
}

/// Where a handshake-never connection stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StallAt {
    /// After TCP connect (no TLS ClientHello).
    Tcp,
    /// After the TLS handshake (no HTTP request).
    Tls,
    /// After half an HTTP request head.
    Http,
}

/// What a drip connection drips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DripPhase {
    /// An HTTP request head that never ends.
    Head,
    /// After the DERP handshake, a frame that never ends.
    Frames,
}

/// What garbage frames are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Garbage {
    /// Frames of type 0x7f (unknown: skipped and counted).
    UnknownType,
    /// SendPacket to random keys nobody has (dropped as unknown_dest).
    UnknownDest,
}

/// `abuse` mode.
#[derive(Debug, Clone, Args)]
pub struct AbuseArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// What the abusive clients do.
    #[arg(long, value_enum)]
    pub mode: AbuseMode,

    /// Connections kept open (handshake-never, drip).
    #[arg(long, default_value_t = 5000)]
    pub conns: usize,

    /// handshake-never: where to stop.
    #[arg(long, value_enum, default_value_t = StallAt::Tls)]
    pub stall_at: StallAt,

    /// drip: what to drip.
    #[arg(long, value_enum, default_value_t = DripPhase::Frames)]
    pub drip_phase: DripPhase,

    /// garbage: what the frames are.
    #[arg(long, value_enum, default_value_t = Garbage::UnknownType)]
    pub garbage: Garbage,

    /// garbage: bytes to send (frames included), e.g. 1GiB.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub bytes: u64,

    /// garbage: payload bytes per frame (unknown-type: up to 1 MiB; unknown-dest: up to 64 KiB).
    #[arg(long, default_value_t = 65536)]
    pub frame_size: usize,

    /// How long to keep the connections (handshake-never, drip); garbage stops when --bytes
    /// are sent.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: std::time::Duration,

    /// Connections being opened at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,

    /// Print the JSON result on stdout instead of the text summary.
    #[arg(long)]
    pub json: bool,

    /// Worker threads of the load generator's runtime [default: one per core].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// `1GiB`, `512MiB`, `64KiB`, `1000` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
    .unwrap_or((s, 1));
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("`{s}` is not a size like 1GiB, 512MiB, 64KiB or 1000"))
}

const DERP_HELP: &str = "\
Every packet carries a sequence number and its send time (one clock: all clients live in this
process), so the receiver measures one-way latency; with --echo it sends each packet back and the
sender measures the round trip. At the end every sender stops, makes sure the relay has read all
it sent (Ping/Pong), and a last marker packet flushes each receiver's queue: `sent` = `received` +
the packets the relay dropped, exactly.

Three ways to send: flood (the default: open loop, as fast as TCP takes them; measures a relay
under overload, most packets are dropped at the receivers' queues), --rate R (open loop, R
packets/s in all) and --window N (closed loop: each sender keeps at most N packets in flight to
its receiver, so the relay runs at its capacity with ~0 loss: use it to measure capacity). The
report says which one ran (settings.send_mode).

Examples:
  ferry-loadtest derp http://127.0.0.1:3340/derp                       # 8 pairs, 1200 B, flood
  ferry-loadtest derp http://127.0.0.1:3340/derp --window 16           # capacity, closed loop
  ferry-loadtest derp http://127.0.0.1:3340/derp --topology fan-in --clients 9 --size 64
  ferry-loadtest derp http://127.0.0.1:3340/derp --echo --rate 10000 --svg rtt.svg";

const CONNECT_HELP: &str = "\
Examples:
  ferry-loadtest connect http://127.0.0.1:3340/derp --concurrency 32 --duration 10s
  ferry-loadtest connect https://127.0.0.1:8443/derp --insecure --json";

const IDLE_HELP: &str = "\
Reads the server's VmRSS from /proc/PID/status before connecting and after all connections are up
and have been held for --hold, and reports the growth per connection.

Example:
  ferry-loadtest idle https://127.0.0.1:8443/derp --insecure --clients 10000 --server-pid $(pidof ferry-relay)";

const STUN_HELP: &str = "\
Each socket keeps --window requests in flight (20-byte Binding requests, sendmmsg/recvmmsg). An
answer counts if it is a Binding success response to a transaction this socket sent; a request
unanswered for --loss-timeout is counted lost.

Examples:
  ferry-loadtest stun 127.0.0.1:3478
  ferry-loadtest stun 127.0.0.1:3478 --sockets 64 --window 8 --server-pid $(pidof turnserver)";

/// Where the DERP server is and how to trust it.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// DERP URL: https://host[:port]/derp, or http:// for a plain dev relay.
    #[arg(value_name = "URL")]
    pub url: String,

    /// Trust this CA (PEM file) instead of the system roots.
    #[arg(long, value_name = "PEM", help_heading = "TLS")]
    pub ca_file: Option<PathBuf>,

    /// Trust exactly the leaf certificate with this CertName pin (`sha256-raw:<hex>`, the sha256
    /// of the certificate's DER, as in a DERP map); the name is not checked.
    #[arg(long, value_name = "sha256-raw:HEX", help_heading = "TLS")]
    pub pin: Option<String>,

    /// Accept any certificate (labs only: no protection against an impostor).
    #[arg(long, help_heading = "TLS")]
    pub insecure: bool,

    /// Name sent in SNI and checked on the certificate [default: the URL's host].
    #[arg(long, value_name = "NAME", help_heading = "TLS")]
    pub tls_name: Option<String>,

    /// Spread client source addresses over this many 127.0.0.x addresses when the target is on
    /// loopback (more source addresses, more ephemeral ports). 1 disables.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub source_ips: u8,

    /// With --source-ips on loopback: the first address is 127.0.0.N (so two runs can use
    /// disjoint sources, e.g. an abuser on 127.0.0.200 beside honest clients on .1-.32, to
    /// exercise a per-IP limit).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=254))]
    pub source_first: u8,
}

/// What every run shares: timing, the server to watch, and the outputs.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Warm-up before measuring (not counted in rates or histograms).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// PID of the server, if it runs on this host: its CPU time (utime+stime) over the measured
    /// window, its RSS and peak RSS (VmHWM) from /proc.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// Print the JSON report on stdout instead of the text summary.
    #[arg(long)]
    pub json: bool,

    /// Write a chart (latency percentiles, throughput over time) to this SVG file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,

    /// No progress bar (it is hidden anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,

    /// Worker threads of the load generator's runtime [default: one per core].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// Who sends to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// Client 2i sends to client 2i+1.
    Pairs,
    /// Clients 1..N all send to client 0.
    FanIn,
}

/// `derp` mode.
#[derive(Debug, Clone, Args)]
pub struct DerpArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub run: RunArgs,

    /// Number of DERP connections (pairs: an even number; fan-in: 1 receiver + N-1 senders).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,

    /// Who sends to whom.
    #[arg(long, value_enum, default_value_t = Topology::Pairs)]
    pub topology: Topology,

    /// Packet size in bytes (the DERP payload, 24..=65536; 24 bytes carry the sequence number
    /// and timestamp).
    #[arg(long, default_value_t = 1200)]
    pub size: usize,

    /// Total packets per second over all senders; 0 floods (as fast as the relay takes them).
    /// Open loop: senders do not wait for their receivers.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,

    /// Closed loop (capacity): each sender keeps at most N packets in flight to its receiver
    /// (sent but not yet read by it) and sends the next as soon as one arrives. `--window`
    /// alone means 16: at most the 32-packet receive queue of derper (ferry's holds at least
    /// 32), so in pairs a relay never has to drop, yet 8 pairs x 16 keep enough in flight to
    /// saturate a relay.
    /// In fan-in keep senders x N at most the relay's queue depth.
    #[arg(
        long,
        value_name = "N",
        num_args = 0..=1,
        default_missing_value = "16",
        conflicts_with = "rate",
        value_parser = clap::value_parser!(u64).range(1..=1_000_000)
    )]
    pub window: Option<u64>,

    /// With --window: when a full window sees no progress for this long (the relay dropped
    /// its last packets, and DERP does not report loss), the sender writes off what is
    /// outstanding and opens the window again. Written-off packets are reported; the exact
    /// loss figure still comes from the end-of-run drain.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration, requires = "window")]
    pub window_timeout: Duration,

    /// Receivers send every packet back: round-trip latency at the sender.
    #[arg(long)]
    pub echo: bool,

    /// Retry a failed connect up to N times, 100 ms doubling to 2 s apart (+0-50 % jitter), as
    /// a real client does; 0 (default): the first failure ends the run. For measuring honest
    /// clients while the relay sheds an attack at accept (`accept_rate`).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub connect_retries: u32,
}

/// `connect` mode.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub run: RunArgs,

    /// Handshakes in progress at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
}

/// `idle` mode.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,

    /// Handshakes in progress at once while opening.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,

    /// How long to hold all connections before reading the server's memory.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub hold: Duration,

    /// PID of the server on this host: its RSS before and after, per connection.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// The relay's KeepAlive interval (ferry: [limits] keepalive_interval, derper: 60 s): each
    /// KeepAlive gap is checked against it plus --keepalive-jitter, and the report gives the
    /// maximum lateness.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Option<std::time::Duration>,

    /// The relay's KeepAlive jitter (a random extra delay of up to this; ferry and derper: 5 s).
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub keepalive_jitter: std::time::Duration,

    /// Print the JSON report on stdout instead of the text summary.
    #[arg(long)]
    pub json: bool,

    /// Write a chart (handshake latency percentiles) to this SVG file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,

    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,

    /// Worker threads of the load generator's runtime [default: one per core].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// `stun` mode.
#[derive(Debug, Clone, Args)]
pub struct StunArgs {
    /// STUN server, IP:PORT (UDP).
    #[arg(value_name = "ADDR")]
    pub target: std::net::SocketAddr,

    #[command(flatten)]
    pub run: RunArgs,

    /// UDP sockets (each a distinct source port).
    #[arg(long, default_value_t = 4)]
    pub sockets: usize,

    /// Requests in flight per socket.
    #[arg(long, default_value_t = 128)]
    pub window: usize,

    /// A request unanswered this long is counted lost.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub loss_timeout: Duration,

    /// Send requests as Tailscale's clients do (SOFTWARE=tailnode, FINGERPRINT); derper's STUN
    /// server answers only those.
    #[arg(long)]
    pub tailscale: bool,
}

impl Command {
    /// Worker threads asked for, if any.
    pub fn threads(&self) -> Option<usize> {
        match self {
            Command::Derp(a) => a.run.threads,
            Command::Connect(a) => a.run.threads,
            Command::Idle(a) => a.threads,
            Command::Stun(a) => a.run.threads,
            Command::Soak(a) => a.threads,
            Command::Abuse(a) => a.threads,
            Command::UdpRelay(a) => a.run.threads,
            Command::Turn(a) => a.run.threads,
        }
    }

    /// Whether to print JSON, where to write the SVG, whether to draw progress.
    pub fn outputs(&self) -> (bool, Option<&std::path::Path>, bool) {
        match self {
            Command::Derp(a) => (a.run.json, a.run.svg.as_deref(), !a.run.no_progress),
            Command::Connect(a) => (a.run.json, a.run.svg.as_deref(), !a.run.no_progress),
            Command::Idle(a) => (a.json, a.svg.as_deref(), !a.no_progress),
            Command::Stun(a) => (a.run.json, a.run.svg.as_deref(), !a.run.no_progress),
            // These print their own results (see main.rs).
            Command::Soak(a) => (a.json, None, false),
            Command::Abuse(a) => (a.json, None, false),
            Command::UdpRelay(a) => (a.run.json, None, false),
            Command::Turn(a) => (a.run.json, None, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derp(args: &[&str]) -> Result<DerpArgs, clap::Error> {
        let mut argv = vec!["ferry-loadtest", "derp", "http://127.0.0.1:3340/derp"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Derp(a) => Ok(a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("7B"), Ok(7));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999GiB").is_err());
    }

    #[test]
    fn abuse_and_soak_flags() {
        let c = Cli::try_parse_from([
            "ferry-loadtest",
            "abuse",
            "https://127.0.0.1:8443/derp",
            "--insecure",
            "--mode",
            "handshake-never",
            "--stall-at",
            "tcp",
        ])
        .unwrap();
        let Command::Abuse(a) = c.command else {
            unreachable!()
        };
        assert_eq!(
            (a.mode, a.stall_at, a.conns),
            (AbuseMode::HandshakeNever, StallAt::Tcp, 5000)
        );
        assert_eq!(a.bytes, 1 << 30);
        let c =
            Cli::try_parse_from(["ferry-loadtest", "soak", "https://127.0.0.1:8443/derp"]).unwrap();
        let Command::Soak(s) = c.command else {
            unreachable!()
        };
        assert_eq!((s.clients, s.pairs, s.churn), (10_000, 1000, 100));
        assert_eq!(s.duration, Duration::from_secs(600));
        assert_eq!(s.sample_every, Duration::from_secs(10));
    }

    #[test]
    fn window_flags() {
        let a = derp(&[]).unwrap();
        assert_eq!((a.window, a.rate), (None, 0), "flood by default");
        let a = derp(&["--window"]).unwrap();
        assert_eq!(a.window, Some(16), "--window alone is 16");
        assert_eq!(a.window_timeout, Duration::from_millis(200));
        let a = derp(&["--window", "8", "--window-timeout", "1s"]).unwrap();
        assert_eq!(
            (a.window, a.window_timeout),
            (Some(8), Duration::from_secs(1))
        );
        assert!(
            derp(&["--window", "8", "--rate", "1000"]).is_err(),
            "closed or open loop"
        );
        assert!(derp(&["--window", "0"]).is_err());
        assert!(
            derp(&["--window-timeout", "1s"]).is_err(),
            "only with --window"
        );
    }
}
