//! `gantry-executor`: runs one Gantry task inside its job (a Kubernetes pod, or a child
//! process of the dispatcher's `local` runtime) and publishes exactly one result.
//!
//! It reads the task file, runs the engine under the task's deadline, publishes a
//! `gantry.result/v1` message to the results exchange with publisher confirms, then writes a
//! short status for the runtime (`exit.json` in the job directory, the termination log).
//!
//! # Layout
//!
//! - [`cli`]: the flags and their environment variables, turned into [`run::Settings`].
//! - [`run`]: one attempt from task file to published result, and the exit code it earns.
//! - [`warm`]: a warm executor, serving the tasks the dispatcher hands it on one engine.
//! - [`engine`]: the engines (`echo`, `command`, `openai`) and how they stop at the deadline.
//! - [`progress`]: a streamed answer's pieces, published as they come.
//! - [`publish`]: publishing the result with confirms and retries.
//! - [`job_dir`]: the `local` runtime's job directory (`started`, `exit.json`).
//! - [`report`]: the final status written to `exit.json` and the termination log.

mod cli;
mod engine;
mod job_dir;
mod progress;
mod publish;
mod report;
mod run;
mod warm;

#[cfg(test)]
mod broker_tests;

use std::process::ExitCode;

use clap::Parser;
use gantry_shared::config::LogFormat;
use gantry_shared::telemetry;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::run::Outcome;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = cli::Args::parse();
    let config = args.global.load();
    let traces = telemetry::init_service(
        config.as_ref().map_or(LogFormat::Text, |c| c.log_format),
        telemetry::SERVICE_FILTER,
        "gantry-executor",
        config
            .as_ref()
            .ok()
            .and_then(|c| c.otlp_endpoint.as_deref()),
    );
    let code = serve(args, config).await;
    traces.shutdown().await;
    code
}

/// Runs the task (or, warm, the tasks) the flags and configuration describe.
async fn serve(
    args: cli::Args,
    config: gantry_shared::Result<gantry_shared::config::Config>,
) -> ExitCode {
    let settings = match args.into_settings() {
        Ok(settings) => settings,
        Err(e) => clap::Error::raw(clap::error::ErrorKind::MissingRequiredArgument, e).exit(),
    };

    let config = match config {
        Ok(config) => config,
        Err(e) => {
            let reason = format!(
                "cannot load the configuration: {}; fix --config / GANTRY_CONFIG or the GANTRY_* variables",
                telemetry::chain(&e)
            );
            return finish(run::refuse(&settings, reason).await);
        }
    };

    // Register the handlers before any work, so a signal that arrives early is not lost.
    let shutdown = match shutdown_signal() {
        Ok(shutdown) => shutdown,
        Err(e) => {
            let reason = format!("cannot install the SIGTERM/SIGINT handlers: {e}");
            return finish(run::refuse(&settings, reason).await);
        }
    };

    if let Some(warm) = &settings.warm {
        let code = warm::serve(&settings, warm, &config, shutdown).await;
        info!(exit_code = code, "warm executor ended");
        return ExitCode::from(code);
    }
    finish(run::run(&settings, &config, shutdown).await)
}

/// Logs how the run ended and returns its exit code.
fn finish(outcome: Outcome) -> ExitCode {
    let code = outcome.exit_code();
    match outcome {
        Outcome::Published(_) => info!(exit_code = code, "{}", outcome.describe()),
        _ => warn!(exit_code = code, "{}", outcome.describe()),
    }
    ExitCode::from(code)
}

/// A future that completes on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => warn!("SIGTERM received; stopping the engine"),
            _ = int.recv() => warn!("SIGINT received; stopping the engine"),
        }
    })
}
