//! What becomes of one delivery from a task queue ([`Disposition`]), decided once per
//! delivery, and carrying it out ([`settle`]): the one place that acks, returns,
//! republishes or dead-letters a delivery, or fails its attempt. Every disposition is
//! counted in the delivery counters under its [`Handled`] bucket.

use chrono::Utc;
use gantry_shared::message::{
    ErrorKind, Evidence, JobName, ResultStatus, Task, TaskError, TaskResult,
};
use gantry_shared::telemetry::chain;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tracing::{error, info, warn};

use super::role::Role;
use crate::dead_letter;
use crate::metrics::Handled;
use crate::runtime::Runtime;
use crate::{Error, Result};

/// What becomes of one delivery.
pub(crate) enum Disposition {
    /// The attempt's job runs: created, or found (`adopted`). Acked.
    Started { adopted: bool },
    /// Nothing to do for this delivery, for the reason: acked.
    Skip(&'static str),
    /// Back to the end of its queue as a new publish (confirmed), then acked: a nack would
    /// count toward the queue's delivery limit.
    Requeue {
        task: Box<Task>,
        reason: &'static str,
        why: &'static str,
    },
    /// Returned to its queue (nack), for the reason: its consumer stops, or the hand-off
    /// failed and another delivery may do better.
    Return(&'static str),
    /// Refused: dead-lettered with the reason (confirmed), then acked; counted by `label`.
    DeadLetter { reason: String, label: &'static str },
    /// The attempt failed before its job could run: a failure of `kind` is published on
    /// its behalf (the recorder retries it if `retryable` and the class allows), then
    /// acked; counted by kind.
    Fail {
        task: Box<Task>,
        job: JobName,
        kind: ErrorKind,
        message: String,
        retryable: bool,
        evidence: Evidence,
    },
}

impl Disposition {
    /// A refused message, with the rejection's reason and label.
    pub(crate) fn refuse(rejection: &gantry_shared::message::Rejection) -> Disposition {
        Disposition::DeadLetter {
            reason: rejection.to_string(),
            label: rejection.metric_label(),
        }
    }
}

/// Carries out `disposition` for `delivery` from `queue`; the bucket it is counted in.
/// A failure to carry it out returns the delivery to its queue (or, at shutdown, leaves it
/// to come back when the channel closes).
pub(crate) async fn settle<R: Runtime>(
    role: &Role<R>,
    queue: &str,
    delivery: &Delivery,
    disposition: Disposition,
) -> Handled {
    match carry_out(role, queue, delivery, disposition).await {
        Ok(handled) => handled,
        Err(Error::ShuttingDown) => Handled::Requeued("shutdown"),
        Err(e) => {
            error!(error = %chain(&e), "could not settle the delivery; returning it to its queue");
            nack(delivery).await;
            Handled::Requeued("error")
        }
    }
}

async fn carry_out<R: Runtime>(
    role: &Role<R>,
    queue: &str,
    delivery: &Delivery,
    disposition: Disposition,
) -> Result<Handled> {
    let ctx = &role.ctx;
    Ok(match disposition {
        Disposition::Started { adopted } => {
            ack(delivery).await;
            if adopted {
                Handled::Adopted
            } else {
                Handled::Dispatched
            }
        }
        Disposition::Skip(reason) => {
            ack(delivery).await;
            Handled::Skipped(reason)
        }
        Disposition::Return(reason) => {
            nack(delivery).await;
            Handled::Requeued(reason)
        }
        Disposition::DeadLetter { reason, label } => {
            let count = ctx.metrics.rejected(label);
            warn!(%reason, rejected_total = count, "rejected message; dead-lettering it");
            dead_letter::publish(
                &ctx.publisher,
                &ctx.topology.dlx(),
                queue,
                delivery,
                &reason,
            )
            .await?;
            ack(delivery).await;
            Handled::DeadLettered(label)
        }
        Disposition::Requeue { task, reason, why } => {
            let (body, props) = match task.to_amqp(Utc::now()) {
                Ok(m) => m,
                Err(rejection) => {
                    let refused = Disposition::refuse(&rejection);
                    return Box::pin(carry_out(role, queue, delivery, refused)).await;
                }
            };
            ctx.publish_task(
                &ctx.topology.tasks_exchange(),
                task.executor.as_str(),
                &body,
                props,
            )
            .await?;
            ack(delivery).await;
            info!(task_id = %task.id, why, "requeued at the end of the queue");
            Handled::Requeued(reason)
        }
        Disposition::Fail {
            task,
            job,
            kind,
            message,
            retryable,
            evidence,
        } => {
            let (reason, label) = (kind.to_string(), kind.label());
            let error = TaskError {
                kind,
                message,
                retryable,
            };
            let result = TaskResult::on_behalf(
                task.id,
                task.attempt,
                ResultStatus::Failed,
                error,
                evidence,
                &reason,
            );
            ctx.publish_result(&result).await?;
            role.runtime.mark_handled(&job);
            ack(delivery).await;
            Handled::Failed(label)
        }
    })
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        // The channel broke: the message comes back and finds its attempt claimed.
        warn!(error = %e, "ack failed; the message will be redelivered and find its attempt claimed");
    }
}

async fn nack(delivery: &Delivery) {
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    if let Err(e) = delivery.nack(requeue).await {
        warn!(error = %e, "nack failed; the message comes back when the channel closes");
    }
}
