//! Warm executors: for a class with `warm:`, a job loads its engine once and serves many
//! tasks, while the dispatcher stays the one place that decides where each task runs.
//!
//! - [`Pools`] holds each class's warm executors and the tasks in hand on each. A task
//!   goes to the fullest executor that has a free slot (so the others can idle out); a new
//!   executor is started only when none has one and the class has fewer than
//!   `max_active_jobs`.
//! - The hand-off ([`hand_off`]) claims the attempt (`dispatched`, with the executor's job
//!   and the task's place in it as evidence) before the task is published to that
//!   executor's own queue, so a repeated delivery never reaches a second executor.
//! - A slot is freed when the store announces the attempt's end (`DONE_CHANNEL`; see
//!   `super::cancel`), and an executor with nothing in hand for `idle_timeout`, or that
//!   reached `max_tasks_per_job` or `max_job_lifetime`, is told to drain.
//! - [`follow_warm`] follows an executor to its end; each attempt still in hand then (the
//!   executor crashed, was OOM-killed or stopped) gets a result on its behalf, retryable as
//!   the runtime's verdict says.
//! - Where a job does not run as soon as it is started (a Kubernetes Job's pod is
//!   scheduled, pulls its image, starts), a task handed to an executor is recorded
//!   `running` once the executor runs: by [`follow_warm`] for the tasks handed before its
//!   pod ran, by the hand-off for those handed after. The pool says which, under its lock,
//!   so each task is recorded once.
//!
//! The choice and its failure analysis: `docs/decisions.md` (warm executors).

use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_shared::catalog::{ExecutorSpec, WarmSpec};
use gantry_shared::message::{
    ErrorKind, Evidence, ExecutorClass, HandedTask, JobName, Task, WarmOrder,
};
use gantry_shared::store::{Change, TaskRecord, TaskState, WarmExecutor};
use gantry_shared::telemetry::chain;
use lapin::BasicProperties;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{error, info, warn};
use uuid::Uuid;

use super::disposition::Disposition;
use super::follow::on_behalf;
use super::pools::Placed;
use super::record::{record, record_attempt};
use super::role::Role;
use crate::runtime::{Job, JobEnd, Runtime};
use crate::{Error, Result};

/// Hands `task` of a warm class to a warm executor (starting one if the class has room)
/// and says what becomes of its delivery.
///
/// # Errors
/// A write that Postgres refuses, or [`Error::ShuttingDown`].
pub(crate) async fn hand_off<R: Runtime>(
    role: &Arc<Role<R>>,
    class: &ExecutorClass,
    task: Task,
    spec: &ExecutorSpec,
    warm: WarmSpec,
    permit: OwnedSemaphorePermit,
    arrived: Instant,
) -> Result<Disposition> {
    let ctx = &role.ctx;
    let runtime = &role.runtime;
    let until = tokio::time::Instant::from_std(arrived) + ctx.settings.dispatcher.max_hold;
    let mut permit = Some(permit);
    let placed = loop {
        let changed = role.warm.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let Some(p) = permit.take() else {
            return Err(Error::ShuttingDown);
        };
        let mut full = false;
        match role.warm.place(class, spec, warm, &task, p) {
            Ok(placed) if placed.new => match count(role, class, spec, &placed.job).await {
                Ok(true) => {
                    let in_use = ctx.metrics.capacity_in_use(class.as_str());
                    role.warm.count_in_use(&placed.job, in_use);
                    break placed;
                }
                Ok(false) => {
                    permit = role.warm.withdraw(&placed.job);
                    full = true;
                }
                Err(e) => {
                    role.warm.withdraw(&placed.job);
                    return Err(e);
                }
            },
            Ok(placed) => break placed,
            Err(p) => permit = Some(p),
        }
        tokio::select! {
            () = &mut changed => {}
            // Another dispatcher's executor of the class may end: nothing announces it.
            () = tokio::time::sleep(super::claim::RECHECK), if full => {}
            () = tokio::time::sleep_until(until) => {
                return Ok(Disposition::Requeue {
                    task: Box::new(task),
                    reason: "capacity",
                    why: "held too long waiting for a warm executor's slot",
                });
            }
            () = ctx.shutdown.cancelled() => return Err(Error::ShuttingDown),
        }
    };
    let dispatch_id = format!("{}.{}", runtime.instance(), Uuid::new_v4().simple());
    let evidence = Evidence {
        dispatch_id: Some(dispatch_id.clone()),
        warm_seq: Some(placed.seq),
        ..runtime.evidence(&placed.job)
    };
    let claim = Change {
        evidence: evidence.clone(),
        ..Change::default()
    };
    let claimed = match record(role, class, &task, TaskState::Dispatched, &claim).await {
        Ok(claimed) => claimed,
        Err(e) => {
            undo(role, &task, &placed).await;
            return Err(e);
        }
    };
    if !claimed.changed() {
        undo(role, &task, &placed).await;
        info!(task_id = %task.id, outcome = ?claimed, "another delivery of this attempt claimed it; skipping the delivery");
        return Ok(Disposition::Skip("claimed"));
    }
    let fail = |task: Task, message: String| Disposition::Fail {
        task: Box::new(task),
        job: placed.job.clone(),
        kind: ErrorKind::DispatchFailed,
        message,
        retryable: true,
        evidence: evidence.clone(),
    };
    if placed.new
        && let Err(e) = start(role, class, spec, warm, &placed.job).await
    {
        error!(task_id = %task.id, job = %placed.job, error = %chain(&e), "cannot start a warm executor");
        role.warm.remove(&placed.job);
        uncount(role, &placed.job).await;
        return Ok(fail(task, chain(&e)));
    }
    if let Err(e) = publish(role, &task, &dispatch_id, &placed).await {
        error!(task_id = %task.id, job = %placed.job, error = %chain(&e), "cannot hand the task to its warm executor");
        role.warm.release(task.id);
        return Ok(fail(task, chain(&e)));
    }
    if placed.new {
        ctx.metrics.task_to_job(class.as_str(), arrived.elapsed());
    }
    let executor_runs = role.warm.published(task.id, &evidence);
    if runtime.runs_at_start() || executor_runs {
        let running = Change {
            evidence: running_evidence(&evidence, runtime.evidence(&placed.job)),
            ..Change::default()
        };
        record(role, class, &task, TaskState::Running, &running).await?;
    }
    Ok(Disposition::Started { adopted: false })
}

