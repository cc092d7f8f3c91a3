//! The engines that do a task's work, and the one contract they share: run until the work
//! is done or the `stop` future fires, and on `stop` leave nothing running behind.
//!
//! - [`echo`]: returns the payload; test knobs make it sleep, fail or crash.
//! - [`command`]: runs a program with the task on stdin and the output on stdout.
//! - [`openai`]: asks an OpenAI-compatible model server (started in the job, or at an
//!   endpoint) and streams its text to the progress publisher.
//! - `finished`: how a run ends, which every engine returns.
//! - `capture`: reading a program's output within limits. `deltas`: where pieces of an
//!   answer go. `group`: a program's process
//!   group, stopped as one.

mod capture;
mod command;
mod deltas;
mod echo;
mod finished;
mod group;
mod openai;
#[cfg(test)]
pub(crate) mod test_support;

use gantry_shared::catalog::OpenAiEngine;
use gantry_shared::message::TaskEnvelope;

pub(crate) use deltas::Deltas;
pub(crate) use finished::{Finished, StopReason};

/// The engine named by the executor's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Engine {
    Echo,
    /// The program and its arguments.
    Command(Vec<String>),
    /// The model, its server and how to start it.
    Openai(Box<OpenAiEngine>),
}

impl Engine {
    /// Runs the task until it finishes or `stop` fires.
    /// `group_file`, when given, holds the command's process group id while it runs, so
    /// the runtime can stop the program even if this executor dies first. `deltas`, when
    /// given, takes the answer's pieces as they come (engines that make none ignore it).
    pub(crate) async fn run(
        &self,
        task: &TaskEnvelope,
        group_file: Option<&std::path::Path>,
        deltas: Option<&Deltas>,
        stop: impl Future<Output = StopReason>,
    ) -> Finished {
        match self {
            Engine::Echo => echo::run(task, stop).await,
            Engine::Command(argv) => command::run(argv, task, group_file, stop).await,
            Engine::Openai(engine) => openai::run(engine, task, group_file, deltas, stop).await,
        }
    }
}
