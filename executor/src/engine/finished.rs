//! How an engine run ends: the one answer every engine gives.

use gantry_shared::message::{ErrorKind, TaskError, Usage};
use serde_json::Value;

/// Why the engine was asked to stop before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// The task's deadline passed.
    Deadline,
    /// The executor received SIGTERM or SIGINT.
    Signal,
    /// The task was cancelled (`gantry cancel`) while a warm executor ran it.
    Cancelled,
}

/// How an engine run ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Finished {
    /// The work succeeded with this output, and the usage the engine knows (tokens).
    Output { output: Value, usage: Option<Usage> },
    /// The work failed.
    Failed(TaskError),
    /// The engine was stopped; nothing it started is still running.
    Stopped(StopReason),
    /// The echo engine's `exit_code` knob: exit with this code without publishing.
    Exit(u8),
}

/// A task error that another attempt would not fix.
pub(super) fn permanent(kind: ErrorKind, message: impl Into<String>) -> TaskError {
    TaskError {
        kind,
        message: message.into(),
        retryable: false,
    }
}

impl Finished {
    /// Success with `output` and no usage to report.
    pub(crate) fn output(output: Value) -> Finished {
        Finished::Output {
            output,
            usage: None,
        }
    }
}
