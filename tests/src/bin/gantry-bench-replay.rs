//! `gantry-bench-replay`: how fast `gantry dlq replay` moves dead letters, beside a
//! baseline measured in the same run on the same broker: a bare lapin consume →
//! publish (confirmed) → ack move of as many messages between two quorum queues, with the
//! same prefetch and the same number of publishes in flight.
//!
//! `cargo run --release -p gantry-tests --bin gantry-bench-replay -- --messages 10000`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chrono::Utc;
use clap::Parser;
use futures_util::StreamExt;
use gantry_producer::dlq::{DEFAULT_IN_FLIGHT, DeadLetters, ReplayOptions, Selection};
use gantry_shared::amqp::{self, confirm_channel, publish_confirmed};
use gantry_shared::dead_letter::DeadLetter;
use gantry_shared::message::{ExecutorClass, Limits, Task, TaskName, TaskSpec, headers};
use gantry_shared::retry;
use gantry_tests::{TestEnv, amqp_url};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use serde_json::json;
use tokio::task::JoinSet;

/// Measures a replay of dead letters against a bare move on the same broker.
#[derive(Debug, Parser)]
struct Args {
    /// Dead letters to replay (and messages to move in the baseline).
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Publishes awaiting their confirm at once, in both runs.
    #[arg(long, default_value_t = DEFAULT_IN_FLIGHT)]
    in_flight: usize,
}

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "gantry-bench-replay: {} messages, {} in flight",
        args.messages, args.in_flight
    );
    let env = TestEnv::new(None).await?;
    let outcome = run(&env, &args).await;
    env.cleanup().await?;
    let (baseline, replay) = outcome?;
    println!(
        "\n{:<62} {:>9.0} msg/s",
        "baseline: lapin consume→publish (confirmed)→ack, quorum→quorum", baseline
    );
    println!(
        "{:<62} {:>9.0} msg/s",
        "gantry dlq replay: dead→tasks, recorded in Postgres", replay
    );
    println!("\nratio replay/baseline: {:.2}", replay / baseline);
    Ok(())
}

async fn run(env: &TestEnv, args: &Args) -> Result<(f64, f64)> {
    let n = args.messages;
    let started = Instant::now();
    let sample = make_dead_letters(env, n, args.in_flight).await?;
    println!(
        "made {n} dead letters ({} bytes of body each) in {:.1} s",
        sample.0.len(),
        started.elapsed().as_secs_f64()
    );

    let baseline = baseline(n, &sample, args.in_flight)
        .await
        .context("baseline")?;

    let dl = DeadLetters::new(&env.config())?;
    let options = ReplayOptions {
        in_flight: args.in_flight,
        ..ReplayOptions::default()
    };
    let summary = dl
        .replay(&Selection::all(), &options, std::future::pending())
        .await?;
    ensure!(
        summary.done.len() == n && summary.failed.is_empty(),
        "replayed {} of {n}: {:?}",
        summary.done.len(),
        summary.failed.first()
    );
    let tasks = env
        .queue_depth(&format!("{}.tasks.echo", env.prefix))
        .await?;
    ensure!(
        tasks as usize == n,
        "{tasks} tasks in the task queue, not {n}"
    );
    println!("replayed {n} in {:.2} s", summary.elapsed.as_secs_f64());
    Ok((baseline, n as f64 / summary.elapsed.as_secs_f64()))
}

/// Dead letters as the dispatcher makes them (a valid task, published to the DLX with a
/// reason and an id), recorded in Postgres as the recorder would. Returns one of them, for
/// the baseline to move messages of the same size.
async fn make_dead_letters(
    env: &TestEnv,
    n: usize,
    in_flight: usize,
) -> Result<(Vec<u8>, BasicProperties)> {
    let publisher = env.publisher().await?;
    let dlx = env.topology().dlx();
    let queue = format!("{}.tasks.echo", env.prefix);
    let store = env.store().await?;
    let mut sent = JoinSet::new();
    let mut letters = Vec::with_capacity(n);
    let mut sample = None;
    for i in 0..n {
        let (body, props) = dead_task(i, &queue)?;
        sample.get_or_insert_with(|| (body.clone(), props.clone()));
        letters.push(DeadLetter::from_message(&props, &body));
        while sent.len() >= in_flight {
            if let Some(r) = sent.join_next().await {
                r??;
            }
        }
        let (publisher, dlx, queue) = (publisher.clone(), dlx.clone(), queue.clone());
        sent.spawn(async move {
            publisher
                .publish(
                    &dlx,
                    &queue,
                    &body,
                    props,
                    true,
                    retry::for_at_most(TIMEOUT),
                )
                .await
        });
    }
    while let Some(r) = sent.join_next().await {
        r??;
    }
    publisher.close().await;
    for batch in letters.chunks(500) {
        store.record_dead_letters(batch).await?;
    }
    sample.context("no dead letters made")
}

