//! Gantry's benchmarks and its fault suite, and what they share: throughput and latency
//! figures, the bare lapin baseline they compare Gantry with, CPU time by process group,
//! and where their processes run. The worlds they run in (a database, a prefix, a
//! dispatcher process, the tasks they submit) come from `gantry-tests`; the Kubernetes API
//! double from `gantry-kube-double`.
//!
//! # Layout
//!
//! - [`Figures`], [`median`], [`percentiles`]: one measured run, and medians over rounds.
//! - [`lapin_round_trip`], [`declare_quorum`]: the bare broker baseline.
//! - [`Cpu`]: CPU time by process group, from /proc.
//! - [`placement`]: one CPU for the side a baseline measures, the others for the rest.
//! - The binaries (`src/bin/`): `gantry-bench` (the `local` runtime against the
//!   baseline), `gantry-bench-replay` (`gantry dlq replay` against a bare move),
//!   `gantry-bench-kube` (the `kubernetes` runtime against the double and two baselines),
//!   `gantry-bench-llm` (LLM requests through Gantry against the same requests sent straight
//!   to the model server), `gantry-faults` (the fault suite: no task lost, no attempt run
//!   twice).

pub mod placement;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::StreamExt;
use gantry_shared::amqp::{self, confirm_channel, publish_confirmed};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use tokio::sync::Semaphore;

use gantry_tests::amqp_url;

/// Declares a durable quorum queue.
///
/// # Errors
/// The broker refused it.
pub async fn declare_quorum(channel: &Channel, queue: &str) -> Result<()> {
    let mut qargs = FieldTable::default();
    qargs.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), qargs)
        .await?;
    Ok(())
}

/// One measured run: throughput, latency percentiles, duration.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub per_second: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub elapsed: Duration,
}

impl Figures {
    /// `n` items in `elapsed`, with one latency each.
    pub fn of(n: usize, elapsed: Duration, latencies: Vec<Duration>) -> Figures {
        let (p50, p99) = percentiles(latencies);
        Figures {
            per_second: n as f64 / elapsed.as_secs_f64(),
            p50,
            p99,
            elapsed,
        }
    }

    /// The medians of each figure over rounds.
    pub fn median(rounds: &[Figures]) -> Figures {
        let secs = |f: &dyn Fn(&Figures) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        Figures {
            per_second: secs(&|f| f.per_second),
            p50: Duration::from_secs_f64(secs(&|f| f.p50.as_secs_f64())),
            p99: Duration::from_secs_f64(secs(&|f| f.p99.as_secs_f64())),
            elapsed: Duration::from_secs_f64(secs(&|f| f.elapsed.as_secs_f64())),
        }
    }

    /// One line: name, throughput, p50, p99, duration.
    pub fn print(&self, name: &str) {
        println!(
            "{name:<55} {:>9.1} /s   p50 {:>9.2} ms   p99 {:>9.2} ms   total {:>7.2} s",
            self.per_second,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.elapsed.as_secs_f64()
        );
    }
}

/// The median of `v` (the upper one of an even count); 0 when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// p50 and p99 (nearest rank); zero when empty.
pub fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    if v.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

/// The bare lapin baseline: `n` messages of `body_len` bytes (at least their send time)
/// published with confirms (`mandatory`, persistent) by `concurrency` publishers into a
/// fresh quorum queue, consumed with prefetch 64 and acked one by one. Latency is publish
/// → consumed. The queue is deleted afterwards.
///
/// # Errors
/// The broker refused or dropped something.
pub async fn lapin_round_trip(concurrency: usize, n: usize, body_len: usize) -> Result<Figures> {
    let url = amqp_url().into();
    let queue = format!("bench-baseline-{}", uuid::Uuid::new_v4().simple());
    let timeout = Duration::from_secs(10);
    let pub_conn = amqp::connect(&url, "bench-publish", timeout).await?;
    let sub_conn = amqp::connect(&url, "bench-consume", timeout).await?;
    let channel = confirm_channel(&pub_conn, timeout).await?;
    declare_quorum(&channel, &queue).await?;
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
                .and_then(|s| s.trim_end().parse().ok())
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
            let body = format!("{:<body_len$}", start.elapsed().as_nanos());
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
    anyhow::ensure!(
        latencies.len() == n,
        "the baseline consumed {} of {n}",
        latencies.len()
    );
    Ok(Figures::of(n, elapsed, latencies))
}

/// CPU time in µs (per message, once divided): this process, one watched process (a
/// dispatcher), RabbitMQ, Postgres, everything else.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub this: f64,
    pub watched: f64,
    pub rabbitmq: f64,
    pub postgres: f64,
    pub other: f64,
}

impl Cpu {
    /// CPU time spent by every process, in µs, by group.
    pub fn now() -> Cpu {
        Cpu::watching(None)
    }

    /// As [`Cpu::now`], with process `pid` counted apart, in `watched`.
    pub fn watching(pid: Option<u32>) -> Cpu {
        let me = std::process::id().to_string();
        let watched = pid.map(|p| p.to_string());
        let mut cpu = Cpu::default();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return cpu;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = &stat[open + 1..close];
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            let ticks = |i: usize| {
                fields
                    .get(i)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            // utime and stime, and those of exited children (a Postgres backend that served
            // a connection of the run is gone by its end: its time is its parent's), in
            // clock ticks of 10 ms (USER_HZ = 100 on Linux).
            let us = (ticks(11) + ticks(12) + ticks(13) + ticks(14)) * 10_000.0;
            match comm {
                _ if name == me => cpu.this += us,
                _ if watched.as_deref() == Some(name.as_str()) => cpu.watched += us,
                "beam.smp" => cpu.rabbitmq += us,
                "postgres" => cpu.postgres += us,
                _ => cpu.other += us,
            }
        }
        cpu
    }

    /// What was spent since `before`, per message of `n`.
    pub fn per_message(self, before: Cpu, n: usize) -> Cpu {
        let n = n.max(1) as f64;
        Cpu {
            this: (self.this - before.this) / n,
            watched: (self.watched - before.watched) / n,
            rabbitmq: (self.rabbitmq - before.rabbitmq) / n,
            postgres: (self.postgres - before.postgres) / n,
            other: (self.other - before.other) / n,
        }
    }

    /// The medians of each group over rounds.
    pub fn median(rounds: &[Cpu]) -> Cpu {
        let m = |f: &dyn Fn(&Cpu) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        Cpu {
            this: m(&|c| c.this),
            watched: m(&|c| c.watched),
            rabbitmq: m(&|c| c.rabbitmq),
            postgres: m(&|c| c.postgres),
            other: m(&|c| c.other),
        }
    }
}

/// The `warm:` line of a benchmark's echo class (YAML, indented for the class), or nothing:
/// warm executors of `max_concurrency` slots, idle for 30 s before they end.
pub fn warm_line(max_concurrency: Option<u16>) -> String {
    max_concurrency
        .map(|n| format!("    warm: {{ max_concurrency: {n}, idle_timeout: 30s }}\n"))
        .unwrap_or_default()
}
