//! What the dispatchers that share one database share beside the task rows: who is alive,
//! how many attempts of a class hold a job, and the claims a dead dispatcher left.
//!
//! - A dispatcher's *presence* ([`Store::be_present`]) is a session advisory lock, keyed by
//!   a random id, that it holds on a connection of its own for as long as it lives (and
//!   takes again, under the same id, after that connection is lost). Postgres drops the
//!   lock when the connection closes, which a killed process's does at once: whoever can
//!   take the lock knows its holder is gone.
//! - A *claim with capacity* ([`Store::claim`]) is the attempt's `dispatched` claim, taken
//!   only while fewer than the class's limit of its attempts hold a job of their own
//!   (`dispatched` or `running`, not on a warm executor), counted in `tasks` under a lock of
//!   the class held for the claim's transaction. The claim names its dispatcher. The unit
//!   is given back when the attempt ends (a result, `retrying`, a cancel), by whichever
//!   process records that, so it outlives the dispatcher that took it.
//! - *Adoption* ([`Store::adopt`]) hands the claims of dispatchers whose presence is gone to
//!   a live one, each to exactly one: the dead one's lock, taken for the transaction that
//!   moves its claims, is the proof that it is gone and that no other dispatcher is taking
//!   them at the same moment.

use std::collections::HashSet;

use tokio::sync::oneshot;

use super::batch::{Transition, transitions_in};
use super::pool::Store;
use super::rules::{Applied, Change, lock, transition_in};
use super::sql::pg;
use super::state::TaskState;
use super::tasks::TaskRecord;
use crate::Result;
use crate::message::{Attempt, ExecutorClass, TaskId};

/// Names the class locks among advisory locks of two keys (the other key: the class's
/// `hashtext`). Presence locks are of one key, a space of their own.
pub(super) const CLASS_LOCK: i32 = 0x6761_6e74;

/// Attempts that hold a job of their own (what capacity counts and adoption moves).
const HOLDS_A_JOB: &str = "state IN ('dispatched', 'running') AND warm_seq IS NULL";

/// A dispatcher's presence: its id, held as a lock for as long as the connection lives.
#[derive(Debug)]
pub struct Presence {
    /// The id its claims carry.
    pub id: i64,
    /// Resolves when the connection that holds the lock is gone: from then on, peers may
    /// take this dispatcher's claims over.
    pub lost: oneshot::Receiver<()>,
}

/// One claim with capacity, for [`Store::claim`].
#[derive(Debug, Clone)]
pub struct Claim {
    pub id: TaskId,
    pub attempt: Attempt,
    pub change: Change,
    pub executor: ExecutorClass,
    /// Most attempts of the class that may hold a job at once.
    pub limit: u32,
    /// The claiming dispatcher's [`Presence::id`].
    pub dispatcher: i64,
}

/// What a claim did.
#[derive(Debug, Clone, PartialEq)]
pub enum Claimed {
    /// The claim's write, as [`Store::transition`] answers it: `Changed` is the claim.
    Applied(Applied),
    /// The attempt could be claimed, but `active` attempts of its class hold a job already,
    /// no fewer than the limit: nothing was written.
    Full { active: u32 },
}

