//! The task lifecycle's writes for many tasks at once: a set of `received` records, or of
//! transitions, in one transaction of a few statements, whatever the number of tasks.
//!
//! Each applies exactly the rules of its one-task form ([`Store::record_received`](super::Store::record_received),
//! [`transition_in`]): the common case (a new task; a task moving forward within its
//! attempt) is written set-wise, with arrays bound to `unnest`; the rare ones (a
//! redelivery, a new attempt, a late or duplicate event) go through the one-task code in
//! the same transaction. A task named twice in one call is written in two rounds, in the
//! order given, so the second sees the first.
//!
//! One transaction per task made Postgres, and the round trips to it, the larger part of
//! a dispatch's cost (three transactions of four or five statements per task); a batch
//! costs its few statements and one commit.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use serde_json::Value;
use uuid::Uuid;

use super::rules::{Applied, Change, lock_all, received_again, transition_in};
use super::sql::{DONE_CHANNEL, cached, clean, pg, scrub};
use super::state::TaskState;
use crate::Result;
use crate::message::{Attempt, Task, TaskId};

/// One transition to apply, for [`Store::transitions`](super::Store::transitions).
#[derive(Debug, Clone)]
pub struct Transition {
    pub id: TaskId,
    pub attempt: Attempt,
    pub state: TaskState,
    pub change: Change,
}

/// Splits `0..n` into rounds in which each key appears at most once, keeping the order of
/// each key's items across rounds.
fn rounds<K: Eq + std::hash::Hash>(keys: &[K]) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut seen: HashMap<&K, usize> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        let round = seen.entry(key).and_modify(|r| *r += 1).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(i);
    }
    rounds
}

/// [`transition_in`] for many, in `tx`; the outcomes in the order of `batch`.
pub(super) async fn transitions_in(
    tx: &Transaction<'_>,
    batch: &[Transition],
) -> Result<Vec<Applied>> {
    let mut out: Vec<Option<Applied>> = vec![None; batch.len()];
    let ids: Vec<TaskId> = batch.iter().map(|t| t.id).collect();
    for round in rounds(&ids) {
        transition_round(tx, batch, &round, &mut out).await?;
    }
    Ok(out
        .into_iter()
        .map(|a| a.unwrap_or(Applied::Unknown))
        .collect())
}

/// One round: `indices` name distinct tasks.
async fn transition_round(
    tx: &Transaction<'_>,
    batch: &[Transition],
    indices: &[usize],
    out: &mut [Option<Applied>],
) -> Result<()> {
    let ids: Vec<Uuid> = indices.iter().map(|&i| batch[i].id.as_uuid()).collect();
    let locked = lock_all(tx, &ids).await?;
    // The transitions the common case covers; the others, one at a time.
    let mut fast = Vec::with_capacity(indices.len());
    for &i in indices {
        let t = &batch[i];
        let Some(current) = locked.get(&t.id.as_uuid()) else {
            out[i] = Some(Applied::Unknown);
            continue;
        };
        let forward = current
            .state
            .can_become(current.attempt, t.state, t.attempt);
        if forward && t.attempt == current.attempt {
            fast.push(i);
        } else {
            out[i] = Some(transition_in(tx, t.id, t.attempt, t.state, &t.change).await?);
        }
    }
    if fast.is_empty() {
        return Ok(());
    }
    let recorded = insert_events(
        tx,
        fast.iter().map(|&i| {
            let t = &batch[i];
            (t.id, t.attempt, t.state.as_str(), t.change.detail.as_ref())
        }),
    )
    .await?;
    let mut changed = Vec::with_capacity(fast.len());
    for i in fast {
        let t = &batch[i];
        if recorded.contains(&(t.id.as_uuid(), t.attempt)) {
            let reply_to = locked.get(&t.id.as_uuid()).and_then(|l| l.reply_to.clone());
            out[i] = Some(Applied::Changed { reply_to });
            changed.push(t);
        } else {
            out[i] = Some(Applied::Duplicate);
        }
    }
    update_tasks(tx, &changed).await?;
    let done: Vec<String> = changed
        .iter()
        .filter(|t| t.state.ends_attempt())
        .map(|t| t.id.to_string())
        .collect();
    if !done.is_empty() {
        tx.execute(
            "SELECT pg_notify($1, id) FROM unnest($2::text[]) AS id",
            &[&DONE_CHANNEL, &done],
        )
        .await
        .map_err(pg("notify"))?;
    }
    Ok(())
}

