//! What is kept of a Celery task beside the Gantry task it becomes ([`CeleryOrigin`]), and
//! the names the bridge marks its messages with.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::message::TaskId;

/// Header on the Gantry task message a Celery task became: `celery`. For operators (it shows
/// in `gantry dlq show`); the bridge reads the task's [`CeleryOrigin`] from Postgres.
pub const ORIGIN_HEADER: &str = "x-gantry-origin";

/// Header on a Celery task waiting for its `eta` in a delay queue: the time (RFC 3339)
/// before which it must not reach its executor class's queue.
pub const NOT_BEFORE_HEADER: &str = "x-gantry-not-before";

/// Routing key that takes a task back from the delay queues to the bridge's `eta` queue:
/// it has a dot, so it can never be an executor class's key.
pub const ETA_ROUTING_KEY: &str = "celery.eta";

/// Whether a message's headers are those of a Celery protocol 2 task message: a `task`
/// and an `id`.
pub fn is_celery_message(headers: &lapin::types::FieldTable) -> bool {
    use crate::message::FieldTableExt;
    headers.get_str("task").is_some() && headers.get_str("id").is_some()
}

/// Where a Celery task's deadline came from, which decides how its expiry is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadlineFrom {
    /// The message's `expires`: an expired task is `REVOKED`, as a Celery worker reports it.
    Expires,
    /// The message's `timelimit`: the task ran out of time, `FAILURE` with
    /// `TimeLimitExceeded`.
    TimeLimit,
    /// The class's `celery.ttl`: reported as `REVOKED` like `expires`.
    Default,
}

impl DeadlineFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadlineFrom::Expires => "expires",
            DeadlineFrom::TimeLimit => "time_limit",
            DeadlineFrom::Default => "default",
        }
    }
}

impl fmt::Display for DeadlineFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeadlineFrom {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "expires" => Ok(DeadlineFrom::Expires),
            "time_limit" => Ok(DeadlineFrom::TimeLimit),
            "default" => Ok(DeadlineFrom::Default),
            other => Err(format!("unknown deadline origin {other:?}")),
        }
    }
}

/// What Gantry keeps of a Celery task beside the task itself: where its result goes and the
/// Celery context the task message has no field for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CeleryOrigin {
    pub task_id: TaskId,
    /// The client's reply queue (`rpc://`); `None` when it wants no result
    /// (`ignore_result`, or no result backend).
    pub reply_to: Option<String>,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    /// Celery's own retry count when the message was sent.
    pub retries: u32,
    pub eta: Option<DateTime<Utc>>,
    pub deadline_from: DeadlineFrom,
}
