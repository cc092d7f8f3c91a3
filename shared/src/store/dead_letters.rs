//! Dead letters as the recorder sees them on the audit queue.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::pool::Store;
use super::rules::{Applied, Change, transition_in};
use super::sql::{DONE_CHANNEL, clean, pg, scrub};
use super::state::TaskState;
use crate::Result;
pub use crate::dead_letter::DeadLetter;
use crate::message::{Attempt, TaskId};

impl Store {
    /// Records dead letters in one transaction. A dead letter of a known task also ends the
    /// task: `expired` when it ran out of time, `dead_lettered` otherwise.
    ///
    /// # Errors
    /// Postgres errors; then nothing of the batch is recorded.
    pub async fn record_dead_letters(&self, letters: &[DeadLetter]) -> Result<Vec<Applied>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg("begin"))?;
        let mut outcomes = Vec::with_capacity(letters.len());
        for letter in letters {
            let d = &letter.label;
            let inserted = tx
                .execute(
                    "INSERT INTO dead_letters (id, message_id, task_id, task, executor, reason,
                         reason_kind, death, headers, body, body_truncated, dead_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                     ON CONFLICT (id) DO NOTHING",
                    &[
                        &d.id,
                        &clean(d.message_id.as_deref()),
                        &d.task_id.map(|t| t.as_uuid()),
                        &clean(d.task.as_deref()),
                        &clean(d.executor.as_deref()),
                        &clean(Some(&d.reason)),
                        &clean(Some(d.reason_kind())),
                        &letter.death.as_ref().map(scrub),
                        &scrub(&letter.headers),
                        &letter.body,
                        &letter.body_truncated,
                        &d.dead_at,
                    ],
                )
                .await
                .map_err(pg("insert dead letter"))?;
            let applied = match (inserted, d.task_id) {
                (1, Some(_)) if !letter.ends_task() => Applied::Unknown,
                (1, Some(task_id)) => {
                    let state = if d.reason_kind() == "expired" {
                        TaskState::Expired
                    } else {
                        TaskState::DeadLettered
                    };
                    let change = Change {
                        evidence: crate::message::Evidence {
                            terminal_reason: Some(d.reason.clone()),
                            ..Default::default()
                        },
                        finished_at: Some(d.dead_at),
                        error: Some(
                            json!({"kind": d.reason_kind(), "message": d.reason, "retryable": false}),
                        ),
                        detail: Some(json!({"dead_letter_id": d.id, "reason": d.reason})),
                        ..Change::default()
                    };
                    let attempt = d.attempt.and_then(Attempt::new).unwrap_or(Attempt::FIRST);
                    match transition_in(&tx, task_id, attempt, state, &change).await? {
                        Applied::Unknown => never_received(&tx, letter, task_id, state).await?,
                        other => other,
                    }
                }
                (1, None) => Applied::Unknown,
                _ => Applied::Duplicate,
            };
            outcomes.push(applied);
        }
        tx.commit().await.map_err(pg("commit dead letters"))?;
        Ok(outcomes)
    }

    /// Dead letters recorded, newest first: `(id, task_id, reason_kind, reason)`.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn dead_letters(
        &self,
        limit: i64,
    ) -> Result<Vec<(Uuid, Option<Uuid>, String, String)>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, task_id, reason_kind, reason FROM dead_letters ORDER BY dead_at DESC LIMIT $1",
                &[&limit],
            )
            .await
            .map_err(pg("read dead letters"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    /// Dead letters matching `filter`, newest first, one page; and how many match in all.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn find_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        limit: i64,
        offset: i64,
    ) -> Result<(Vec<DeadLetterRecord>, i64)> {
        let client = self.client().await?;
        let ids: Vec<Uuid> = filter.ids.clone();
        let task_id = filter.task_id.map(|t| t.as_uuid());
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
            &filter.reason_kind,
            &filter.executor,
            &filter.task,
            &task_id,
            &filter.since,
            &filter.until,
            &ids,
            &filter.include_handled,
        ];
        const WHERE: &str = "($1::text IS NULL OR reason_kind = $1)
              AND ($2::text IS NULL OR executor = $2)
              AND ($3::text IS NULL OR task = $3)
              AND ($4::uuid IS NULL OR task_id = $4)
              AND ($5::timestamptz IS NULL OR dead_at >= $5)
              AND ($6::timestamptz IS NULL OR dead_at < $6)
              AND (cardinality($7::uuid[]) = 0 OR id = ANY($7))
              AND ($8 OR (replayed_at IS NULL AND purged_at IS NULL))";
        let total: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM dead_letters WHERE {WHERE}"),
                &params,
            )
            .await
            .map_err(pg("count dead letters"))?
            .get(0);
        let mut page: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.to_vec();
        page.push(&limit);
        page.push(&offset);
        let rows = client
            .query(
                &format!(
                    "SELECT * FROM dead_letters WHERE {WHERE} ORDER BY dead_at DESC, id LIMIT $9 OFFSET $10"
                ),
                &page,
            )
            .await
            .map_err(pg("read dead letters"))?;
        Ok((rows.iter().map(DeadLetterRecord::from_row).collect(), total))
    }

    /// One dead letter by id.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn dead_letter(&self, id: Uuid) -> Result<Option<DeadLetterRecord>> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT * FROM dead_letters WHERE id = $1", &[&id])
            .await
            .map_err(pg("read dead letter"))?;
        Ok(row.as_ref().map(DeadLetterRecord::from_row))
    }

    /// Notes that a dead letter was replayed (taken out of `gantry.dead` and republished).
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn mark_replayed(&self, id: Uuid) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE dead_letters SET replayed_at = now(), replay_count = replay_count + 1 WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(pg("mark replayed"))?;
        Ok(())
    }

    /// Notes that a dead letter was purged from `gantry.dead`.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn mark_purged(&self, id: Uuid) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE dead_letters SET purged_at = now() WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(pg("mark purged"))?;
        Ok(())
    }
}

