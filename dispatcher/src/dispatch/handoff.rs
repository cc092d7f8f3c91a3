//! One task's hand-off to the runtime, from a valid delivery to its [`Disposition`]:
//! record `received` → resolve and admit the image → claim the attempt, with a unit of its
//! class's capacity shared by every dispatcher (`super::claim`) → start its job → record
//! `running` (where the runtime runs jobs at once) → follow the job.
//!
//! The attempt's job is created only by the delivery that claims it: the claim is the
//! attempt's `dispatched` event, recorded in Postgres before the create, and a task row that
//! says the attempt is over, or an event that says another delivery claimed it, ends the
//! delivery without a job. So a repeated delivery of an attempt (a redelivery, a duplicate
//! retry, a copy dead-lettered twice out of a delay queue) never runs it a second time, even
//! after its first job is gone. A claim whose job was never created (the dispatcher stopped
//! in between) is failed as lost by the dispatcher that adopts it (`super::adopt`); one whose
//! Kubernetes Job was created without its Secret is completed by the redelivery.

use std::sync::Arc;
use std::time::Instant;

use gantry_shared::message::{ErrorKind, Evidence, ExecutorClass, JobName, Task};
use gantry_shared::store::{Applied, Change, TaskState};
use gantry_shared::telemetry::{chain, trace};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{Instrument, error, info, warn};
use uuid::Uuid;

use super::disposition::Disposition;
use super::follow::{Origin, follow};
use super::record::record;
use super::role::Role;
use crate::runtime::{Job, Runtime};
use crate::{Error, Result};

/// Hands `task` (holding one unit of its class's capacity, its delivery `arrived` then) to
/// the runtime and says what becomes of its delivery.
///
/// # Errors
/// A write that Postgres refuses, or [`Error::ShuttingDown`].
pub(crate) async fn hand_off<R: Runtime>(
    role: &Arc<Role<R>>,
    class: &ExecutorClass,
    task: Task,
    permit: OwnedSemaphorePermit,
    arrived: Instant,
) -> Result<Disposition> {
    let span = tracing::info_span!(
        target: trace::TARGET,
        "gantry.dispatch",
        otel.kind = "consumer",
        gantry.task_id = %task.id,
        gantry.attempt = i64::from(task.attempt.get()),
        gantry.executor = %class,
    );
    trace::set_parent(&span, task.traceparent.as_deref());
    let handed = trace::traceparent(&span);
    start(role, class, task, permit, arrived, handed)
        .instrument(span)
        .await
}

/// [`hand_off`] in its span of the task's trace; the job gets `handed`, the span's
/// `traceparent`, when spans are exported (else the task's own).
async fn start<R: Runtime>(
    role: &Arc<Role<R>>,
    class: &ExecutorClass,
    mut task: Task,
    permit: OwnedSemaphorePermit,
    arrived: Instant,
    handed: Option<String>,
) -> Result<Disposition> {
    let ctx = &role.ctx;
    let (state, attempt) = ctx
        .persist("record received", || role.lifecycle.received(&task))
        .await?;
    if handed.is_some() {
        task.traceparent = handed;
    }
    if state.has_ended(attempt, task.attempt) {
        let why = if state.is_terminal() {
            "ended"
        } else if attempt > task.attempt {
            "superseded"
        } else {
            "retrying"
        };
        info!(task_id = %task.id, attempt = %task.attempt, %state, current_attempt = %attempt,
              "this attempt is over (the task is {state} at attempt {attempt}); skipping the delivery");
        return Ok(Disposition::Skip(why));
    }
    let catalog = ctx.catalog();
    let Some(spec) = catalog.get(class) else {
        // Its consumer is being stopped: back to the queue, where the class's tasks wait.
        warn!(task_id = %task.id, "executor class {class} left the catalog; returning the task to its queue");
        return Ok(Disposition::Return("class_removed"));
    };
    let runtime = &role.runtime;
    let spec = match runtime.resolve_image(&task, spec).await {
        Ok(spec) => spec,
        Err(e) if e.is_transient() => {
            warn!(task_id = %task.id, error = %chain(&e), "no image for the task yet");
            return Ok(Disposition::Requeue {
                task: Box::new(task),
                reason: "image",
                why: "waiting for its image",
            });
        }
        Err(e) => {
            return Ok(Disposition::DeadLetter {
                reason: format!("image: {e}"),
                label: e.metric_label(),
            });
        }
    };
    if let Err(Error::Unrunnable { reason, .. }) = runtime.admit(&task, &spec) {
        return Ok(Disposition::DeadLetter {
            reason: format!("invalid: {reason}"),
            label: "invalid",
        });
    }
    if let Some(warm) = spec.warm {
        return super::warm::hand_off(role, class, task, &spec, warm, permit, arrived).await;
    }
    let name = JobName::for_task(task.id, task.attempt);
    let dispatch_id = format!("{}.{}", runtime.instance(), Uuid::new_v4().simple());
    let claim = Change {
        evidence: Evidence {
            dispatch_id: Some(dispatch_id.clone()),
            ..runtime.evidence(&name)
        },
        ..Change::default()
    };
    let limit = spec.max_active_jobs;
    let Some(claimed) = super::claim::claim(role, class, &task, &claim, limit, arrived).await?
    else {
        return Ok(Disposition::Requeue {
            task: Box::new(task),
            reason: "capacity",
            why: "held too long waiting for capacity",
        });
    };
    if !claimed.changed() {
        if claimed == Applied::Duplicate
            && let Err(e) = runtime.complete(&task, &spec).await
        {
            warn!(task_id = %task.id, job = %name, error = %chain(&e), "cannot complete the claimed attempt's Job");
        }
        let why = match claimed {
            Applied::Stale { current, .. } if current.is_terminal() => "ended",
            Applied::Unknown => "unknown",
            _ => "claimed",
        };
        info!(task_id = %task.id, job = %name, outcome = ?claimed,
              "another delivery of this attempt claimed its Job; skipping the delivery");
        return Ok(Disposition::Skip(why));
    }
    let (job, existed) = match runtime.start(&task, &spec, &dispatch_id).await {
        Ok(started) => started,
        Err(e) => {
            // The job cannot start (missing program, refused by the API server, full
            // disk): fail the attempt with the reason rather than loop on it.
            error!(task_id = %task.id, error = %chain(&e), "cannot start the job");
            return Ok(Disposition::Fail {
                task: Box::new(task),
                job: name,
                kind: ErrorKind::DispatchFailed,
                message: chain(&e),
                retryable: true,
                evidence: Evidence {
                    dispatch_id: Some(dispatch_id),
                    ..Evidence::default()
                },
            });
        }
    };
    if !existed {
        ctx.metrics.task_to_job(class.as_str(), arrived.elapsed());
    }
    if existed {
        warn!(task_id = %task.id, job = %name, "the attempt's Job existed before its claim (a dispatcher stopped between creating it and recording that); following it");
    }
    if runtime.runs_at_start() {
        let running = Change {
            started_at: job.started_at(),
            ..claim.clone()
        };
        record(role, class, &task, TaskState::Running, &running).await?;
    }
    let origin = if existed {
        Origin::Found
    } else {
        Origin::Created
    };
    tokio::spawn(follow(role.clone(), job, Some(permit), origin));
    Ok(Disposition::Started { adopted: existed })
}
