//! Following a job to its end, holding one unit of its class's capacity: `running` is
//! recorded when the runtime says the job runs, and a job that ends without a result from
//! its executor gets one published on its behalf, so every attempt reaches an outcome.

use std::sync::Arc;

use gantry_shared::message::{ErrorKind, ResultStatus, TaskError, TaskResult};
use gantry_shared::store::{Change, TaskState};
use gantry_shared::telemetry::chain;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{error, warn};

use super::role::Role;
use crate::metrics::inc;
use crate::runtime::{End, Job, JobEnd, Runtime};

/// Follows `job` to its end.
pub(crate) async fn follow<R: Runtime>(
    role: Arc<Role<R>>,
    job: R::Job,
    permit: Option<OwnedSemaphorePermit>,
) {
    let _permit = permit;
    let (ctx, runtime) = (&role.ctx, &role.runtime);
    let (task_id, attempt, name) = (job.task_id(), job.attempt(), job.name().clone());
    // A duplicate delivery or a restart may find a job that is already followed.
    let Some(_following) = role.follow_guard(&name) else {
        return;
    };
    // The follower lives as long as its job, so its own state stays small: each step's
    // future is boxed, and only the one running takes memory.
    let running = tokio::select! {
        r = Box::pin(runtime.running(&job)) => r,
        _ = ctx.shutdown.cancelled() => return,
    };
    if let Some((evidence, started_at)) = running {
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
        if recorded.is_err() {
            return;
        }
    }
    let end = tokio::select! {
        end = Box::pin(runtime.wait(job)) => end,
        // The job keeps running; a restarted dispatcher adopts it.
        _ = ctx.shutdown.cancelled() => return,
    };
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
        inc(&ctx.metrics.synthesized);
    }
    runtime.mark_handled(&name);
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
