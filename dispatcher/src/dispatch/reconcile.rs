//! At start, before any delivery: takes over the claims of gone dispatchers (`super::adopt`),
//! adopts the jobs the runtime has that no live dispatcher claimed (running ones are
//! followed, ended ones have their end dealt with), and fails the attempts that Postgres
//! says this runtime dispatched but whose job is gone, so every task reaches a terminal
//! state. A job is gone when it was claimed but never created (the dispatcher stopped in
//! between), when its state directory was wiped, or when it was deleted while no dispatcher
//! followed it; its attempt is failed as `job_lost`, which is retried, and never started
//! again under the same attempt.

use std::collections::HashMap;
use std::sync::Arc;

use gantry_shared::message::{ExecutorClass, JobName};
use gantry_shared::store::TaskState;
use tokio::sync::Semaphore;
use tracing::info;

use super::adopt::{adopt, fail_lost};
use super::follow::{Origin, follow};
use super::role::Role;
use super::warm;
use crate::Result;
use crate::runtime::{Job, Runtime};

/// Reconciles the runtime with Postgres; the jobs followed take units of `capacity`.
///
/// # Errors
/// The runtime's state or Postgres cannot be read, or a result cannot be published.
pub(crate) async fn reconcile<R: Runtime>(
    role: &Arc<Role<R>>,
    capacity: &HashMap<ExecutorClass, Arc<Semaphore>>,
) -> Result<()> {
    let (ctx, runtime) = (&role.ctx, &role.runtime);
    runtime.sweep();
    // The claims of gone dispatchers (this process's earlier life among them) are this
    // one's now; the jobs live dispatchers claimed are theirs to follow.
    adopt(role, Some(capacity)).await?;
    let (me, instance) = (role.dispatcher, runtime.instance().to_owned());
    let adopted_warm = ctx
        .persist("adopt warm executors", || {
            ctx.store.adopt_warm(me, &instance)
        })
        .await?;
    let others = ctx
        .persist("read the claims of other dispatchers", || {
            ctx.store.held_by_others(me)
        })
        .await?;
    let others_warm = ctx
        .persist("read the warm executors of other dispatchers", || {
            ctx.store.warm_held_by_others(me)
        })
        .await?;
    let mut warm_jobs = Vec::new();
    for (job, running) in runtime.scan()? {
        if job.is_warm() {
            if !others_warm.contains(job.name().as_str()) {
                warm_jobs.push((job, running));
            }
            continue;
        }
        if others.contains(&(job.task_id(), job.attempt())) {
            continue;
        }
        let permit = ExecutorClass::parse(job.executor())
            .ok()
            .and_then(|c| capacity.get(&c).cloned())
            .and_then(|s| s.try_acquire_owned().ok());
        info!(job = %job.name(), running, "reconciling a job found at start");
        ctx.metrics.reconciled.inc();
        tokio::spawn(follow(role.clone(), job, permit, Origin::Found));
    }
    let unfinished = ctx
        .persist("read unfinished tasks", || ctx.store.unfinished(None))
        .await?;
    // A gone dispatcher's warm executor that no longer exists counts no more.
    for name in adopted_warm {
        let name = JobName::recorded(&name);
        if !runtime.knows(&name) {
            warm::uncount(role, &name).await;
        }
    }
    for (job, running) in warm_jobs {
        ctx.metrics.reconciled.inc();
        let semaphore = ExecutorClass::parse(job.executor())
            .ok()
            .and_then(|c| capacity.get(&c));
        warm::adopt(role, job, running, &unfinished, semaphore);
    }
    // Only tasks whose job should exist: a `retrying` task waits in a delay queue.
    let running = [TaskState::Dispatched.as_str(), TaskState::Running.as_str()];
    let ours = format!("{}.", runtime.instance());
    for record in unfinished
        .into_iter()
        .filter(|r| running.contains(&r.state.as_str()))
    {
        // Only tasks this runtime dispatched: another dispatcher has its own jobs.
        let mine = record
            .dispatch_id
            .as_deref()
            .is_some_and(|d| d.starts_with(&ours));
        // An attempt with a job of its own is taken over through its claim (`adopt`).
        let Some(job_name) = record
            .job_name
            .as_deref()
            .filter(|name| mine && JobName::names_warm(name) && !others_warm.contains(*name))
        else {
            continue;
        };
        let name = JobName::recorded(job_name);
        if runtime.knows(&name) {
            continue;
        }
        fail_lost(role, record.task_id, record.attempt, record.state, &name).await?;
    }
    Ok(())
}
