//! Results: `gantry.results` → `tasks` and `task_events`, then forward to `reply_to`.

use std::collections::HashMap;

use gantry_shared::message::{
    ErrorKind, ExecutorClass, FieldTableExt, ReportedBy, ResultStatus, TaskError, TaskId,
    TaskResult, headers,
};
use gantry_shared::store::{Applied, ResultWrite, TaskRecord};
use gantry_shared::telemetry::{chain, trace};
use lapin::message::Delivery;
use tracing::{Instrument, Span, debug, error, info, warn};

use super::retry::{self, Plan};
use crate::context::Ctx;
use crate::{Error, Result, dead_letter};

/// Records one batch of results, then publishes what follows from them.
pub(super) async fn record(ctx: &Ctx, batch: &[Delivery]) -> Result<()> {
    let mut results = Vec::with_capacity(batch.len());
    let mut origin = Vec::with_capacity(batch.len());
    for delivery in batch {
        match TaskResult::from_amqp(&delivery.properties, &delivery.data) {
            Ok(r) => {
                results.push(r);
                origin.push(delivery);
            }
            Err(rejection) => {
                let reason = format!("{rejection} (result message)");
                warn!(%reason, "rejected result message; dead-lettering it");
                dead_letter_result(ctx, delivery, &reason, "bad_result").await?;
            }
        }
    }
    if results.is_empty() {
        return Ok(());
    }
    let ids: Vec<_> = results.iter().map(|r| r.task_id).collect();
    let executors = ctx
        .persist("read executors", || ctx.store.executors(&ids))
        .await?;
    let catalog = ctx.catalog();
    let plans: Vec<Plan> = results
        .iter()
        .map(|r| {
            let policy = executors
                .get(&r.task_id)
                .and_then(|c| catalog.get(c).map(|s| s.retry.clone()));
            retry::plan(policy.as_ref(), r)
        })
        .collect();
    let writes: Vec<ResultWrite<'_>> = results
        .iter()
        .zip(&plans)
        .map(|(r, p)| ResultWrite {
            result: r,
            state: p.state(r),
            note: p.note(),
        })
        .collect();
    let spans: Vec<Span> = origin
        .iter()
        .zip(&results)
        .map(|(delivery, result)| commit_span(delivery, result))
        .collect();
    let outcomes = match ctx
        .persist("record results", || ctx.store.record_result_writes(&writes))
        .await
    {
        Ok(outcomes) => outcomes.into_iter().map(Some).collect(),
        Err(Error::ShuttingDown) => return Err(Error::ShuttingDown),
        Err(e) => {
            warn!(error = %chain(&e), "Postgres refused the batch; recording its results one by one");
            one_by_one(ctx, &writes, &origin).await?
        }
    };
    for (((result, plan), outcome), span) in results.iter().zip(&plans).zip(outcomes).zip(spans) {
        let Some(outcome) = outcome else { continue };
        follow_outcome(ctx, result, plan, outcome, &executors)
            .instrument(span)
            .await?;
    }
    Ok(())
}

/// What follows the record of one result: metrics, the retry or dead letter its plan asks
/// for, and the forward to the caller.
async fn follow_outcome(
    ctx: &Ctx,
    result: &TaskResult,
    plan: &Plan,
    outcome: Applied,
    executors: &HashMap<TaskId, ExecutorClass>,
) -> Result<()> {
    match outcome {
        Applied::Changed { reply_to } => {
            let class = executors
                .get(&result.task_id)
                .map_or("unknown", |c| c.as_str());
            ctx.metrics.result_recorded(class, result.status.as_str());
            ctx.metrics.task_entered(class, plan.state(result));
            info!(task_id = %result.task_id, status = %result.status, attempt = %result.attempt, reported_by = %result.reported_by, "result recorded");
            follow_plan(ctx, result, plan).await?;
            if let Some(queue) = reply_to.filter(|_| plan.state(result).is_terminal()) {
                forward(ctx, result, &queue).await?;
            }
        }
        Applied::Duplicate => {
            ctx.metrics.results_duplicate.inc();
            debug!(task_id = %result.task_id, "duplicate result; nothing changed");
            // A crash between commit and publish leaves the retry, dead letter or
            // forward to the redelivery of the same result; each is safe to repeat. A
            // second, different result for the attempt (the executor's and the
            // dispatcher's, say) has nothing left to do: the first one's plan was
            // followed, and following it again would publish the retry twice.
            if let Some(record) = ctx
                .persist("read task", || ctx.store.task(result.task_id))
                .await?
                && record.attempt == result.attempt
                && record.state == plan.state(result)
                && is_recorded(&record, result)
            {
                follow_plan(ctx, result, plan).await?;
                if let Some(queue) = record.reply_to.filter(|_| record.forwarded_at.is_none())
                    && plan.state(result).is_terminal()
                {
                    forward(ctx, result, &queue).await?;
                }
            }
        }
        Applied::Stale { current, attempt } => {
            ctx.metrics.results_duplicate.inc();
            info!(task_id = %result.task_id, status = %result.status, %current, %attempt, "late result ignored: the task is already {current}");
        }
        Applied::Unknown => {
            warn!(task_id = %result.task_id, "result for a task this database does not know; ignored");
        }
    }
    Ok(())
}