/// A task's evidence as it runs: its claim's dispatch id and place, and the executor's
/// job, pod and node as the runtime knows them `now`.
fn running_evidence(claim: &Evidence, now: Evidence) -> Evidence {
    Evidence {
        dispatch_id: claim.dispatch_id.clone(),
        warm_seq: claim.warm_seq,
        ..now
    }
}

/// Counts the new executor `job` against its class's `max_active_jobs` across dispatchers;
/// `false` when the class has no room.
///
/// # Errors
/// A write that Postgres refuses, or [`Error::ShuttingDown`].
async fn count<R: Runtime>(
    role: &Role<R>,
    class: &ExecutorClass,
    spec: &ExecutorSpec,
    job: &JobName,
) -> Result<bool> {
    let ctx = &role.ctx;
    super::claim::present(role).await?;
    let executor = WarmExecutor {
        job: job.as_str(),
        executor: class,
        instance: role.runtime.instance(),
        dispatcher: role.dispatcher,
    };
    ctx.persist("count a warm executor", || {
        ctx.store.count_warm(&executor, spec.max_active_jobs)
    })
    .await
}

/// Stops counting the executor `job` against its class: it ended, or was never started.
pub(crate) async fn uncount<R: Runtime>(role: &Role<R>, job: &JobName) {
    if let Err(e) = role.ctx.store.warm_ended(job.as_str()).await {
        warn!(job = %job, error = %chain(&e), "cannot stop counting the warm executor; its unit of capacity comes back when a dispatcher takes it over");
    }
}

/// Gives back a placement that did not become a hand-off; a new executor not started is
/// forgotten.
async fn undo<R: Runtime>(role: &Role<R>, task: &Task, placed: &Placed) {
    role.warm.release(task.id);
    if placed.new {
        role.warm.remove(&placed.job);
        uncount(role, &placed.job).await;
    }
}

/// Declares a new executor's queues and starts its job, then follows it.
async fn start<R: Runtime>(
    role: &Arc<Role<R>>,
    class: &ExecutorClass,
    spec: &ExecutorSpec,
    warm: WarmSpec,
    job: &JobName,
) -> Result<()> {
    let ctx = &role.ctx;
    let channel = ctx.publisher.channel().await?;
    ctx.topology.declare_warm(&channel, job.as_str()).await?;
    let queue = ctx.topology.warm_queue(job.as_str());
    let started = role
        .runtime
        .start_warm(job, class, spec, &warm, &queue)
        .await?;
    info!(job = %job, executor = %class, "warm executor started");
    role.warm.ready(job);
    tokio::spawn(follow_warm(role.clone(), started));
    Ok(())
}

/// Publishes `task` to its executor's queue, with the broker's confirm.
async fn publish<R: Runtime>(
    role: &Role<R>,
    task: &Task,
    dispatch_id: &str,
    placed: &Placed,
) -> Result<()> {
    let ctx = &role.ctx;
    let (body, props) =
        HandedTask::to_amqp(task, dispatch_id, placed.seq).map_err(gantry_shared::Error::from)?;
    let queue = ctx.topology.warm_queue(placed.job.as_str());
    send(role, &queue, &body, props).await
}

/// Sends `order` to the executor `job`.
pub(crate) async fn order<R: Runtime>(role: &Role<R>, job: &JobName, order: &WarmOrder) {
    let queue = role.ctx.topology.warm_control_queue(job.as_str());
    let body = serde_json::to_vec(order).unwrap_or_default();
    let props = BasicProperties::default().with_delivery_mode(2);
    if let Err(e) = send(role, &queue, &body, props).await {
        warn!(job = %job, ?order, error = %chain(&e), "cannot send the warm executor its order");
    }
}

