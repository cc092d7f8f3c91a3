//! The one error type of `gantry-producer`.

use std::time::Duration;

use gantry_shared::message::{ExecutorClass, Rejection, TaskId};
use gantry_shared::store::TaskState;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when submitting a task or following it. Each variant says
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot be used (for example a prefix with spaces).
    #[error(transparent)]
    Config(Box<gantry_shared::Error>),

    /// The task breaks a rule the dispatcher would apply, so it was not published.
    #[error("the task was not submitted: {0}; fix it and submit again")]
    Rejected(#[from] Rejection),

    /// No queue is bound for the executor class: the broker returned the message.
    #[error(
        "no queue takes executor class {executor} on prefix {prefix}: is {executor} in the executor catalog, and has `gantry topology apply` (or the dispatcher) declared the topology?"
    )]
    Unroutable {
        executor: ExecutorClass,
        prefix: String,
    },

    /// The tasks exchange does not exist: the topology was never declared on this prefix.
    #[error(
        "exchange {exchange} does not exist: declare the topology of prefix {prefix} with `gantry topology apply` (or by starting the dispatcher), then submit again"
    )]
    NoExchange { exchange: String, prefix: String },

    /// RabbitMQ could not be reached, refused the message, or did not answer in time.
    #[error(transparent)]
    Broker(Box<gantry_shared::Error>),

    /// Postgres could not be reached, a query failed, or the database has no Gantry schema
    /// (or one of another version).
    #[error("Postgres at {url}: {source}")]
    Database {
        /// The database URL with its password hidden.
        url: String,
        #[source]
        source: Box<gantry_shared::Error>,
    },

    /// The connection that listens for finished tasks was lost while waiting, and another
    /// could not be made.
    #[error(
        "lost the Postgres connection while waiting for task {task_id}; wait again with `gantry wait {task_id}`"
    )]
    ListenLost { task_id: TaskId },

    /// The task did not reach a terminal state in time; it may still finish later.
    #[error(
        "task {task_id} did not finish within {waited}: {}; wait longer with `gantry wait {task_id} --timeout …` or look at `gantry status {task_id}`",
        still(*.state)
    )]
    WaitTimeout {
        task_id: TaskId,
        /// How long was waited, already formatted (`30s`, `1h 30s`).
        waited: String,
        /// The state at the end of the wait; `None` if no dispatcher has recorded the task.
        state: Option<TaskState>,
    },
}

impl Error {
    /// A short label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Rejected(_) => "rejected",
            Error::Unroutable { .. } | Error::NoExchange { .. } => "unroutable",
            Error::Broker(_) => "amqp",
            Error::Database { .. } | Error::ListenLost { .. } => "postgres",
            Error::WaitTimeout { .. } => "timeout",
        }
    }

    /// Whether the error is a wait that ran out of time (the task may still finish).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::WaitTimeout { .. })
    }

    pub(crate) fn config(e: gantry_shared::Error) -> Self {
        Error::Config(Box::new(e))
    }

    pub(crate) fn broker(e: gantry_shared::Error) -> Self {
        Error::Broker(Box::new(e))
    }

    pub(crate) fn wait_timeout(
        task_id: TaskId,
        waited: Duration,
        state: Option<TaskState>,
    ) -> Self {
        Error::WaitTimeout {
            task_id,
            waited: human_duration(waited),
            state,
        }
    }
}

fn still(state: Option<TaskState>) -> String {
    match state {
        Some(state) => format!("it is still {state}"),
        None => "no dispatcher has recorded it yet (it is still queued, no dispatcher serves \
                 this prefix and database, or the task id is wrong)"
            .to_owned(),
    }
}

/// A duration for people: whole seconds (`1h 30s`), or milliseconds under a second.
pub fn human_duration(d: Duration) -> String {
    let rounded = if d < Duration::from_secs(1) {
        Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    } else {
        Duration::from_secs(d.as_secs() + u64::from(d.subsec_millis() >= 500))
    };
    humantime::format_duration(rounded).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_millis(3_600_400)), "1h");
        assert_eq!(human_duration(Duration::from_millis(90_600)), "1m 31s");
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn a_timeout_says_where_the_task_is() {
        let id = TaskId::new();
        let e = Error::wait_timeout(id, Duration::from_secs(30), Some(TaskState::Running));
        let text = e.to_string();
        assert!(text.contains("within 30s: it is still running"), "{text}");
        assert!(text.contains(&format!("gantry wait {id}")), "{text}");
        let e = Error::wait_timeout(id, Duration::from_secs(30), None);
        assert!(e.to_string().contains("no dispatcher has recorded it"));
        assert!(e.is_timeout());
    }
}
