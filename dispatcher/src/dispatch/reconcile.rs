//! At start, before any delivery: adopts the jobs the runtime has (running ones are
//! followed, ended ones have their end dealt with), and fails the attempts that Postgres
//! says this runtime dispatched but whose job is gone, so every task reaches a terminal
//! state. A job is gone when it was claimed but never created (the dispatcher stopped in
//! between), when its state directory was wiped, or when it was deleted while no dispatcher
//! followed it; its attempt is failed as `job_lost`, which is retried, and never started
//! again under the same attempt.

use std::collections::HashMap;
use std::sync::Arc;

use gantry_shared::message::{ErrorKind, ExecutorClass, JobName};
use gantry_shared::store::TaskState;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::follow::{Origin, follow, on_behalf};
use super::role::Role;
use super::warm;
use crate::Result;
use crate::runtime::{End, Job, JobEnd, Runtime};

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
    let mut warm_jobs = Vec::new();
    for (job, running) in runtime.scan()? {
        if job.is_warm() {
            warm_jobs.push((job, running));
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
        let Some(job_name) = record.job_name.as_deref().filter(|_| mine) else {
            continue;
        };
        let attempt = record.attempt;
        let name = if JobName::names_warm(job_name) {
            JobName::recorded(job_name)
        } else {
            JobName::for_task(record.task_id, attempt)
        };
        if name.as_str() != job_name || runtime.knows(&name) {
            continue;
        }
        warn!(task_id = %record.task_id, job = %name, state = %record.state, "the attempt's job is gone; failing the attempt as lost");
        let end = JobEnd {
            task_id: record.task_id,
            attempt,
            job_name: name.clone(),
            end: End::Failure {
                kind: ErrorKind::JobLost,
                retryable: true,
                reason: "JobLost",
            },
            exit: format!(
                "job lost: the attempt was {} but its job no longer exists (never created, or deleted while no dispatcher followed it)",
                record.state
            ),
            log_tail: String::new(),
            evidence: runtime.evidence(&name),
        };
        ctx.publish_result(&on_behalf(&end)).await?;
        if !name.is_warm() {
            runtime.mark_handled(&name);
        }
        ctx.metrics.synthesized.inc();
    }
    Ok(())
}
