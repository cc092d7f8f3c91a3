//! The Celery bridge: Celery clients send to Gantry unchanged (docs/celery.md).
//!
//! A bridge consumer takes each Celery task message from the configured Celery queues,
//! checks and converts it ([`gantry_shared::celery`]), keeps its origin (reply queue, Celery
//! context) in Postgres, publishes it as an ordinary `gantry.task/v1` message with confirms,
//! and only then acks the Celery delivery. From there the task goes the way every task goes
//! (dispatch, record, retries, dead letters, replay, `gantry status`); only its reply
//! differs: the recorder sends it in the format of Celery's `rpc://` backend when the task
//! has an origin row ([`reply`]). A task with an `eta` waits in the delay queues, never in
//! a held delivery ([`eta`]). Revokes broadcast on Celery's control exchange cancel through
//! the store, like `gantry cancel` ([`revoke`]).
//!
//! # Layout
//!
//! - `bridge`: a Celery queue's consumer and the conversion of each delivery.
//! - `eta`: tasks not due yet, through the delay queues and back. `publish`: a converted
//!   task published, marked as Celery's.
//! - `revoke`: the control exchange's revokes.
//! - `reply`: replies in Celery's format, after the commit.

mod bridge;
mod eta;
mod publish;
pub(crate) mod reply;
mod revoke;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use gantry_shared::amqp::{self, confirm_channel};
use gantry_shared::celery::{CeleryState, ETA_ROUTING_KEY};
use gantry_shared::message::TaskId;
use gantry_shared::telemetry::chain;
use gantry_shared::topology::quorum_args;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicNackOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};
use tracing::{info, warn};

use crate::context::Ctx;
use crate::health::Loops;
use crate::session::{SessionEnd, Source, open_until_shutdown};
use crate::{Error, Result};

/// Sends `STARTED` to the Celery client of `task_id` once its job runs, when
/// `celery.track_started` is on (Celery's `task_track_started`, which is a worker's setting
/// in Celery and so Gantry's here). Best effort: a `STARTED` lost changes nothing the client
/// waits for.
pub(crate) async fn started(ctx: &Ctx, task_id: TaskId) {
    let celery = &ctx.settings.dispatcher.celery;
    if !(celery.enabled && celery.track_started) {
        return;
    }
    let sent = async {
        let Some(queue) = ctx
            .store
            .celery_origin(task_id)
            .await?
            .and_then(|o| o.reply_to)
        else {
            return Ok(());
        };
        let (body, props) = gantry_shared::celery::reply(task_id, &CeleryState::Started);
        ctx.reply(task_id, &queue, &body, props).await.map(drop)
    };
    if let Err(e) = sent.await {
        warn!(%task_id, error = %chain(&e), "could not send STARTED to the Celery client");
    }
}

/// The queue of tasks back from the delay queues, due or not.
fn eta_queue(ctx: &Ctx) -> String {
    format!("{}.celery.eta", ctx.topology.prefix())
}

/// The queue of revokes, bound to Celery's control exchange. One for all dispatchers of a
/// prefix: a revoke is a write to Postgres, which every dispatcher hears.
fn revoke_queue(ctx: &Ctx) -> String {
    format!("{}.celery.revoke", ctx.topology.prefix())
}

/// Declares the bridge's queues and starts its consumers.
///
/// # Errors
/// The broker is unreachable, or a queue exists with other arguments.
pub(crate) async fn start(ctx: Arc<Ctx>, loops: &mut Loops) -> Result<()> {
    declare(&ctx).await?;
    for queue in ctx.settings.dispatcher.celery.queues.clone() {
        loops.spawn("celery/bridge", consume(ctx.clone(), Stream::Celery(queue)));
    }
    loops.spawn("celery/eta", consume(ctx.clone(), Stream::Eta));
    loops.spawn("celery/revoke", consume(ctx.clone(), Stream::Revoke));
    info!(queues = ?ctx.settings.dispatcher.celery.queues, control_exchange = %ctx.settings.dispatcher.celery.control_exchange, "Celery bridge started");
    Ok(())
}

