//! The dispatch role: one consumer per executor class. For each delivery: validate →
//! record `received` → resolve the image → start (or find) the job → record `dispatched`
//! and `running` → ack,
//! then follow the job to its end in the background, holding one unit of the class's
//! capacity. While a class is at `max_active_jobs`, deliveries wait un-acked within a small
//! prefetch and the rest stays in RabbitMQ. A task whose image cannot be resolved yet (the
//! executor registry does not answer) is republished at the end of its queue; one whose
//! image is refused is dead-lettered with the reason.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use futures_util::StreamExt;
use gantry_shared::message::{
    Evidence, ExecutorClass, JobName, Rejection, ResultStatus, Task, TaskError, TaskResult,
};
use gantry_shared::store::{Applied, Change, TaskState};
use gantry_shared::telemetry::chain;
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};
use uuid::Uuid;

use crate::consume::{SessionEnd, Source, open_until_shutdown};
use crate::metrics::{Handled, inc};
use crate::runtime::{End, JobEnd, RuntimeJob};
use crate::service::Ctx;
use crate::{Error, Result, dead_letter};

/// Consumes the queue of `class` until `stop` (shutdown, or the class leaving the catalog).
pub(crate) async fn run_class(
    ctx: Arc<Ctx>,
    class: ExecutorClass,
    capacity: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let queue = ctx.topology.task_queue(&class);
    let source = Source {
        url: &ctx.settings.common.amqp_url,
        name: format!("gantry-dispatcher/{class}"),
        queue: queue.clone(),
        prefetch: ctx.settings.dispatcher.max_waiting,
        timeout: ctx.settings.common.broker_timeout,
    };
    while let Some(mut session) = open_until_shutdown(&source, &stop).await {
        let end = consume(
            &ctx,
            &class,
            &queue,
            &capacity,
            &stop,
            &mut session.consumer,
        )
        .await;
        let stop = matches!(end, SessionEnd::Shutdown);
        session.close(&end, &queue).await;
        if stop {
            return;
        }
    }
}

async fn consume(
    ctx: &Arc<Ctx>,
    class: &ExecutorClass,
    queue: &str,
    capacity: &Arc<Semaphore>,
    stop: &CancellationToken,
    consumer: &mut Consumer,
) -> SessionEnd {
    let mut handlers = tokio::task::JoinSet::new();
    let end = loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => break SessionEnd::Shutdown,
            d = consumer.next() => d,
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                warn!(queue, error = %e, "consumer failed");
                break SessionEnd::Broken;
            }
            None => break SessionEnd::Broken,
        };
        let (ctx, class, queue) = (ctx.clone(), class.clone(), queue.to_owned());
        let parsed = parse(&ctx, &class, &delivery);
        let step = match parsed {
            // A refusal needs no capacity.
            Err(rejection) => Step::Refuse(rejection),
            // Wait for capacity with the delivery in hand: it stays un-acked meanwhile,
            // but not so long that RabbitMQ's consumer_timeout closes the channel.
            Ok(task) => tokio::select! {
                _ = stop.cancelled() => break SessionEnd::Shutdown,
                p = capacity.clone().acquire_owned() => match p {
                    Ok(permit) => Step::Dispatch(Box::new(task), permit),
                    Err(_) => break SessionEnd::Shutdown,
                },
                _ = tokio::time::sleep(ctx.settings.dispatcher.max_hold) => Step::Requeue(Box::new(task)),
            },
        };
        handlers.spawn(async move { handle(ctx, class, queue, delivery, step).await });
        while handlers.try_join_next().is_some() {}
    };
    // Let in-flight hand-offs finish (each is a few quick writes) before the channel
    // closes; anything not acked by then is requeued by RabbitMQ.
    while handlers.join_next().await.is_some() {}
    end
}

/// What to do with one delivery.
enum Step {
    Refuse(Rejection),
    Dispatch(Box<Task>, OwnedSemaphorePermit),
    /// Held too long waiting for capacity: back to the end of the queue.
    Requeue(Box<Task>),
}

