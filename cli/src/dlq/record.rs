//! The Postgres side of a replay: the task's new attempt, recorded before the publish.
//!
//! The recorder gives every dead task a row, even one that died in its queue before any
//! dispatcher received it. A replay can still come first, when the recorder is behind on
//! `<prefix>.dead.audit` (or no dispatcher runs): then the task is recorded here from the
//! dead letter's body, as the recorder would: `received`, then the dead letter's end
//! (`expired`, or `dead_lettered` for any other reason) at its old attempt, the event
//! noting that `gantry dlq replay` recorded it. When the recorder catches up it finds that
//! end already recorded and changes nothing, so the reopened task stays reopened. Every
//! write here is idempotent, so a replay that runs again changes nothing.

use gantry_shared::message::{
    Attempt, Evidence, ExecutorClass, FieldTableExt, Task, TaskEnvelope, TaskId, TaskName, headers,
};
use gantry_shared::store::{Applied, Change, Store, TaskState};
use lapin::BasicProperties;
use serde_json::json;
use tracing::{debug, instrument};

use super::summary::Entry;

/// Records the replay of the dead letter `letter` as attempt `attempt` of `task_id`
/// (`Store::record_replay`), recording the task first if Postgres does not know it yet.
///
/// # Errors
/// Postgres errors.
#[instrument(skip_all, fields(dead_letter_id = %letter.id, %task_id, attempt))]
pub(super) async fn record_replay(
    store: &Store,
    letter: &Entry,
    props: &BasicProperties,
    data: &[u8],
    task_id: TaskId,
    attempt: u32,
) -> gantry_shared::Result<Applied> {
    // A replay's attempt follows the dead letter's (at least 1): never 0.
    let attempt = Attempt::new(attempt).unwrap_or(Attempt::FIRST);
    let applied = store.record_replay(task_id, attempt, letter.id).await?;
    if applied != Applied::Unknown {
        return Ok(applied);
    }
    let Some(task) = task_of(props, data) else {
        return Ok(Applied::Unknown);
    };
    debug!("the task is not recorded yet; recording it from its dead letter");
    store.record_received(&task).await?;
    let state = if letter.reason_kind() == "expired" {
        TaskState::Expired
    } else {
        TaskState::DeadLettered
    };
    let change = Change {
        evidence: Evidence {
            terminal_reason: Some(letter.reason.clone()),
            ..Evidence::default()
        },
        finished_at: Some(letter.dead_at),
        error: Some(json!({
            "kind": letter.reason_kind(),
            "message": letter.reason,
            "retryable": false,
        })),
        detail: Some(json!({
            "dead_letter_id": letter.id,
            "reason": letter.reason,
            "recorded_by": "gantry dlq replay",
        })),
        ..Change::default()
    };
    store
        .transition(task.id, task.attempt, state, &change)
        .await?;
    store.record_replay(task_id, attempt, letter.id).await
}

/// The task a dead letter's body describes, as it was published (no checks of its
/// deadline or limits: it is recorded, not run).
fn task_of(props: &BasicProperties, data: &[u8]) -> Option<Task> {
    let envelope: TaskEnvelope = serde_json::from_slice(data).ok()?;
    let table = props.headers().clone().unwrap_or_default();
    let header = |k: &str| table.get_str(k).map(str::to_owned);
    Some(Task {
        id: envelope.task_id,
        name: TaskName::parse(&envelope.task).ok()?,
        executor: ExecutorClass::parse(&envelope.executor).ok()?,
        payload: envelope.payload,
        deadline: envelope.deadline,
        resources: envelope.resources,
        idempotency_key: envelope.idempotency_key,
        priority: envelope.priority,
        submitted_at: envelope.submitted_at,
        attempt: Attempt::new(envelope.attempt).unwrap_or(Attempt::FIRST),
        stream: envelope.stream,
        reply_to: props.reply_to().as_ref().map(|r| r.to_string()),
        traceparent: header(headers::TRACEPARENT),
        tracestate: header(headers::TRACESTATE),
    })
}
