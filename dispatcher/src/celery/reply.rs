//! Replies in the format of Celery's `rpc://` result backend, always after the task's end
//! is committed: the recorder's forward asks [`rpc_reply`] for the message of a Celery task
//! ([`gantry_shared::celery::reply`]); a task that ends without a result to forward
//! (revoked, expired or dead-lettered before it ran) is answered from its record
//! ([`of_record`], [`after_dead_letters`]).

use gantry_shared::celery::{CeleryOrigin, CeleryState, reply};
use gantry_shared::message::{TaskId, TaskResult};
use gantry_shared::store::TaskRecord;
use lapin::BasicProperties;

use crate::Result;
use crate::context::Ctx;

/// The reply for a result that ended a Celery task, `None` for any other task (its
/// `gantry.result/v1` message is forwarded as it is).
///
/// # Errors
/// Postgres errors.
pub(crate) async fn rpc_reply(
    ctx: &Ctx,
    result: &TaskResult,
) -> Result<Option<(Vec<u8>, BasicProperties)>> {
    if !ctx.settings.dispatcher.celery.enabled {
        return Ok(None);
    }
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
/// or refused before they ran) get their reply now.
///
/// # Errors
/// As [`of_record`].
pub(crate) async fn after_dead_letters(ctx: &Ctx, ids: &[TaskId]) -> Result<()> {
    if !ctx.settings.dispatcher.celery.enabled {
        return Ok(());
    }
    for id in ids {
        let Some(origin) = ctx
            .persist("read Celery origin", || ctx.store.celery_origin(*id))
            .await?
        else {
            continue;
        };
        if let Some(record) = ctx.persist("read task", || ctx.store.task(*id)).await?
            && record.state.is_terminal()
            && record.forwarded_at.is_none()
        {
            of_record(ctx, &record, &origin).await?;
        }
    }
    Ok(())
}