async fn send<R: Runtime>(
    role: &Role<R>,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<()> {
    tokio::select! {
        r = role.ctx.publish_task("", queue, body, props) => r,
        () = role.ctx.shutdown.cancelled() => Err(Error::ShuttingDown),
    }
}

/// Tells the executors due to end to drain, every second, until shutdown.
pub(crate) async fn retire<R: Runtime>(role: Arc<Role<R>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = role.ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for job in role.warm.retire_due() {
            info!(job = %job, "warm executor done (idle, or at its task or lifetime limit); draining it");
            order(&role, &job, &WarmOrder::Drain).await;
        }
    }
}

/// Takes over a warm executor found at start: it drains (this dispatcher hands it
/// nothing), holding the attempts Postgres says it has, and is followed to its end.
pub(crate) fn adopt<R: Runtime>(
    role: &Arc<Role<R>>,
    job: R::Job,
    running: bool,
    unfinished: &[TaskRecord],
    capacity: Option<&Arc<tokio::sync::Semaphore>>,
) {
    let name = job.name().clone();
    let held: Vec<_> = unfinished
        .iter()
        .filter(|r| r.job_name.as_deref() == Some(name.as_str()))
        .map(|r| {
            let permit = capacity.and_then(|s| s.clone().try_acquire_owned().ok());
            (r.task_id, r.attempt, permit)
        })
        .collect();
    info!(job = %name, running, in_hand = held.len(), "adopting a warm executor found at start; it drains");
    if let Ok(class) = ExecutorClass::parse(job.executor()) {
        let in_use = role.ctx.metrics.capacity_in_use(class.as_str());
        role.warm.adopt(class, name.clone(), held);
        role.warm.count_in_use(&name, in_use);
    }
    let role = role.clone();
    tokio::spawn(async move {
        if running {
            order(&role, &name, &WarmOrder::Drain).await;
        }
        follow_warm(role, job).await;
    });
}

/// Waits for the executor's end; on a runtime whose jobs do not run at start, first for it
/// to run, recording `running` for the tasks published to it by then.
async fn run_to_end<R: Runtime>(role: &Role<R>, job: R::Job) -> JobEnd {
    let runtime = &role.runtime;
    if !runtime.runs_at_start()
        && let Some((evidence, _)) = runtime.running(&job).await
    {
        let handed = role.warm.runs(job.name());
        info!(job = %job.name(), pod = ?evidence.pod_name, node = ?evidence.node, in_hand = handed.len(), "warm executor running");
        for (class, id, attempt, claim) in handed {
            let running = Change {
                evidence: running_evidence(&claim, evidence.clone()),
                ..Change::default()
            };
            if let Err(e) =
                record_attempt(role, &class, id, attempt, TaskState::Running, &running).await
            {
                warn!(task_id = %id, error = %chain(&e), "cannot record the task running; its result still ends it");
            }
        }
    }
    runtime.wait(job).await
}

/// Follows a warm executor to its end; then fails on their behalf the attempts it still
/// held, removes its queues and marks it handled.
pub(crate) async fn follow_warm<R: Runtime>(role: Arc<Role<R>>, job: R::Job) {
    let (ctx, runtime) = (&role.ctx, &role.runtime);
    let name = job.name().clone();
    let Some(_following) = role.follow_guard(&name) else {
        return;
    };
    let end = tokio::select! {
        end = Box::pin(run_to_end(&role, job)) => end,
        // It keeps running; a restarted dispatcher adopts it.
        _ = ctx.shutdown.cancelled() => return,
    };
    let held = role.warm.remove(&name);
    info!(job = %name, exit = %end.exit, in_hand = held.len(), "warm executor ended");
    uncount(&role, &name).await;
    for (id, attempt) in held {
        let over = match ctx.store.task(id).await {
            Ok(Some(record)) => record.state.has_ended(record.attempt, attempt),
            Ok(None) => false,
            Err(e) => {
                error!(task_id = %id, error = %chain(&e), "cannot read the task; its attempt is settled at the next start");
                return;
            }
        };
        if over {
            continue;
        }
        let end = JobEnd {
            task_id: id,
            attempt,
            ..end.clone()
        };
        let result = on_behalf(&end);
        warn!(task_id = %id, job = %name, status = %result.status, exit = %end.exit, "the warm executor ended with the attempt in hand; publishing a result on its behalf");
        if let Err(e) = ctx.publish_result(&result).await {
            error!(task_id = %id, error = %chain(&e), "could not publish the result on the executor's behalf; it is settled at the next start");
            return;
        }
        ctx.metrics.synthesized.inc();
    }
    match ctx.publisher.channel().await {
        Ok(channel) => {
            if let Err(e) = ctx.topology.delete_warm(&channel, name.as_str()).await {
                warn!(job = %name, error = %chain(&e), "cannot delete the warm executor's queues");
            }
        }
        Err(e) => {
            warn!(job = %name, error = %chain(&e), "cannot delete the warm executor's queues")
        }
    }
    runtime.mark_handled(&name);
}
