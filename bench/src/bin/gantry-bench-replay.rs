//! `gantry-bench-replay`: how fast `gantry dlq replay` moves dead letters, beside a
//! baseline measured in the same run on the same broker: a bare lapin consume →
//! publish (confirmed) → ack move of as many messages between two quorum queues, with the
//! same prefetch (the whole queue) and the same number of publishes in flight.
//!
//! Each round runs in a world of its own (database, prefix, queues), so no round pays for
//! the queues an earlier one filled, drained or deleted. It makes fresh dead letters
//! (published to the dead-letter exchange as the dispatcher does, and recorded in Postgres
//! as the recorder does) and, at the same time, the baseline's messages, so both read
//! messages of the same age. Then it moves the baseline's messages and replays the dead
//! letters with the library function behind `gantry dlq replay` (no rate limit, no
//! dispatcher: they land in `<prefix>.tasks.echo`), in turn: odd rounds move first, even
//! rounds replay first. Medians are reported, because the machine is shared.
//!
//! `cargo run --release -p gantry-bench --bin gantry-bench-replay -- --messages 10000`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chrono::Utc;
use clap::Parser;
use futures_util::StreamExt;
use gantry_bench::{Cpu, declare_quorum};
use gantry_cli::dlq::{DEFAULT_IN_FLIGHT, DeadLetters, ReplayOptions, Selection};
use gantry_shared::amqp::{self, confirm_channel, publish_confirmed};
use gantry_shared::dead_letter::DeadLetter;
use gantry_shared::message::{Limits, Task, headers};
use gantry_shared::retry;
use gantry_tests::{TestEnv, amqp_url, echo_spec};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use serde_json::json;
use tokio::task::JoinSet;

/// Measures a replay of dead letters against a bare move on the same broker.
#[derive(Debug, Parser)]
struct Args {
    /// Dead letters to replay (and messages to move in the baseline), per round.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Publishes awaiting their confirm at once, in both.
    #[arg(long, default_value_t = DEFAULT_IN_FLIGHT)]
    in_flight: usize,
    /// Rounds of baseline then replay; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// One measured move: messages per second, and the CPU time each message cost, by who
/// spent it.
#[derive(Debug, Clone, Copy)]
struct Figures {
    per_second: f64,
    cpu: Cpu,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "gantry-bench-replay: {} messages per round, {} in flight, {} rounds",
        args.messages, args.in_flight, args.rounds
    );
    let rounds = rounds(&args).await?;
    let median = |f: &dyn Fn(&(Figures, Figures)) -> f64| {
        gantry_bench::median(&rounds.iter().map(f).collect::<Vec<_>>())
    };
    let base = median(&|r| r.0.per_second);
    let replay = median(&|r| r.1.per_second);
    let ratio = median(&|r| r.1.per_second / r.0.per_second);
    let cpu = |pick: &dyn Fn(&(Figures, Figures)) -> Cpu| {
        Cpu::median(&rounds.iter().map(pick).collect::<Vec<_>>())
    };
    println!("\nmedians of {} rounds:", rounds.len());
    println!(
        "{:<64} {:>7.0} msg/s",
        "baseline: lapin consume→publish (confirmed)→ack, quorum→quorum", base
    );
    println!(
        "{:<64} {:>7.0} msg/s",
        "gantry dlq replay: dead→tasks, recorded in Postgres", replay
    );
    println!("ratio replay/baseline: {ratio:.2}");
    println!("\nCPU per message (µs):   this process  RabbitMQ  Postgres  other");
    for (name, c) in [
        ("baseline", cpu(&|r| r.0.cpu)),
        ("replay", cpu(&|r| r.1.cpu)),
    ] {
        println!(
            "  {name:<22} {:>12.1}  {:>8.1}  {:>8.1}  {:>5.1}",
            c.this, c.rabbitmq, c.postgres, c.other
        );
    }
    Ok(())
}

/// Runs the rounds, each in a world of its own (database, prefix and queues), so no round
/// pays for the queues an earlier one filled, drained or deleted. The order alternates:
/// odd rounds move first, even rounds replay first.
async fn rounds(args: &Args) -> Result<Vec<(Figures, Figures)>> {
    let mut out = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds.max(1) {
        let env = TestEnv::new(None).await?;
        let outcome = run(&env, args, round % 2 == 0).await;
        env.cleanup().await?;
        let (base, replay) = outcome?;
        println!(
            "round {round}: baseline {:.0} msg/s, replay {:.0} msg/s, ratio {:.2}",
            base.per_second,
            replay.per_second,
            replay.per_second / base.per_second
        );
        out.push((base, replay));
    }
    Ok(out)
}

