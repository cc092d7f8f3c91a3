//! `gantry-bench-warm`: what warm executors save when a job's engine is slow to start. The
//! same tasks arrive at a steady rate twice in one run, on the `local` runtime: once to a
//! class with one job per task, once to the same class made warm. Every executor waits
//! `--start-delay` before its engine is ready (`GANTRY_ENGINE_START_DELAY`, as loading a
//! model would), and every task works `--work` (the echo engine's `sleep_ms`).
//!
//! Reported for each: executor-seconds per task (the time executor processes lived, from
//! `started` to `exit.json`, summed: what GPU-seconds would be), throughput, and the p50/p99
//! of the time from submit to the result persisted.
//!
//! Build the binaries first, in release: `cargo build --release --bins`, then
//! `target/release/gantry-bench-warm` (or `make bench-warm`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use chrono::{DateTime, Utc};
use clap::Parser;
use gantry_bench::Figures;
use gantry_shared::message::TaskId;
use gantry_tests::{TestEnv, task_spec};
use serde_json::json;
use tokio_postgres::NoTls;

/// One job per task against warm executors, for a slow-starting engine.
#[derive(Debug, Parser)]
struct Args {
    /// Tasks in each run.
    #[arg(long, default_value_t = 500)]
    tasks: usize,
    /// Tasks submitted per second, steadily.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// How long each executor's engine takes to get ready (L).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    start_delay: Duration,
    /// How long each task works (I).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    work: Duration,
    /// max_active_jobs of the class with one job per task.
    #[arg(long, default_value_t = 150)]
    cold_jobs: u32,
    /// max_active_jobs of the warm class (warm executors).
    #[arg(long, default_value_t = 2)]
    warm_jobs: u32,
    /// max_concurrency of each warm executor.
    #[arg(long, default_value_t = 8)]
    warm_concurrency: u16,
}

/// What one run measured.
struct Run {
    figures: Figures,
    executor_seconds: f64,
    executors: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "gantry-bench-warm: {} tasks at {}/s, engine start L = {:?}, work I = {:?}",
        args.tasks, args.rate, args.start_delay, args.work
    );
    let cold_class = format!(
        "executors:\n  echo:\n    engine: {{ kind: echo }}\n    max_active_jobs: {}\n",
        args.cold_jobs
    );
    let warm_class = format!(
        "executors:\n  echo:\n    engine: {{ kind: echo }}\n    max_active_jobs: {}\n    warm: {{ max_concurrency: {}, idle_timeout: 10s }}\n",
        args.warm_jobs, args.warm_concurrency
    );
    let cold = run(&args, &cold_class).await.context("one job per task")?;
    let warm = run(&args, &warm_class).await.context("warm executors")?;
    let per_task = |r: &Run| r.executor_seconds / args.tasks as f64;
    for (name, r) in [
        (
            format!("one job per task (max_active_jobs {})", args.cold_jobs),
            &cold,
        ),
        (
            format!(
                "warm ({} executors × {} at once)",
                args.warm_jobs, args.warm_concurrency
            ),
            &warm,
        ),
    ] {
        println!(
            "{name}: {:.2} executor-seconds per task ({} executors, {:.0} s in all)",
            per_task(r),
            r.executors,
            r.executor_seconds
        );
        r.figures.print("  submit→persisted");
    }
    println!(
        "\nratio executor-seconds per task, one job per task / warm: {:.1}x",
        per_task(&cold) / per_task(&warm)
    );
    println!(
        "ratio p99, warm / one job per task: {:.2}",
        warm.figures.p99.as_secs_f64() / cold.figures.p99.as_secs_f64()
    );
    Ok(())
}

/// Submits the tasks at the steady rate to a dispatcher with `catalog`, waits for all of
/// them, and reads what the executors cost.
async fn run(args: &Args, catalog: &str) -> Result<Run> {
    let env = TestEnv::new(Some(catalog)).await?;
    let delay = humantime::format_duration(args.start_delay).to_string();
    let dispatcher =
        gantry_tests::Dispatcher::start(&env, &[("GANTRY_ENGINE_START_DELAY", delay.as_str())])?;
    let producer = Arc::new(env.producer().await?);
    let work_ms = u64::try_from(args.work.as_millis())?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    let start = Instant::now();
    let mut submitted: Vec<(TaskId, DateTime<Utc>)> = Vec::with_capacity(args.tasks);
    for i in 0..args.tasks {
        tick.tick().await;
        let at = Utc::now();
        let spec = task_spec(
            "echo",
            json!({"i": i, "sleep_ms": work_ms}),
            Duration::from_secs(3600),
        );
        submitted.push((producer.submit(spec).await?, at));
    }
    let (client, conn) = tokio_postgres::connect(&env.database_url, NoTls).await?;
    tokio::spawn(conn);
    // A benchmark, not a test: poll the count until every task is terminal.
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FROM tasks WHERE state IN ('succeeded','failed','expired','cancelled','dead_lettered')",
                &[],
            )
            .await?;
        if row.get::<_, i64>(0) as usize >= args.tasks {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(3600),
            "the run took over an hour"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows = client
        .query("SELECT task_id, state, finished_at FROM tasks", &[])
        .await?;
    let finished: std::collections::HashMap<TaskId, (String, DateTime<Utc>)> = rows
        .iter()
        .map(|r| {
            let id = TaskId::from(r.get::<_, uuid::Uuid>(0));
            let at: Option<DateTime<Utc>> = r.get(2);
            (id, (r.get::<_, String>(1), at.unwrap_or_else(Utc::now)))
        })
        .collect();
    let mut latencies = Vec::with_capacity(args.tasks);
    let mut last = submitted[0].1;
    for (id, at) in &submitted {
        let (state, done) = finished.get(id).context("a task without a row")?;
        ensure!(
            state == "succeeded",
            "task {id} ended {state}; see {}",
            dispatcher.log.display()
        );
        latencies.push((*done - *at).to_std().unwrap_or_default());
        last = last.max(*done);
    }
    let elapsed = (last - submitted[0].1).to_std().unwrap_or_default();
    // Warm executors are drained once idle for idle_timeout: their cost includes that.
    let jobs = env.dir.path().join("state/jobs");
    let (executor_seconds, executors) = executor_time(&jobs, Duration::from_secs(120)).await?;
    dispatcher.terminate(Duration::from_secs(60))?;
    if let Ok(p) = Arc::try_unwrap(producer) {
        p.close().await;
    }
    env.cleanup().await?;
    Ok(Run {
        figures: Figures::of(args.tasks, elapsed, latencies),
        executor_seconds,
        executors,
    })
}

/// The seconds every executor under `jobs` lived (from `started` to `exit.json`), summed,
/// and how many there were; waits up to `within` for the last ones to end.
async fn executor_time(jobs: &Path, within: Duration) -> Result<(f64, usize)> {
    let until = Instant::now() + within;
    loop {
        let mut total = 0.0;
        let mut count = 0;
        let mut running = 0;
        for dir in std::fs::read_dir(jobs)?.flatten().map(|e| e.path()) {
            let Ok(born) = modified(&dir.join("started")) else {
                continue;
            };
            count += 1;
            match modified(&dir.join("exit.json")) {
                Ok(died) => total += died.duration_since(born).unwrap_or_default().as_secs_f64(),
                Err(_) => running += 1,
            }
        }
        if running == 0 {
            return Ok((total, count));
        }
        ensure!(Instant::now() < until, "{running} executors still running");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn modified(path: &Path) -> std::io::Result<SystemTime> {
    std::fs::metadata(path)?.modified()
}
