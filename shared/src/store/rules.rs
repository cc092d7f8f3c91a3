//! The one rule of a task's transitions, applied to one task under its row lock: states
//! move forward within an attempt, a later attempt supersedes an earlier one, a terminal
//! state is never overwritten, and every write is idempotent on `(task, attempt, event)`.
//! The batched writes (`batch`) and every single write go through it.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use serde_json::Value;
use tokio_postgres::Row;

use super::sql::{DONE_CHANNEL, cached, clean, pg, scrub};
use super::state::TaskState;
use crate::Result;
use crate::message::{Attempt, Evidence, Task, TaskId};

/// One transition to apply.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub evidence: Evidence,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The whole result envelope, for terminal states.
    pub result: Option<Value>,
    pub error: Option<Value>,
    /// Extra context for the `task_events` row.
    pub detail: Option<Value>,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The state moved forward.
    Changed { reply_to: Option<String> },
    /// The same event was already recorded: nothing changed.
    Duplicate,
    /// The task is already further along (or terminal); the late event is noted only.
    Stale {
        current: TaskState,
        attempt: Attempt,
    },
    /// No such task.
    Unknown,
}

impl Applied {
    pub fn changed(&self) -> bool {
        matches!(self, Applied::Changed { .. })
    }
}

pub(super) async fn insert_event(
    tx: &Transaction<'_>,
    id: TaskId,
    attempt: Attempt,
    event: &str,
    detail: Option<&Value>,
) -> Result<bool> {
    let detail = detail.map(scrub);
    let insert = cached(
        tx,
        "INSERT INTO task_events (task_id, attempt, event, detail) VALUES ($1, $2, $3, $4)
         ON CONFLICT (task_id, attempt, event) DO NOTHING",
    )
    .await?;
    let n = tx
        .execute(&insert, &[&id.as_uuid(), &attempt, &event, &detail])
        .await
        .map_err(pg("insert task event"))?;
    Ok(n == 1)
}

/// A task row, locked for the rest of the transaction.
pub(super) struct Locked {
    pub(super) state: TaskState,
    pub(super) attempt: Attempt,
    pub(super) reply_to: Option<String>,
}

impl Locked {
    fn from_row(row: &Row) -> Result<Locked> {
        Ok(Locked {
            state: row.try_get("state").map_err(pg("read a task row"))?,
            attempt: row.try_get("attempt").map_err(pg("read a task row"))?,
            reply_to: row.try_get("reply_to").map_err(pg("read a task row"))?,
        })
    }
}

/// Locks the rows of `ids` (in one order, so two writers never deadlock on them).
pub(super) async fn lock_all(
    tx: &Transaction<'_>,
    ids: &[uuid::Uuid],
) -> Result<std::collections::HashMap<uuid::Uuid, Locked>> {
    let select = cached(
        tx,
        "SELECT task_id, state, attempt, reply_to FROM tasks WHERE task_id = ANY($1)
         ORDER BY task_id FOR UPDATE",
    )
    .await?;
    let rows = tx.query(&select, &[&ids]).await.map_err(pg("lock tasks"))?;
    rows.iter()
        .map(|row| Ok((row.get("task_id"), Locked::from_row(row)?)))
        .collect()
}

/// `received` for a task Postgres knows already: a new attempt (retry or replay), which may
/// carry a new deadline, or a repeated delivery of an attempt, which changes nothing and is
/// answered with the task's state as it stands (a repeat of an attempt that has ended must
/// say so, or the dispatcher would run it again).
pub(super) async fn received_again(
    tx: &Transaction<'_>,
    task: &Task,
) -> Result<(TaskState, Attempt)> {
    let attempt = task.attempt;
    let change = Change::default();
    Ok(
        match transition_in(tx, task.id, task.attempt, TaskState::Received, &change).await? {
            Applied::Stale { current, attempt } => (current, attempt),
            Applied::Duplicate => match lock(tx, task.id).await? {
                Some(Locked { state, attempt, .. }) => (state, attempt),
                None => (TaskState::Received, attempt),
            },
            Applied::Changed { .. } => {
                tx.execute(
                    "UPDATE tasks SET envelope = $2, deadline = $3 WHERE task_id = $1",
                    &[
                        &task.id.as_uuid(),
                        &scrub(&serde_json::to_value(task.envelope())?),
                        &task.deadline,
                    ],
                )
                .await
                .map_err(pg("update envelope"))?;
                (TaskState::Received, attempt)
            }
            Applied::Unknown => (TaskState::Received, attempt),
        },
    )
}

