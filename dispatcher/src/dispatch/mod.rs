//! The dispatch role: turns each task delivered on a class's queue into a job on the
//! runtime, follows every job to its end, and stops the jobs of cancelled tasks.
//!
//! A delivery flows one way through these files: `classes` runs a consumer per class in
//! service → `consume` takes a delivery and waits for capacity → `handoff` decides what
//! becomes of it (a [`Disposition`](disposition::Disposition)) and starts the job →
//! `disposition` carries that out (ack, return, requeue, dead-letter, fail the attempt) →
//! `follow` follows the job to its end; `warm` hands the tasks of a warm class to
//! executors that serve many (`pools` holds them). `claim` claims an attempt with a unit
//! of its class's capacity, shared by every dispatcher on the database; `record` writes an
//! attempt's `running` (and a warm attempt's `dispatched`). `reconcile` runs once at start,
//! before any delivery; `adopt` keeps this dispatcher present and takes over what gone
//! dispatchers left; `cancel` listens for cancellations; `role` holds what they share.

mod adopt;
mod cancel;
mod claim;
mod classes;
mod consume;
mod disposition;
mod follow;
mod handoff;
mod pools;
mod reconcile;
mod record;
mod role;
mod warm;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::message::ExecutorClass;
use tokio::sync::Semaphore;

use tracing::info;

use crate::context::Ctx;
use crate::health::Loops;
use crate::runtime::Runtime;
use crate::{Error, Result};

/// Starts the dispatch role on `runtime`: reconciles first (so a restart loses and
/// duplicates nothing), then spawns into `loops` the class consumers, the cancellation
/// listener and the runtime's housekeeping, all of which stop at shutdown.
///
/// # Errors
/// Reconciliation fails (the runtime's state or Postgres cannot be read).
pub(crate) async fn start<R: Runtime>(ctx: Arc<Ctx>, runtime: R, loops: &mut Loops) -> Result<()> {
    let presence = ctx
        .persist("take this dispatcher's presence", || {
            ctx.store.be_present(None)
        })
        .await?
        .ok_or(Error::ShuttingDown)?;
    info!(dispatcher = presence.id, "present on the database");
    let role = Arc::new(role::Role::new(ctx.clone(), runtime, presence.id));
    loops.spawn(
        "dispatch/presence",
        adopt::keep_present(role.clone(), presence),
    );
    let capacity: HashMap<ExecutorClass, Arc<Semaphore>> = ctx
        .catalog()
        .iter()
        .map(|(class, spec)| {
            (
                class.clone(),
                Arc::new(Semaphore::new(spec.task_capacity() as usize)),
            )
        })
        .collect();
    reconcile::reconcile(&role, &capacity).await?;
    loops.spawn(
        "dispatch/cancellations",
        cancel::watch_cancellations(role.clone()),
    );
    loops.spawn("dispatch/warm", warm::retire(role.clone()));
    loops.spawn("dispatch/adopt", adopt::keep_adopting(role.clone()));
    loops.spawn(
        "dispatch/consumers",
        classes::supervise(role.clone(), capacity),
    );
    loops.spawn("dispatch/sweep", async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = role.ctx.shutdown.cancelled() => return,
                _ = tick.tick() => role.runtime.sweep(),
            }
        }
    });
    Ok(())
}
