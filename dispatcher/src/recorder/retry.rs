//! Retries: a failed attempt whose error the executor class deems retryable goes back to
//! the task queue through a delay queue, as attempt + 1, with exponential backoff and
//! jitter; once `max_attempts` are spent the task is dead-lettered with reason
//! `max_attempts`. Both publishes are confirmed before the result is acked, and both are
//! safe to repeat: a repeated retry finds its attempt already claimed, a repeated dead
//! letter has the same id.

use std::time::Duration;

use chrono::Utc;
use gantry_shared::catalog::RetryPolicy;
use gantry_shared::message::{
    ErrorKind, ExecutorClass, ResultStatus, Task, TaskEnvelope, TaskName, TaskResult, headers,
};
use gantry_shared::retry;
use gantry_shared::store::TaskState;
use gantry_shared::topology::{RETRY_TIER_HEADER, tier_name};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Value, json};
use tracing::{info, warn};
use uuid::Uuid;

use crate::context::Ctx;
use crate::{Error, Result};

/// What to do with one result.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Plan {
    /// Record it in the state its status names.
    Record,
    /// Record `retrying` and publish attempt + 1 after `delay`.
    Retry { delay: Duration },
    /// Attempts are spent: record `dead_lettered` and dead-letter the task.
    Exhausted { reason: String },
}

impl Plan {
    pub(crate) fn state(&self, result: &TaskResult) -> TaskState {
        match self {
            Plan::Record => result.status.into(),
            Plan::Retry { .. } => TaskState::Retrying,
            Plan::Exhausted { .. } => TaskState::DeadLettered,
        }
    }

    pub(crate) fn note(&self) -> Option<Value> {
        match self {
            Plan::Record => None,
            Plan::Retry { delay } => Some(json!({"retry_in_ms": delay.as_millis() as u64})),
            Plan::Exhausted { reason } => Some(json!({"dead_letter_reason": reason})),
        }
    }
}

/// Decides, from the executor class's retry policy, what a result leads to.
pub(crate) fn plan(policy: Option<&RetryPolicy>, result: &TaskResult) -> Plan {
    let (Some(policy), ResultStatus::Failed, Some(error)) =
        (policy, result.status, result.error.as_ref())
    else {
        return Plan::Record;
    };
    if !policy.is_retryable(error.kind.as_str(), error.retryable) {
        return Plan::Record;
    }
    if result.attempt.get() < policy.max_attempts {
        Plan::Retry {
            delay: policy.delay_before(result.attempt.next().get()),
        }
    } else {
        Plan::Exhausted {
            reason: format!(
                "max_attempts: failed {} of {} attempts; last error {}: {}",
                result.attempt,
                policy.max_attempts,
                error.kind,
                truncate(&error.message, 300)
            ),
        }
    }
}

/// The delay tier that fits `delay`: the longest not above it (the shortest if all are).
pub(crate) fn tier_for(delay: Duration, tiers: &[Duration]) -> Option<Duration> {
    let mut sorted = tiers.to_vec();
    sorted.sort();
    sorted
        .iter()
        .rev()
        .find(|t| **t <= delay)
        .or(sorted.first())
        .copied()
}

