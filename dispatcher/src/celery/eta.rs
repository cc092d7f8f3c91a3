//! Celery tasks with an `eta` (or a countdown) ahead of them wait in the delay queues that
//! retries use, never in a held delivery: RabbitMQ's `consumer_timeout` would close the
//! channel of a delivery held past it. The task, already converted, is published to the
//! retry exchange with the longest delay tier not beyond its `eta` (the shortest if all
//! are) and the routing key `celery.eta`; when the tier's TTL runs out, RabbitMQ
//! dead-letters it to the tasks exchange, which routes that key to the `eta` queue. There it
//! is published to its class's queue if due, or delayed again. An `eta` is met to within the
//! shortest tier (1 s by default), never early.

use chrono::{DateTime, Utc};
use gantry_shared::celery::{ETA_ROUTING_KEY, NOT_BEFORE_HEADER};
use gantry_shared::message::{FieldTableExt, Rejection, Task};
use gantry_shared::topology::{RETRY_TIER_HEADER, tier_name};
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use tracing::{debug, warn};

use super::publish::{marked, publish};
use crate::context::Ctx;
use crate::recorder::retry::tier_for;
use crate::{Error, Result, dead_letter};

/// Sends `task` through the delay tier that fits the time left until `due`.
pub(super) async fn delay(
    ctx: &Ctx,
    task: &Task,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<()> {
    let left = (due - now).to_std().unwrap_or_default();
    let tiers = &ctx.settings.common.queues.retry_delays;
    let Some(tier) = tier_for(left, tiers) else {
        return Err(Error::Job {
            job: task.id.to_string(),
            message: "no delay tiers are configured (queues.retry_delays); a Celery eta needs them"
                .into(),
        });
    };
    let (body, props) = task.to_amqp(now).map_err(gantry_shared::Error::from)?;
    let mut table = props.headers().clone().unwrap_or_default();
    table.insert(
        RETRY_TIER_HEADER.into(),
        AMQPValue::LongString(tier_name(tier).into()),
    );
    table.insert(
        NOT_BEFORE_HEADER.into(),
        AMQPValue::LongString(due.to_rfc3339().into()),
    );
    let props = marked(props.with_headers(table));
    debug!(task_id = %task.id, %due, tier = %tier_name(tier), "Celery task not due yet; delayed");
    let exchange = ctx.topology.retry_exchange();
    ctx.publish_task(&exchange, ETA_ROUTING_KEY, &body, props)
        .await
}

/// Takes one task back from the delay queues: to its class's queue if due, else delayed
/// again. One whose deadline has passed meanwhile is dead-lettered `expired`.
pub(super) async fn take(ctx: &Ctx, queue: &str, delivery: &Delivery) -> Result<()> {
    let now = Utc::now();
    let limits = &ctx.settings.common.limits;
    let task = match Task::from_amqp(&delivery.properties, &delivery.data, limits, now) {
        Ok(task) => task,
        Err(rejection) => {
            let reason = match &rejection {
                Rejection::DeadlinePassed(deadline) => format!(
                    "expired: deadline {deadline} passed while the Celery task waited for its eta"
                ),
                other => other.to_string(),
            };
            let count = ctx.metrics.rejected(rejection.metric_label());
            warn!(%reason, rejected_total = count, "task back from the delay queues refused; dead-lettering it");
            return dead_letter::publish(
                &ctx.publisher,
                &ctx.topology.dlx(),
                queue,
                delivery,
                &reason,
            )
            .await;
        }
    };
    let due = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.get_str(NOT_BEFORE_HEADER))
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc));
    match due {
        Some(due) if due > now => delay(ctx, &task, due, now).await,
        _ => publish(ctx, &task, now).await,
    }
}
