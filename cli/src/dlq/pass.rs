//! One pass over `<prefix>.dead`, as the [module docs](super#the-pass) describe: read the
//! messages that were there at the start, act on the selected ones, hold the others until
//! the channel closes.

use std::pin::pin;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::StreamExt;
use gantry_shared::amqp::timed;
use gantry_shared::dead_letter::Label;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer, message::Delivery};
use tokio::time::{Interval, MissedTickBehavior};
use tracing::{info, instrument};

use super::handle::{DeadLetters, close};
use super::pipeline::{Item, Pipeline};
use super::selection::Selection;
use super::summary::{Action, Entry, Outcome, Summary, collect};
use crate::{Error, Result};

/// How long the pass waits for the next delivery before it decides the queue has no more.
const IDLE: Duration = Duration::from_secs(3);
/// The consumer tag, as the management UI shows it.
const CONSUMER_TAG: &str = "gantry-dlq";

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
