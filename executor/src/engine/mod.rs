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
pub(crate) use openai::Serving;

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

/// An engine made ready once for a warm executor, which runs many tasks on it: the
/// `openai` engine's server is started (or its endpoint named) here, not per task.
pub(crate) enum Warm {
    Echo,
    Command(Vec<String>),
    Openai(Box<(OpenAiEngine, Serving)>),
}

impl Engine {
    /// Makes the engine ready for many tasks.
    ///
    /// # Errors
    /// How it failed to get ready (the model server did not start), as a task would end.
    pub(crate) async fn warm_up(
        &self,
        group_file: Option<&std::path::Path>,
        stop: impl Future<Output = StopReason>,
    ) -> Result<Warm, Finished> {
        match self {
            Engine::Echo => Ok(Warm::Echo),
            Engine::Command(argv) => Ok(Warm::Command(argv.clone())),
            Engine::Openai(engine) => {
                let mut stop = std::pin::pin!(stop);
                let serving = openai::open(engine, group_file, &mut stop).await?;
                Ok(Warm::Openai(Box::new(((**engine).clone(), serving))))
            }
        }
    }
}

impl Warm {
    /// Runs one task until it finishes or `stop` fires; the engine stays ready. A command
    /// gets no process-group file: tasks run side by side, and each one's group is stopped
    /// by its own run.
    pub(crate) async fn run(
        &self,
        task: &TaskEnvelope,
        deltas: Option<&Deltas>,
        stop: impl Future<Output = StopReason>,
    ) -> Finished {
        match self {
            Warm::Echo => echo::run(task, stop).await,
            Warm::Command(argv) => command::run(argv, task, None, stop).await,
            Warm::Openai(warm) => openai::ask(&warm.0, &warm.1, task, deltas, stop).await,
        }
    }

    /// Why the engine can take no more tasks, if it cannot: its model server died.
    pub(crate) async fn broken(&self) -> Option<String> {
        match self {
            Warm::Openai(warm) => warm
                .1
                .exited()
                .await
                .map(|status| format!("the model server exited ({status})")),
            Warm::Echo | Warm::Command(_) => None,
        }
    }

    /// Stops what [`Engine::warm_up`] started.
    pub(crate) async fn close(self, group_file: Option<&std::path::Path>) {
        if let Warm::Openai(warm) = self {
            warm.1.close(group_file).await;
        }
    }
}
