//! Task rows and their transitions.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio_postgres::{AsyncMessage, NoTls, Row, Statement};
use tracing::{debug, instrument};

use super::batch::{self, Transition};
use super::{DONE_CHANNEL, Store, TaskState, clean, pg, scrub};
use crate::message::{Evidence, Task, TaskId, TaskResult};
use crate::{Error, Result};

/// A task as stored, for `gantry status` and the CLI's `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskRecord {
    pub task_id: TaskId,
    pub task: String,
    pub executor: String,
    pub state: String,
    pub attempt: i32,
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
    pub result: Option<Value>,
    pub error: Option<Value>,
    pub forwarded_at: Option<DateTime<Utc>>,
}

impl TaskRecord {
    /// The parsed state.
    pub fn state(&self) -> TaskState {
        self.state.parse().unwrap_or(TaskState::Received)
    }

    fn from_row(r: &Row) -> Self {
        TaskRecord {
            task_id: TaskId::from(r.get::<_, uuid::Uuid>("task_id")),
            task: r.get("task"),
            executor: r.get("executor"),
            state: r.get("state"),
            attempt: r.get("attempt"),
            reply_to: r.get("reply_to"),
            deadline: r.get("deadline"),
            submitted_at: r.get("submitted_at"),
            received_at: r.get("received_at"),
            dispatched_at: r.get("dispatched_at"),
            started_at: r.get("started_at"),
            finished_at: r.get("finished_at"),
            dispatch_id: r.get("dispatch_id"),
            job_name: r.get("job_name"),
            pod_name: r.get("pod_name"),
            node: r.get("node"),
            terminal_reason: r.get("terminal_reason"),
            result: r.get("result"),
            error: r.get("error"),
            forwarded_at: r.get("forwarded_at"),
        }
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
    Stale { current: TaskState, attempt: i32 },
    /// No such task.
    Unknown,
}

impl Applied {
    pub fn changed(&self) -> bool {
        matches!(self, Applied::Changed { .. })
    }
}

impl Store {
    /// Records that a task was received (or a new attempt of it). Idempotent: returns the
    /// task's current state and attempt whether or not this call changed anything.
    ///
    /// # Errors
    /// Postgres errors.
    #[instrument(skip_all, fields(task_id = %task.id, attempt = task.attempt))]
    pub async fn record_received(&self, task: &Task) -> Result<(TaskState, i32)> {
        let received = self.record_received_many(&[task]).await?;
        Ok(received
            .first()
            .copied()
            .unwrap_or((TaskState::Received, attempt_i32(task.attempt))))
    }

    /// [`Store::record_received`] for many tasks, in one transaction; each task's state and
    /// attempt afterwards, in the order given.
    ///
    /// # Errors
    /// Postgres errors; then nothing of the batch is recorded.
    #[instrument(skip_all, fields(batch = tasks.len()))]
    pub async fn record_received_many(&self, tasks: &[&Task]) -> Result<Vec<(TaskState, i32)>> {
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
        attempt: u32,
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

    /// The executor class of each known task among `ids`.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn executors(
        &self,
        ids: &[TaskId],
    ) -> Result<std::collections::HashMap<TaskId, String>> {
        let client = self.client().await?;
        let uuids: Vec<uuid::Uuid> = ids.iter().map(TaskId::as_uuid).collect();
        let rows = client
            .query(
                "SELECT task_id, executor FROM tasks WHERE task_id = ANY($1)",
                &[&uuids],
            )
            .await
            .map_err(pg("read executors"))?;
        Ok(rows
            .iter()
            .map(|r| (TaskId::from(r.get::<_, uuid::Uuid>(0)), r.get(1)))
            .collect())
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
            error: Some(json!({"kind": "cancelled", "message": reason, "retryable": false})),
            detail: Some(json!({"reason": reason})),
            ..Change::default()
        };
        let outcome = match lock(&tx, id).await? {
            Some(locked) if locked.state.is_terminal() => Cancel::AlreadyEnded(locked.state),
            Some(locked) => {
                let attempt = u32::try_from(locked.attempt).unwrap_or(1);
                transition_in(&tx, id, attempt, TaskState::Cancelled, &change).await?;
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
                insert_event(&tx, id, 1, "cancelled", change.detail.as_ref()).await?;
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
        let mut config = self.config.clone();
        config.connect_timeout(Duration::from_secs(10));
        let (client, mut connection) = config.connect(NoTls).await.map_err(pg("connect"))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (keep, kept) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            // The client is handed over once it has said LISTEN: owning it keeps the session
            // open for as long as notifications are read.
            let mut kept = kept;
            let mut _client = None;
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            loop {
                tokio::select! {
                    c = &mut kept, if _client.is_none() => match c {
                        Ok(c) => _client = Some(c),
                        Err(_) => break,
                    },
                    message = messages.next() => match message {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            if let Ok(id) = n.payload().parse::<TaskId>()
                                && tx.send(id).is_err()
                            {
                                break;
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                }
            }
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
        new_attempt: u32,
        dead_letter_id: uuid::Uuid,
    ) -> Result<Applied> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg("begin"))?;
        let new_attempt = attempt_i32(new_attempt);
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
        Ok(row.as_ref().map(TaskRecord::from_row))
    }

    /// Tasks that are not terminal, for reconciliation at start.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn unfinished(&self, executor: Option<&str>) -> Result<Vec<TaskRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT * FROM tasks WHERE state IN ('received', 'dispatched', 'running', 'retrying')
                   AND ($1::text IS NULL OR executor = $1)",
                &[&executor],
            )
            .await
            .map_err(pg("read unfinished tasks"))?;
        Ok(rows.iter().map(TaskRecord::from_row).collect())
    }

