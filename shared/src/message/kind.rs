//! Stable names that results carry: what kind of failure ended an attempt
//! ([`ErrorKind`]), and who reported the result ([`ReportedBy`]).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What kind of failure ended an attempt: a stable, machine-readable name, stored in the
/// result and in `tasks.error`. Retry policies name kinds (`retryable_kinds`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A command exited non-zero or was killed.
    CommandFailed,
    /// A command's stdout was not JSON.
    BadOutput,
    /// A command wrote more than the limit to stdout.
    OutputTooLarge,
    /// A command could not be started.
    SpawnFailed,
    /// The `echo` engine was asked to fail.
    EchoFailed,
    /// The `echo` engine was given a bad knob.
    InvalidPayload,
    /// The deadline passed.
    DeadlineExceeded,
    /// The executor was stopped by a signal (eviction, drain, preemption, cancel).
    Terminated,
    /// The executor ended without reporting.
    ExecutorCrashed,
    /// The job could not be created.
    DispatchFailed,
    /// The attempt was claimed but its job is gone.
    JobLost,
    /// The container ran out of memory.
    Oom,
    /// The pod was evicted.
    Evicted,
    /// The pod's node was lost.
    NodeLost,
    /// The image could not be pulled.
    ImagePull,
    /// No node could take the pod.
    Unschedulable,
    /// Postgres refused to store the result.
    ResultUnrecordable,
    /// A retry was planned but the task could not be published again.
    RetryImpossible,
    /// The task was cancelled.
    Cancelled,
    /// A refused task (dead-letter reason `invalid: …`).
    Invalid,
    /// A task that expired before it ran (dead-letter reason `expired: …`).
    Expired,
    /// A task delivered more than the queue's limit.
    DeliveryLimit,
    /// A task whose attempts are spent.
    MaxAttempts,
    /// A task for which no image could be used.
    Image,
    /// The model server did not get ready (it exited, or `startup_timeout` passed).
    EngineStartFailed,
    /// The model server refused the request (HTTP 4xx: e.g. a prompt over the context).
    EngineRefused,
    /// The model server failed the request or died while answering it.
    EngineFailed,
    /// A kind this version does not name: a user program's, or a newer executor's.
    Other(String),
}

impl ErrorKind {
    const NAMED: [ErrorKind; 27] = [
        ErrorKind::CommandFailed,
        ErrorKind::BadOutput,
        ErrorKind::OutputTooLarge,
        ErrorKind::SpawnFailed,
        ErrorKind::EchoFailed,
        ErrorKind::InvalidPayload,
        ErrorKind::DeadlineExceeded,
        ErrorKind::Terminated,
        ErrorKind::ExecutorCrashed,
        ErrorKind::DispatchFailed,
        ErrorKind::JobLost,
        ErrorKind::Oom,
        ErrorKind::Evicted,
        ErrorKind::NodeLost,
        ErrorKind::ImagePull,
        ErrorKind::Unschedulable,
        ErrorKind::ResultUnrecordable,
        ErrorKind::RetryImpossible,
        ErrorKind::Cancelled,
        ErrorKind::Invalid,
        ErrorKind::Expired,
        ErrorKind::DeliveryLimit,
        ErrorKind::MaxAttempts,
        ErrorKind::Image,
        ErrorKind::EngineStartFailed,
        ErrorKind::EngineRefused,
        ErrorKind::EngineFailed,
    ];

    /// The name, as results and Postgres carry it.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorKind::Other(name) => name,
            named => named.label(),
        }
    }

    /// A label for counting by kind: the name of a named kind, `other` for the rest (whose
    /// names are not bounded).
    pub fn label(&self) -> &'static str {
        ErrorKind::NAMED
            .iter()
            .zip(NAMES)
            .find(|(k, _)| *k == self)
            .map_or("other", |(_, name)| name)
    }

    /// The kind named `name`: one of the named kinds, else [`ErrorKind::Other`].
    pub fn named(name: &str) -> ErrorKind {
        ErrorKind::NAMED
            .into_iter()
            .find(|k| k.as_str() == name)
            .unwrap_or_else(|| ErrorKind::Other(name.to_owned()))
    }
}

/// The names of [`ErrorKind::NAMED`], in its order.
const NAMES: [&str; 27] = [
    "command_failed",
    "bad_output",
    "output_too_large",
    "spawn_failed",
    "echo_failed",
    "invalid_payload",
    "deadline_exceeded",
    "terminated",
    "executor_crashed",
    "dispatch_failed",
    "job_lost",
    "oom",
    "evicted",
    "node_lost",
    "image_pull",
    "unschedulable",
    "result_unrecordable",
    "retry_impossible",
    "cancelled",
    "invalid",
    "expired",
    "delivery_limit",
    "max_attempts",
    "image",
    "engine_start_failed",
    "engine_refused",
    "engine_failed",
];

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for ErrorKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl Serialize for ErrorKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(ErrorKind::named(&String::deserialize(d)?))
    }
}

/// Who reported a result: the executor, from the work itself, or the dispatcher, on its
/// behalf (it could not be started, crashed, was lost or stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportedBy {
    #[default]
    Executor,
    Dispatcher,
}

impl ReportedBy {
    /// The name, as results carry it.
    pub fn as_str(&self) -> &'static str {
        match self {
            ReportedBy::Executor => "executor",
            ReportedBy::Dispatcher => "dispatcher",
        }
    }
}

impl fmt::Display for ReportedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::{ErrorKind, ReportedBy};

    #[test]
    fn every_named_kind_reads_back_as_itself_and_others_are_kept_as_they_came() {
        for kind in ErrorKind::NAMED {
            let text = serde_json::to_string(&kind).unwrap();
            assert_eq!(serde_json::from_str::<ErrorKind>(&text).unwrap(), kind);
        }
        for (kind, name) in ErrorKind::NAMED.iter().zip(super::NAMES) {
            assert_eq!(kind.as_str(), name);
            assert_eq!(kind.label(), name);
        }
        let other: ErrorKind = serde_json::from_str("\"gpu_fell_off_the_bus\"").unwrap();
        assert_eq!(other.label(), "other");
        assert_eq!(other, ErrorKind::Other("gpu_fell_off_the_bus".into()));
        assert_eq!(other.to_string(), "gpu_fell_off_the_bus");
    }

    #[test]
    fn a_result_without_a_reporter_was_reported_by_its_executor() {
        assert_eq!(ReportedBy::default(), ReportedBy::Executor);
        let d: ReportedBy = serde_json::from_str("\"dispatcher\"").unwrap();
        assert_eq!(d.to_string(), "dispatcher");
        assert!(serde_json::from_str::<ReportedBy>("\"someone\"").is_err());
    }
}