async fn handle(
    ctx: Arc<Ctx>,
    class: ExecutorClass,
    queue: String,
    delivery: Delivery,
    step: Step,
) {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_default();
    let span = info_span!("task", %message_id, executor = %class);
    async {
        let done = match step {
            Step::Refuse(rejection) => refuse(&ctx, &queue, &delivery, &rejection).await,
            Step::Dispatch(task, permit) => {
                dispatch(&ctx, &class, &queue, &delivery, *task, permit).await
            }
            Step::Requeue(task) => {
                let why = "held too long waiting for capacity";
                requeue(&ctx, &queue, &delivery, &task, why, "capacity").await
            }
        };
        let handled = match done {
            Ok(handled) => handled,
            // Not acked: the message goes back to its queue when the channel closes.
            Err(Error::ShuttingDown) => Handled::Requeued("shutdown"),
            Err(e) => {
                // Back to the queue; a message that fails every time reaches the delivery
                // limit and is dead-lettered as poison instead of holding a prefetch slot.
                error!(error = %chain(&e), "could not hand the message off; returning it to its queue");
                nack(&delivery).await;
                Handled::Requeued("error")
            }
        };
        ctx.metrics.deliveries.count(handled);
    }
    .instrument(span)
    .await;
}

/// Dead-letters a message that is not a valid task, with its reason, then acks it.
async fn refuse(
    ctx: &Ctx,
    queue: &str,
    delivery: &Delivery,
    rejection: &Rejection,
) -> Result<Handled> {
    dead_letter(
        ctx,
        queue,
        delivery,
        &rejection.to_string(),
        rejection.metric_label(),
    )
    .await
}

/// Dead-letters a delivery with `reason`, counted under `label`, then acks it.
async fn dead_letter(
    ctx: &Ctx,
    queue: &str,
    delivery: &Delivery,
    reason: &str,
    label: &'static str,
) -> Result<Handled> {
    let count = ctx.metrics.rejected(label);
    warn!(%reason, rejected_total = count, "rejected message; dead-lettering it");
    dead_letter::publish(&ctx.publisher, &ctx.topology.dlx(), queue, delivery, reason).await?;
    ack(delivery).await;
    Ok(Handled::DeadLettered(label))
}

/// Puts a task back at the end of its queue (it waited too long for capacity, or its image
/// cannot be resolved yet), as a new publish (confirmed, then the original is acked): a nack
/// would count as a delivery towards the poison limit. Counted as requeued for `reason`.
async fn requeue(
    ctx: &Ctx,
    queue: &str,
    delivery: &Delivery,
    task: &Task,
    why: &str,
    reason: &'static str,
) -> Result<Handled> {
    let (body, props) = match task.to_amqp(Utc::now()) {
        Ok(m) => m,
        Err(rejection) => return refuse(ctx, queue, delivery, &rejection).await,
    };
    ctx.publisher
        .publish(
            &ctx.topology.tasks_exchange(),
            task.executor.as_str(),
            &body,
            props,
            true,
            gantry_shared::retry::for_at_most(std::time::Duration::from_secs(60)),
        )
        .await?;
    ack(delivery).await;
    info!(task_id = %task.id, why, "requeued at the end of the queue");
    Ok(Handled::Requeued(reason))
}