impl Store {
    /// Makes this process present as `id`, or as a fresh id when `None`: takes the id's
    /// lock on a connection of its own, kept open until the process ends or the connection
    /// is lost. `None` when another session holds the lock of `id`.
    ///
    /// # Errors
    /// The connection cannot be made, or the lock cannot be asked for.
    pub async fn be_present(&self, id: Option<i64>) -> Result<Option<Presence>> {
        let (client, messages) = self.dedicated_connection().await?;
        // The client is handed over once it holds the lock.
        let (keep, lost) = super::pool::drive(messages, |_| true);
        let id = loop {
            let candidate = id.unwrap_or_else(|| {
                let (random, _) = uuid::Uuid::new_v4().as_u64_pair();
                i64::from_ne_bytes(random.to_ne_bytes())
            });
            let taken: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&candidate])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(pg("take the presence lock"))?;
            match (taken, id) {
                (true, _) => break candidate,
                (false, Some(_)) => return Ok(None),
                (false, None) => continue,
            }
        };
        let _ = keep.send(client);
        Ok(Some(Presence { id, lost }))
    }

    /// Claims an attempt (its `dispatched` event, as [`Store::transition`] writes it) for
    /// the dispatcher `claim.dispatcher`, if its class has room: fewer than `claim.limit`
    /// of its attempts hold a job. Claims of one class are taken one transaction at a time.
    ///
    /// # Errors
    /// Postgres errors; then nothing is claimed.
    pub async fn claim(&self, claim: &Claim) -> Result<Claimed> {
        let mut claimed = self.claim_many(std::slice::from_ref(claim)).await?;
        Ok(claimed.pop().unwrap_or(Claimed::Applied(Applied::Unknown)))
    }

    /// [`Store::claim`] for many, in one transaction per class; what each did, in the order
    /// given. A class's room goes to its claims in that order.
    ///
    /// # Errors
    /// Postgres errors; then nothing is claimed.
    #[tracing::instrument(skip_all, fields(claims = claims.len()))]
    pub async fn claim_many(&self, claims: &[Claim]) -> Result<Vec<Claimed>> {
        let mut out: Vec<Option<Claimed>> = vec![None; claims.len()];
        let mut classes: Vec<&ExecutorClass> = claims.iter().map(|c| &c.executor).collect();
        classes.sort();
        classes.dedup();
        let mut client = self.client().await?;
        for class in classes {
            let of_class: Vec<usize> = (0..claims.len())
                .filter(|&i| &claims[i].executor == class)
                .collect();
            let tx = client.transaction().await.map_err(pg("begin"))?;
            claim_class(&tx, claims, &of_class, &mut out).await?;
            tx.commit().await.map_err(pg("commit claims"))?;
        }
        Ok(out
            .into_iter()
            .map(|c| c.unwrap_or(Claimed::Applied(Applied::Unknown)))
            .collect())
    }

    /// Hands to the dispatcher `me` the claims (attempts with a job of their own, not yet
    /// ended) of every dispatcher of the runtime instance `instance` whose presence is
    /// gone, and those no dispatcher is named on (made before dispatchers were); returns
    /// them. Each claim is handed to one dispatcher only.
    ///
    /// # Errors
    /// Postgres errors; the claims not yet moved stay where they were.
    #[tracing::instrument(skip(self))]
    pub async fn adopt(&self, me: i64, instance: &str) -> Result<Vec<TaskRecord>> {
        let prefix = format!("{instance}.");
        let mut client = self.client().await?;
        let owners: Vec<Option<i64>> = client
            .query(
                &format!(
                    "SELECT DISTINCT dispatcher FROM tasks WHERE {HOLDS_A_JOB}
                       AND dispatcher IS DISTINCT FROM $1
                       AND left(dispatch_id, length($2)) = $2"
                ),
                &[&me, &prefix],
            )
            .await
            .map_err(pg("read the claiming dispatchers"))?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(pg("read the claiming dispatchers"))?;
        let mut adopted = Vec::new();
        for owner in owners {
            let tx = client.transaction().await.map_err(pg("begin"))?;
            if let Some(owner) = owner
                && !gone(&tx, owner).await?
            {
                continue;
            }
            let rows = tx
                .query(
                    &format!(
                        "UPDATE tasks SET dispatcher = $1
                          WHERE dispatcher IS NOT DISTINCT FROM $2 AND {HOLDS_A_JOB}
                            AND left(dispatch_id, length($3)) = $3
                         RETURNING *"
                    ),
                    &[&me, &owner, &prefix],
                )
                .await
                .map_err(pg("adopt a gone dispatcher's claims"))?;
            tx.commit().await.map_err(pg("commit adoption"))?;
            for row in &rows {
                adopted.push(TaskRecord::from_row(row)?);
            }
        }
        Ok(adopted)
    }

    /// The attempts holding a job that other dispatchers than `me` claimed and still hold.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn held_by_others(&self, me: i64) -> Result<HashSet<(TaskId, Attempt)>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT task_id, attempt FROM tasks WHERE {HOLDS_A_JOB}
                       AND dispatcher IS NOT NULL AND dispatcher <> $1"
                ),
                &[&me],
            )
            .await
            .map_err(pg("read the claims of other dispatchers"))?;
        rows.iter()
            .map(|r| {
                let read = || pg("read the claims of other dispatchers");
                let id = TaskId::from(r.try_get::<_, uuid::Uuid>(0).map_err(read())?);
                Ok((id, r.try_get(1).map_err(read())?))
            })
            .collect()
    }
}