/// A task that died before any dispatcher received it (expired in its queue, refused as
/// invalid) still gets a row, so `gantry status` and `gantry wait` can say how it ended.
async fn never_received(
    tx: &tokio_postgres::Transaction<'_>,
    letter: &DeadLetter,
    task_id: TaskId,
    state: TaskState,
) -> Result<Applied> {
    let d = &letter.label;
    let envelope: Option<crate::message::TaskEnvelope> = serde_json::from_slice(&letter.body).ok();
    let (deadline, submitted_at) = envelope
        .as_ref()
        .map_or((d.dead_at, d.dead_at), |e| (e.deadline, e.submitted_at));
    let attempt = d.attempt.and_then(Attempt::new).unwrap_or(Attempt::FIRST);
    let error = json!({"kind": d.reason_kind(), "message": d.reason, "retryable": false});
    let inserted = tx
        .execute(
            "INSERT INTO tasks (task_id, task, executor, state, attempt, deadline, submitted_at,
                 received_at, finished_at, terminal_reason, error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10)
             ON CONFLICT (task_id) DO NOTHING",
            &[
                &task_id.as_uuid(),
                &clean(d.task.as_deref()).unwrap_or_default(),
                &clean(d.executor.as_deref()).unwrap_or_default(),
                &state,
                &attempt,
                &deadline,
                &submitted_at,
                &d.dead_at,
                &clean(Some(&d.reason)),
                &scrub(&error),
            ],
        )
        .await
        .map_err(pg("insert dead task"))?;
    if inserted == 0 {
        return Ok(Applied::Duplicate);
    }
    let detail = json!({"dead_letter_id": d.id, "reason": d.reason, "never_received": true});
    tx.execute(
        "INSERT INTO task_events (task_id, attempt, event, detail) VALUES ($1, $2, $3, $4)
         ON CONFLICT (task_id, attempt, event) DO NOTHING",
        &[&task_id.as_uuid(), &attempt, &state.as_str(), &detail],
    )
    .await
    .map_err(pg("insert task event"))?;
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&DONE_CHANNEL, &task_id.to_string()],
    )
    .await
    .map_err(pg("notify"))?;
    Ok(Applied::Changed { reply_to: None })
}

/// Which dead letters to select; every field that is set must match.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    /// `invalid`, `expired`, `delivery_limit`, `max_attempts`, …
    pub reason_kind: Option<String>,
    pub executor: Option<String>,
    /// Task name, e.g. `llm.chat`.
    pub task: Option<String>,
    pub task_id: Option<TaskId>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only these dead letters (empty: any).
    pub ids: Vec<Uuid>,
    /// Also those already replayed or purged.
    pub include_handled: bool,
}

/// A recorded dead letter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterRecord {
    pub id: Uuid,
    pub message_id: Option<String>,
    pub task_id: Option<Uuid>,
    pub task: Option<String>,
    pub executor: Option<String>,
    pub reason: String,
    pub reason_kind: String,
    pub death: Option<Value>,
    pub headers: Value,
    #[serde(skip)]
    pub body: Vec<u8>,
    pub body_truncated: bool,
    pub dead_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
    pub replay_count: i32,
    pub purged_at: Option<DateTime<Utc>>,
}

impl DeadLetterRecord {
    fn from_row(r: &tokio_postgres::Row) -> Self {
        DeadLetterRecord {
            id: r.get("id"),
            message_id: r.get("message_id"),
            task_id: r.get("task_id"),
            task: r.get("task"),
            executor: r.get("executor"),
            reason: r.get("reason"),
            reason_kind: r.get("reason_kind"),
            death: r.get("death"),
            headers: r.get("headers"),
            body: r.get("body"),
            body_truncated: r.get("body_truncated"),
            dead_at: r.get("dead_at"),
            recorded_at: r.get("recorded_at"),
            replayed_at: r.get("replayed_at"),
            replay_count: r.get("replay_count"),
            purged_at: r.get("purged_at"),
        }
    }
}
