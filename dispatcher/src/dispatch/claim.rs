//! An attempt's claim with a unit of its class's capacity, shared by every dispatcher on the
//! database: the claim is written only while fewer than `max_active_jobs` attempts of the
//! class hold a job, counted in Postgres in the claim's own transaction
//! ([`Store::claim`](gantry_shared::store::Store::claim)). A full class is waited for with
//! the delivery in hand: the store announces each attempt's end, and the claim is tried
//! again then, or after [`RECHECK`] at the latest, until the delivery's `max_hold` is spent.
//! The unit is given back when the attempt ends, whoever records that; the per-process
//! semaphore the consumer took before (`super::consume`) is the local bound beside it.

use std::time::{Duration, Instant};

use gantry_shared::message::{ExecutorClass, Task};
use gantry_shared::store::{Applied, Change, Claim, Claimed, TaskState};
use tracing::debug;

use super::role::Role;
use crate::runtime::Runtime;
use crate::{Error, Result};

/// Longest wait between two tries of a full class's claim, should an announcement be missed.
pub(crate) const RECHECK: Duration = Duration::from_secs(1);

/// Claims `task`'s attempt with `change` once its class has room (at most `limit` of its
/// attempts holding a job); `None` when it had none before `max_hold` after `arrived`.
///
/// # Errors
/// A write that Postgres refuses, or [`Error::ShuttingDown`].
pub(super) async fn claim<R: Runtime>(
    role: &Role<R>,
    class: &ExecutorClass,
    task: &Task,
    change: &Change,
    limit: u32,
    arrived: Instant,
) -> Result<Option<Applied>> {
    let ctx = &role.ctx;
    let until = arrived + ctx.settings.dispatcher.max_hold;
    let claim = Claim {
        id: task.id,
        attempt: task.attempt,
        change: change.clone(),
        executor: class.clone(),
        limit,
        dispatcher: role.dispatcher,
    };
    loop {
        present(role).await?;
        // Listening before the count, so an end announced in between is not missed.
        let freed = role.capacity_freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        match ctx
            .persist("record dispatched", || role.lifecycle.claim(&claim))
            .await?
        {
            Claimed::Applied(applied) => {
                if applied.changed() {
                    ctx.metrics
                        .task_entered(class.as_str(), TaskState::Dispatched);
                }
                return Ok(Some(applied));
            }
            Claimed::Full { active } => {
                debug!(task_id = %task.id, active, limit, "the class is at max_active_jobs across dispatchers; waiting");
            }
        }
        let now = Instant::now();
        if now >= until {
            return Ok(None);
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Err(Error::ShuttingDown),
            _ = &mut freed => {}
            _ = tokio::time::sleep(RECHECK.min(until - now)) => {}
        }
    }
}

/// Waits until this dispatcher holds its presence: one whose presence is lost may have its
/// claims taken over, so it makes none until it is back.
///
/// # Errors
/// [`Error::ShuttingDown`].
pub(super) async fn present<R: Runtime>(role: &Role<R>) -> Result<()> {
    let mut present = role.present.subscribe();
    tokio::select! {
        _ = role.ctx.shutdown.cancelled() => Err(Error::ShuttingDown),
        p = present.wait_for(|p| *p) => p.map(|_| ()).map_err(|_| Error::ShuttingDown),
    }
}
