//! What a pass is asked to do ([`Action`], with [`ReplayOptions`] or [`PurgeOptions`]) and
//! what it did ([`Summary`]: the dead letters handled, those kept and why).

use std::time::Duration;

use chrono::{DateTime, Utc};
use gantry_shared::dead_letter::{Label, reason_kind};
use gantry_shared::message::TaskId;
use serde::{Serialize, Serializer};
use uuid::Uuid;

/// Dead letters handled at once unless told otherwise: replays awaiting their confirm, or
/// purges awaiting their ack.
pub const DEFAULT_IN_FLIGHT: usize = 64;

/// How a replay runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The replayed task's new time to live, counted from its replay (default 1h).
    pub ttl: Duration,
    /// At most this many replays per second; `None` for as fast as the broker confirms.
    pub rate: Option<u32>,
    /// Read and report what would be replayed; publish, ack and write nothing.
    pub dry_run: bool,
    /// Replays awaiting their confirm at once (at least 1).
    pub in_flight: usize,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            ttl: Duration::from_secs(3600),
            rate: None,
            dry_run: false,
            in_flight: DEFAULT_IN_FLIGHT,
        }
    }
}

/// How a purge runs.
#[derive(Debug, Clone)]
pub struct PurgeOptions {
    /// Read and report what would be purged; ack and write nothing.
    pub dry_run: bool,
    /// Acks awaited at once (at least 1).
    pub in_flight: usize,
}

impl Default for PurgeOptions {
    fn default() -> Self {
        PurgeOptions {
            dry_run: false,
            in_flight: DEFAULT_IN_FLIGHT,
        }
    }
}

/// What a pass does with the dead letters it selects.
#[derive(Debug, Clone)]
pub enum Action {
    Replay(ReplayOptions),
    Purge(PurgeOptions),
}

impl Action {
    /// `replay` or `purge`.
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Replay(_) => "replay",
            Action::Purge(_) => "purge",
        }
    }

    /// Whether it only reads and reports.
    pub fn dry_run(&self) -> bool {
        match self {
            Action::Replay(o) => o.dry_run,
            Action::Purge(o) => o.dry_run,
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        match self {
            Action::Replay(o) => o.in_flight,
            Action::Purge(o) => o.in_flight,
        }
        .max(1)
    }
}

/// One selected dead letter, as the pass read it from its message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub id: Uuid,
    pub task_id: Option<TaskId>,
    pub task: Option<String>,
    pub executor: Option<String>,
    pub reason: String,
    pub dead_at: DateTime<Utc>,
    /// For a replay, the attempt it starts (`None` when the body is not a task); for a
    /// purge, the attempt that died.
    pub attempt: Option<u32>,
}

impl Entry {
    /// The reason kind: the text before the first colon (`invalid`, `expired`, …).
    pub fn reason_kind(&self) -> &str {
        reason_kind(&self.reason)
    }
}

impl From<Label> for Entry {
    fn from(label: Label) -> Entry {
        Entry {
            id: label.id,
            task_id: label.task_id,
            task: label.task,
            executor: label.executor,
            reason: label.reason,
            dead_at: label.dead_at,
            attempt: label.attempt,
        }
    }
}

/// A selected dead letter that was not replayed or purged: it is still in the queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    #[serde(flatten)]
    pub entry: Entry,
    /// Why, and what to do about it.
    pub error: String,
}

/// What a pass did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// `replay` or `purge`.
    pub action: &'static str,
    pub dry_run: bool,
    pub queue: String,
    /// Messages in the queue when the pass started.
    pub queue_depth: u32,
    /// Messages read.
    pub read: u64,
    /// Messages the selection matched.
    pub matched: u64,
    /// Replayed or purged (in a dry run: that would be), in the order they were done.
    pub done: Vec<Entry>,
    /// Messages not matching, returned to the queue untouched.
    pub kept: u64,
    /// Matching dead letters left in the queue, each with its reason.
    pub failed: Vec<Failure>,
    /// Things that went wrong after a dead letter was handled, or with the pass itself.
    pub warnings: Vec<String>,
    /// Why the pass ended before it read every message, if it did.
    pub stopped: Option<String>,
    #[serde(rename = "elapsed_seconds", serialize_with = "seconds")]
    pub elapsed: Duration,
}

impl Summary {
    /// Whether every selected dead letter was handled and the pass read to the end.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty() && self.stopped.is_none()
    }

    /// Dead letters handled per second.
    pub fn per_second(&self) -> f64 {
        self.done.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn seconds<S: Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// How one delivery ended: handled (maybe with a warning), or kept with a reason.
pub(super) type Outcome = (Entry, std::result::Result<Option<String>, String>);

/// Adds one delivery's outcome to the summary.
pub(super) fn collect(summary: &mut Summary, (entry, result): Outcome) {
    match result {
        Ok(warning) => {
            summary.warnings.extend(warning);
            summary.done.push(entry);
        }
        Err(error) => summary.failed.push(Failure { entry, error }),
    }
}