/// Declares what the bridge consumes. The Celery queues as a Celery client declares them
/// (durable, no arguments) unless they exist already, in whatever form; the `eta` queue bound
/// to the tasks exchange; the revoke queue bound to the control exchange, which Celery
/// declares transient.
async fn declare(ctx: &Ctx) -> Result<()> {
    let common = &ctx.settings.common;
    let conn = amqp::connect(
        &common.amqp_url,
        "gantry-dispatcher/celery-setup",
        common.broker_timeout,
    )
    .await?;
    let topology = &ctx.topology;
    let declared = async {
        for queue in &ctx.settings.dispatcher.celery.queues {
            // A passive declare first: an existing queue is used as it is (a quorum queue a
            // Celery app declared with its own arguments, say).
            let channel = confirm_channel(&conn, common.broker_timeout).await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let exists = channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
                .is_ok();
            if !exists {
                let channel = confirm_channel(&conn, common.broker_timeout).await?;
                topology
                    .queue(&channel, queue, FieldTable::default())
                    .await?;
            }
        }
        let channel = confirm_channel(&conn, common.broker_timeout).await?;
        let eta = eta_queue(ctx);
        topology.queue(&channel, &eta, quorum_args()).await?;
        let tasks = topology.tasks_exchange();
        topology
            .bind(
                &channel,
                &eta,
                &tasks,
                ETA_ROUTING_KEY,
                FieldTable::default(),
            )
            .await?;
        bind_revokes(ctx, &channel).await
    };
    let result = declared.await;
    let _ = conn.close(200, "celery queues declared".into()).await;
    result
}

/// The control exchange as Celery declares it (fanout, transient) and the revoke queue
/// bound to it. Done again at every reconnect: a broker restart forgets the exchange.
async fn bind_revokes(ctx: &Ctx, channel: &Channel) -> Result<()> {
    let exchange = &ctx.settings.dispatcher.celery.control_exchange;
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| gantry_shared::Error::Amqp {
            operation: "exchange.declare (Celery's control exchange)",
            source,
        })?;
    let queue = revoke_queue(ctx);
    ctx.topology.queue(channel, &queue, quorum_args()).await?;
    ctx.topology
        .bind(channel, &queue, exchange, "", FieldTable::default())
        .await?;
    Ok(())
}

/// What a bridge consumer takes.
#[derive(Debug, Clone)]
enum Stream {
    /// A Celery queue.
    Celery(String),
    /// Tasks back from the delay queues.
    Eta,
    /// Revokes.
    Revoke,
}

/// Consumes `stream` until shutdown, reconnecting when the broker goes away. Each delivery
/// is acked once it has been dealt with (converted and published, delayed, dead-lettered,
/// or its revoke recorded); one that could not be is returned to its queue.
async fn consume(ctx: Arc<Ctx>, stream: Stream) {
    let celery = &ctx.settings.dispatcher.celery;
    let (name, queue) = match &stream {
        Stream::Celery(queue) => (format!("gantry-dispatcher/celery/{queue}"), queue.clone()),
        Stream::Eta => ("gantry-dispatcher/celery-eta".into(), eta_queue(&ctx)),
        Stream::Revoke => ("gantry-dispatcher/celery-revoke".into(), revoke_queue(&ctx)),
    };
    let source = Source {
        url: &ctx.settings.common.amqp_url,
        name,
        queue: queue.clone(),
        prefetch: celery.prefetch.max(1),
        timeout: ctx.settings.common.broker_timeout,
    };
    ctx.metrics.consumer(&source.name);
    let mut first = true;
    while let Some(mut session) = open_until_shutdown(&source, &ctx.shutdown).await {
        if matches!(stream, Stream::Revoke) && !first {
            // The control exchange is transient: a restarted broker has lost it and the
            // binding.
            if let Err(e) = declare(&ctx).await {
                warn!(error = %chain(&e), "cannot bind the revoke queue again");
            }
        }
        first = false;
        let end = loop {
            let delivery = tokio::select! {
                _ = ctx.shutdown.cancelled() => break SessionEnd::Shutdown,
                d = session.consumer.next() => d,
            };
            let delivery = match delivery {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    warn!(%queue, error = %e, "consumer failed");
                    break SessionEnd::Broken;
                }
                None => break SessionEnd::Broken,
            };
            let handled = match &stream {
                Stream::Celery(queue) => bridge::take(&ctx, queue, &delivery).await,
                Stream::Eta => eta::take(&ctx, &queue, &delivery).await,
                Stream::Revoke => revoke::take(&ctx, &delivery).await,
            };
            if !settle(&delivery, handled, &queue).await {
                break SessionEnd::Shutdown;
            }
        };
        let stop = matches!(end, SessionEnd::Shutdown);
        session.close(&end, &queue).await;
        if stop {
            return;
        }
        ctx.metrics.reconnected(&source.name);
    }
}

/// Acks a delivery dealt with, returns one that was not; `false` when shutting down (the
/// delivery is left un-acked and comes back when the channel closes).
async fn settle(delivery: &Delivery, handled: Result<()>, queue: &str) -> bool {
    match handled {
        Ok(()) => {
            if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                warn!(queue, error = %e, "ack failed; the delivery comes back and is handled again, idempotently");
            }
            true
        }
        Err(Error::ShuttingDown) => false,
        Err(e) => {
            warn!(queue, error = %chain(&e), "Celery delivery not handled; returning it to its queue");
            // A pause, so a failure that repeats does not spin.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            if let Err(e) = delivery.nack(requeue).await {
                warn!(queue, error = %e, "nack failed");
            }
            true
        }
    }
}
