//! One pass over `<prefix>.dead`, as the [module docs](super#the-pass) describe: read the
//! messages that were there at the start, act on the selected ones, hold the others until
//! the channel closes.

use std::pin::pin;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use gantry_shared::amqp::timed;
use gantry_shared::dead_letter::{Label, reason_kind};
use gantry_shared::message::TaskId;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer, message::Delivery};
use serde::{Serialize, Serializer};
use tokio::time::{Interval, MissedTickBehavior};
use tracing::{info, instrument};
use uuid::Uuid;

use super::pipeline::{Item, Pipeline};
use super::{DeadLetters, Selection, close};
use crate::{Error, Result};

/// Dead letters handled at once unless told otherwise: replays awaiting their confirm, or
/// purges awaiting their ack.
pub const DEFAULT_IN_FLIGHT: usize = 64;
/// How long the pass waits for the next delivery before it decides the queue has no more.
const IDLE: Duration = Duration::from_secs(3);
/// The consumer tag, as the management UI shows it.
const CONSUMER_TAG: &str = "gantry-dlq";

/// How a replay runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The replayed task's new time to live, counted from its replay (default 1h).
    pub ttl: Duration,
    /// At most this many replays per second; `None` for as fast as the broker confirms.
    pub rate: Option<u32>,
    /// Read and report what would be replayed; publish, ack and write nothing.
    pub dry_run: bool,
    /// Replays awaiting their confirm at once (at least 1).
    pub in_flight: usize,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            ttl: Duration::from_secs(3600),
            rate: None,
            dry_run: false,
            in_flight: DEFAULT_IN_FLIGHT,
        }
    }
}

/// How a purge runs.
#[derive(Debug, Clone)]
pub struct PurgeOptions {
    /// Read and report what would be purged; ack and write nothing.
    pub dry_run: bool,
    /// Acks awaited at once (at least 1).
    pub in_flight: usize,
}

impl Default for PurgeOptions {
    fn default() -> Self {
        PurgeOptions {
            dry_run: false,
            in_flight: DEFAULT_IN_FLIGHT,
        }
    }
}

/// What a pass does with the dead letters it selects.
#[derive(Debug, Clone)]
pub enum Action {
    Replay(ReplayOptions),
    Purge(PurgeOptions),
}

impl Action {
    /// `replay` or `purge`.
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Replay(_) => "replay",
            Action::Purge(_) => "purge",
        }
    }

    /// Whether it only reads and reports.
    pub fn dry_run(&self) -> bool {
        match self {
            Action::Replay(o) => o.dry_run,
            Action::Purge(o) => o.dry_run,
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        match self {
            Action::Replay(o) => o.in_flight,
            Action::Purge(o) => o.in_flight,
        }
        .max(1)
    }
}

/// One selected dead letter, as the pass read it from its message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub id: Uuid,
    pub task_id: Option<TaskId>,
    pub task: Option<String>,
    pub executor: Option<String>,
    pub reason: String,
    pub dead_at: DateTime<Utc>,
    /// For a replay, the attempt it starts (`None` when the body is not a task); for a
    /// purge, the attempt that died.
    pub attempt: Option<u32>,
}

impl Entry {
    /// The reason kind: the text before the first colon (`invalid`, `expired`, …).
    pub fn reason_kind(&self) -> &str {
        reason_kind(&self.reason)
    }
}

impl From<Label> for Entry {
    fn from(label: Label) -> Entry {
        Entry {
            id: label.id,
            task_id: label.task_id,
            task: label.task,
            executor: label.executor,
            reason: label.reason,
            dead_at: label.dead_at,
            attempt: label.attempt,
        }
    }
}

/// A selected dead letter that was not replayed or purged: it is still in the queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    #[serde(flatten)]
    pub entry: Entry,
    /// Why, and what to do about it.
    pub error: String,
}

/// What a pass did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// `replay` or `purge`.
    pub action: &'static str,
    pub dry_run: bool,
    pub queue: String,
    /// Messages in the queue when the pass started.
    pub queue_depth: u32,
    /// Messages read.
    pub read: u64,
    /// Messages the selection matched.
    pub matched: u64,
    /// Replayed or purged (in a dry run: that would be), in the order they were done.
    pub done: Vec<Entry>,
    /// Messages not matching, returned to the queue untouched.
    pub kept: u64,
    /// Matching dead letters left in the queue, each with its reason.
    pub failed: Vec<Failure>,
    /// Things that went wrong after a dead letter was handled, or with the pass itself.
    pub warnings: Vec<String>,
    /// Why the pass ended before it read every message, if it did.
    pub stopped: Option<String>,
    #[serde(rename = "elapsed_seconds", serialize_with = "seconds")]
    pub elapsed: Duration,
}