/// Publishes attempt + 1 of the task through the delay queue that fits `delay`.
pub(crate) async fn schedule(ctx: &Ctx, result: &TaskResult, delay: Duration) -> Result<()> {
    let Some(mut task) = stored_task(ctx, result).await? else {
        let why = "the task as received is not stored, so it cannot be published again";
        return end_attempt(
            ctx,
            result,
            TaskState::Failed,
            ErrorKind::RetryImpossible,
            why,
        )
        .await;
    };
    task.attempt = result.attempt.next();
    let now = Utc::now();
    let (body, props) = match task.to_amqp(now) {
        Ok(m) => m,
        Err(_) => {
            info!(task_id = %task.id, "no time left before the deadline for a retry");
            let why = "the deadline passed before the next attempt";
            return end_attempt(
                ctx,
                result,
                TaskState::Expired,
                ErrorKind::DeadlineExceeded,
                why,
            )
            .await;
        }
    };
    let tiers = &ctx.settings.common.queues.retry_delays;
    let Some(tier) = tier_for(delay, tiers) else {
        return Err(Error::Job {
            job: task.id.to_string(),
            message: "no retry delay tiers are configured (queues.retry_delays)".into(),
        });
    };
    let mut table = props.headers().clone().unwrap_or_default();
    table.insert(
        RETRY_TIER_HEADER.into(),
        AMQPValue::LongString(tier_name(tier).into()),
    );
    let props = props.with_headers(table);
    publish(ctx, &ctx.topology.retry_exchange(), &task, &body, props).await?;
    ctx.metrics.retry_scheduled(task.executor.as_str());
    info!(task_id = %task.id, next_attempt = %task.attempt, ?delay, tier = %tier_name(tier), "retry scheduled");
    Ok(())
}

/// Ends a `retrying` attempt that cannot be retried after all.
async fn end_attempt(
    ctx: &Ctx,
    result: &TaskResult,
    state: TaskState,
    kind: ErrorKind,
    message: &str,
) -> Result<()> {
    let change = gantry_shared::store::Change {
        finished_at: Some(Utc::now()),
        error: Some(json!({"kind": kind, "message": message, "retryable": false})),
        ..Default::default()
    };
    ctx.persist("end attempt", || {
        ctx.store
            .transition(result.task_id, result.attempt, state, &change)
    })
    .await?;
    Ok(())
}

/// Dead-letters a task whose attempts are spent, with reason `max_attempts`.
pub(crate) async fn dead_letter(ctx: &Ctx, result: &TaskResult, reason: &str) -> Result<()> {
    let Some(task) = stored_task(ctx, result).await? else {
        return Ok(());
    };
    let body = serde_json::to_vec(&task.envelope()).map_err(gantry_shared::Error::from)?;
    let mut table = FieldTable::default();
    table.insert(
        headers::SCHEMA.into(),
        AMQPValue::LongString(gantry_shared::message::TASK_SCHEMA.into()),
    );
    table.insert(
        headers::ATTEMPT.into(),
        AMQPValue::LongLongInt(task.attempt.get().into()),
    );
    let mut put = |k: &str, v: String| {
        table.insert(k.into(), AMQPValue::LongString(v.into()));
    };
    // One id per (task, attempt): a repeated dead-lettering is recorded once.
    let id = Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{}/{}/max_attempts", task.id, task.attempt).as_bytes(),
    );
    put(headers::REASON, reason.to_owned());
    put(headers::DEAD_LETTER_ID, id.to_string());
    put(
        headers::ORIGINAL_QUEUE,
        ctx.topology.task_queue(&task.executor),
    );
    put(headers::ORIGINAL_ROUTING_KEY, task.executor.to_string());
    // A replay continues the task's trace.
    if let Some(tp) = &task.traceparent {
        put(headers::TRACEPARENT, tp.clone());
    }
    table.insert(
        headers::DEAD_AT.into(),
        AMQPValue::Timestamp(Utc::now().timestamp().max(0) as u64),
    );
    // No expiration: a dead letter must not expire out of gantry.dead.
    let mut props = lapin::BasicProperties::default()
        .with_headers(table)
        .with_content_type(gantry_shared::message::CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_message_id(task.id.to_string().into())
        .with_correlation_id(task.id.to_string().into());
    // A replay of the dead letter must still answer the caller.
    if let Some(reply_to) = task
        .reply_to
        .as_deref()
        .and_then(|r| ShortString::try_new(r).ok())
    {
        props = props.with_reply_to(reply_to);
    }
    if let Some(p) = task.priority {
        props = props.with_priority(p);
    }
    publish(ctx, &ctx.topology.dlx(), &task, &body, props).await?;
    warn!(task_id = %task.id, attempts = %task.attempt, %reason, "attempts spent; task dead-lettered");
    Ok(())
}

