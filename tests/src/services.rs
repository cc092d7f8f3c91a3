//! Restarts of the RabbitMQ and PostgreSQL servers on this machine, for the tests and the
//! fault suite that check what survives them. They stop every other user of the servers,
//! so whatever calls them runs alone.

use std::process::Command;

use anyhow::{Context, Result, bail};

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(cmd)
        .args(args)
        .status()
        .with_context(|| format!("running {cmd}"))?;
    if !status.success() {
        bail!("{cmd} {args:?} failed: {status}");
    }
    Ok(())
}

/// Stops and starts the RabbitMQ application, and waits until it is up.
///
/// # Errors
/// `rabbitmqctl` is missing or fails.
pub fn restart_rabbitmq() -> Result<()> {
    run("rabbitmqctl", &["-q", "stop_app"])?;
    run("rabbitmqctl", &["-q", "start_app"])?;
    run("rabbitmqctl", &["-q", "await_startup"])
}

/// Restarts the newest PostgreSQL cluster named `main`.
///
/// # Errors
/// No cluster under `/etc/postgresql`, or `pg_ctlcluster` fails.
pub fn restart_postgres() -> Result<()> {
    let version = std::fs::read_dir("/etc/postgresql")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
        .context("no PostgreSQL cluster under /etc/postgresql")?;
    run(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", &version, "main", "restart"],
    )
}
