//! The warm executors that exist (`warm_executors`), so that a warm class's
//! `max_active_jobs` holds across dispatchers as its claims' capacity does (see
//! `super::capacity`): an executor is counted from before its job is started until its end
//! is handled, and is taken over, like a claim, when the dispatcher that follows it is gone.

use std::collections::HashSet;

use super::capacity::{CLASS_LOCK, gone};
use super::pool::Store;
use super::sql::pg;
use crate::Result;
use crate::message::ExecutorClass;

/// A warm executor to count, for [`Store::count_warm`].
#[derive(Debug, Clone, Copy)]
pub struct WarmExecutor<'a> {
    pub job: &'a str,
    pub executor: &'a ExecutorClass,
    /// The runtime instance that runs it.
    pub instance: &'a str,
    /// The dispatcher that starts and follows it.
    pub dispatcher: i64,
}

impl Store {
    /// Counts a new warm executor against its class, if the class has fewer than `limit`
    /// of them; says whether it did. Executors of one class are counted one at a time.
    ///
    /// # Errors
    /// Postgres errors; then nothing is counted.
    #[tracing::instrument(skip_all, fields(job = warm.job))]
    pub async fn count_warm(&self, warm: &WarmExecutor<'_>, limit: u32) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg("begin"))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&CLASS_LOCK, &warm.executor.as_str()],
        )
        .await
        .map_err(pg("lock the class's capacity"))?;
        let running: i64 = tx
            .query_one(
                "SELECT count(*) FROM warm_executors WHERE executor = $1",
                &[&warm.executor.as_str()],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(pg("count the class's warm executors"))?;
        if running >= i64::from(limit) {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO warm_executors (job_name, executor, instance, dispatcher)
             VALUES ($1, $2, $3, $4) ON CONFLICT (job_name) DO NOTHING",
            &[
                &warm.job,
                &warm.executor.as_str(),
                &warm.instance,
                &warm.dispatcher,
            ],
        )
        .await
        .map_err(pg("count a warm executor"))?;
        tx.commit().await.map_err(pg("commit a warm executor"))?;
        Ok(true)
    }

    /// Stops counting the warm executor `job` (it ended, or was never started).
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn warm_ended(&self, job: &str) -> Result<()> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM warm_executors WHERE job_name = $1", &[&job])
            .await
            .map_err(pg("forget a warm executor"))?;
        Ok(())
    }

    /// Hands to the dispatcher `me` the warm executors of the runtime instance `instance`
    /// whose dispatchers are gone; returns their job names.
    ///
    /// # Errors
    /// Postgres errors; the executors not yet moved stay where they were.
    pub async fn adopt_warm(&self, me: i64, instance: &str) -> Result<Vec<String>> {
        let mut client = self.client().await?;
        let owners: Vec<i64> = client
            .query(
                "SELECT DISTINCT dispatcher FROM warm_executors
                  WHERE dispatcher <> $1 AND instance = $2",
                &[&me, &instance],
            )
            .await
            .map_err(pg("read the dispatchers of warm executors"))?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(pg("read the dispatchers of warm executors"))?;
        let mut adopted = Vec::new();
        for owner in owners {
            let tx = client.transaction().await.map_err(pg("begin"))?;
            if !gone(&tx, owner).await? {
                continue;
            }
            let rows = tx
                .query(
                    "UPDATE warm_executors SET dispatcher = $1
                      WHERE dispatcher = $2 AND instance = $3 RETURNING job_name",
                    &[&me, &owner, &instance],
                )
                .await
                .map_err(pg("adopt a gone dispatcher's warm executors"))?;
            tx.commit().await.map_err(pg("commit adoption"))?;
            for row in &rows {
                adopted.push(
                    row.try_get(0)
                        .map_err(pg("read an adopted warm executor"))?,
                );
            }
        }
        Ok(adopted)
    }

    /// The warm executors that other dispatchers than `me` follow.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn warm_held_by_others(&self, me: i64) -> Result<HashSet<String>> {
        let client = self.client().await?;
        client
            .query(
                "SELECT job_name FROM warm_executors WHERE dispatcher <> $1",
                &[&me],
            )
            .await
            .map_err(pg("read the warm executors of other dispatchers"))?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(pg("read the warm executors of other dispatchers"))
    }
}
