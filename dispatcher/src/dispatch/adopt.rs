//! Dispatchers side by side: this process's presence on the database, and the claims of
//! gone dispatchers that it takes over, so that what a dispatcher leaves when it dies or
//! is replaced (a rolling update, a SIGKILL) still reaches an outcome.
//!
//! - [`keep_present`] holds the presence (`Store::be_present`) and, should its connection
//!   be lost, takes it again under the same id; meanwhile this process claims nothing.
//! - [`adopt`] takes over the claims of dispatchers whose presence is gone (at start, then
//!   every [`ADOPT_EVERY`]): an attempt whose job exists is followed to its end (its result
//!   recorded, one published on its behalf if it ends without one); an attempt whose job
//!   does not exist [`GRACE`] after its claim was never started (its dispatcher stopped
//!   between the claim and the create) and is failed as `job_lost`, which is retried.
//!   Their warm executors are taken over too (every [`ADOPT_EVERY`]; at start,
//!   `super::reconcile` does it): each drains and is followed to its end.
//!
//! Only the claims of this runtime instance are taken: on Kubernetes every dispatcher of a
//! namespace sees its Jobs; on `local`, only a dispatcher on the same state directory sees
//! its processes. The decision: `docs/decisions.md` (dispatchers side by side).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use gantry_shared::message::{Attempt, ErrorKind, ExecutorClass, JobName, TaskId};
use gantry_shared::store::{Presence, TaskRecord, TaskState};
use gantry_shared::telemetry::chain;
use tokio::sync::Semaphore;
use tracing::{error, info, warn};

use super::follow::{Origin, follow, on_behalf};
use super::role::Role;
use super::warm;
use crate::Result;
use crate::runtime::{End, Job, JobEnd, Runtime};

/// How often a running dispatcher looks for the claims of gone dispatchers.
pub(crate) const ADOPT_EVERY: Duration = Duration::from_secs(10);

/// How long after its claim an adopted attempt's job may still appear (a create in flight
/// when its dispatcher went, seen late by this one's watch) before the attempt counts as
/// never started.
pub(crate) const GRACE: Duration = Duration::from_secs(10);

/// Holds this process's presence until shutdown, taking it again under the same id after
/// a lost connection; while it is lost, `role.present` says so and no claim is made.
pub(crate) async fn keep_present<R: Runtime>(role: Arc<Role<R>>, mut presence: Presence) {
    let ctx = &role.ctx;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = &mut presence.lost => {}
        }
        role.present.send_replace(false);
        warn!(
            dispatcher = role.dispatcher,
            "lost the Postgres connection that holds this dispatcher's presence; claiming nothing until it is back"
        );
        let mut delays = backon::BackoffBuilder::build(gantry_shared::retry::forever());
        presence = loop {
            match ctx.store.be_present(Some(role.dispatcher)).await {
                Ok(Some(again)) => break again,
                Ok(None) => warn!(
                    dispatcher = role.dispatcher,
                    "another session holds this dispatcher's presence (a peer adopting its claims); trying again"
                ),
                Err(e) => {
                    warn!(error = %chain(&e), "cannot take this dispatcher's presence again; retrying")
                }
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        };
        info!(
            dispatcher = role.dispatcher,
            "this dispatcher's presence is back"
        );
        role.present.send_replace(true);
    }
}

/// Takes over the claims of gone dispatchers every [`ADOPT_EVERY`] until shutdown.
pub(crate) async fn keep_adopting<R: Runtime>(role: Arc<Role<R>>) {
    let mut tick = tokio::time::interval(ADOPT_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = role.ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = adopt(&role, None).await {
            warn!(error = %chain(&e), "cannot take over the claims of gone dispatchers; trying again later");
        }
        if let Err(e) = adopt_warm(&role).await {
            warn!(error = %chain(&e), "cannot take over the warm executors of gone dispatchers; trying again later");
        }
    }
}

/// Takes over the claims of gone dispatchers; the jobs followed take a unit of their
/// class's `capacity` when one is free.
///
/// # Errors
/// Postgres cannot be read.
pub(crate) async fn adopt<R: Runtime>(
    role: &Arc<Role<R>>,
    capacity: Option<&HashMap<ExecutorClass, Arc<Semaphore>>>,
) -> Result<()> {
    let ctx = &role.ctx;
    let instance = role.runtime.instance().to_owned();
    let orphans = ctx
        .persist("adopt claims", || {
            ctx.store.adopt(role.dispatcher, &instance)
        })
        .await?;
    for orphan in orphans {
        info!(task_id = %orphan.task_id, attempt = %orphan.attempt, state = %orphan.state,
              "taking over an attempt whose dispatcher is gone");
        ctx.metrics.reconciled.inc();
        let semaphore = ExecutorClass::parse(&orphan.executor)
            .ok()
            .and_then(|class| capacity?.get(&class).cloned());
        tokio::spawn(settle(role.clone(), orphan, semaphore));
    }
    Ok(())
}

