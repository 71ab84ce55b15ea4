//! ferry-loadtest: a load generator for any DERP v2 relay and any STUN server.
//!
//! The binary (`src/main.rs`) is a thin clap front; everything it runs lives here so the tests
//! can run the same code against an in-process relay and check its accounting.
//!
//! - [`target`]: the URL, TCP dialing spread over 127.0.0.0/8, TLS (CA file, pin, insecure), the
//!   HTTP upgrade and the DERP handshake, with errors that say what went wrong.
//! - [`derp`]: packet runs (pairs or fan-in, flood or fixed rate, echo for round trips) with an
//!   exact end-of-run drain, so sent = received + what the relay dropped.
//! - [`conns`]: connect storm (handshakes/s) and idle connections (server memory per client).
//! - [`stun`]: STUN Binding requests over UDP, pipelined, with latency and loss.
//! - [`soak`]: a long run with churn and traffic, the relay's RSS/fds/tasks/queues sampled.
//! - [`abuse`]: hostile clients at scale (stalled handshakes, drips, garbage frames).
//! - [`udprelay`]: a UDP relay's forwarding capacity (issue 15).
//! - [`turn`]: a TURN relay's (coturn's) forwarding capacity, measured the same way.
//! - [`stats`]: slopes, keepalive lateness, Prometheus scrapes.
//! - [`report`], [`svg`]: the JSON report (schema in `report.schema.json`), the text summary and
//!   the chart.

pub mod abuse;
pub mod cli;
pub mod conns;
pub mod derp;
pub mod limits;
pub mod procfs;
pub mod progress;
pub mod report;
pub mod soak;
pub mod stats;
pub mod stun;
pub mod svg;
pub mod target;
pub mod turn;
pub mod udprelay;

pub use cli::{Cli, Command};
pub use report::Report;

/// Runs one command to completion and returns its report. `soak` and `abuse` have results of
/// their own: [`soak::run`], [`abuse::run`].
pub async fn run(cli: &Cli) -> anyhow::Result<Report> {
    match &cli.command {
        Command::Soak(_) | Command::Abuse(_) | Command::UdpRelay(_) | Command::Turn(_) => {
            anyhow::bail!(
                "soak, abuse, udp-relay and turn have their own results: call soak::run, \
                 abuse::run, udprelay::run or turn::run"
            )
        }
        Command::Derp(a) => derp::run(a).await,
        Command::Connect(a) => conns::run_connect(a).await,
        Command::Idle(a) => conns::run_idle(a).await,
        Command::Stun(a) => stun::run(a).await,
    }
}
