//! `ferry-relay`: parse flags, environment and the config file, then run [`Server::spawn`]
//! (`run`), print the DERP map (`derpmap`) or probe a health URL (`healthcheck`).
//!
//! [`Server::spawn`]: ferry_relay::Server::spawn

mod advice;
mod cli;
mod derpmap;
mod file;
mod healthcheck;
mod resolve;
mod run;
mod settings;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use cli::{Cmd, Top};
use resolve::Sources;

#[tokio::main]
async fn main() -> ExitCode {
    let matches = Top::command().get_matches();
    let top = match Top::from_arg_matches(&matches) {
        Ok(t) => t,
        Err(e) => e.exit(),
    };
    let result = match top.command {
        None => match Sources::load(top.settings, cli::given(&matches)) {
            Ok(sources) => run::run(sources).await,
            Err(e) => Err(e.into()),
        },
        Some(Cmd::Healthcheck { url, timeout }) => {
            return match healthcheck::check(&url, timeout) {
                Ok(()) => ExitCode::SUCCESS,
                Err(why) => {
                    eprintln!("ferry-relay healthcheck: unhealthy: {}", chain(&why.into()));
                    ExitCode::FAILURE
                }
            };
        }
        Some(Cmd::Derpmap(args)) => {
            let before = cli::flags_before_subcommand(&matches);
            if before.is_empty() {
                let mut args = *args;
                let sub = matches
                    .subcommand_matches("derpmap")
                    .expect("the derpmap subcommand matched");
                let mut settings = std::mem::take(&mut args.settings);
                settings.derpmap = std::mem::take(&mut args.map);
                Sources::load(settings, cli::given(sub))
                    .map_err(anyhow::Error::from)
                    .and_then(Sources::resolve)
                    .and_then(|r| derpmap::command(args, r))
            } else {
                Err(anyhow::anyhow!(
                    "put the relay's flags after `derpmap` (ferry-relay derpmap {} ...), so they are read",
                    before.join(" ")
                ))
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-relay: error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-separated (as `{:#}` prints them), leaving out a TOML parse
/// error's own text: its Display is a multi-line snippet repeating what the message above it
/// already says with the line number. Advice the binary attached ([`ferry_proto::Advised`]) comes
/// last, after `; `.
fn chain(e: &anyhow::Error) -> String {
    ferry_proto::report(e.as_ref(), |c| {
        c.downcast_ref::<toml::de::Error>().is_some()
    })
}