/// Inserts events `(task, attempt, event, detail)` of distinct tasks; returns the
/// `(task, attempt)` of those that were new.
async fn insert_events<'a>(
    tx: &Transaction<'_>,
    events: impl Iterator<Item = (TaskId, Attempt, &'a str, Option<&'a Value>)>,
) -> Result<HashSet<(Uuid, Attempt)>> {
    let (mut ids, mut attempts, mut names, mut details) = (vec![], vec![], vec![], vec![]);
    for (id, attempt, event, detail) in events {
        ids.push(id.as_uuid());
        attempts.push(attempt);
        names.push(event);
        details.push(detail.map(scrub));
    }
    let insert = cached(
        tx,
        "INSERT INTO task_events (task_id, attempt, event, detail)
         SELECT * FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::jsonb[])
         ON CONFLICT (task_id, attempt, event) DO NOTHING
         RETURNING task_id, attempt",
    )
    .await?;
    let rows = tx
        .query(&insert, &[&ids, &attempts, &names, &details])
        .await
        .map_err(pg("insert task events"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The task rows of transitions that were recorded (distinct tasks, same attempt), as
/// [`transition_in`] writes one.
async fn update_tasks(tx: &Transaction<'_>, changed: &[&Transition]) -> Result<()> {
    if changed.is_empty() {
        return Ok(());
    }
    let now = Utc::now();
    let n = changed.len();
    let mut ids = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut text: [Vec<Option<String>>; 5] = Default::default();
    let mut times: [Vec<Option<DateTime<Utc>>>; 3] = Default::default();
    let (mut results, mut errors) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut warm_seqs: Vec<Option<i32>> = Vec::with_capacity(n);
    for t in changed {
        let (c, e) = (&t.change, &t.change.evidence);
        ids.push(t.id.as_uuid());
        states.push(t.state.as_str());
        attempts.push(t.attempt);
        for (column, value) in text.iter_mut().zip([
            &e.dispatch_id,
            &e.job_name,
            &e.pod_name,
            &e.node,
            &e.terminal_reason,
        ]) {
            column.push(clean(value.as_deref()));
        }
        warm_seqs.push(e.warm_seq.and_then(|n| i32::try_from(n).ok()));
        let dispatched_at = c
            .dispatched_at
            .or((t.state == TaskState::Dispatched).then_some(now));
        let started_at = c
            .started_at
            .or((t.state == TaskState::Running).then_some(now));
        for (column, value) in times
            .iter_mut()
            .zip([dispatched_at, started_at, c.finished_at])
        {
            column.push(value);
        }
        results.push(c.result.as_ref().map(scrub));
        errors.push(c.error.as_ref().map(scrub));
    }
    let update = cached(
        tx,
        "UPDATE tasks SET state = u.state, attempt = u.attempt, updated_at = now(),
             dispatch_id = coalesce(u.dispatch_id, tasks.dispatch_id),
             job_name = coalesce(u.job_name, tasks.job_name),
             pod_name = coalesce(u.pod_name, tasks.pod_name),
             node = coalesce(u.node, tasks.node),
             terminal_reason = coalesce(u.terminal_reason, tasks.terminal_reason),
             dispatched_at = coalesce(tasks.dispatched_at, u.dispatched_at),
             started_at = coalesce(tasks.started_at, u.started_at),
             finished_at = coalesce(u.finished_at, tasks.finished_at),
             result = coalesce(u.result, tasks.result), error = coalesce(u.error, tasks.error),
             warm_seq = coalesce(u.warm_seq, tasks.warm_seq)
         FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[],
                     $11::timestamptz[], $12::jsonb[], $13::jsonb[], $14::int4[])
             AS u(task_id, state, attempt, dispatch_id, job_name, pod_name, node,
                  terminal_reason, dispatched_at, started_at, finished_at, result, error,
                  warm_seq)
         WHERE tasks.task_id = u.task_id",
    )
    .await?;
    let [dispatch_id, job_name, pod_name, node, terminal_reason] = &text;
    let [dispatched_at, started_at, finished_at] = &times;
    tx.execute(
        &update,
        &[
            &ids,
            &states,
            &attempts,
            dispatch_id,
            job_name,
            pod_name,
            node,
            terminal_reason,
            dispatched_at,
            started_at,
            finished_at,
            &results,
            &errors,
            &warm_seqs,
        ],
    )
    .await
    .map_err(pg("update tasks"))?;
    Ok(())
}

/// [`Store::record_received`](super::Store::record_received)(super::Store::record_received) for many, in `tx`; for each
/// task, its state and attempt afterwards, in the order of `tasks`.
pub(super) async fn received_in(
    tx: &Transaction<'_>,
    tasks: &[&Task],
) -> Result<Vec<(TaskState, Attempt)>> {
    let mut out: Vec<Option<(TaskState, Attempt)>> = vec![None; tasks.len()];
    let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
    for round in rounds(&ids) {
        received_round(tx, tasks, &round, &mut out).await?;
    }
    Ok(out
        .into_iter()
        .zip(tasks)
        .map(|(o, t)| o.unwrap_or((TaskState::Received, t.attempt)))
        .collect())
}

/// One round: `indices` name distinct tasks.
async fn received_round(
    tx: &Transaction<'_>,
    tasks: &[&Task],
    indices: &[usize],
    out: &mut [Option<(TaskState, Attempt)>],
) -> Result<()> {
    let n = indices.len();
    let mut ids = Vec::with_capacity(n);
    let (mut names, mut executors) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut attempts = Vec::with_capacity(n);
    let mut text: [Vec<Option<String>>; 3] = Default::default();
    let (mut deadlines, mut submitted) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut envelopes = Vec::with_capacity(n);
    for &i in indices {
        let t = tasks[i];
        ids.push(t.id.as_uuid());
        names.push(t.name.as_str());
        executors.push(t.executor.as_str());
        attempts.push(t.attempt);
        for (column, value) in
            text.iter_mut()
                .zip([&t.reply_to, &t.idempotency_key, &t.traceparent])
        {
            column.push(value.clone());
        }
        deadlines.push(t.deadline);
        submitted.push(t.submitted_at);
        envelopes.push(scrub(&serde_json::to_value(t.envelope())?));
    }
    // `xmax = 0` tells a fresh row from a cancelled placeholder filled in here.
    let insert = cached(
        tx,
        "INSERT INTO tasks (task_id, task, executor, state, attempt, reply_to,
                 idempotency_key, traceparent, deadline, submitted_at, envelope)
             SELECT u.task_id, u.task, u.executor, 'received', u.attempt, u.reply_to,
                    u.idempotency_key, u.traceparent, u.deadline, u.submitted_at, u.envelope
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int4[], $5::text[],
                           $6::text[], $7::text[], $8::timestamptz[], $9::timestamptz[],
                           $10::jsonb[])
                 AS u(task_id, task, executor, attempt, reply_to, idempotency_key,
                      traceparent, deadline, submitted_at, envelope)
              ORDER BY u.task_id
             ON CONFLICT (task_id) DO UPDATE SET task = EXCLUDED.task,
                 executor = EXCLUDED.executor, deadline = EXCLUDED.deadline,
                 submitted_at = EXCLUDED.submitted_at, reply_to = EXCLUDED.reply_to,
                 envelope = EXCLUDED.envelope
             WHERE tasks.task = '' AND tasks.state = 'cancelled'
             RETURNING task_id, (xmax = 0)",
    )
    .await?;
    let [reply_to, idempotency_key, traceparent] = &text;
    let rows = tx
        .query(
            &insert,
            &[
                &ids,
                &names,
                &executors,
                &attempts,
                reply_to,
                idempotency_key,
                traceparent,
                &deadlines,
                &submitted,
                &envelopes,
            ],
        )
        .await
        .map_err(pg("insert tasks"))?;
    let written: HashMap<Uuid, bool> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut fresh = Vec::new();
    for &i in indices {
        let t = tasks[i];
        let attempt = t.attempt;
        out[i] = match written.get(&t.id.as_uuid()) {
            Some(true) => {
                fresh.push(t);
                Some((TaskState::Received, attempt))
            }
            // Cancelled before any dispatcher received it.
            Some(false) => Some((TaskState::Cancelled, attempt)),
            // Known already: a redelivery, or a new attempt.
            None => Some(received_again(tx, t).await?),
        };
    }
    if !fresh.is_empty() {
        insert_events(
            tx,
            fresh.iter().map(|t| (t.id, t.attempt, "received", None)),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::rounds;

    #[test]
    fn a_key_named_twice_is_written_in_a_later_round_in_its_order() {
        assert_eq!(
            rounds(&["a", "b", "a", "c", "a", "b"]),
            vec![vec![0, 1, 3], vec![2, 5], vec![4]]
        );
        assert!(rounds::<u8>(&[]).is_empty());
    }
}
