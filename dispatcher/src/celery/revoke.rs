//! `app.control.revoke(task_id)`: each revoke broadcast on Celery's control exchange
//! cancels its tasks the way `gantry cancel` does (`Store::cancel`): a task still queued is
//! skipped when it arrives, a running one has its job stopped by the dispatcher that
//! follows it. The client gets `REVOKED` once the cancel is committed. Gantry stops the job
//! of a revoked task whether or not `terminate` was asked for: a cancelled task's work is
//! not wanted.

use gantry_shared::celery::Revoke;
use gantry_shared::store::Cancel;
use lapin::message::Delivery;
use tracing::{debug, info};

use super::reply;
use crate::Result;
use crate::context::Ctx;

/// Takes one control message: a revoke is recorded, anything else is not Gantry's to answer.
pub(super) async fn take(ctx: &Ctx, delivery: &Delivery) -> Result<()> {
    let content_type = delivery
        .properties
        .content_type()
        .as_ref()
        .map(|c| c.as_str());
    let Some(revoke) = Revoke::from_body(content_type, &delivery.data) else {
        debug!("control message that is not a revoke; ignored");
        return Ok(());
    };
    if !revoke.ignored.is_empty() {
        info!(ids = ?revoke.ignored, "revoke of ids that are not UUIDs, so no Gantry task's; ignored");
    }
    for id in revoke.task_ids {
        let reason = "revoked by a Celery client";
        let outcome = ctx
            .persist("cancel", || ctx.store.cancel(id, reason))
            .await?;
        match outcome {
            Cancel::Cancelled(was) => {
                info!(task_id = %id, was = ?was.map(|s| s.to_string()), terminate = revoke.terminate, "Celery revoke: task cancelled");
                let Some(origin) = ctx
                    .persist("read Celery origin", || ctx.store.celery_origin(id))
                    .await?
                else {
                    // Not converted yet: the bridge finds the task cancelled and replies then.
                    continue;
                };
                if let Some(record) = ctx.persist("read task", || ctx.store.task(id)).await? {
                    reply::of_record(ctx, &record, &origin).await?;
                }
            }
            Cancel::AlreadyEnded(state) => {
                debug!(task_id = %id, %state, "Celery revoke of a task that had already ended");
            }
        }
    }
    Ok(())
}
