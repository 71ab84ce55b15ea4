//! `ferry-loadtest`: see `ferry-loadtest --help`.

use std::process::ExitCode;

use clap::Parser;
use ferry_loadtest::{svg, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cli.command.threads() {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // soak, abuse, udp-relay and turn print results of their own.
    let own = match &cli.command {
        Command::Soak(a) => Some(
            rt.block_on(ferry_loadtest::soak::run(a))
                .map(|r| (a.json, r.to_json(), r.summary())),
        ),
        Command::Abuse(a) => Some(
            rt.block_on(ferry_loadtest::abuse::run(a))
                .map(|r| (a.json, r.to_json(), r.summary())),
        ),
        Command::UdpRelay(a) => Some(rt.block_on(ferry_loadtest::udprelay::run(a)).map(|r| {
            (
                a.run.json,
                serde_json::to_string_pretty(&r).expect("serializable"),
                r.summary(),
            )
        })),
        Command::Turn(a) => Some(rt.block_on(ferry_loadtest::turn::run(a)).map(|r| {
            (
                a.run.json,
                serde_json::to_string_pretty(&r).expect("serializable"),
                r.summary(),
            )
        })),
        _ => None,
    };
    if let Some(r) = own {
        return match r {
            Ok((json, j, text)) => {
                if json {
                    println!("{j}");
                } else {
                    print!("{text}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let report = match rt.block_on(ferry_loadtest::run(&cli)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let (json, svg_path, _) = cli.command.outputs();
    if let Some(path) = svg_path {
        if let Err(e) = std::fs::write(path, svg::render(&report)) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.summary());
    }
    ExitCode::SUCCESS
}
