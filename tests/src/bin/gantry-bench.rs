//! `gantry-bench`: end-to-end throughput and latency of echo tasks on the `local` runtime,
//! beside a baseline measured in the same run on the same broker: a bare lapin
//! publish (confirmed) → consume → ack loop through a quorum queue.
//!
//! Build the binaries first, in release: `cargo build --release --bins`, then
//! `cargo run --release -p gantry-tests --bin gantry-bench -- --tasks 2000`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use clap::Parser;
use futures_util::StreamExt;
use gantry_shared::amqp::{self, confirm_channel, publish_confirmed};
use gantry_shared::message::{ExecutorClass, TaskId, TaskName, TaskSpec};
use gantry_tests::{TestEnv, amqp_url};
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
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
}

/// Sequential tasks measured before the bulk run, for latency without queueing.
const IDLE_SAMPLES: usize = 30;

struct Figures {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    elapsed: Duration,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "gantry-bench: {} tasks, {} submitters, max_active_jobs {}",
        args.tasks, args.concurrency, args.max_active
    );
    let idle_base = baseline(1, IDLE_SAMPLES).await.context("idle baseline")?;
    let baseline = baseline(args.concurrency, args.tasks)
        .await
        .context("baseline")?;
    let (idle, gantry) = gantry(&args).await.context("gantry run")?;
    let base_name = "baseline: lapin publish→consume→ack (quorum queue)";
    let gantry_name = "gantry: submit→persisted (local runtime, echo)";
    println!(
        "\nunder load ({} at once, {} submitters):",
        args.tasks, args.concurrency
    );
    print_row(base_name, &baseline);
    print_row(gantry_name, &gantry);
    println!("\none at a time ({IDLE_SAMPLES} sequential, nothing queued):");
    print_row(base_name, &idle_base);
    print_row(gantry_name, &idle);
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

fn print_row(name: &str, f: &Figures) {
    println!(
        "{name:<55} {:>9.1} /s   p50 {:>9.2} ms   p99 {:>9.2} ms   total {:>7.2} s",
        f.per_second,
        f.p50.as_secs_f64() * 1e3,
        f.p99.as_secs_f64() * 1e3,
        f.elapsed.as_secs_f64()
    );
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

async fn baseline(concurrency: usize, n: usize) -> Result<Figures> {
    let url = amqp_url().into();
    let queue = format!("bench-baseline-{}", uuid::Uuid::new_v4().simple());
    let timeout = Duration::from_secs(10);
    let pub_conn = amqp::connect(&url, "bench-publish", timeout).await?;
    let sub_conn = amqp::connect(&url, "bench-consume", timeout).await?;
    let channel = confirm_channel(&pub_conn, timeout).await?;
    let mut qargs = FieldTable::default();
    qargs.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), qargs)
        .await?;
    let consume = sub_conn.create_channel().await?;
    consume.basic_qos(64, BasicQosOptions::default()).await?;
    let mut consumer = consume
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let start = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(n);
        while latencies.len() < n {
            let Some(Ok(d)) = consumer.next().await else {
                break;
            };
            let sent: u128 = std::str::from_utf8(&d.data)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            latencies.push(Duration::from_nanos(
                (start.elapsed().as_nanos() - sent) as u64,
            ));
            let _ = d.ack(BasicAckOptions::default()).await;
        }
        latencies
    });
    let limit = Arc::new(Semaphore::new(concurrency));
    let mut sends = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = limit.clone().acquire_owned().await?;
        let channel = channel.clone();
        let queue = queue.clone();
        sends.push(tokio::spawn(async move {
            let body = start.elapsed().as_nanos().to_string();
            let r = publish_confirmed(
                &channel,
                "",
                &queue,
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
                true,
                timeout,
            )
            .await;
            drop(permit);
            r
        }));
    }
    for s in sends {
        s.await??;
    }
    let latencies = receiver.await?;
    let elapsed = start.elapsed();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    let _ = pub_conn.close(200, "ok".into()).await;
    let _ = sub_conn.close(200, "ok".into()).await;
    let (p50, p99) = percentiles(latencies);
    Ok(Figures {
        per_second: n as f64 / elapsed.as_secs_f64(),
        p50,
        p99,
        elapsed,
    })
}

fn echo_spec(i: usize) -> Result<TaskSpec> {
    Ok(TaskSpec {
        executor: ExecutorClass::parse("echo")?,
        name: TaskName::parse("bench.echo")?,
        payload: json!({"i": i}),
        ttl: Duration::from_secs(3600),
        reply_to: None,
        idempotency_key: None,
        priority: None,
        resources: None,
    })
}

async fn gantry(args: &Args) -> Result<(Figures, Figures)> {
    let catalog = format!(
        "executors:\n  echo:\n    engine: {{ kind: echo }}\n    max_active_jobs: {}\n",
        args.max_active
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let dispatcher = env.dispatcher()?;
    let producer = Arc::new(env.producer().await?);

    let idle_start = Instant::now();
    let mut idle = Vec::with_capacity(IDLE_SAMPLES);
    for i in 0..IDLE_SAMPLES {
        let t = Instant::now();
        let id = producer.submit(echo_spec(i)?).await?;
        let record = producer.wait(id, Duration::from_secs(60)).await?;
        anyhow::ensure!(
            record.state == "succeeded",
            "idle task {id} ended {}",
            record.state
        );
        idle.push(t.elapsed());
    }
    let idle_elapsed = idle_start.elapsed();
    let (p50, p99) = percentiles(idle);
    let idle = Figures {
        per_second: IDLE_SAMPLES as f64 / idle_elapsed.as_secs_f64(),
        p50,
        p99,
        elapsed: idle_elapsed,
    };

    let n = args.tasks;
    let limit = Arc::new(Semaphore::new(args.concurrency));
    let start = Instant::now();
    let mut sends = Vec::with_capacity(n);
    for i in 0..n {
        let permit = limit.clone().acquire_owned().await?;
        let producer = producer.clone();
        sends.push(tokio::spawn(async move {
            let submitted: DateTime<Utc> = Utc::now();
            let id = producer.submit(echo_spec(i)?).await?;
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
    let (p50, p99) = percentiles(latencies);
    let load = Figures {
        per_second: n as f64 / elapsed.as_secs_f64(),
        p50,
        p99,
        elapsed,
    };
    Ok((idle, load))
}
