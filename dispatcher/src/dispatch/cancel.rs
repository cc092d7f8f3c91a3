//! Cancellation: stops the jobs of tasks cancelled while this dispatcher follows them
//! (`gantry cancel` records `cancelled`; the store announces it on its `LISTEN` channel).
//! A cancelled task still in its queue is skipped when it arrives (its attempt is over).
//! The same announcements free the slots of warm executors as their attempts end (a
//! cancelled task in hand on one is aborted by an order to that executor), and wake the
//! hand-offs that wait for their class's capacity.

use std::sync::Arc;

use gantry_shared::message::{JobName, WarmOrder};
use gantry_shared::store::TaskState;
use gantry_shared::telemetry::chain;
use tracing::{info, warn};

use super::role::Role;
use super::warm;
use crate::runtime::Runtime;

/// Listens for cancellations until shutdown, listening again after a lost connection.
pub(crate) async fn watch_cancellations<R: Runtime>(role: Arc<Role<R>>) {
    let ctx = &role.ctx;
    let mut delays = backon::BackoffBuilder::build(gantry_shared::retry::forever());
    loop {
        let listening = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            l = ctx.store.terminal_notifications() => l,
        };
        let mut ids = match listening {
            Ok(rx) => {
                release_ended(&role).await;
                rx
            }
            Err(e) => {
                let delay = delays.next().unwrap_or(std::time::Duration::from_secs(5));
                warn!(error = %chain(&e), ?delay, "cannot listen for cancellations; retrying");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        loop {
            let id = tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                id = ids.recv() => match id {
                    Some(id) => id,
                    None => break,
                },
            };
            // The attempt's unit of its class's capacity is free, wherever it was held.
            role.capacity_freed.notify_waiters();
            // A warm executor's slot frees as the attempt ends, whatever ended it.
            let warm_job = role.warm.release(id);
            let Ok(Some(record)) = ctx.store.task(id).await else {
                continue;
            };
            if let Some(job) = warm_job {
                if record.state == TaskState::Cancelled {
                    info!(task_id = %id, job = %job, "task cancelled; telling its warm executor");
                    warm::order(&role, &job, &WarmOrder::Cancel { task_id: id }).await;
                }
                continue;
            }
            let name = JobName::for_task(id, record.attempt);
            if record.state != TaskState::Cancelled || !role.is_following(&name) {
                continue;
            }
            info!(task_id = %id, job = %name, "task cancelled; stopping its job");
            if let Err(e) = role.runtime.cancel(&name).await {
                warn!(task_id = %id, error = %chain(&e), "cannot stop the cancelled task's job");
            }
        }
    }
}

/// Frees the warm slots of attempts that ended while nothing listened (at start, or after
/// the listening connection was lost).
async fn release_ended<R: Runtime>(role: &Role<R>) {
    for (id, attempt) in role.warm.held() {
        if let Ok(Some(record)) = role.ctx.store.task(id).await
            && record.state.has_ended(record.attempt, attempt)
        {
            role.warm.release(id);
        }
    }
}
