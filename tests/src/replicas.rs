//! Dispatchers side by side on one database: what the tests of several dispatchers watch
//! and check. [`Claims`] samples, while the test runs, how many attempts of a class hold a
//! job at once
//! (what `max_active_jobs` bounds across dispatchers) and which dispatchers claimed them;
//! [`ended_once`] checks that every task reached one terminal state, ran once, and that
//! each attempt that did not run was one whose job was never created.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gantry_producer::Producer;
use gantry_shared::message::TaskId;
use gantry_shared::store::TaskState;
use tokio_postgres::NoTls;

use crate::executions::Executions;

/// What [`Claims`] saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Most attempts holding a job of their own (`dispatched` or `running`) at once.
    pub most_active: i64,
    /// The dispatchers named on those claims.
    pub dispatchers: BTreeSet<i64>,
    /// How many samples were taken.
    pub samples: usize,
}

/// Samples the task table every few milliseconds until stopped.
pub struct Claims {
    stop: Arc<AtomicBool>,
    /// The dispatchers named on the claims of the last sample, once each per claim.
    last: Arc<Mutex<Vec<i64>>>,
    sampling: tokio::task::JoinHandle<Result<Seen>>,
}

impl Claims {
    /// Starts sampling the claims of the class `executor` in the database at `url`.
    ///
    /// # Errors
    /// The database cannot be reached.
    pub async fn watch(url: &str, executor: &str) -> Result<Claims> {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .context("connecting to sample the claims")?;
        tokio::spawn(connection);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let last = Arc::new(Mutex::new(Vec::new()));
        let latest = last.clone();
        let executor = executor.to_owned();
        let sampling = tokio::spawn(async move {
            let mut seen = Seen::default();
            while !stopped.load(Ordering::Relaxed) {
                let rows = client
                    .query(
                        "SELECT dispatcher FROM tasks WHERE executor = $1
                            AND state IN ('dispatched', 'running') AND warm_seq IS NULL",
                        &[&executor],
                    )
                    .await?;
                seen.samples += 1;
                seen.most_active = seen.most_active.max(rows.len() as i64);
                let named: Vec<i64> = rows
                    .iter()
                    .filter_map(|r| r.get::<_, Option<i64>>(0))
                    .collect();
                seen.dispatchers.extend(named.iter().copied());
                *latest.lock().unwrap_or_else(|p| p.into_inner()) = named;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(seen)
        });
        Ok(Claims {
            stop,
            last,
            sampling,
        })
    }

    /// How many attempts holding a job the last sample found claimed by `dispatcher`.
    pub fn held_by(&self, dispatcher: i64) -> usize {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.iter().filter(|d| **d == dispatcher).count()
    }

    /// Stops sampling and says what was seen.
    ///
    /// # Errors
    /// A sample failed.
    pub async fn stop(self) -> Result<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        self.sampling.await?
    }
}

/// The id a dispatcher is present under, from its log (`present on the database`).
pub fn presence(log: &str) -> Option<i64> {
    let line = log
        .lines()
        .find(|l| l.contains("present on the database"))?;
    let (_, rest) = line.split_once("dispatcher=")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// How the attempts of the tasks went.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Attempts {
    /// Attempts in all.
    pub made: u64,
    /// Attempts failed as `job_lost` (claimed, their job never created).
    pub lost: u64,
}

/// Waits for every task of `ids` to end, and checks that each ended once, `succeeded`, and
/// ran exactly once (by `executions`), at its last attempt; returns how its attempts went.
///
/// # Errors
/// A task that did not succeed, ended twice, or ran other than once at its last attempt.
pub async fn ended_once(
    producer: &Producer,
    ids: &[TaskId],
    executions: &Executions,
) -> Result<Attempts> {
    let mut attempts = Attempts::default();
    for id in ids {
        let record = producer.wait(*id, Duration::from_secs(240)).await?;
        ensure!(
            record.state == TaskState::Succeeded,
            "task {id} ended {}: {:?}",
            record.state,
            record.error
        );
        let events = producer.events(*id).await?;
        let ends: Vec<&str> = events
            .iter()
            .map(|e| e.event.as_str())
            .filter(|e| e.parse::<TaskState>().is_ok_and(|s| s.is_terminal()))
            .collect();
        ensure!(ends == ["succeeded"], "task {id} ended as {ends:?}");
        attempts.made += u64::from(record.attempt.get());
        attempts.lost += events
            .iter()
            .filter(|e| e.event == "retrying")
            .filter(|e| {
                e.detail
                    .as_ref()
                    .is_some_and(|d| d["error"]["kind"] == "job_lost")
            })
            .count() as u64;
    }
    let counts = executions.counts()?;
    ensure!(
        counts.len() == ids.len() && counts.values().all(|n| *n == 1),
        "every task runs once: {counts:?}"
    );
    for id in ids {
        let last = producer
            .status(*id)
            .await?
            .context("a task that ended is known")?
            .attempt
            .get();
        ensure!(
            counts.contains_key(&(id.to_string(), last)),
            "task {id} ran at its last attempt, {last}: {counts:?}"
        );
    }
    Ok(attempts)
}
