//! The engines that do a task's work, and the one contract they share: run until the work
//! is done or the `stop` future fires, and on `stop` leave nothing running behind.
//!
//! - [`echo`]: returns the payload; test knobs make it sleep, fail or crash.
//! - [`command`]: runs a program with the task on stdin and the output on stdout.
//! - `finished`: how a run ends, which every engine returns.
//! - `capture`: reading a program's output within limits.

mod capture;
mod command;
mod echo;
mod finished;
#[cfg(test)]
pub(crate) mod test_support;

use gantry_shared::message::TaskEnvelope;

pub(crate) use finished::{Finished, StopReason};

/// The engine named by the executor's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Engine {
    Echo,
    /// The program and its arguments.
    Command(Vec<String>),
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
