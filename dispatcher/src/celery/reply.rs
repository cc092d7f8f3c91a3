//! Replies in the format of Celery's `rpc://` result backend, always after the task's end
//! is committed: the recorder's forward asks [`rpc_reply`] for the message of a Celery task
//! ([`gantry_shared::celery::reply`]); a task that ends without a result to forward
//! (revoked, expired or dead-lettered before it ran) is answered from its record
//! ([`of_record`], [`after_dead_letters`]).

use gantry_shared::celery::{
    CeleryOrigin, CeleryState, DeadlineFrom, ORIGIN_HEADER, is_celery_message, reply,
};
use gantry_shared::message::{TaskId, TaskResult};
use gantry_shared::store::TaskRecord;
use lapin::BasicProperties;

use crate::Result;
use crate::context::Ctx;

/// The reply for a result that ended a Celery task, `None` for any other task (its
/// `gantry.result/v1` message is forwarded as it is). Asked whatever this process's
/// settings say: the recorder may run apart from the dispatchers that take Celery tasks.
///
/// # Errors
/// Postgres errors.
pub(crate) async fn rpc_reply(
    ctx: &Ctx,
    result: &TaskResult,
) -> Result<Option<(Vec<u8>, BasicProperties)>> {
    let origin = ctx
        .persist("read Celery origin", || {
            ctx.store.celery_origin(result.task_id)
        })
        .await?;
    Ok(origin.map(|o| {
        reply(
            result.task_id,
            &CeleryState::of_result(result, o.deadline_from),
        )
    }))
}

/// Sends the reply of a Celery task that has ended, from its record, and notes it sent.
///
/// # Errors
/// A broker failure (after retries) or a Postgres error.
pub(crate) async fn of_record(ctx: &Ctx, record: &TaskRecord, origin: &CeleryOrigin) -> Result<()> {
    let (Some(queue), Some(state)) = (
        origin.reply_to.as_deref(),
        CeleryState::of_record(record, origin.deadline_from),
    ) else {
        return Ok(());
    };
    let (body, props) = reply(record.task_id, &state);
    ctx.reply(record.task_id, queue, &body, props).await?;
    ctx.persist("mark forwarded", || {
        ctx.store.mark_forwarded(record.task_id)
    })
    .await
}

/// After dead letters are recorded: the Celery tasks among them that they ended (expired
/// before they ran, or refused by the bridge) get their reply now. `ended` holds each
/// task ended and its dead letter's properties.
///
/// # Errors
/// As [`of_record`].
pub(crate) async fn after_dead_letters(
    ctx: &Ctx,
    ended: &[(TaskId, &BasicProperties)],
) -> Result<()> {
    for (id, props) in ended {
        let id = *id;
        let headers = props.headers().clone().unwrap_or_default();
        if !headers.contains_key(ORIGIN_HEADER) && !is_celery_message(&headers) {
            continue;
        }
        let kept = ctx
            .persist("read Celery origin", || ctx.store.celery_origin(id))
            .await?;
        // A message the bridge refused has no origin kept: its reply queue is its own.
        let Some(origin) = kept.or_else(|| refused_origin(id, props)) else {
            continue;
        };
        if let Some(record) = ctx.persist("read task", || ctx.store.task(id)).await?
            && record.state.is_terminal()
            && record.forwarded_at.is_none()
        {
            of_record(ctx, &record, &origin).await?;
        }
    }
    Ok(())
}

/// The origin of a Celery message the bridge refused: where its reply goes.
fn refused_origin(task_id: TaskId, props: &BasicProperties) -> Option<CeleryOrigin> {
    is_celery_message(props.headers().as_ref()?).then_some(())?;
    Some(CeleryOrigin {
        task_id,
        reply_to: props
            .reply_to()
            .as_ref()
            .map(|r| r.to_string())
            .filter(|r| !r.is_empty()),
        root_id: None,
        parent_id: None,
        group: None,
        retries: 0,
        eta: None,
        deadline_from: DeadlineFrom::Default,
    })
}