/// Follows an adopted attempt's job, or fails the attempt as lost if it has none once
/// [`GRACE`] has passed since its claim.
async fn settle<R: Runtime>(
    role: Arc<Role<R>>,
    orphan: TaskRecord,
    capacity: Option<Arc<Semaphore>>,
) {
    let name = JobName::for_task(orphan.task_id, orphan.attempt);
    if orphan.job_name.as_deref() != Some(name.as_str()) {
        return;
    }
    let claimed = orphan.dispatched_at.unwrap_or_else(Utc::now);
    let since = (Utc::now() - claimed).to_std().unwrap_or_default();
    if since < GRACE && !role.runtime.knows(&name) {
        tokio::select! {
            _ = role.ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(GRACE - since) => {}
        }
    }
    let found = match role.runtime.scan() {
        Ok(jobs) => jobs.into_iter().find(|(job, _)| job.name() == &name),
        Err(e) => {
            error!(task_id = %orphan.task_id, error = %chain(&e), "cannot read the runtime's jobs; the attempt is taken over at the next start");
            return;
        }
    };
    match found {
        Some((job, _)) => {
            let permit = capacity.and_then(|s| s.try_acquire_owned().ok());
            follow(role, job, permit, Origin::Found).await;
        }
        None => {
            if let Err(e) =
                fail_lost(&role, orphan.task_id, orphan.attempt, orphan.state, &name).await
            {
                error!(task_id = %orphan.task_id, error = %chain(&e), "cannot fail the lost attempt; it is taken over at the next start");
            }
        }
    }
}

/// Takes over the warm executors of gone dispatchers: each drains and is followed to its
/// end, holding the attempts Postgres says it has; one whose job does not exist
/// [`GRACE`] later stops counting, and its attempts are failed as lost.
///
/// # Errors
/// Postgres cannot be read.
async fn adopt_warm<R: Runtime>(role: &Arc<Role<R>>) -> Result<()> {
    let ctx = &role.ctx;
    let instance = role.runtime.instance().to_owned();
    let names = ctx
        .persist("adopt warm executors", || {
            ctx.store.adopt_warm(role.dispatcher, &instance)
        })
        .await?;
    for name in names {
        info!(job = %name, "taking over a warm executor whose dispatcher is gone");
        ctx.metrics.reconciled.inc();
        tokio::spawn(settle_warm(role.clone(), JobName::recorded(&name)));
    }
    Ok(())
}

async fn settle_warm<R: Runtime>(role: Arc<Role<R>>, name: JobName) {
    let ctx = &role.ctx;
    if !role.runtime.knows(&name) {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(GRACE) => {}
        }
    }
    let read =
        async { Ok::<_, crate::Error>((role.runtime.scan()?, ctx.store.unfinished(None).await?)) };
    let (jobs, unfinished) = match read.await {
        Ok(read) => read,
        Err(e) => {
            error!(job = %name, error = %chain(&e), "cannot read the warm executor's job or tasks; it is taken over at the next start");
            return;
        }
    };
    if let Some((job, running)) = jobs.into_iter().find(|(job, _)| job.name() == &name) {
        warm::adopt(&role, job, running, &unfinished, None);
        return;
    }
    warm::uncount(&role, &name).await;
    let held = unfinished.iter().filter(|r| {
        r.job_name.as_deref() == Some(name.as_str())
            && matches!(r.state, TaskState::Dispatched | TaskState::Running)
    });
    for record in held {
        if let Err(e) = fail_lost(&role, record.task_id, record.attempt, record.state, &name).await
        {
            error!(task_id = %record.task_id, error = %chain(&e), "cannot fail the lost attempt; it is taken over at the next start");
        }
    }
}

/// Publishes, on behalf of the attempt's job, that it was lost: the attempt was `state`
/// but its job no longer exists (never created, or deleted while no dispatcher followed
/// it). `job_lost` is retried.
///
/// # Errors
/// The result cannot be published.
pub(crate) async fn fail_lost<R: Runtime>(
    role: &Role<R>,
    task_id: TaskId,
    attempt: Attempt,
    state: TaskState,
    name: &JobName,
) -> Result<()> {
    let (ctx, runtime) = (&role.ctx, &role.runtime);
    warn!(%task_id, job = %name, %state, "the attempt's job is gone; failing the attempt as lost");
    let end = JobEnd {
        task_id,
        attempt,
        job_name: name.clone(),
        end: End::Failure {
            kind: ErrorKind::JobLost,
            retryable: true,
            reason: "JobLost",
        },
        exit: format!(
            "job lost: the attempt was {state} but its job no longer exists (never created, or deleted while no dispatcher followed it)"
        ),
        log_tail: String::new(),
        evidence: runtime.evidence(name),
    };
    ctx.publish_result(&on_behalf(&end)).await?;
    if !name.is_warm() {
        runtime.mark_handled(name);
    }
    ctx.metrics.synthesized.inc();
    Ok(())
}