/// Hands one task attempt to the runtime. The attempt's Job is created only by the delivery
/// that claims it: the claim is the attempt's `dispatched` event, recorded in Postgres before
/// the create, and a task row that says the attempt is over, or an event that says another
/// delivery claimed it, ends the delivery without a Job. So a repeated delivery of an attempt
/// (a redelivery, a duplicate retry, a copy dead-lettered twice out of a delay queue) never
/// runs it a second time, even after its first Job is gone. A claim whose Job was never
/// created (the dispatcher stopped in between) is failed as lost at the next start; one
/// whose Job was created without its Secret is completed by the redelivery.
async fn dispatch(
    ctx: &Arc<Ctx>,
    class: &ExecutorClass,
    queue: &str,
    delivery: &Delivery,
    task: Task,
    permit: OwnedSemaphorePermit,
) -> Result<Handled> {
    let (state, attempt) = ctx
        .persist("record received", || ctx.lifecycle.received(&task))
        .await?;
    let current = u32::try_from(attempt).unwrap_or(0);
    if state.has_ended(current, task.attempt) {
        let why = if state.is_terminal() {
            "ended"
        } else if current > task.attempt {
            "superseded"
        } else {
            "retrying"
        };
        info!(task_id = %task.id, attempt = task.attempt, %state, current_attempt = attempt,
              "this attempt is over (the task is {state} at attempt {attempt}); skipping the delivery");
        ack(delivery).await;
        return Ok(Handled::Skipped(why));
    }
    let catalog = ctx.catalog();
    let Some(spec) = catalog.get(class) else {
        // Its consumer is being stopped: back to the queue, where the class's tasks wait.
        warn!(task_id = %task.id, "executor class {class} left the catalog; returning the task to its queue");
        nack(delivery).await;
        return Ok(Handled::Requeued("class_removed"));
    };
    let runtime = ctx.runtime.as_ref().ok_or(Error::ShuttingDown)?;
    let spec = match runtime.resolve_image(&task, spec).await {
        Ok(spec) => spec,
        Err(e) if e.is_transient() => {
            warn!(task_id = %task.id, error = %chain(&e), "no image for the task yet");
            return requeue(
                ctx,
                queue,
                delivery,
                &task,
                "waiting for its image",
                "image",
            )
            .await;
        }
        Err(e) => {
            let reason = format!("image: {e}");
            return dead_letter(ctx, queue, delivery, &reason, e.metric_label()).await;
        }
    };
    if let Err(Error::Unrunnable { reason, .. }) = runtime.admit(&task, &spec) {
        let reason = format!("invalid: {reason}");
        return dead_letter(ctx, queue, delivery, &reason, "invalid").await;
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
    let claimed = ctx
        .persist("record dispatched", || {
            ctx.lifecycle
                .transition(task.id, task.attempt, TaskState::Dispatched, &claim)
        })
        .await?;
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
              "another delivery of this attempt claimed its Job; skipping this one");
        ack(delivery).await;
        return Ok(Handled::Skipped(why));
    }
    let (job, existed) = match runtime.start(&task, &spec, &dispatch_id).await {
        Ok(s) => s,
        Err(e) => {
            // The job cannot start (missing program, refused by the API server, full
            // disk): fail the attempt with the reason rather than loop on it.
            error!(task_id = %task.id, error = %chain(&e), "cannot start the job");
            let result = synthesized(
                &task,
                ResultStatus::Failed,
                "dispatch_failed",
                chain(&e),
                true,
                Evidence {
                    dispatch_id: Some(dispatch_id),
                    ..Evidence::default()
                },
            );
            ctx.publish_result(&result).await?;
            runtime.mark_handled(&name);
            ack(delivery).await;
            return Ok(Handled::Failed("dispatch_failed"));
        }
    };
    if existed {
        warn!(task_id = %task.id, job = %name, "the attempt's Job existed before its claim (a dispatcher stopped between creating it and recording that); following it");
    }
    if runtime.runs_at_start() {
        let running = Change {
            started_at: runtime.started_at(&job),
            ..claim.clone()
        };
        ctx.persist("record running", || {
            ctx.lifecycle
                .transition(task.id, task.attempt, TaskState::Running, &running)
        })
        .await?;
    }
    ack(delivery).await;
    tokio::spawn(follow(
        ctx.clone(),
        task.id,
        task.attempt,
        job,
        Some(permit),
    ));
    Ok(if existed {
        Handled::Adopted
    } else {
        Handled::Dispatched
    })
}

