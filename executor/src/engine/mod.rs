//! The engines that do a task's work, and the one contract they share: run until the work
//! is done or the `stop` future fires, and on `stop` leave nothing running behind.
//!
//! - [`echo`]: returns the payload; test knobs make it sleep, fail or crash.
//! - [`command`]: runs a program with the task on stdin and the output on stdout.

mod capture;
mod command;
mod echo;
#[cfg(test)]
pub(crate) mod test_support;

use gantry_shared::message::{TaskEnvelope, TaskError};
use serde_json::Value;

/// The engine named by the executor's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Engine {
    Echo,
    /// The program and its arguments.
    Command(Vec<String>),
}

/// Why the engine was asked to stop before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// The task's deadline passed.
    Deadline,
    /// The executor received SIGTERM or SIGINT.
    Signal,
}

/// How an engine run ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Finished {
    /// The work succeeded with this output.
    Output(Value),
    /// The work failed.
    Failed(TaskError),
    /// The engine was stopped; nothing it started is still running.
    Stopped(StopReason),
    /// The echo engine's `exit_code` knob: exit with this code without publishing.
    Exit(u8),
}

impl Engine {
    /// Runs the task until it finishes or `stop` fires.
    /// `group_file`, when given, holds the command's process group id while it runs, so
    /// the runtime can stop the program even if this executor dies first.
    pub(crate) async fn run(
        &self,
        task: &TaskEnvelope,
        group_file: Option<&std::path::Path>,
        stop: impl Future<Output = StopReason>,
    ) -> Finished {
        match self {
            Engine::Echo => echo::run(task, stop).await,
            Engine::Command(argv) => command::run(argv, task, group_file, stop).await,
        }
    }
}

/// A task error that another attempt would not fix.
fn permanent(kind: &str, message: impl Into<String>) -> TaskError {
    TaskError {
        kind: kind.to_owned(),
        message: message.into(),
        retryable: false,
    }
}
