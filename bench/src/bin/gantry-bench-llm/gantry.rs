//! The Gantry side: the same request as a task, submitted with the client library and
//! waited for until its result is stored in Postgres, or submitted with streaming on and
//! followed from its first piece to its end.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use gantry_producer::{
    ExecutorClass, Producer, StreamEvent, TaskName, TaskRecord, TaskSpec, TaskState,
};
use serde_json::Value;

use crate::sample::{STAGES, Sample, Timings};

/// Longest a task may take: queued behind the others, then a server start at most.
const PATIENCE: Duration = Duration::from_secs(600);

/// Submits `payload` as a task of `class` and waits for its stored result; with `stream`,
/// follows its pieces on the way. Latency runs from the submit call to the result as read
/// from Postgres (the stream's end, when streaming); the first token is the first piece.
///
/// # Errors
/// The task cannot be submitted, does not succeed, or its output lacks usage or timings.
pub(crate) async fn ask(
    producer: &Producer,
    class: &str,
    payload: Value,
    stream: bool,
) -> Result<Sample> {
    let spec = TaskSpec {
        executor: ExecutorClass::parse(class)?,
        name: TaskName::parse("bench.chat")?,
        payload,
        ttl: PATIENCE,
        reply_to: None,
        idempotency_key: None,
        priority: None,
        resources: None,
    };
    let submitted = Utc::now();
    let start = Instant::now();
    let (record, first_token) = if stream {
        let mut events = producer.submit_streaming(spec, PATIENCE).await?;
        let mut first_token = None;
        loop {
            match events.try_next().await? {
                Some(StreamEvent::Progress(_)) => {
                    first_token.get_or_insert_with(|| start.elapsed());
                }
                Some(StreamEvent::ProgressLost { reason }) => bail!("progress lost: {reason}"),
                Some(StreamEvent::Finished(record)) => break (*record, first_token),
                None => bail!("the stream of task {} ended early", events.task_id()),
            }
        }
    } else {
        let id = producer.submit(spec).await?;
        (producer.wait(id, PATIENCE).await?, None)
    };
    let latency = start.elapsed();
    let read = Utc::now();
    ensure!(
        record.state == TaskState::Succeeded,
        "task {} ended {}: {:?}",
        record.task_id,
        record.state,
        record.error
    );
    ensure!(
        !stream || first_token.is_some(),
        "task {}: no piece came",
        record.task_id
    );
    let output = record
        .result
        .as_ref()
        .and_then(|r| r.get("output"))
        .with_context(|| format!("task {} has no output", record.task_id))?;
    let ms = |field: &str| {
        output
            .pointer(&format!("/timings/{field}"))
            .and_then(Value::as_u64)
            .map(Duration::from_millis)
    };
    Ok(Sample {
        latency,
        first_token,
        completion_tokens: output
            .pointer("/usage/completion_tokens")
            .and_then(Value::as_u64)
            .with_context(|| format!("an output without usage: {output}"))?,
        stages: stages(submitted, &record, read),
        executor: Some(Timings {
            server_start: ms("server_start_ms")
                .with_context(|| format!("an output without timings: {output}"))?,
            first_token: ms("time_to_first_token_ms"),
            generation: ms("generation_ms")
                .with_context(|| format!("an output without timings: {output}"))?,
        }),
    })
}

/// The task's way, by the times Postgres has of it: submitted (this process's clock) →
/// received by the dispatcher → dispatched → the executor running it (its process started,
/// the task read) → the engine done → the result read from Postgres (this process's clock).
fn stages(
    submitted: DateTime<Utc>,
    record: &TaskRecord,
    read: DateTime<Utc>,
) -> Option<[Duration; STAGES]> {
    let between = |a: DateTime<Utc>, b: DateTime<Utc>| (b - a).to_std().unwrap_or_default();
    let (dispatched, started, finished) = (
        record.dispatched_at?,
        record.started_at?,
        record.finished_at?,
    );
    Some([
        between(submitted, record.received_at),
        between(record.received_at, dispatched),
        between(dispatched, started),
        between(started, finished),
        between(finished, read),
    ])
}