    /// The events of a task, oldest first: `(attempt, event, detail, at)`.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn events(
        &self,
        id: TaskId,
    ) -> Result<Vec<(i32, String, Option<Value>, DateTime<Utc>)>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT attempt, event, detail, at FROM task_events WHERE task_id = $1 ORDER BY id",
                &[&id.as_uuid()],
            )
            .await
            .map_err(pg("read task events"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    /// Waits until the task is terminal and returns it. Listens on [`DONE_CHANNEL`] on a
    /// dedicated connection, so it reacts when the recorder commits, without polling.
    ///
    /// # Errors
    /// [`Error::WaitTimeout`], [`Error::UnknownTask`] if the task never appears, or Postgres
    /// errors.
    pub async fn wait_terminal(&self, id: TaskId, timeout: Duration) -> Result<TaskRecord> {
        let mut config = self.config.clone();
        config.connect_timeout(Duration::from_secs(10));
        let (client, mut connection) = config.connect(NoTls).await.map_err(pg("connect"))?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message
                    && tx.send(n.payload().to_owned()).is_err()
                {
                    break;
                }
            }
        });
        let wanted = id.to_string();
        let waiting = async {
            client
                .batch_execute(&format!("LISTEN {DONE_CHANNEL}"))
                .await
                .map_err(pg("listen"))?;
            loop {
                // Check after LISTEN so a commit between the two is never missed.
                if let Some(record) = self.task(id).await?
                    && record.state().is_terminal()
                {
                    return Ok(record);
                }
                loop {
                    match rx.recv().await {
                        Some(payload) if payload == wanted => break,
                        Some(_) => continue,
                        None => return Err(Error::ListenLost),
                    }
                }
                debug!(task_id = %id, "task finished");
            }
        };
        let outcome = tokio::time::timeout(timeout, waiting).await;
        driver.abort();
        match outcome {
            Ok(r) => r,
            Err(_) => match self.task(id).await? {
                Some(_) => Err(Error::WaitTimeout(timeout)),
                None => Err(Error::UnknownTask(id)),
            },
        }
    }
}

pub(super) fn attempt_i32(attempt: u32) -> i32 {
    i32::try_from(attempt).unwrap_or(i32::MAX)
}

/// A statement of the task lifecycle's hot path, prepared once per connection (the pool's
/// cache): Postgres parses and plans it once, and each use is one round trip, not two.
pub(super) async fn cached(tx: &Transaction<'_>, sql: &str) -> Result<Statement> {
    tx.prepare_cached(sql)
        .await
        .map_err(pg("prepare a task statement"))
}

async fn insert_event(
    tx: &Transaction<'_>,
    id: TaskId,
    attempt: i32,
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

/// What `cancel` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Cancel {
    /// Cancelled; the state it was in (`None`: no dispatcher had received it yet).
    Cancelled(Option<TaskState>),
    /// Too late: the task had already ended in this state.
    AlreadyEnded(TaskState),
}

/// A task row, locked for the rest of the transaction.
pub(super) struct Locked {
    pub(super) state: TaskState,
    pub(super) attempt: i32,
    pub(super) reply_to: Option<String>,
}

impl Locked {
    fn from_row(row: &Row) -> Locked {
        Locked {
            state: row
                .get::<_, String>("state")
                .parse()
                .unwrap_or(TaskState::Received),
            attempt: row.get("attempt"),
            reply_to: row.get("reply_to"),
        }
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
    Ok(rows
        .iter()
        .map(|row| (row.get("task_id"), Locked::from_row(row)))
        .collect())
}

/// `received` for a task Postgres knows already: a new attempt (retry or replay), which may
/// carry a new deadline, or a repeated delivery of an attempt, which changes nothing and is
/// answered with the task's state as it stands (a repeat of an attempt that has ended must
/// say so, or the dispatcher would run it again).
pub(super) async fn received_again(tx: &Transaction<'_>, task: &Task) -> Result<(TaskState, i32)> {
    let attempt = attempt_i32(task.attempt);
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

async fn lock(tx: &Transaction<'_>, id: TaskId) -> Result<Option<Locked>> {
    let select = cached(
        tx,
        "SELECT state, attempt, reply_to FROM tasks WHERE task_id = $1 FOR UPDATE",
    )
    .await?;
    let row = tx
        .query_opt(&select, &[&id.as_uuid()])
        .await
        .map_err(pg("lock task"))?;
    Ok(row.as_ref().map(Locked::from_row))
}

/// The transition rule, applied under a row lock.
pub(super) async fn transition_in(
    tx: &Transaction<'_>,
    id: TaskId,
    attempt: u32,
    state: TaskState,
    change: &Change,
) -> Result<Applied> {
    let attempt = attempt_i32(attempt);
    let Some(Locked {
        state: current,
        attempt: current_attempt,
        reply_to,
    }) = lock(tx, id).await?
    else {
        return Ok(Applied::Unknown);
    };
    let event = state.as_str();
    if !current.can_become(current_attempt.max(0) as u32, state, attempt.max(0) as u32) {
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
                 terminal_reason = NULL, result = NULL, error = NULL
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
             result = coalesce($12, result), error = coalesce($13, error)
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
        ],
    )
    .await
    .map_err(pg("update task"))?;
    if state.is_terminal() {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&DONE_CHANNEL, &id.to_string()],
        )
        .await
        .map_err(pg("notify"))?;
    }
    Ok(Applied::Changed { reply_to })
}