pub(super) async fn lock(tx: &Transaction<'_>, id: TaskId) -> Result<Option<Locked>> {
    let select = cached(
        tx,
        "SELECT state, attempt, reply_to FROM tasks WHERE task_id = $1 FOR UPDATE",
    )
    .await?;
    let row = tx
        .query_opt(&select, &[&id.as_uuid()])
        .await
        .map_err(pg("lock task"))?;
    row.as_ref().map(Locked::from_row).transpose()
}

/// The transition rule, applied under a row lock.
pub(super) async fn transition_in(
    tx: &Transaction<'_>,
    id: TaskId,
    attempt: Attempt,
    state: TaskState,
    change: &Change,
) -> Result<Applied> {
    let Some(Locked {
        state: current,
        attempt: current_attempt,
        reply_to,
    }) = lock(tx, id).await?
    else {
        return Ok(Applied::Unknown);
    };
    let event = state.as_str();
    if !current.can_become(current_attempt, state, attempt) {
        let seen = tx
            .query_opt(
                "SELECT 1 FROM task_events WHERE task_id = $1 AND attempt = $2 AND event = $3",
                &[&id.as_uuid(), &attempt, &event],
            )
            .await
            .map_err(pg("read task event"))?;
        if seen.is_some() {
            return Ok(Applied::Duplicate);
        }
        let late = format!("late:{event}");
        insert_event(tx, id, attempt, &late, change.detail.as_ref()).await?;
        return Ok(Applied::Stale {
            current,
            attempt: current_attempt,
        });
    }
    if !insert_event(tx, id, attempt, event, change.detail.as_ref()).await? {
        return Ok(Applied::Duplicate);
    }
    if attempt > current_attempt {
        tx.execute(
            "UPDATE tasks SET dispatched_at = NULL, started_at = NULL, finished_at = NULL,
                 dispatch_id = NULL, job_name = NULL, pod_name = NULL, node = NULL,
                 terminal_reason = NULL, result = NULL, error = NULL, warm_seq = NULL,
                 dispatcher = NULL
             WHERE task_id = $1",
            &[&id.as_uuid()],
        )
        .await
        .map_err(pg("reset attempt"))?;
    }
    let now = Utc::now();
    let dispatched_at = change
        .dispatched_at
        .or((state == TaskState::Dispatched).then_some(now));
    let started_at = change
        .started_at
        .or((state == TaskState::Running).then_some(now));
    let e = &change.evidence;
    let (dispatch_id, job_name, pod_name, node, terminal_reason) = (
        clean(e.dispatch_id.as_deref()),
        clean(e.job_name.as_deref()),
        clean(e.pod_name.as_deref()),
        clean(e.node.as_deref()),
        clean(e.terminal_reason.as_deref()),
    );
    let (result, error) = (
        change.result.as_ref().map(scrub),
        change.error.as_ref().map(scrub),
    );
    let update = cached(
        tx,
        "UPDATE tasks SET state = $2, attempt = $3, updated_at = now(),
             dispatch_id = coalesce($4, dispatch_id), job_name = coalesce($5, job_name),
             pod_name = coalesce($6, pod_name), node = coalesce($7, node),
             terminal_reason = coalesce($8, terminal_reason),
             dispatched_at = coalesce(dispatched_at, $9),
             started_at = coalesce(started_at, $10),
             finished_at = coalesce($11, finished_at),
             result = coalesce($12, result), error = coalesce($13, error),
             warm_seq = coalesce($14, warm_seq)
         WHERE task_id = $1",
    )
    .await?;
    tx.execute(
        &update,
        &[
            &id.as_uuid(),
            &event,
            &attempt,
            &dispatch_id,
            &job_name,
            &pod_name,
            &node,
            &terminal_reason,
            &dispatched_at,
            &started_at,
            &change.finished_at,
            &result,
            &error,
            &e.warm_seq.and_then(|n| i32::try_from(n).ok()),
        ],
    )
    .await
    .map_err(pg("update task"))?;
    if state.ends_attempt() {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&DONE_CHANNEL, &id.to_string()],
        )
        .await
        .map_err(pg("notify"))?;
    }
    Ok(Applied::Changed { reply_to })
}
