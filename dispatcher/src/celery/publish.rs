//! Publishing a Celery task as the Gantry task it became, marked as Celery's.

use chrono::{DateTime, Utc};
use gantry_shared::celery::ORIGIN_HEADER;
use gantry_shared::message::Task;
use lapin::BasicProperties;
use lapin::types::AMQPValue;

use crate::Result;
use crate::context::Ctx;

/// Publishes a task to its class's queue, marked as Celery's.
pub(super) async fn publish(ctx: &Ctx, task: &Task, now: DateTime<Utc>) -> Result<()> {
    let (body, props) = task.to_amqp(now).map_err(gantry_shared::Error::from)?;
    let exchange = ctx.topology.tasks_exchange();
    ctx.publish_task(&exchange, task.executor.as_str(), &body, marked(props))
        .await
}

/// The task message's properties with the header that says it came from Celery.
pub(super) fn marked(props: BasicProperties) -> BasicProperties {
    let mut table = props.headers().clone().unwrap_or_default();
    table.insert(ORIGIN_HEADER.into(), AMQPValue::LongString("celery".into()));
    props.with_headers(table)
}