fn parse(ctx: &Ctx, class: &ExecutorClass, delivery: &Delivery) -> Result<Task, Rejection> {
    let task = Task::from_amqp(
        &delivery.properties,
        &delivery.data,
        &ctx.settings.common.limits,
        Utc::now(),
    )?;
    if &task.executor != class {
        if ctx.catalog().get(&task.executor).is_none() {
            return Err(Rejection::UnknownExecutor(task.executor.to_string()));
        }
        return Err(Rejection::BadField {
            field: "executor",
            detail: format!(
                "{:?} arrived on the queue of class {class:?}; publish with routing key = executor",
                task.executor.as_str()
            ),
        });
    }
    Ok(task)
}

/// Returns a delivery to its queue.
async fn nack(delivery: &Delivery) {
    let requeue = lapin::options::BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    if let Err(e) = delivery.nack(requeue).await {
        warn!(error = %e, "nack failed; the message comes back when the channel closes");
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        // The channel broke: the message comes back and finds its job.
        warn!(error = %e, "ack failed; the message will be redelivered and find its job");
    }
}

/// Follows a job to its end: records `running` when its pod runs (where the runtime learns
/// that later), and publishes a result on the executor's behalf if it could not.
pub(crate) async fn follow(
    ctx: Arc<Ctx>,
    task_id: gantry_shared::message::TaskId,
    attempt: u32,
    job: RuntimeJob,
    permit: Option<OwnedSemaphorePermit>,
) {
    let _permit = permit;
    let Some(runtime) = ctx.runtime.as_ref() else {
        return;
    };
    let name = job.name().clone();
    // A duplicate delivery or a restart may find a job that is already followed.
    let Some(_following) = ctx.follow_guard(&name) else {
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
            ctx.lifecycle
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
            .is_some_and(|r| r.state() == TaskState::Cancelled)
    };
    if end.end != End::Published && !Box::pin(cancelled()).await {
        let result = synthesize(&end);
        warn!(task_id = %end.task_id, job = %end.job_name, status = %result.status, exit = %end.exit, "job ended without publishing a result; publishing one on its behalf");
        if let Err(e) = Box::pin(ctx.publish_result(&result)).await {
            error!(error = %chain(&e), job = %name, "could not publish the synthesized result; it is retried at the next start");
            return;
        }
        inc(&ctx.metrics.synthesized);
    }
    runtime.mark_handled(&name);
}

/// Stops the jobs of tasks cancelled while this dispatcher follows them (`gantry cancel`
/// records `cancelled`; the store announces it on its `LISTEN` channel).
pub(crate) async fn watch_cancellations(ctx: Arc<Ctx>) {
    let Some(runtime) = ctx.runtime.as_ref() else {
        return;
    };
    let mut delays = backon::BackoffBuilder::build(gantry_shared::retry::forever());
    loop {
        let listening = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            l = ctx.store.terminal_notifications() => l,
        };
        let mut ids = match listening {
            Ok(rx) => rx,
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
            let Ok(Some(record)) = ctx.store.task(id).await else {
                continue;
            };
            let name = JobName::for_task(id, u32::try_from(record.attempt).unwrap_or(1));
            if record.state() != TaskState::Cancelled || !ctx.is_following(&name) {
                continue;
            }
            info!(task_id = %id, job = %name, "task cancelled; stopping its job");
            if let Err(e) = runtime.cancel(&name).await {
                warn!(task_id = %id, error = %chain(&e), "cannot stop the cancelled task's job");
            }
        }
    }
}

