//! One Celery delivery in: checked and converted to a Gantry task, its origin kept in
//! Postgres, published with confirms (to its class's queue, or to the delay queues while its
//! `eta` is ahead) and only then acked by the caller. What Gantry cannot take is
//! dead-lettered with a reason, like any bad task.

use chrono::{DateTime, Utc};
use gantry_shared::celery::{CeleryOrigin, CeleryTask, claim};
use gantry_shared::message::{FieldTableExt, Rejection, Task, headers, traceparent};
use lapin::message::Delivery;
use tracing::{info, warn};

use super::publish::{marked, publish};
use super::{eta, reply};
use crate::Result;
use crate::context::Ctx;
use crate::dead_letter::{self, Refused};

/// What a Celery delivery becomes.
enum Converted {
    /// A task to publish now, or at `not_before`.
    Run {
        task: Box<Task>,
        not_before: Option<DateTime<Utc>>,
    },
    /// A task whose deadline passed before it could be dispatched, with the reason.
    Expired { task: Box<Task>, reason: String },
}

/// Why a delivery is refused, and its label in the counters.
struct Refusal {
    reason: String,
    label: &'static str,
}

impl From<Rejection> for Refusal {
    fn from(rejection: Rejection) -> Self {
        Refusal {
            reason: rejection.to_string(),
            label: rejection.metric_label(),
        }
    }
}

/// Takes one delivery of the Celery queue `queue`.
pub(super) async fn take(ctx: &Ctx, queue: &str, delivery: &Delivery) -> Result<()> {
    let now = Utc::now();
    let (converted, origin) = match convert(ctx, delivery, now) {
        Ok(converted) => converted,
        Err(refusal) => {
            let count = ctx.metrics.rejected(refusal.label);
            warn!(queue, reason = %refusal.reason, rejected_total = count, "refused a Celery message; dead-lettering it");
            // It keeps its Celery form: an operator sees what the client sent.
            return dead_letter::publish(
                &ctx.publisher,
                &ctx.topology.dlx(),
                queue,
                delivery,
                &refusal.reason,
            )
            .await;
        }
    };
    ctx.persist("record Celery origin", || {
        ctx.store.record_celery_origin(&origin)
    })
    .await?;
    if let Some(record) = ctx
        .persist("read task", || ctx.store.task(origin.task_id))
        .await?
        && record.state.is_terminal()
    {
        // Revoked before it arrived, or this delivery came back after its task was
        // handled: nothing to run; the reply, if still owed, goes now.
        info!(task_id = %origin.task_id, state = %record.state, "Celery task already ended; not published");
        if record.forwarded_at.is_none() {
            reply::of_record(ctx, &record, &origin).await?;
        }
        return Ok(());
    }
    match converted {
        Converted::Run {
            task,
            not_before: Some(due),
        } => eta::delay(ctx, &task, due, now).await,
        Converted::Run {
            task,
            not_before: None,
        } => publish(ctx, &task, now).await,
        Converted::Expired { task, reason } => expired(ctx, queue, &task, &reason).await,
    }
}

/// Checks a Celery delivery and converts it, with the origin to keep beside the task.
fn convert(
    ctx: &Ctx,
    delivery: &Delivery,
    now: DateTime<Utc>,
) -> Result<(Converted, CeleryOrigin), Refusal> {
    let limits = &ctx.settings.common.limits;
    let celery = CeleryTask::from_amqp(&delivery.properties, &delivery.data, limits)?;
    let catalog = ctx.catalog();
    let Some((class, spec)) = claim(&catalog, celery.name.as_str()) else {
        return Err(Refusal {
            reason: format!(
                "invalid: task: no executor class claims the Celery task name {:?}; add it, or a pattern that matches it, to a class's celery.tasks in the catalog",
                celery.name.as_str()
            ),
            label: "celery_unclaimed",
        });
    };
    let (envelope, origin, not_before) = celery.envelope(class.as_str(), spec.ttl, now);
    let deadline = envelope.deadline;
    let (check_at, expired) = if deadline <= now {
        // Checked as of just before its deadline: the task it would have been.
        (deadline - chrono::Duration::milliseconds(1), true)
    } else {
        (now, false)
    };
    let mut task = Box::new(Task::from_envelope(envelope, limits, check_at)?);
    catalog.check_payload(&task.executor, &task.payload)?;
    task.reply_to = origin.reply_to.clone();
    // A Celery client that traces (OpenTelemetry's Celery instrumentation) sends its span
    // as the `traceparent` header: the task continues its trace.
    let theirs = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.get_str(headers::TRACEPARENT))
        .filter(|tp| traceparent::is_valid(tp))
        .map(str::to_owned);
    task.traceparent = Some(theirs.unwrap_or_else(traceparent::generate));
    let converted = if expired {
        let reason = format!(
            "expired: deadline {deadline} (the Celery task's expires or time limit) passed before the task was dispatched"
        );
        Converted::Expired { task, reason }
    } else {
        Converted::Run { task, not_before }
    };
    Ok((converted, origin))
}

/// Dead-letters a task that expired before it could be dispatched, as the Gantry task it
/// became (its message as of just before its deadline; the dead letter drops the
/// expiration): the recorder records it `expired`, and its reply (`REVOKED`) follows the
/// commit.
async fn expired(ctx: &Ctx, queue: &str, task: &Task, reason: &str) -> Result<()> {
    let as_of = task.deadline - chrono::Duration::milliseconds(1);
    let (body, props) = task.to_amqp(as_of).map_err(gantry_shared::Error::from)?;
    let props = marked(props);
    let count = ctx.metrics.rejected("deadline_passed");
    info!(task_id = %task.id, %reason, rejected_total = count, "Celery task expired before dispatch; dead-lettering it");
    let message = Refused {
        routing_key: task.executor.as_str(),
        properties: &props,
        body: &body,
    };
    dead_letter::publish_message(&ctx.publisher, &ctx.topology.dlx(), queue, &message, reason).await
}
