//! Results: `gantry.results` → `tasks` and `task_events`, then forward to `reply_to`.

use std::sync::Arc;

use gantry_shared::message::{ExecutorClass, TaskResult};
use gantry_shared::store::{Applied, ResultWrite};
use gantry_shared::telemetry::chain;
use lapin::Consumer;
use lapin::message::Delivery;
use tracing::{debug, info, warn};

use super::retry::{self, Plan};
use super::{ack_batch, next_batch};
use crate::consume::{SessionEnd, Source, open_until_shutdown};
use crate::metrics::inc;
use crate::service::Ctx;
use crate::{Result, dead_letter};

pub(crate) async fn run_results(ctx: Arc<Ctx>) {
    let d = &ctx.settings.dispatcher;
    let source = Source {
        url: &ctx.settings.common.amqp_url,
        name: "gantry-recorder/results".into(),
        queue: ctx.topology.results_queue(),
        prefetch: u16::try_from(d.record_batch * 2).unwrap_or(u16::MAX),
        timeout: ctx.settings.common.broker_timeout,
    };
    while let Some(mut session) = open_until_shutdown(&source, &ctx.shutdown).await {
        let end = record_batches(&ctx, &mut session.consumer).await;
        let stop = matches!(end, SessionEnd::Shutdown);
        session.close(&end, &source.queue).await;
        if stop {
            return;
        }
    }
}

async fn record_batches(ctx: &Ctx, consumer: &mut Consumer) -> SessionEnd {
    let d = &ctx.settings.dispatcher;
    loop {
        let Some(batch) =
            next_batch(consumer, d.record_batch, d.record_linger, &ctx.shutdown).await
        else {
            return if ctx.shutdown.is_cancelled() {
                SessionEnd::Shutdown
            } else {
                SessionEnd::Broken
            };
        };
        match record(ctx, &batch).await {
            Ok(()) => ack_batch(&batch).await,
            // Not acked: the batch comes back after the reconnect or restart.
            Err(e) => {
                warn!(error = %chain(&e), "batch not recorded");
                return if ctx.shutdown.is_cancelled() {
                    SessionEnd::Shutdown
                } else {
                    SessionEnd::Broken
                };
            }
        }
    }
}

async fn record(ctx: &Ctx, batch: &[Delivery]) -> Result<()> {
    let mut results = Vec::with_capacity(batch.len());
    for delivery in batch {
        match TaskResult::from_amqp(&delivery.properties, &delivery.data) {
            Ok(r) => results.push(r),
            Err(rejection) => {
                let reason = format!("{rejection} (result message)");
                ctx.metrics.rejected("bad_result");
                warn!(%reason, "rejected result message; dead-lettering it");
                dead_letter::publish(
                    &ctx.publisher,
                    &ctx.topology.dlx(),
                    &ctx.topology.results_queue(),
                    delivery,
                    &reason,
                )
                .await?;
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
    let plans: Vec<Plan> = results
        .iter()
        .map(|r| {
            let policy = executors
                .get(&r.task_id)
                .and_then(|e| ExecutorClass::parse(e).ok())
                .and_then(|c| ctx.settings.catalog.get(&c).map(|s| s.retry.clone()));
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
    let outcomes = ctx
        .persist("record results", || ctx.store.record_result_writes(&writes))
        .await?;
    for ((result, plan), outcome) in results.iter().zip(&plans).zip(outcomes) {
        match outcome {
            Applied::Changed { reply_to } => {
                inc(&ctx.metrics.results_recorded);
                info!(task_id = %result.task_id, status = %result.status, attempt = result.attempt, reported_by = %result.reported_by, "result recorded");
                follow_plan(ctx, result, plan).await?;
                if let Some(queue) = reply_to.filter(|_| plan.state(result).is_terminal()) {
                    forward(ctx, result, &queue).await?;
                }
            }
            Applied::Duplicate => {
                inc(&ctx.metrics.results_duplicate);
                debug!(task_id = %result.task_id, "duplicate result; nothing changed");
                // A crash between commit and publish leaves the retry, dead letter or
                // forward to the redelivery; each is safe to repeat.
                if let Some(record) = ctx
                    .persist("read task", || ctx.store.task(result.task_id))
                    .await?
                    && record.attempt == result.attempt as i32
                    && record.state == plan.state(result).as_str()
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
                inc(&ctx.metrics.results_duplicate);
                info!(task_id = %result.task_id, status = %result.status, %current, attempt, "late result ignored: the task is already {current}");
            }
            Applied::Unknown => {
                warn!(task_id = %result.task_id, "result for a task this database does not know; ignored");
            }
        }
    }
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

/// Sends the durable result to the caller's reply queue, then notes it.
async fn forward(ctx: &Ctx, result: &TaskResult, queue: &str) -> Result<()> {
    let (body, props) = result.to_amqp().map_err(gantry_shared::Error::from)?;
    let sent = ctx
        .publisher
        .publish(
            "",
            queue,
            &body,
            props,
            false,
            gantry_shared::retry::for_at_most(std::time::Duration::from_secs(30)),
        )
        .await;
    match sent {
        Ok(()) => {
            inc(&ctx.metrics.forwarded);
            ctx.persist("mark forwarded", || {
                ctx.store.mark_forwarded(result.task_id)
            })
            .await?;
        }
        Err(e) => {
            warn!(task_id = %result.task_id, queue, error = %chain(&e), "could not forward the result to reply_to; it stays in Postgres")
        }
    }
    Ok(())
}