/// The result of a job whose executor did not report.
fn synthesize(end: &JobEnd) -> TaskResult {
    let mut evidence = end.evidence.clone();
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
            "deadline_exceeded",
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
            *kind,
            with_tail(end.exit.clone()),
            *retryable,
            *reason,
        ),
        End::Crashed | End::Published => (
            ResultStatus::Failed,
            "executor_crashed",
            with_tail(format!(
                "the executor ended ({}) without reporting a result",
                end.exit
            )),
            true,
            "Error",
        ),
    };
    evidence.terminal_reason = Some(reason.into());
    TaskResult {
        task_id: end.task_id,
        status,
        output: None,
        error: Some(TaskError {
            kind: kind.into(),
            message,
            retryable,
        }),
        attempt: end.attempt,
        evidence,
        started_at: None,
        finished_at: Utc::now(),
        usage: None,
        reported_by: "dispatcher".into(),
    }
}

fn synthesized(
    task: &Task,
    status: ResultStatus,
    kind: &str,
    message: String,
    retryable: bool,
    evidence: Evidence,
) -> TaskResult {
    TaskResult {
        task_id: task.id,
        status,
        output: None,
        error: Some(TaskError {
            kind: kind.into(),
            message,
            retryable,
        }),
        attempt: task.attempt,
        evidence: Evidence {
            terminal_reason: Some(kind.into()),
            ..evidence
        },
        started_at: None,
        finished_at: Utc::now(),
        usage: None,
        reported_by: "dispatcher".into(),
    }
}

/// At start: adopts running jobs, deals with jobs that ended while no dispatcher ran, and
/// fails the attempts that Postgres says this runtime dispatched but whose job is gone, so
/// every task reaches a terminal state. A job is gone when it was claimed but never created
/// (the dispatcher stopped in between), when its state directory was wiped, or when it was
/// deleted while no dispatcher followed it; its attempt is failed as `job_lost`, which is
/// retried, and never started again under the same attempt.
pub(crate) async fn reconcile(
    ctx: &Arc<Ctx>,
    capacity: &HashMap<ExecutorClass, Arc<Semaphore>>,
) -> Result<()> {
    let Some(runtime) = ctx.runtime.as_ref() else {
        return Ok(());
    };
    runtime.sweep();
    for (job, running) in runtime.scan()? {
        let permit = ExecutorClass::parse(job.executor())
            .ok()
            .and_then(|c| capacity.get(&c).cloned())
            .and_then(|s| s.try_acquire_owned().ok());
        info!(job = %job.name(), running, "reconciling a job found at start");
        inc(&ctx.metrics.reconciled);
        let (task_id, attempt) = match &job {
            RuntimeJob::Local(j) => (j.task_id, j.attempt),
            RuntimeJob::Kube(j) => (j.task_id, j.attempt),
        };
        tokio::spawn(follow(ctx.clone(), task_id, attempt, job, permit));
    }
    let unfinished = ctx
        .persist("read unfinished tasks", || ctx.store.unfinished(None))
        .await?;
    // Only tasks whose job should exist: a `retrying` task waits in a delay queue.
    let running = [TaskState::Dispatched.as_str(), TaskState::Running.as_str()];
    for record in unfinished
        .into_iter()
        .filter(|r| running.contains(&r.state.as_str()))
    {
        // Only tasks this state directory dispatched: another dispatcher on the same machine
        // has its own jobs.
        let ours = record
            .dispatch_id
            .as_deref()
            .is_some_and(|d| d.starts_with(&format!("{}.", runtime.instance())));
        let Some(job_name) = record.job_name.as_deref().filter(|_| ours) else {
            continue;
        };
        let attempt = u32::try_from(record.attempt).unwrap_or(1);
        let name = JobName::for_task(record.task_id, attempt);
        if name.as_str() != job_name || runtime.knows(&name) {
            continue;
        }
        warn!(task_id = %record.task_id, job = %name, state = %record.state, "the attempt's job is gone; failing the attempt as lost");
        let end = JobEnd {
            task_id: record.task_id,
            attempt,
            job_name: name.clone(),
            end: End::Failure {
                kind: "job_lost",
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
        ctx.publish_result(&synthesize(&end)).await?;
        runtime.mark_handled(&name);
        inc(&ctx.metrics.synthesized);
    }
    Ok(())
}