impl Summary {
    /// Whether every selected dead letter was handled and the pass read to the end.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty() && self.stopped.is_none()
    }

    /// Dead letters handled per second.
    pub fn per_second(&self) -> f64 {
        self.done.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn seconds<S: Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// How one delivery ended: handled (maybe with a warning), or kept with a reason.
pub(super) type Outcome = (Entry, std::result::Result<Option<String>, String>);

/// Runs one pass; see [`DeadLetters::replay`] and [`DeadLetters::purge`].
#[instrument(skip_all, fields(action = action.verb(), dry_run = action.dry_run(), selection = %selection))]
pub(super) async fn run(
    dl: &DeadLetters,
    selection: &Selection,
    action: Action,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary> {
    if !selection.is_chosen() {
        return Err(Error::NothingSelected {
            action: action.verb(),
        });
    }
    let started = Instant::now();
    let timeout = dl.config().broker_timeout;
    // Everything a write needs is connected before anything is taken from the queue.
    let mut pipeline = if action.dry_run() {
        None
    } else {
        Some(Pipeline::start(dl, &action).await?)
    };
    let mut summary = empty_summary(dl, &action);
    let conn = match dl.connect("consume").await {
        Ok(conn) => conn,
        Err(e) => {
            finish(pipeline, &mut summary).await;
            return Err(e);
        }
    };
    let outcome = match timed("channel.open", timeout, conn.create_channel()).await {
        Ok(channel) => {
            let outcome = consume(
                dl,
                &channel,
                selection,
                &action,
                pipeline.as_mut(),
                &mut summary,
                shutdown,
            )
            .await;
            // Every ack is sent and every mark written before the channel closes...
            finish(pipeline, &mut summary).await;
            // ...and closing it returns every message the pass held to the queue.
            close(Some(&channel), &conn).await;
            outcome
        }
        Err(e) => {
            finish(pipeline, &mut summary).await;
            close(None, &conn).await;
            Err(Error::broker(e))
        }
    };
    outcome?;
    summary.elapsed = started.elapsed();
    info!(
        read = summary.read,
        matched = summary.matched,
        done = summary.done.len(),
        kept = summary.kept,
        failed = summary.failed.len(),
        "dead-letter pass finished"
    );
    Ok(summary)
}

fn empty_summary(dl: &DeadLetters, action: &Action) -> Summary {
    Summary {
        action: action.verb(),
        dry_run: action.dry_run(),
        queue: dl.queue(),
        queue_depth: 0,
        read: 0,
        matched: 0,
        done: Vec::new(),
        kept: 0,
        failed: Vec::new(),
        warnings: Vec::new(),
        stopped: None,
        elapsed: Duration::ZERO,
    }
}

/// Lets the pipeline (if any) finish what it was handed, and adds that to `summary`.
async fn finish(pipeline: Option<Pipeline>, summary: &mut Summary) {
    if let Some(pipeline) = pipeline {
        pipeline.finish(summary).await;
    }
}

/// Reads the queue's depth, opens the consumer, and reads.
async fn consume(
    dl: &DeadLetters,
    channel: &Channel,
    selection: &Selection,
    action: &Action,
    pipeline: Option<&mut Pipeline>,
    summary: &mut Summary,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let timeout = dl.config().broker_timeout;
    summary.queue_depth = dl.depth(channel).await?;
    if summary.queue_depth == 0 {
        return Ok(());
    }
    let mut consumer = open_consumer(channel, &summary.queue, summary.queue_depth, timeout).await?;
    let (ttl, mut pacer) = match action {
        Action::Replay(o) if o.dry_run => (Some(o.ttl), None),
        Action::Replay(o) => (Some(o.ttl), o.rate.filter(|r| *r > 0).map(pacer)),
        Action::Purge(_) => (None, None),
    };
    read(
        summary,
        &mut consumer,
        selection,
        ttl,
        pipeline,
        pacer.as_mut(),
        shutdown,
    )
    .await;
    Ok(())
}

/// Reads up to the depth the queue had at the start, handing matches to the pipeline (or,
/// in a dry run, only looking at them).
async fn read(
    summary: &mut Summary,
    consumer: &mut Consumer,
    selection: &Selection,
    ttl: Option<Duration>,
    mut pipeline: Option<&mut Pipeline>,
    mut pacer: Option<&mut Interval>,
    shutdown: impl Future<Output = ()>,
) {
    let depth = u64::from(summary.queue_depth);
    let mut shutdown = pin!(shutdown);
    while summary.read < depth {
        if let Some(why) = pipeline.as_deref_mut().and_then(|p| p.collect(summary)) {
            summary.stopped = Some(why);
            return;
        }
        let next = tokio::select! {
            biased;
            () = &mut shutdown => {
                summary.stopped = Some("interrupted".into());
                return;
            }
            next = tokio::time::timeout(IDLE, consumer.next()) => next,
        };
        let delivery = match next {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(e))) => {
                summary.stopped = Some(format!("the consumer failed: {e}"));
                return;
            }
            Ok(None) => {
                summary.stopped = Some("the broker closed the channel".into());
                return;
            }
            Err(_) => {
                summary.warnings.push(format!(
                    "read {} of the {depth} messages {} held at the start; no more came within {}",
                    summary.read,
                    summary.queue,
                    gantry_producer::human_duration(IDLE)
                ));
                return;
            }
        };
        summary.read += 1;
        let label = Label::read(&delivery.properties, &delivery.data);
        if !selection.matches(&label) {
            // Held: never acked nor requeued here, it goes back when the channel closes.
            summary.kept += 1;
            continue;
        }
        let Some(pipeline) = pipeline.as_deref_mut() else {
            summary.matched += 1;
            collect(summary, look(label, &delivery, ttl));
            continue;
        };
        if let Some(pacer) = pacer.as_deref_mut() {
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    // Returned untouched, like everything not read yet.
                    summary.read -= 1;
                    summary.stopped = Some("interrupted".into());
                    return;
                }
                _ = pacer.tick() => {}
            }
        }
        summary.matched += 1;
        let replay =
            ttl.map(|ttl| label.replay(&delivery.properties, &delivery.data, ttl, Utc::now()));
        let mut entry = Entry::from(label);
        let replay = match replay {
            Some(None) => {
                collect(summary, (entry, Err(no_route())));
                continue;
            }
            Some(Some(replay)) => {
                entry.attempt = replay.task.map(|(_, attempt)| attempt);
                Some(replay)
            }
            None => None,
        };
        let item = Item {
            delivery,
            entry,
            replay,
        };
        pipeline.send(item).await;
    }
}

