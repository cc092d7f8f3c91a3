//! `gantry-bench-celery`: the same Celery client (`bench/celery/driver.py`, celery 5 from
//! PyPI) against a Celery worker and against Gantry, in one run.
//!
//! - Celery: a prefork worker, `-c 2`, `task_acks_late`, results by `rpc://`, running
//!   `bench.echo` (`bench/celery/worker_app.py`), which returns `{args, kwargs}`.
//! - Gantry: a dispatcher in this process with its Celery bridge on, the `local` runtime,
//!   the `echo` class claiming `bench.echo`: each task is converted, published, dispatched
//!   as its own `gantry-executor` process, its result committed to Postgres and then sent
//!   to the client's reply queue.
//!
//! Each side: `--burst` tasks sent at once and gathered (throughput; latency there includes
//! the wait in the queue), then `--serial` tasks one at a time (a task's round trip, p50
//! and p99). Build in release first: `cargo build --release --bins`
//! (`make bench-celery` does both).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use gantry_bench::Figures;
use gantry_tests::celery::{CeleryNames, python};
use gantry_tests::{TestEnv, amqp_url, eventually, queue_state};
use serde_json::Value;
use tokio::process::Command;

/// A Celery worker and Gantry, behind the same Celery client.
#[derive(Debug, Parser)]
struct Args {
    /// Tasks sent at once, each side.
    #[arg(long, default_value_t = 1000)]
    burst: usize,
    /// Tasks sent one at a time, each side.
    #[arg(long, default_value_t = 200)]
    serial: usize,
    /// `max_active_jobs` of Gantry's echo class.
    #[arg(long, default_value_t = 8)]
    max_active_jobs: u32,
    /// Make Gantry's echo class warm, each executor running this many tasks at once
    /// (`max_active_jobs` then counts warm executors).
    #[arg(long, value_name = "MAX_CONCURRENCY")]
    warm: Option<u16>,
}

/// What one side measured.
struct Side {
    burst: Figures,
    serial: Figures,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "Celery client → Celery worker (prefork -c 2, acks late) vs Gantry (local runtime, echo class, max_active_jobs {}{}), {} tasks at once, {} one at a time",
        args.max_active_jobs,
        args.warm
            .map(|n| format!(", warm × {n}"))
            .unwrap_or_default(),
        args.burst,
        args.serial
    );
    let celery = celery_worker(&args).await?;
    let gantry = gantry(&args).await?;
    for (name, side) in [("Celery worker", &celery), ("Gantry", &gantry)] {
        side.burst.print(&format!("{name}: {} at once", args.burst));
        side.serial.print(&format!("{name}: one at a time"));
    }
    println!(
        "throughput Gantry / Celery: {:.3} at once, {:.3} one at a time",
        gantry.burst.per_second / celery.burst.per_second,
        gantry.serial.per_second / celery.serial.per_second
    );
    Ok(())
}

/// The Celery side: a worker of the benchmark's app on a world of its own.
async fn celery_worker(args: &Args) -> Result<Side> {
    let env = TestEnv::new(None).await?;
    let names = CeleryNames::of(&env);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/celery");
    let mut worker = Command::new(python()?)
        .args([
            "-m",
            "celery",
            "-A",
            "worker_app",
            "worker",
            "-c",
            "2",
            "-P",
            "prefork",
        ])
        .args([
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ])
        .args(["-l", "WARNING", "-Q", &names.queue])
        .current_dir(dir)
        .env("CELERY_BROKER_URL", amqp_url())
        .env("CELERY_QUEUE", &names.queue)
        .env("CELERY_CONTROL_EXCHANGE", &names.control)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the Celery worker")?;
    eventually(
        "the Celery worker to consume",
        Duration::from_secs(60),
        || async {
            Ok(queue_state(&names.queue)
                .await
                .ok()
                .filter(|(_, consumers)| *consumers > 0)
                .map(|_| ()))
        },
    )
    .await?;
    let side = drive(args, &names).await;
    worker.kill().await.ok();
    names.remove(&env).await?;
    env.cleanup().await?;
    side
}

/// The Gantry side: a dispatcher with its Celery bridge on, on a world of its own.
async fn gantry(args: &Args) -> Result<Side> {
    let warm = gantry_bench::warm_line(args.warm);
    let catalog = format!(
        "executors:\n  echo:\n    engine: {{ kind: echo }}\n    max_active_jobs: {}\n    celery: {{ tasks: [bench.echo] }}\n{warm}",
        args.max_active_jobs
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let names = CeleryNames::of(&env);
    let dispatcher = env.celery_dispatcher().await?;
    let side = drive(args, &names).await;
    dispatcher.stop().await?;
    names.remove(&env).await?;
    env.cleanup().await?;
    side
}

/// Runs the client once against `names` and reads its figures.
async fn drive(args: &Args, names: &CeleryNames) -> Result<Side> {
    let out = Command::new(python()?)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/celery/driver.py"))
        .args([args.burst.to_string(), args.serial.to_string()])
        .env("CELERY_BROKER_URL", amqp_url())
        .env("CELERY_QUEUE", &names.queue)
        .env("CELERY_CONTROL_EXCHANGE", &names.control)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .context("running the benchmark's Celery client")?;
    if !out.status.success() {
        bail!("the benchmark's Celery client failed ({})", out.status);
    }
    let figures: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the client printed {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    Ok(Side {
        burst: figures_of(&figures["burst"])?,
        serial: figures_of(&figures["serial"])?,
    })
}

fn figures_of(run: &Value) -> Result<Figures> {
    let n = run["n"].as_u64().context("n")? as usize;
    let seconds = run["seconds"].as_f64().context("seconds")?;
    let latencies = run["latencies"]
        .as_array()
        .context("latencies")?
        .iter()
        .filter_map(Value::as_f64)
        .map(Duration::from_secs_f64)
        .collect();
    Ok(Figures::of(n, Duration::from_secs_f64(seconds), latencies))
}