/// One round: the dead letters and the baseline's source queue are filled at the same
/// time (so both read messages of the same age), then both are measured.
async fn run(env: &TestEnv, args: &Args, replay_first: bool) -> Result<(Figures, Figures)> {
    let n = args.messages;
    let started = Instant::now();
    let sample = dead_task(0, &format!("{}.tasks.echo", env.prefix))?;
    let (made, moves) = tokio::join!(
        make_dead_letters(env, n, args.in_flight),
        Move::prepare(n, &sample, args.in_flight)
    );
    let moves = moves.context("baseline")?;
    if let Err(e) = made {
        moves.delete().await?;
        return Err(e);
    }
    println!(
        "made {n} dead letters and {n} messages to move ({} bytes of body each) in {:.1} s",
        sample.0.len(),
        started.elapsed().as_secs_f64()
    );
    let (baseline, replay) = if replay_first {
        let replay = replay(env, args).await;
        (moves.run(n, args.in_flight).await, replay)
    } else {
        let baseline = moves.run(n, args.in_flight).await;
        (baseline, replay(env, args).await)
    };
    moves.delete().await?;
    Ok((baseline.context("baseline")?, replay?))
}

/// Replays every dead letter of `env` with the library function behind `gantry dlq replay`.
async fn replay(env: &TestEnv, args: &Args) -> Result<Figures> {
    let n = args.messages;
    let dl = DeadLetters::new(&env.config())?;
    let options = ReplayOptions {
        in_flight: args.in_flight,
        ..ReplayOptions::default()
    };
    let cpu = Cpu::now();
    let summary = dl
        .replay(&Selection::all(), &options, std::future::pending())
        .await?;
    let cpu = Cpu::now().per_message(cpu, n);
    ensure!(
        summary.done.len() == n && summary.failed.is_empty(),
        "replayed {} of {n}: {:?}",
        summary.done.len(),
        summary.failed.first()
    );
    let tasks = format!("{}.tasks.echo", env.prefix);
    ensure!(
        env.queue_depth(&tasks).await? as usize == n,
        "the task queue does not hold the {n} replays"
    );
    Ok(Figures {
        per_second: n as f64 / summary.elapsed.as_secs_f64(),
        cpu,
    })
}

/// Dead letters as the dispatcher makes them (a valid task, published to the DLX with a
/// reason and an id), recorded in Postgres as the recorder would.
async fn make_dead_letters(env: &TestEnv, n: usize, in_flight: usize) -> Result<()> {
    let publisher = env.publisher().await?;
    let dlx = env.topology().dlx();
    let queue = format!("{}.tasks.echo", env.prefix);
    let store = env.store().await?;
    let mut sent = JoinSet::new();
    let mut letters = Vec::with_capacity(n);
    for i in 0..n {
        let (body, props) = dead_task(i, &queue)?;
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
    Ok(())
}

fn dead_task(i: usize, queue: &str) -> Result<(Vec<u8>, BasicProperties)> {
    let task = Task::new(
        echo_spec("bench.replay", json!({"i": i, "prompt": "x".repeat(200)}))?,
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

/// The baseline: `n` copies of a dead letter moved from one quorum queue to another.
struct Move {
    setup: lapin::Connection,
    channel: Channel,
    from: String,
    to: String,
}

impl Move {
    /// Declares the two queues and fills the first with `n` copies of `sample`.
    async fn prepare(
        n: usize,
        sample: &(Vec<u8>, BasicProperties),
        in_flight: usize,
    ) -> Result<Move> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let setup = amqp::connect(&amqp_url().into(), "bench-move-setup", TIMEOUT).await?;
        let channel = confirm_channel(&setup, TIMEOUT).await?;
        let moves = Move {
            setup,
            channel,
            from: format!("bench-move-a-{id}"),
            to: format!("bench-move-b-{id}"),
        };
        for q in [&moves.from, &moves.to] {
            declare_quorum(&moves.channel, q).await?;
        }
        let sample = Arc::new(sample.clone());
        if let Err(e) = fill(&moves.channel, &moves.from, n, &sample, in_flight).await {
            moves.delete().await?;
            return Err(e);
        }
        Ok(moves)
    }

    /// Moves the `n` messages: consume with the whole queue as prefetch (as a replay pass
    /// does), publish with a confirm, then ack. Timed from connecting, as a replay is.
    async fn run(&self, n: usize, in_flight: usize) -> Result<Figures> {
        let url = amqp_url().into();
        // Reading every process's CPU time takes milliseconds: it is done outside the timed
        // window, as for the replay.
        let cpu = Cpu::now();
        let start = Instant::now();
        let pub_conn = amqp::connect(&url, "bench-move-publish", TIMEOUT).await?;
        let sub_conn = amqp::connect(&url, "bench-move-consume", TIMEOUT).await?;
        let publish = confirm_channel(&pub_conn, TIMEOUT).await?;
        let consume = sub_conn.create_channel().await?;
        consume
            .basic_qos(u16::try_from(n).unwrap_or(0), BasicQosOptions::default())
            .await?;
        let mut consumer = consume
            .basic_consume(
                self.from.as_str().into(),
                "bench-move".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
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
            let (publish, to) = (publish.clone(), self.to.clone());
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
        let _ = consume.close(200, "ok".into()).await;
        let _ = sub_conn.close(200, "ok".into()).await;
        let _ = pub_conn.close(200, "ok".into()).await;
        let elapsed = start.elapsed();
        Ok(Figures {
            per_second: n as f64 / elapsed.as_secs_f64(),
            cpu: Cpu::now().per_message(cpu, n),
        })
    }

    async fn delete(self) -> Result<()> {
        for q in [&self.from, &self.to] {
            self.channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        let _ = self.setup.close(200, "ok".into()).await;
        Ok(())
    }
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
