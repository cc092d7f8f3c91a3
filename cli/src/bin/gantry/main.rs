//! `gantry`: submit GPU tasks, follow them, set up the broker and handle dead letters, from
//! a shell.
//!
//! Results go to stdout (text, or one JSON object with `--json`); errors and logs go to
//! stderr; the exit code says how the task ended (see `gantry --help`). Tasks are submitted
//! and followed with `gantry-producer`, the library backends link; the topology and dead
//! letters are handled by this crate's library, `gantry_cli`.
//!
//! # Layout
//!
//! - [`args`]: the command line and its help.
//! - [`commands`]: what each subcommand does.
//! - [`dlq`]: `gantry dlq …`, its arguments and what it does; [`dlq_view`] prints it.
//! - [`follow`]: `submit --stream`, the answer's pieces printed as they come.
//! - [`payload`]: reading `--payload` (inline JSON, `@FILE`, `@-`).
//! - [`view`]: how a task is printed.
//! - [`exit`]: exit codes.

mod args;
mod commands;
mod dlq;
mod dlq_view;
mod exit;
mod follow;
mod payload;
mod view;

use std::process::ExitCode;

use clap::Parser;
use gantry_shared::config::Config;
use gantry_shared::telemetry;

use crate::args::Cli;
use crate::exit::Exit;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // Clap prints usage errors itself and exits 2.
    let cli = Cli::parse();
    let config = match cli.global.load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {}", telemetry::chain(&e));
            return Exit::Usage.into();
        }
    };
    let traces = init_logging(&config);
    let ran = commands::run(cli.command, &config).await;
    traces.shutdown().await;
    match ran {
        Ok(exit) => exit.into(),
        Err(e) => {
            eprintln!("error: {}", telemetry::chain(e.as_ref()));
            Exit::for_error(&e).into()
        }
    }
}

/// Logs go to stderr, warnings only unless `RUST_LOG` asks for more: stdout carries the
/// result. lapin stays quiet below errors (it logs a returned message with its payload), and
/// about channels the broker closes: a passive declare of a missing queue (`gantry dlq`
/// asks whether an executor class has a queue) or a topology conflict close the channel
/// that asked, and the command reports that itself. With `otlp_endpoint` set, a submit's
/// span goes there, as the task's trace begins.
fn init_logging(config: &Config) -> telemetry::Traces {
    telemetry::init_service(
        config.log_format,
        "warn,lapin=error,lapin::channel=off",
        "gantry",
        config.otlp_endpoint.as_deref(),
    )
}