/// Publishes a task message, mandatory and confirmed, routed by its executor class.
async fn publish(
    ctx: &Ctx,
    exchange: &str,
    task: &Task,
    body: &[u8],
    props: lapin::BasicProperties,
) -> Result<()> {
    let policy = retry::for_at_most(Duration::from_secs(60));
    ctx.publisher
        .publish(exchange, task.executor.as_str(), body, props, true, policy)
        .await?;
    Ok(())
}

/// The task of `result` as stored at its last `received`, at the result's attempt.
async fn stored_task(ctx: &Ctx, result: &TaskResult) -> Result<Option<Task>> {
    let id = result.task_id;
    let envelope = ctx
        .persist("read envelope", || ctx.store.envelope(id))
        .await?;
    let record = ctx.persist("read task", || ctx.store.task(id)).await?;
    let (Some((envelope, traceparent)), Some(record)) = (envelope, record) else {
        warn!(task_id = %id, "cannot retry or dead-letter: the task as received is not stored");
        return Ok(None);
    };
    let env: TaskEnvelope = match serde_json::from_value(envelope) {
        Ok(e) => e,
        Err(e) => {
            warn!(task_id = %id, error = %e, "stored task is unreadable; cannot retry it");
            return Ok(None);
        }
    };
    let (Ok(name), Ok(executor)) = (
        TaskName::parse(&env.task),
        ExecutorClass::parse(&env.executor),
    ) else {
        return Ok(None);
    };
    Ok(Some(Task {
        id,
        name,
        executor,
        payload: env.payload,
        deadline: env.deadline,
        resources: env.resources,
        idempotency_key: env.idempotency_key,
        priority: env.priority,
        submitted_at: env.submitted_at,
        attempt: result.attempt,
        stream: env.stream,
        reply_to: record.reply_to,
        traceparent,
        tracestate: None,
    }))
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::message::{Evidence, TaskError, TaskId};

    fn failed(attempt: u32, retryable: bool) -> TaskResult {
        TaskResult {
            task_id: TaskId::new(),
            status: ResultStatus::Failed,
            output: None,
            error: Some(TaskError {
                kind: gantry_shared::message::ErrorKind::Oom,
                message: "out of memory".into(),
                retryable,
            }),
            attempt: gantry_shared::message::Attempt::new(attempt).expect("attempts count from 1"),
            evidence: Evidence::default(),
            started_at: None,
            finished_at: Utc::now(),
            usage: None,
            reported_by: gantry_shared::message::ReportedBy::Executor,
        }
    }

    #[test]
    fn retryable_failures_are_retried_until_attempts_are_spent() {
        let p = RetryPolicy::default();
        assert!(matches!(
            plan(Some(&p), &failed(1, true)),
            Plan::Retry { .. }
        ));
        assert!(matches!(
            plan(Some(&p), &failed(2, true)),
            Plan::Retry { .. }
        ));
        let Plan::Exhausted { reason } = plan(Some(&p), &failed(3, true)) else {
            panic!("the third failure spends the attempts");
        };
        assert!(reason.starts_with("max_attempts: failed 3 of 3 attempts; last error oom"));
        assert_eq!(plan(Some(&p), &failed(1, false)), Plan::Record);
        assert_eq!(plan(None, &failed(1, true)), Plan::Record);
    }

    #[test]
    fn the_tier_is_the_longest_that_does_not_overshoot() {
        let tiers = [1, 5, 30].map(Duration::from_secs);
        assert_eq!(
            tier_for(Duration::from_secs(7), &tiers),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            tier_for(Duration::from_millis(300), &tiers),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            tier_for(Duration::from_secs(600), &tiers),
            Some(Duration::from_secs(30))
        );
        assert_eq!(tier_for(Duration::from_secs(1), &[]), None);
    }
}
