//! The command line: the top-level parser, its subcommands and help texts. The relay's own
//! settings (flags, `FERRY_*` variables, file keys) are in [`crate::settings`].

use std::collections::HashSet;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::ArgMatches;

use crate::settings::{DerpmapSettings, Settings};

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
Ports: DERP 443/tcp, STUN 3478/udp+tcp, UDP relay 3480/udp, captive-portal check 80/tcp,
metrics 127.0.0.1:9090.
See docs/operating.md.";

#[derive(Debug, clap::Parser)]
#[command(name = "ferry-relay", version, about = ABOUT, after_help = AFTER_HELP)]
pub(crate) struct Top {
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Option<Cmd>,
}

/// Without a subcommand, ferry-relay runs the relay.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Cmd {
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
pub(crate) enum MapFormat {
    /// Tailscale's DERPMap JSON (policy file `derpMap`, derpprobe -derp-map).
    Json,
    /// Headscale's derp.yaml (a file under `derp.paths`).
    Headscale,
}

#[derive(Debug, clap::Args)]
pub(crate) struct DerpmapArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    pub format: MapFormat,
    #[command(flatten)]
    pub map: DerpmapSettings,
    #[command(flatten)]
    pub settings: Settings,
}

/// The ids of the arguments given on the command line or through the environment (not
/// defaults): which of a setting's sources to name in a message.
pub(crate) fn given(matches: &ArgMatches) -> HashSet<String> {
    matches
        .ids()
        .filter(|id| {
            matches!(
                matches.value_source(id.as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .map(|id| id.to_string())
        .collect()
}

/// The relay's flags given before `derpmap`, which belong to the top-level parser and would be
/// ignored: `derpmap` reads its own copy of them.
pub(crate) fn flags_before_subcommand(matches: &ArgMatches) -> Vec<String> {
    use clap::CommandFactory;
    Top::command()
        .get_arguments()
        .filter(|a| matches.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine))
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect()
}

/// The long flag and environment variable of the argument `id` (`--accept-rate`,
/// `FERRY_ACCEPT_RATE`), for messages.
pub(crate) fn flag_and_env(id: &str) -> Option<(String, Option<String>)> {
    use clap::CommandFactory;
    let cmd = Top::command();
    let arg = cmd.get_arguments().find(|a| a.get_id().as_str() == id)?;
    Some((
        format!("--{}", arg.get_long()?),
        arg.get_env().map(|e| e.to_string_lossy().into_owned()),
    ))
}
