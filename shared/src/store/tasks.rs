//! Task rows and their transitions.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_postgres::Row;
use tracing::instrument;

use super::batch::{self, Transition};
use super::pool::Store;
use super::rules::{Applied, Change, Locked, insert_event, lock, transition_in};
use super::sql::{DONE_CHANNEL, pg};
use super::state::TaskState;
use crate::Result;
use crate::message::{Attempt, ErrorKind, ExecutorClass, Task, TaskId, TaskResult};

/// A task as stored, for `gantry status` and the CLI's `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskRecord {
    pub task_id: TaskId,
    pub task: String,
    /// The executor class as the task named it: a task refused on receipt keeps the text it
    /// came with, valid or not, and one cancelled before any dispatcher saw it has none
    /// (empty).
    pub executor: String,
    pub state: TaskState,
    pub attempt: Attempt,
    pub reply_to: Option<String>,
    pub deadline: DateTime<Utc>,
    pub submitted_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub dispatch_id: Option<String>,
    pub job_name: Option<String>,
    pub pod_name: Option<String>,
    pub node: Option<String>,
    pub terminal_reason: Option<String>,
    /// The attempt's place among the tasks of its warm executor; `None` when it had a job
    /// of its own.
    pub warm_seq: Option<u32>,
    pub result: Option<Value>,
    pub error: Option<Value>,
    pub forwarded_at: Option<DateTime<Utc>>,
}

impl TaskRecord {
    /// The row as a record. A state this binary does not know is an error that names it.
    pub(super) fn from_row(r: &Row) -> Result<Self> {
        let read = || pg("read a task");
        Ok(TaskRecord {
            task_id: TaskId::from(r.try_get::<_, uuid::Uuid>("task_id").map_err(read())?),
            task: r.try_get("task").map_err(read())?,
            executor: r.try_get("executor").map_err(read())?,
            state: r.try_get("state").map_err(read())?,
            attempt: r.try_get("attempt").map_err(read())?,
            reply_to: r.try_get("reply_to").map_err(read())?,
            deadline: r.try_get("deadline").map_err(read())?,
            submitted_at: r.try_get("submitted_at").map_err(read())?,
            received_at: r.try_get("received_at").map_err(read())?,
            dispatched_at: r.try_get("dispatched_at").map_err(read())?,
            started_at: r.try_get("started_at").map_err(read())?,
            finished_at: r.try_get("finished_at").map_err(read())?,
            dispatch_id: r.try_get("dispatch_id").map_err(read())?,
            job_name: r.try_get("job_name").map_err(read())?,
            pod_name: r.try_get("pod_name").map_err(read())?,
            node: r.try_get("node").map_err(read())?,
            terminal_reason: r.try_get("terminal_reason").map_err(read())?,
            warm_seq: r
                .try_get::<_, Option<i32>>("warm_seq")
                .map_err(read())?
                .and_then(|n| u32::try_from(n).ok()),
            result: r.try_get("result").map_err(read())?,
            error: r.try_get("error").map_err(read())?,
            forwarded_at: r.try_get("forwarded_at").map_err(read())?,
        })
    }
}

/// How the recorder files one result: usually in the state its status names; a retryable
/// failure with attempts left becomes `retrying`, one without becomes `dead_lettered`.
#[derive(Debug, Clone)]
pub struct ResultWrite<'a> {
    pub result: &'a TaskResult,
    pub state: TaskState,
    /// Why the state differs from the status, for the event.
    pub note: Option<Value>,
}

impl Store {
    /// Records that a task was received (or a new attempt of it). Idempotent: returns the
    /// task's current state and attempt whether or not this call changed anything.
    ///
    /// # Errors
    /// Postgres errors.
    #[instrument(skip_all, fields(task_id = %task.id, attempt = %task.attempt))]
    pub async fn record_received(&self, task: &Task) -> Result<(TaskState, Attempt)> {
        let received = self.record_received_many(&[task]).await?;
        Ok(received
            .first()
            .copied()
            .unwrap_or((TaskState::Received, task.attempt)))
    }