/// An exclusive consumer with manual acks and a window that holds the whole pass: every
/// delivery may stay un-acked until the end (0, no limit, for queues deeper than 65,535).
async fn open_consumer(
    channel: &Channel,
    queue: &str,
    depth: u32,
    timeout: Duration,
) -> Result<Consumer> {
    let prefetch = u16::try_from(depth).unwrap_or(0);
    timed(
        "basic.qos",
        timeout,
        channel.basic_qos(prefetch, BasicQosOptions::default()),
    )
    .await
    .map_err(Error::broker)?;
    let consumed = timed(
        "basic.consume",
        timeout,
        channel.basic_consume(
            queue.into(),
            CONSUMER_TAG.into(),
            BasicConsumeOptions {
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    match consumed {
        Ok(consumer) => Ok(consumer),
        Err(gantry_shared::Error::Amqp { source, .. }) if is_busy(&source) => {
            Err(Error::DeadQueueBusy {
                queue: queue.to_owned(),
            })
        }
        Err(e) => Err(Error::broker(e)),
    }
}

/// A pace of `rate` per second; a late tick delays the next rather than bursting.
fn pacer(rate: u32) -> Interval {
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

/// A dry run's look at one delivery: what a replay would publish (`ttl` given), or what a
/// purge would remove.
fn look(label: Label, delivery: &Delivery, ttl: Option<Duration>) -> Outcome {
    let replay = ttl.map(|ttl| label.replay(&delivery.properties, &delivery.data, ttl, Utc::now()));
    let mut entry = Entry::from(label);
    let Some(replay) = replay else {
        return (entry, Ok(None));
    };
    match replay {
        Some(replay) => {
            entry.attempt = replay.task.map(|(_, attempt)| attempt);
            (entry, Ok(None))
        }
        None => (entry, Err(no_route())),
    }
}

fn no_route() -> String {
    "the dead letter names no executor class (not in its body, nor in its headers), so no queue can take it; read it with `gantry dlq show` and purge it if it cannot be used".into()
}

/// Adds one delivery's outcome to the summary.
pub(super) fn collect(summary: &mut Summary, (entry, result): Outcome) {
    match result {
        Ok(warning) => {
            summary.warnings.extend(warning);
            summary.done.push(entry);
        }
        Err(error) => summary.failed.push(Failure { entry, error }),
    }
}

/// Whether `basic.consume` was refused because another consumer holds the queue.
fn is_busy(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED | AMQPSoftError::RESOURCELOCKED)
            )
    )
}
