//! Following a job to its end, holding one unit of its class's capacity: `running` is
//! recorded when the runtime says the job runs, and a job that ends without a result from
//! its executor gets one published on its behalf, so every attempt reaches an outcome.
//! While it follows a job, its unit of capacity counts as in use; the time to running and
//! the run time are observed.

use std::sync::Arc;

use chrono::Utc;
use gantry_shared::message::{ErrorKind, ResultStatus, TaskError, TaskResult};
use gantry_shared::store::{Change, TaskState};
use gantry_shared::telemetry::chain;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{error, warn};

use super::role::Role;
use crate::runtime::{End, Job, JobEnd, Runtime};

/// How the follower came by its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Its hand-off created it just now: its time to running is this dispatcher's to
    /// observe.
    Created,
    /// Found: at start, or by a delivery whose attempt's Job existed already.
    Found,
}

/// Follows `job` to its end.
pub(crate) async fn follow<R: Runtime>(
    role: Arc<Role<R>>,
    job: R::Job,
    permit: Option<OwnedSemaphorePermit>,
    origin: Origin,
) {
    let (ctx, runtime) = (&role.ctx, &role.runtime);
    let (task_id, attempt, name) = (job.task_id(), job.attempt(), job.name().clone());
    // A duplicate delivery or a restart may find a job that is already followed.
    let Some(_following) = role.follow_guard(&name) else {
        return;
    };
    let class = job.executor().to_owned();
    let _in_use = permit.map(|p| (p, ctx.metrics.capacity_in_use(&class)));
    let mut started = job.started_at();
    // The follower lives as long as its job, so its own state stays small: each step's
    // future is boxed, and only the one running takes memory.
    let running = tokio::select! {
        r = Box::pin(runtime.running(&job)) => r,
        _ = ctx.shutdown.cancelled() => return,
    };
    if let Some((evidence, started_at)) = running {
        if let (Origin::Created, Some(created), Some(at)) = (origin, job.created_at(), started_at)
            && let Ok(took) = (at - created).to_std()
        {
            ctx.metrics.job_to_running(&class, took);
        }
        started = started_at.or(Some(Utc::now()));
        let change = Change {
            evidence,
            started_at,
            ..Change::default()
        };
        let recorded = Box::pin(ctx.persist("record running", || {
            role.lifecycle
                .transition(task_id, attempt, TaskState::Running, &change)
        }))
        .await;
        match recorded {
            Ok(applied) if applied.changed() => {
                ctx.metrics.task_entered(&class, TaskState::Running);
                crate::celery::started(ctx, task_id).await;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
    let end = tokio::select! {
        end = Box::pin(runtime.wait(job)) => end,
        // The job keeps running; a restarted dispatcher adopts it.
        _ = ctx.shutdown.cancelled() => return,
    };
    if let Some(Ok(ran)) = started.map(|s| (Utc::now() - s).to_std()) {
        ctx.metrics.job_ran(&class, end_label(&end.end), ran);
    }
    let cancelled = || async {
        ctx.store
            .task(end.task_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.state == TaskState::Cancelled)
    };
    if end.end != End::Published && !Box::pin(cancelled()).await {
        let result = on_behalf(&end);
        warn!(task_id = %end.task_id, job = %end.job_name, status = %result.status, exit = %end.exit, "job ended without publishing a result; publishing one on its behalf");
        if let Err(e) = Box::pin(ctx.publish_result(&result)).await {
            error!(error = %chain(&e), job = %name, "could not publish the result on the job's behalf; it is retried at the next start");
            return;
        }
        ctx.metrics.synthesized.inc();
    }
    runtime.mark_handled(&name);
}

/// How a job ended, in metrics: `reported` (its executor published its result),
/// `deadline`, `crashed`, or the kind of failure the runtime saw (`oom`, `evicted`, …).
fn end_label(end: &End) -> &'static str {
    match end {
        End::Published => "reported",
        End::Deadline => "deadline",
        End::Crashed => "crashed",
        End::Failure { kind, .. } => kind.label(),
    }
}

/// The result of a job whose executor did not report.
pub(crate) fn on_behalf(end: &JobEnd) -> TaskResult {
    let with_tail = |mut message: String| {
        if !end.log_tail.is_empty() {
            message.push_str(": ");
            message.push_str(&end.log_tail);
        }
        message
    };
    let (status, kind, message, retryable, reason) = match &end.end {
        End::Deadline => (
            ResultStatus::Expired,
            ErrorKind::DeadlineExceeded,
            format!(
                "the job outlived its deadline and was stopped ({})",
                end.exit
            ),
            false,
            "DeadlineExceeded",
        ),
        End::Failure {
            kind,
            retryable,
            reason,
        } => (
            ResultStatus::Failed,
            kind.clone(),
            with_tail(end.exit.clone()),
            *retryable,
            *reason,
        ),
        End::Crashed | End::Published => (
            ResultStatus::Failed,
            ErrorKind::ExecutorCrashed,
            with_tail(format!(
                "the executor ended ({}) without reporting a result",
                end.exit
            )),
            true,
            "Error",
        ),
    };
    let error = TaskError {
        kind,
        message,
        retryable,
    };
    TaskResult::on_behalf(
        end.task_id,
        end.attempt,
        status,
        error,
        end.evidence.clone(),
        reason,
    )
}