fn dead_task(i: usize, queue: &str) -> Result<(Vec<u8>, BasicProperties)> {
    let task = Task::new(
        TaskSpec {
            executor: ExecutorClass::parse("echo")?,
            name: TaskName::parse("bench.replay")?,
            payload: json!({"i": i, "prompt": "x".repeat(200)}),
            ttl: Duration::from_secs(3600),
            reply_to: None,
            idempotency_key: None,
            priority: None,
            resources: None,
        },
        &Limits::default(),
    )?;
    let (body, props) = task.to_amqp(Utc::now())?;
    let mut table = props.headers().clone().unwrap_or_default();
    let mut put = |k: &str, v: String| {
        table.insert(k.into(), AMQPValue::LongString(v.into()));
    };
    put(
        headers::REASON,
        "max_attempts: failed on every attempt".into(),
    );
    put(headers::DEAD_LETTER_ID, uuid::Uuid::new_v4().to_string());
    put(headers::ORIGINAL_QUEUE, queue.to_owned());
    put(headers::ORIGINAL_ROUTING_KEY, "echo".into());
    table.insert(
        headers::DEAD_AT.into(),
        AMQPValue::Timestamp(Utc::now().timestamp() as u64),
    );
    let id = ShortString::from(task.id.to_string());
    let props = BasicProperties::default()
        .with_message_id(id.clone())
        .with_correlation_id(id)
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(table);
    Ok((body, props))
}

/// Moves `n` copies of `sample` from one quorum queue to another: consume with the whole
/// queue as prefetch (as a replay pass does), publish with a confirm, then ack.
async fn baseline(n: usize, sample: &(Vec<u8>, BasicProperties), in_flight: usize) -> Result<f64> {
    let url = amqp_url().into();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (from, to) = (format!("bench-move-a-{id}"), format!("bench-move-b-{id}"));
    let pub_conn = amqp::connect(&url, "bench-move-publish", TIMEOUT).await?;
    let sub_conn = amqp::connect(&url, "bench-move-consume", TIMEOUT).await?;
    let publish = confirm_channel(&pub_conn, TIMEOUT).await?;
    for q in [&from, &to] {
        let mut qargs = FieldTable::default();
        qargs.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        publish
            .queue_declare(q.as_str().into(), QueueDeclareOptions::durable(), qargs)
            .await?;
    }
    let sample = Arc::new(sample.clone());
    fill(&publish, &from, n, &sample, in_flight).await?;

    let consume = sub_conn.create_channel().await?;
    consume
        .basic_qos(u16::try_from(n).unwrap_or(0), BasicQosOptions::default())
        .await?;
    let mut consumer = consume
        .basic_consume(
            from.as_str().into(),
            "bench-move".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let start = Instant::now();
    let mut moving = JoinSet::new();
    for _ in 0..n {
        let delivery = tokio::time::timeout(TIMEOUT, consumer.next())
            .await?
            .context("the consumer closed")??;
        while moving.len() >= in_flight {
            if let Some(r) = moving.join_next().await {
                r??;
            }
        }
        let (publish, to) = (publish.clone(), to.clone());
        moving.spawn(async move {
            publish_confirmed(
                &publish,
                "",
                &to,
                &delivery.data,
                delivery.properties.clone(),
                true,
                TIMEOUT,
            )
            .await?;
            delivery.acker.ack(BasicAckOptions::default()).await?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = moving.join_next().await {
        r??;
    }
    let elapsed = start.elapsed();
    println!("baseline moved {n} in {:.2} s", elapsed.as_secs_f64());
    for q in [&from, &to] {
        publish
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    let _ = pub_conn.close(200, "ok".into()).await;
    let _ = sub_conn.close(200, "ok".into()).await;
    Ok(n as f64 / elapsed.as_secs_f64())
}

async fn fill(
    channel: &Channel,
    queue: &str,
    n: usize,
    sample: &Arc<(Vec<u8>, BasicProperties)>,
    in_flight: usize,
) -> Result<()> {
    let mut sent = JoinSet::new();
    for _ in 0..n {
        while sent.len() >= in_flight {
            if let Some(r) = sent.join_next().await {
                r??;
            }
        }
        let (channel, queue, sample) = (channel.clone(), queue.to_owned(), sample.clone());
        sent.spawn(async move {
            let (body, props) = sample.as_ref();
            publish_confirmed(&channel, "", &queue, body, props.clone(), true, TIMEOUT).await
        });
    }
    while let Some(r) = sent.join_next().await {
        r??;
    }
    Ok(())
}
