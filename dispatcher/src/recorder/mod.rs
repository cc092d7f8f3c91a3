//! The record role: results and dead letters into Postgres, in batches, acked only after
//! the commit, so a crash loses nothing and a duplicate changes nothing. A result is
//! forwarded to its task's `reply_to` only once it is durable.

mod audit;
mod results;
pub(crate) mod retry;

use std::time::Duration;

use std::sync::Arc;

use futures_util::StreamExt;
use gantry_shared::telemetry::chain;
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::context::Ctx;
use crate::session::{SessionEnd, Source, open_until_shutdown};

/// The two queues the recorder consumes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Results,
    DeadLetters,
}

impl Stream {
    /// Its name in metrics.
    fn label(self) -> &'static str {
        match self {
            Stream::Results => "results",
            Stream::DeadLetters => "dead_letters",
        }
    }
}

/// Consumes `stream` in batches until shutdown, reconnecting when the broker goes away.
pub(crate) async fn run(ctx: Arc<Ctx>, stream: Stream) {
    let d = &ctx.settings.dispatcher;
    let (name, queue) = match stream {
        Stream::Results => ("gantry-recorder/results", ctx.topology.results_queue()),
        Stream::DeadLetters => (
            "gantry-recorder/dead-letters",
            ctx.topology.dead_audit_queue(),
        ),
    };
    let source = Source {
        url: &ctx.settings.common.amqp_url,
        name: name.into(),
        queue,
        prefetch: u16::try_from(d.record_batch * 2).unwrap_or(u16::MAX),
        timeout: ctx.settings.common.broker_timeout,
    };
    ctx.metrics.consumer(&source.name);
    while let Some(mut session) = open_until_shutdown(&source, &ctx.shutdown).await {
        let end = batches(&ctx, stream, &mut session.consumer).await;
        let stop = matches!(end, SessionEnd::Shutdown);
        session.close(&end, &source.queue).await;
        if stop {
            return;
        }
        ctx.metrics.reconnected(&source.name);
    }
}

/// Records batch after batch, acking each after its commit, until the session ends.
async fn batches(ctx: &Ctx, stream: Stream, consumer: &mut Consumer) -> SessionEnd {
    let d = &ctx.settings.dispatcher;
    let ended = || {
        if ctx.shutdown.is_cancelled() {
            SessionEnd::Shutdown
        } else {
            SessionEnd::Broken
        }
    };
    loop {
        let Some(batch) =
            next_batch(consumer, d.record_batch, d.record_linger, &ctx.shutdown).await
        else {
            return ended();
        };
        let recorded = match stream {
            Stream::Results => results::record(ctx, &batch).await,
            Stream::DeadLetters => audit::record(ctx, &batch).await,
        };
        match recorded {
            Ok(()) => {
                ctx.metrics.batch_recorded(stream.label(), batch.len());
                ack_batch(&batch).await;
            }
            // Not acked: the batch comes back after the reconnect or restart.
            Err(e) => {
                warn!(?stream, error = %chain(&e), "batch not recorded");
                return ended();
            }
        }
    }
}

/// The next batch: waits for one delivery, then takes what arrives within `linger`, up to
/// `max`. `None` when the consumer ended (reconnect) or shutdown was asked for.
async fn next_batch(
    consumer: &mut Consumer,
    max: usize,
    linger: Duration,
    shutdown: &CancellationToken,
) -> Option<Vec<Delivery>> {
    let first = tokio::select! {
        _ = shutdown.cancelled() => return None,
        d = consumer.next() => d?,
    };
    let mut batch = vec![
        first
            .inspect_err(|e| warn!(error = %e, "consumer failed"))
            .ok()?,
    ];
    let until = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match tokio::time::timeout_at(until, consumer.next()).await {
            Ok(Some(Ok(d))) => batch.push(d),
            Ok(Some(Err(e))) => {
                warn!(error = %e, "consumer failed");
                break;
            }
            Ok(None) | Err(_) => break,
        }
    }
    Some(batch)
}

/// Acks every delivery of a batch at once (they are consecutive on one channel).
async fn ack_batch(batch: &[Delivery]) {
    if let Some(last) = batch.last()
        && let Err(e) = last.ack(BasicAckOptions { multiple: true }).await
    {
        warn!(error = %e, "batch ack failed; the batch is redelivered and recorded idempotently");
    }
}
