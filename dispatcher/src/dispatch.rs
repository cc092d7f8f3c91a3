//! The dispatch role: one consumer per executor class. For each delivery: validate →
//! record `received` → start (or find) the job → record `dispatched` and `running` → ack,
//! then follow the job to its end in the background, holding one unit of the class's
//! capacity. While a class is at `max_active_jobs`, deliveries wait un-acked within a small
//! prefetch and the rest stays in RabbitMQ.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use futures_util::StreamExt;
use gantry_shared::message::{
    Evidence, ExecutorClass, JobName, Rejection, ResultStatus, Task, TaskError, TaskResult,
};
use gantry_shared::store::{Change, TaskState};
use gantry_shared::telemetry::chain;
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{Instrument, error, info, info_span, warn};
use uuid::Uuid;

use crate::consume::{SessionEnd, Source, open_until_shutdown};
use crate::metrics::inc;
use crate::runtime::JobEnd;
use crate::runtime::local::{LocalJob, Started};
use crate::service::Ctx;
use crate::{Error, Result, dead_letter};

/// Consumes the queue of `class` until shutdown.
pub(crate) async fn run_class(ctx: Arc<Ctx>, class: ExecutorClass, capacity: Arc<Semaphore>) {
    let queue = ctx.topology.task_queue(&class);
    let source = Source {
        url: &ctx.settings.common.amqp_url,
        name: format!("gantry-dispatcher/{class}"),
        queue: queue.clone(),
        prefetch: ctx.settings.dispatcher.max_waiting,
        timeout: ctx.settings.common.broker_timeout,
    };
    while let Some(mut session) = open_until_shutdown(&source, &ctx.shutdown).await {
        let end = consume(&ctx, &class, &queue, &capacity, &mut session.consumer).await;
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
    consumer: &mut Consumer,
) -> SessionEnd {
    let mut handlers = tokio::task::JoinSet::new();
    let end = loop {
        let delivery = tokio::select! {
            _ = ctx.shutdown.cancelled() => break SessionEnd::Shutdown,
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
        // Wait for capacity with the delivery in hand: it stays un-acked meanwhile.
        let permit = tokio::select! {
            _ = ctx.shutdown.cancelled() => break SessionEnd::Shutdown,
            p = capacity.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break SessionEnd::Shutdown,
            },
        };
        let ctx = ctx.clone();
        let class = class.clone();
        let queue = queue.to_owned();
        handlers.spawn(async move { handle(ctx, class, queue, delivery, permit).await });
        while handlers.try_join_next().is_some() {}
    };
    // Let in-flight hand-offs finish (each is a few quick writes) before the channel
    // closes; anything not acked by then is requeued by RabbitMQ.
    while handlers.join_next().await.is_some() {}
    end
}

async fn handle(
    ctx: Arc<Ctx>,
    class: ExecutorClass,
    queue: String,
    delivery: Delivery,
    permit: OwnedSemaphorePermit,
) {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_default();
    let span = info_span!("task", %message_id, executor = %class);
    async {
        match dispatch(&ctx, &class, &queue, &delivery, permit).await {
            Ok(()) => {}
            Err(Error::ShuttingDown) => {}
            Err(e) => {
                error!(error = %chain(&e), "could not dispatch; the message stays in the queue and comes back");
            }
        }
    }
    .instrument(span)
    .await;
}

async fn dispatch(
    ctx: &Arc<Ctx>,
    class: &ExecutorClass,
    queue: &str,
    delivery: &Delivery,
    permit: OwnedSemaphorePermit,
) -> Result<()> {
    let task = match parse(ctx, class, delivery) {
        Ok(task) => task,
        Err(rejection) => {
            let reason = rejection.to_string();
            let count = ctx.metrics.rejected(rejection.metric_label());
            warn!(%reason, rejected_total = count, "rejected message; dead-lettering it");
            dead_letter::publish(
                &ctx.publisher,
                &ctx.topology.dlx(),
                queue,
                delivery,
                &reason,
            )
            .await?;
            ack(delivery).await;
            return Ok(());
        }
    };
    let (state, attempt) = ctx
        .persist("record received", || ctx.store.record_received(&task))
        .await?;
    if state.is_terminal() || attempt > task.attempt as i32 {
        info!(task_id = %task.id, %state, attempt, "task already {state}; skipping this delivery");
        inc(&ctx.metrics.skipped);
        ack(delivery).await;
        return Ok(());
    }
    let Some(spec) = ctx.settings.catalog.get(class) else {
        return Err(Error::Job {
            job: task.id.to_string(),
            message: format!("executor class {class} left the catalog"),
        });
    };
    let dispatch_id = Uuid::new_v4().to_string();
    let runtime = ctx.runtime.as_ref().ok_or(Error::ShuttingDown)?;
    let started = match runtime.start(&task, spec, &dispatch_id) {
        Ok(s) => s,
        Err(e) => {
            // The executor cannot start here (missing program, full disk): fail the
            // attempt with the reason rather than loop on it.
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
            ack(delivery).await;
            return Ok(());
        }
    };
    let job = match started {
        Started::Created(job) | Started::Running(job) | Started::Ended(job) => job,
    };
    let mut evidence = runtime.evidence(&job.name);
    evidence.dispatch_id = Some(dispatch_id);
    let dispatched = Change {
        evidence,
        ..Change::default()
    };
    let running = Change {
        started_at: job.started_at,
        ..dispatched.clone()
    };
    ctx.persist("record dispatched", || {
        ctx.store
            .transition(task.id, task.attempt, TaskState::Dispatched, &dispatched)
    })
    .await?;
    ctx.persist("record running", || {
        ctx.store
            .transition(task.id, task.attempt, TaskState::Running, &running)
    })
    .await?;
    ack(delivery).await;
    inc(&ctx.metrics.dispatched);
    tokio::spawn(follow(ctx.clone(), job, Some(permit)));
    Ok(())
}

fn parse(ctx: &Ctx, class: &ExecutorClass, delivery: &Delivery) -> Result<Task, Rejection> {
    let task = Task::from_amqp(
        &delivery.properties,
        &delivery.data,
        &ctx.settings.common.limits,
        Utc::now(),
    )?;
    if ctx.settings.catalog.get(&task.executor).is_none() {
        return Err(Rejection::UnknownExecutor(task.executor.to_string()));
    }
    if &task.executor != class {
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

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        // The channel broke: the message comes back and finds its job.
        warn!(error = %e, "ack failed; the message will be redelivered and find its job");
    }
}

/// Follows a job to its end; publishes a result on the executor's behalf if it could not.
pub(crate) async fn follow(ctx: Arc<Ctx>, job: LocalJob, permit: Option<OwnedSemaphorePermit>) {
    let _permit = permit;
    let Some(runtime) = ctx.runtime.as_ref() else {
        return;
    };
    let name = job.name.clone();
    // A duplicate delivery or a restart may find a job that is already followed.
    let Some(_following) = ctx.follow_guard(&name) else {
        return;
    };
    let end = tokio::select! {
        end = runtime.wait(job) => end,
        // The job keeps running; a restarted dispatcher adopts it.
        _ = ctx.shutdown.cancelled() => return,
    };
    if !end.published {
        let result = synthesize(&end);
        warn!(task_id = %end.task_id, job = %end.job_name, status = %result.status, exit = %end.exit, "job ended without publishing a result; publishing one on its behalf");
        if let Err(e) = ctx.publish_result(&result).await {
            error!(error = %chain(&e), job = %name, "could not publish the synthesized result; it is retried at the next start");
            return;
        }
        inc(&ctx.metrics.synthesized);
    }
    runtime.mark_handled(&name);
}

/// The result of a job whose executor did not report.
fn synthesize(end: &JobEnd) -> TaskResult {
    let mut evidence = end.evidence.clone();
    let (status, kind, message, retryable, reason) = if end.stopped_at_deadline {
        (
            ResultStatus::Expired,
            "deadline_exceeded",
            format!(
                "the job outlived its deadline and was stopped ({})",
                end.exit
            ),
            false,
            "DeadlineExceeded",
        )
    } else {
        let mut message = format!(
            "the executor ended ({}) without reporting a result",
            end.exit
        );
        if !end.log_tail.is_empty() {
            message.push_str(": ");
            message.push_str(&end.log_tail);
        }
        (
            ResultStatus::Failed,
            "executor_crashed",
            message,
            true,
            "Error",
        )
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
/// fails tasks that Postgres says run on this node but whose job is gone (a wiped state
/// directory), so every task reaches a terminal state.
pub(crate) async fn reconcile(
    ctx: &Arc<Ctx>,
    capacity: &HashMap<ExecutorClass, Arc<Semaphore>>,
) -> Result<()> {
    let Some(runtime) = ctx.runtime.as_ref() else {
        return Ok(());
    };
    runtime.sweep();
    for (job, running) in runtime.scan()? {
        let permit = ExecutorClass::parse(&job.executor)
            .ok()
            .and_then(|c| capacity.get(&c).cloned())
            .and_then(|s| s.try_acquire_owned().ok());
        info!(job = %job.name, running, "reconciling a job found in the state directory");
        tokio::spawn(follow(ctx.clone(), job, permit));
    }
    let unfinished = ctx
        .persist("read unfinished tasks", || ctx.store.unfinished(None))
        .await?;
    for record in unfinished {
        let on_this_node = record.node.as_deref() == Some(runtime.node());
        let Some(job_name) = record.job_name.as_deref().filter(|_| on_this_node) else {
            continue;
        };
        let attempt = u32::try_from(record.attempt).unwrap_or(1);
        let name = JobName::for_task(record.task_id, attempt);
        if name.as_str() != job_name || runtime.knows(&name) {
            continue;
        }
        warn!(task_id = %record.task_id, job = %name, "the task's job is gone from the state directory; failing the attempt");
        let end = JobEnd {
            task_id: record.task_id,
            attempt,
            job_name: name.clone(),
            published: false,
            stopped_at_deadline: false,
            exit: "job lost: its directory no longer exists".into(),
            log_tail: String::new(),
            evidence: runtime.evidence(&name),
        };
        ctx.publish_result(&synthesize(&end)).await?;
        inc(&ctx.metrics.synthesized);
    }
    Ok(())
}
