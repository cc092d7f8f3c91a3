//! The record role: results and dead letters into Postgres, in batches, acked only after
//! the commit, so a crash loses nothing and a duplicate changes nothing. A result is
//! forwarded to its task's `reply_to` only once it is durable.

mod audit;
mod results;
mod retry;

use std::time::Duration;

use futures_util::StreamExt;
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub(crate) use audit::run_audit;
pub(crate) use results::run_results;

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