    /// [`Store::record_received`] for many tasks, in one transaction; each task's state and
    /// attempt afterwards, in the order given.
    ///
    /// # Errors
    /// Postgres errors; then nothing of the batch is recorded.
    #[instrument(skip_all, fields(batch = tasks.len()))]
    pub async fn record_received_many(&self, tasks: &[&Task]) -> Result<Vec<(TaskState, Attempt)>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg("begin"))?;
        let outcome = batch::received_in(&tx, tasks).await?;
        tx.commit().await.map_err(pg("commit"))?;
        Ok(outcome)
    }

    /// Applies one transition.
    ///
    /// # Errors
    /// Postgres errors.
    #[instrument(skip(self, change), fields(task_id = %id))]
    pub async fn transition(
        &self,
        id: TaskId,
        attempt: Attempt,
        state: TaskState,
        change: &Change,
    ) -> Result<Applied> {
        let one = Transition {
            id,
            attempt,
            state,
            change: change.clone(),
        };
        let mut applied = self.transitions(std::slice::from_ref(&one)).await?;
        Ok(applied.pop().unwrap_or(Applied::Unknown))
    }

    /// Applies many transitions in one transaction; what each did, in the order given.
    ///
    /// # Errors
    /// Postgres errors; then nothing of the batch is applied.
    #[instrument(skip_all, fields(batch = batch.len()))]
    pub async fn transitions(&self, batch: &[Transition]) -> Result<Vec<Applied>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg("begin"))?;
        let applied = batch::transitions_in(&tx, batch).await?;
        tx.commit().await.map_err(pg("commit"))?;
        Ok(applied)
    }

    /// Records a batch of results, each in the state its own status names. See
    /// [`Store::record_result_writes`].
    ///
    /// # Errors
    /// Postgres errors; then nothing of the batch is recorded.
    pub async fn record_results(&self, results: &[TaskResult]) -> Result<Vec<Applied>> {
        let writes: Vec<ResultWrite<'_>> = results
            .iter()
            .map(|r| ResultWrite {
                result: r,
                state: r.status.into(),
                note: None,
            })
            .collect();
        self.record_result_writes(&writes).await
    }

    /// Records a batch of results in one transaction; each terminal change is announced on
    /// [`DONE_CHANNEL`] when the transaction commits.
    ///
    /// # Errors
    /// Postgres errors; then nothing of the batch is recorded.
    #[instrument(skip_all, fields(batch = writes.len()))]
    pub async fn record_result_writes(&self, writes: &[ResultWrite<'_>]) -> Result<Vec<Applied>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg("begin"))?;
        let mut batch = Vec::with_capacity(writes.len());
        for w in writes {
            let r = w.result;
            let mut detail = json!({"reported_by": r.reported_by, "status": r.status});
            if let Some(note) = &w.note {
                detail["note"] = note.clone();
            }
            if let Some(e) = &r.error {
                detail["error"] = serde_json::to_value(e)?;
            }
            let change = Change {
                evidence: r.evidence.clone(),
                started_at: r.started_at,
                finished_at: w.state.is_terminal().then_some(r.finished_at),
                result: Some(serde_json::to_value(r)?),
                error: r.error.as_ref().map(serde_json::to_value).transpose()?,
                detail: Some(detail),
                ..Change::default()
            };
            batch.push(Transition {
                id: r.task_id,
                attempt: r.attempt,
                state: w.state,
                change,
            });
        }
        let outcomes = batch::transitions_in(&tx, &batch).await?;
        tx.commit().await.map_err(pg("commit results"))?;
        Ok(outcomes)
    }

    /// The executor class of each task among `ids` that a dispatcher received.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn executors(
        &self,
        ids: &[TaskId],
    ) -> Result<std::collections::HashMap<TaskId, ExecutorClass>> {
        let client = self.client().await?;
        let uuids: Vec<uuid::Uuid> = ids.iter().map(TaskId::as_uuid).collect();
        // Only the rows of tasks that were received (a refused task may name no valid
        // class; a task cancelled before it was received names none).
        let rows = client
            .query(
                "SELECT task_id, executor FROM tasks WHERE task_id = ANY($1) AND envelope IS NOT NULL",
                &[&uuids],
            )
            .await
            .map_err(pg("read executors"))?;
        rows.iter()
            .map(|r| {
                let read = || pg("read executors");
                let id = TaskId::from(r.try_get::<_, uuid::Uuid>(0).map_err(read())?);
                Ok((id, r.try_get(1).map_err(read())?))
            })
            .collect()
    }

    /// The task as it was received (its latest attempt) and its trace context, to publish
    /// it again.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn envelope(&self, id: TaskId) -> Result<Option<(Value, Option<String>)>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT envelope, traceparent FROM tasks WHERE task_id = $1 AND envelope IS NOT NULL",
                &[&id.as_uuid()],
            )
            .await
            .map_err(pg("read envelope"))?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Cancels a task that has not ended: it becomes `cancelled` at once (a dispatcher that
    /// follows its job stops it; a dispatcher that receives it later skips it). A task no
    /// dispatcher has received yet gets a row in the `cancelled` state, filled in when it
    /// arrives.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn cancel(&self, id: TaskId, reason: &str) -> Result<Cancel> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg("begin"))?;
        let now = Utc::now();
        let change = Change {
            evidence: crate::message::Evidence {
                terminal_reason: Some("Cancelled".into()),
                ..Default::default()
            },
            finished_at: Some(now),
            error: Some(
                json!({"kind": ErrorKind::Cancelled, "message": reason, "retryable": false}),
            ),
            detail: Some(json!({"reason": reason})),
            ..Change::default()
        };
        let outcome = match lock(&tx, id).await? {
            Some(locked) if locked.state.is_terminal() => Cancel::AlreadyEnded(locked.state),
            Some(locked) => {
                transition_in(&tx, id, locked.attempt, TaskState::Cancelled, &change).await?;
                Cancel::Cancelled(Some(locked.state))
            }
            None => {
                tx.execute(
                    "INSERT INTO tasks (task_id, task, executor, state, attempt, deadline,
                         submitted_at, finished_at, terminal_reason, error)
                     VALUES ($1, '', '', 'cancelled', 1, $2, $2, $2, 'Cancelled', $3)",
                    &[&id.as_uuid(), &now, &change.error],
                )
                .await
                .map_err(pg("insert cancelled task"))?;
                insert_event(&tx, id, Attempt::FIRST, "cancelled", change.detail.as_ref()).await?;
                tx.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&DONE_CHANNEL, &id.to_string()],
                )
                .await
                .map_err(pg("notify"))?;
                Cancel::Cancelled(None)
            }
        };
        tx.commit().await.map_err(pg("commit cancel"))?;
        Ok(outcome)
    }

    /// Task ids as they reach a terminal state, from a dedicated `LISTEN` connection. The
    /// stream ends when the connection is lost; listen again.
    ///
    /// # Errors
    /// The connection cannot be made.
    pub async fn terminal_notifications(
        &self,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<TaskId>> {
        let (client, messages) = self.dedicated_connection().await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // The client is handed over once it has said LISTEN.
        let (keep, _) = super::pool::drive(messages, move |payload| {
            payload
                .parse::<TaskId>()
                .map_or(true, |id| tx.send(id).is_ok())
        });
        client
            .batch_execute(&format!("LISTEN {DONE_CHANNEL}"))
            .await
            .map_err(pg("listen"))?;
        let _ = keep.send(client);
        Ok(rx)
    }

    /// Reopens a task for a replay of its dead letter: the one way out of a terminal state,
    /// recorded as a `replayed` event of the new attempt. Idempotent: replaying the same
    /// dead letter again changes nothing.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn record_replay(
        &self,
        id: TaskId,
        new_attempt: Attempt,
        dead_letter_id: uuid::Uuid,
    ) -> Result<Applied> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg("begin"))?;
        let Some(Locked {
            state: current,
            attempt,
            reply_to,
        }) = lock(&tx, id).await?
        else {
            return Ok(Applied::Unknown);
        };
        let detail = json!({"dead_letter_id": dead_letter_id, "from_state": current.as_str()});
        if attempt >= new_attempt
            || !insert_event(&tx, id, new_attempt, "replayed", Some(&detail)).await?
        {
            return Ok(Applied::Duplicate);
        }
        // `retrying` at the old attempt: the dispatcher takes the new attempt from there.
        tx.execute(
            "UPDATE tasks SET state = 'retrying', updated_at = now() WHERE task_id = $1",
            &[&id.as_uuid()],
        )
        .await
        .map_err(pg("reopen task"))?;
        tx.commit().await.map_err(pg("commit replay"))?;
        Ok(Applied::Changed { reply_to })
    }

    /// Notes that a task's result was forwarded to its `reply_to`.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn mark_forwarded(&self, id: TaskId) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE tasks SET forwarded_at = now() WHERE task_id = $1",
                &[&id.as_uuid()],
            )
            .await
            .map_err(pg("mark forwarded"))?;
        Ok(())
    }

    /// The W3C `traceparent` the task was received with, if it had one.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn traceparent(&self, id: TaskId) -> Result<Option<String>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT traceparent FROM tasks WHERE task_id = $1",
                &[&id.as_uuid()],
            )
            .await
            .map_err(pg("read traceparent"))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// One task, if known.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn task(&self, id: TaskId) -> Result<Option<TaskRecord>> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT * FROM tasks WHERE task_id = $1", &[&id.as_uuid()])
            .await
            .map_err(pg("read task"))?;
        row.as_ref().map(TaskRecord::from_row).transpose()
    }

    /// Tasks that are not terminal, for reconciliation at start.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn unfinished(&self, executor: Option<&ExecutorClass>) -> Result<Vec<TaskRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT * FROM tasks WHERE state IN ('received', 'dispatched', 'running', 'retrying')
                   AND ($1::text IS NULL OR executor = $1)",
                &[&executor],
            )
            .await
            .map_err(pg("read unfinished tasks"))?;
        rows.iter().map(TaskRecord::from_row).collect()
    }

    /// The events of a task, oldest first: `(attempt, event, detail, at)`.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn events(
        &self,
        id: TaskId,
    ) -> Result<Vec<(Attempt, String, Option<Value>, DateTime<Utc>)>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT attempt, event, detail, at FROM task_events WHERE task_id = $1 ORDER BY id",
                &[&id.as_uuid()],
            )
            .await
            .map_err(pg("read task events"))?;
        rows.iter()
            .map(|r| {
                let read = || pg("read task events");
                Ok((
                    r.try_get(0).map_err(read())?,
                    r.try_get(1).map_err(read())?,
                    r.try_get(2).map_err(read())?,
                    r.try_get(3).map_err(read())?,
                ))
            })
            .collect()
    }
}

/// What `cancel` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Cancel {
    /// Cancelled; the state it was in (`None`: no dispatcher had received it yet).
    Cancelled(Option<TaskState>),
    /// Too late: the task had already ended in this state.
    AlreadyEnded(TaskState),
}
