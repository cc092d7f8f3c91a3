//! `gantry-bench`: end-to-end throughput and latency of echo tasks on the `local` runtime,
//! beside a baseline measured in the same run on the same broker: a bare lapin
//! publish (confirmed) → consume → ack loop through a quorum queue.
//!
//! Build the binaries first, in release: `cargo build --release --bins`, then
//! `cargo run --release -p gantry-bench --bin gantry-bench -- --tasks 2000`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use clap::Parser;
use gantry_bench::{Figures, lapin_round_trip};
use gantry_shared::message::TaskId;
use gantry_shared::store::TaskState;
use gantry_tests::{TestEnv, echo_spec};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_postgres::NoTls;

/// Measures Gantry end to end against a bare RabbitMQ loop on the same broker.
#[derive(Debug, Parser)]
struct Args {
    /// Tasks to push through Gantry (and messages through the baseline).
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Concurrent submitters (and publishers in the baseline).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// max_active_jobs of the echo class.
    #[arg(long, default_value_t = 16)]
    max_active: u32,
    /// Make the echo class warm, each executor running this many tasks at once
    /// (`max_active` then counts warm executors).
    #[arg(long, value_name = "MAX_CONCURRENCY")]
    warm: Option<u16>,
}

/// Sequential tasks measured before the bulk run, for latency without queueing.
const IDLE_SAMPLES: usize = 30;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "gantry-bench: {} tasks, {} submitters, max_active_jobs {}{}",
        args.tasks,
        args.concurrency,
        args.max_active,
        args.warm
            .map(|n| format!(", warm (max_concurrency {n})"))
            .unwrap_or_default()
    );
    let idle_base = lapin_round_trip(1, IDLE_SAMPLES, 0)
        .await
        .context("idle baseline")?;
    let baseline = lapin_round_trip(args.concurrency, args.tasks, 0)
        .await
        .context("baseline")?;
    let (idle, gantry) = gantry(&args).await.context("gantry run")?;
    let base_name = "baseline: lapin publish→consume→ack (quorum queue)";
    let gantry_name = if args.warm.is_some() {
        "gantry: submit→persisted (local runtime, echo, warm)"
    } else {
        "gantry: submit→persisted (local runtime, echo)"
    };
    println!(
        "\nunder load ({} at once, {} submitters):",
        args.tasks, args.concurrency
    );
    baseline.print(base_name);
    gantry.print(gantry_name);
    println!("\none at a time ({IDLE_SAMPLES} sequential, nothing queued):");
    idle_base.print(base_name);
    idle.print(gantry_name);
    println!(
        "\nratio gantry/baseline throughput under load: {:.4}",
        gantry.per_second / baseline.per_second
    );
    println!(
        "ratio gantry/baseline p50 latency one at a time: {:.1}x",
        idle.p50.as_secs_f64() / idle_base.p50.as_secs_f64()
    );
    Ok(())
}

async fn gantry(args: &Args) -> Result<(Figures, Figures)> {
    let warm = gantry_bench::warm_line(args.warm);
    let catalog = format!(
        "executors:\n  echo:\n    engine: {{ kind: echo }}\n    max_active_jobs: {}\n{warm}",
        args.max_active
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let dispatcher = env.dispatcher_process()?;
    let producer = Arc::new(env.producer().await?);

    let idle_start = Instant::now();
    let mut idle = Vec::with_capacity(IDLE_SAMPLES);
    for i in 0..IDLE_SAMPLES {
        let t = Instant::now();
        let id = producer
            .submit(echo_spec("bench.echo", json!({"i": i}))?)
            .await?;
        let record = producer.wait(id, Duration::from_secs(60)).await?;
        anyhow::ensure!(
            record.state == TaskState::Succeeded,
            "idle task {id} ended {}",
            record.state
        );
        idle.push(t.elapsed());
    }
    let idle = Figures::of(IDLE_SAMPLES, idle_start.elapsed(), idle);

    let n = args.tasks;
    let limit = Arc::new(Semaphore::new(args.concurrency));
    let start = Instant::now();
    let mut sends = Vec::with_capacity(n);
    for i in 0..n {
        let permit = limit.clone().acquire_owned().await?;
        let producer = producer.clone();
        sends.push(tokio::spawn(async move {
            let submitted: DateTime<Utc> = Utc::now();
            let id = producer
                .submit(echo_spec("bench.echo", json!({"i": i}))?)
                .await?;
            drop(permit);
            anyhow::Ok((id, submitted))
        }));
    }
    let mut submitted: HashMap<TaskId, DateTime<Utc>> = HashMap::with_capacity(n);
    for s in sends {
        let (id, at) = s.await??;
        submitted.insert(id, at);
    }
    let (client, conn) = tokio_postgres::connect(&env.database_url, NoTls).await?;
    tokio::spawn(conn);
    // A benchmark, not a test: poll the count until every task is terminal.
    loop {
        let row = client
            .query_one("SELECT count(*) FROM tasks WHERE state IN ('succeeded','failed','expired','cancelled','dead_lettered')", &[])
            .await?;
        let done: i64 = row.get(0);
        if done as usize >= n + IDLE_SAMPLES {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(1800),
            "only {done} of {n} tasks finished in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = start.elapsed();
    let rows = client
        .query("SELECT task_id, state, updated_at FROM tasks", &[])
        .await?;
    let mut latencies = Vec::with_capacity(n);
    let mut failed = 0;
    for r in rows {
        let id = TaskId::from(r.get::<_, uuid::Uuid>(0));
        if r.get::<_, String>(1) != "succeeded" {
            failed += 1;
        }
        let persisted: DateTime<Utc> = r.get(2);
        if let Some(at) = submitted.get(&id) {
            latencies.push((persisted - *at).to_std().unwrap_or_default());
        }
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} tasks did not succeed; see {}",
        dispatcher.log.display()
    );
    dispatcher.terminate(Duration::from_secs(60))?;
    if let Ok(p) = Arc::try_unwrap(producer) {
        p.close().await;
    }
    env.cleanup().await?;
    Ok((idle, Figures::of(n, elapsed, latencies)))
}