/// Whether the dispatcher `owner` is gone: its presence lock is free. If so, `tx` holds
/// that lock until it ends, so no other dispatcher takes over the same claims meanwhile.
pub(super) async fn gone(tx: &deadpool_postgres::Transaction<'_>, owner: i64) -> Result<bool> {
    tx.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&owner])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(pg("test a dispatcher's presence"))
}

/// The claims `indices` of one class, under its lock, in `tx`: as many as its room allows,
/// in order; the rest are `Full`, but for those whose write would change nothing anyway (a
/// repeated delivery of a claimed or ended attempt), which are answered as they are.
async fn claim_class(
    tx: &deadpool_postgres::Transaction<'_>,
    claims: &[Claim],
    indices: &[usize],
    out: &mut [Option<Claimed>],
) -> Result<()> {
    let Some(&first) = indices.first() else {
        return Ok(());
    };
    let class = claims[first].executor.as_str();
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&CLASS_LOCK, &class],
    )
    .await
    .map_err(pg("lock the class's capacity"))?;
    let active: i64 = tx
        .query_one(
            &format!("SELECT count(*) FROM tasks WHERE executor = $1 AND {HOLDS_A_JOB}"),
            &[&class],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(pg("count the class's active jobs"))?;
    let mut active = u32::try_from(active).unwrap_or(u32::MAX);
    let mut next = 0;
    while next < indices.len() {
        let room = claims[indices[next]].limit.saturating_sub(active) as usize;
        if room == 0 {
            break;
        }
        let round = &indices[next..indices.len().min(next + room)];
        let batch: Vec<Transition> = round
            .iter()
            .map(|&i| Transition {
                id: claims[i].id,
                attempt: claims[i].attempt,
                state: TaskState::Dispatched,
                change: claims[i].change.clone(),
            })
            .collect();
        let applied = transitions_in(tx, &batch).await?;
        let mut won: Vec<(uuid::Uuid, i64)> = Vec::new();
        for (&i, applied) in round.iter().zip(applied) {
            if applied.changed() {
                active += 1;
                won.push((claims[i].id.as_uuid(), claims[i].dispatcher));
            }
            out[i] = Some(Claimed::Applied(applied));
        }
        let (ids, dispatchers): (Vec<uuid::Uuid>, Vec<i64>) = won.into_iter().unzip();
        tx.execute(
            "UPDATE tasks SET dispatcher = c.dispatcher
               FROM unnest($1::uuid[], $2::bigint[]) AS c(task_id, dispatcher)
              WHERE tasks.task_id = c.task_id",
            &[&ids, &dispatchers],
        )
        .await
        .map_err(pg("record the claiming dispatchers"))?;
        next += round.len();
    }
    for &i in &indices[next..] {
        let claim = &claims[i];
        let claimable = lock(tx, claim.id).await?.is_some_and(|l| {
            l.state
                .can_become(l.attempt, TaskState::Dispatched, claim.attempt)
        });
        out[i] = Some(if claimable {
            Claimed::Full { active }
        } else {
            Claimed::Applied(
                transition_in(
                    tx,
                    claim.id,
                    claim.attempt,
                    TaskState::Dispatched,
                    &claim.change,
                )
                .await?,
            )
        });
    }
    Ok(())
}
