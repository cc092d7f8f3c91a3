//! Dead letters as the recorder sees them on the audit queue.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::tasks::{Applied, Change};
use super::{Store, TaskState, pg};
use crate::Result;
use crate::message::TaskId;

/// One dead letter, ready to record.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Stable id: the publisher's `x-gantry-dead-letter-id`, or derived from the message and
    /// its death, so a redelivered audit copy is recorded once.
    pub id: Uuid,
    pub message_id: Option<String>,
    pub task_id: Option<TaskId>,
    pub attempt: Option<u32>,
    pub task: Option<String>,
    pub executor: Option<String>,
    /// `invalid: unknown executor "vlm"`, `expired`, `delivery_limit`, …
    pub reason: String,
    pub death: Option<Value>,
    pub headers: Value,
    pub body: Vec<u8>,
    pub body_truncated: bool,
    pub dead_at: DateTime<Utc>,
}

impl DeadLetter {
    /// The reason kind: the text before the first colon (`invalid`, `expired`, …).
    pub fn reason_kind(&self) -> &str {
        self.reason
            .split_once(':')
            .map_or(self.reason.as_str(), |(k, _)| k)
            .trim()
    }
}

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
        for d in letters {
            let inserted = tx
                .execute(
                    "INSERT INTO dead_letters (id, message_id, task_id, task, executor, reason,
                         reason_kind, death, headers, body, body_truncated, dead_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                     ON CONFLICT (id) DO NOTHING",
                    &[
                        &d.id,
                        &d.message_id,
                        &d.task_id.map(|t| t.as_uuid()),
                        &d.task,
                        &d.executor,
                        &d.reason,
                        &d.reason_kind(),
                        &d.death,
                        &d.headers,
                        &d.body,
                        &d.body_truncated,
                        &d.dead_at,
                    ],
                )
                .await
                .map_err(pg("insert dead letter"))?;
            let applied = match (inserted, d.task_id) {
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
                    super::tasks::transition_in(
                        &tx,
                        task_id,
                        d.attempt.unwrap_or(1),
                        state,
                        &change,
                    )
                    .await?
                }
                (1, None) => Applied::Unknown,
                _ => Applied::Duplicate,
            };
            outcomes.push(applied);
        }
        tx.commit().await.map_err(pg("commit dead letters"))?;
        Ok(outcomes)
    }

    /// Dead letters recorded, newest first (for tests and `gantry dlq list`).
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
}