/// The commit of one result, a span of its task's trace: the child of the span the
/// result's `traceparent` names (the executor's run).
fn commit_span(delivery: &Delivery, result: &TaskResult) -> Span {
    let span = tracing::info_span!(
        target: trace::TARGET,
        "gantry.commit",
        otel.kind = "consumer",
        gantry.task_id = %result.task_id,
        gantry.attempt = i64::from(result.attempt.get()),
        gantry.status = %result.status,
        gantry.reported_by = %result.reported_by,
    );
    let traceparent = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.get_str(headers::TRACEPARENT));
    trace::set_parent(&span, traceparent);
    span
}

/// Whether `result` is the very result recorded for its task (a redelivery of it), not
/// another result for the same attempt: results are told apart by who reported them and
/// when they were made.
fn is_recorded(record: &TaskRecord, result: &TaskResult) -> bool {
    let Some(stored) = record.result.as_ref() else {
        return false;
    };
    let made = serde_json::to_value(result.finished_at).ok();
    stored.get("reported_by").and_then(|v| v.as_str()) == Some(result.reported_by.as_str())
        && stored.get("finished_at") == made.as_ref()
}

/// Records each result alone; one that Postgres refuses for good is dead-lettered for
/// operators and its attempt recorded failed (`result_unrecordable`), so the task still ends
/// and the results behind it are not held up. `None` marks those.
async fn one_by_one(
    ctx: &Ctx,
    writes: &[ResultWrite<'_>],
    origin: &[&Delivery],
) -> Result<Vec<Option<Applied>>> {
    let mut outcomes = Vec::with_capacity(writes.len());
    for (write, delivery) in writes.iter().zip(origin) {
        let single = std::slice::from_ref(write);
        match ctx
            .persist("record result", || ctx.store.record_result_writes(single))
            .await
        {
            Ok(mut o) => outcomes.push(o.pop()),
            Err(Error::ShuttingDown) => return Err(Error::ShuttingDown),
            Err(e) => {
                let why = chain(&e);
                error!(task_id = %write.result.task_id, error = %why, "result cannot be recorded; dead-lettering it");
                let reason = format!("invalid: result cannot be recorded ({why})");
                dead_letter_result(ctx, delivery, &reason, "unrecordable_result").await?;
                let substitute = TaskResult {
                    status: ResultStatus::Failed,
                    output: None,
                    error: Some(TaskError {
                        kind: ErrorKind::ResultUnrecordable,
                        message: reason,
                        retryable: false,
                    }),
                    reported_by: ReportedBy::Dispatcher,
                    ..write.result.clone()
                };
                ctx.persist("record substitute result", || {
                    ctx.store.record_results(std::slice::from_ref(&substitute))
                })
                .await?;
                outcomes.push(None);
            }
        }
    }
    Ok(outcomes)
}

/// Dead-letters a result message with `reason` (kept for operators in `<prefix>.dead`),
/// counted under `label`.
async fn dead_letter_result(
    ctx: &Ctx,
    delivery: &Delivery,
    reason: &str,
    label: &'static str,
) -> Result<()> {
    ctx.metrics.rejected(label);
    let (dlx, queue) = (ctx.topology.dlx(), ctx.topology.results_queue());
    dead_letter::publish(&ctx.publisher, &dlx, &queue, delivery, reason).await?;
    Ok(())
}

/// Publishes what the plan asks for beyond the record: the next attempt or the dead letter.
async fn follow_plan(ctx: &Ctx, result: &TaskResult, plan: &Plan) -> Result<()> {
    match plan {
        Plan::Record => Ok(()),
        Plan::Retry { delay } => retry::schedule(ctx, result, *delay).await,
        Plan::Exhausted { reason } => retry::dead_letter(ctx, result, reason).await,
    }
}

/// Sends the durable result to the caller's reply queue, then notes it. A reply queue that
/// no longer exists is noted and skipped; a broker failure leaves the batch unacked, so the
/// redelivery forwards it (the result itself is already durable).
async fn forward(ctx: &Ctx, result: &TaskResult, queue: &str) -> Result<()> {
    let span = tracing::info_span!(
        target: trace::TARGET,
        "gantry.reply",
        otel.kind = "producer",
        gantry.task_id = %result.task_id,
    );
    forward_in(ctx, result, queue).instrument(span).await
}

/// [`forward`], in its span.
async fn forward_in(ctx: &Ctx, result: &TaskResult, queue: &str) -> Result<()> {
    let (body, props) = match crate::celery::reply::rpc_reply(ctx, result).await? {
        Some(celery) => celery,
        None => result.to_amqp().map_err(gantry_shared::Error::from)?,
    };
    if ctx.reply(result.task_id, queue, &body, props).await? {
        ctx.metrics.forwarded.inc();
    }
    ctx.persist("mark forwarded", || {
        ctx.store.mark_forwarded(result.task_id)
    })
    .await?;
    Ok(())
}
