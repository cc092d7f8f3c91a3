//! What every runtime provides to the dispatch role ([`Runtime`]), the jobs it runs
//! ([`Job`]), and how a job ended ([`JobEnd`]).

use chrono::{DateTime, Utc};
use gantry_shared::catalog::{ExecutorSpec, WarmSpec};
use gantry_shared::message::{Attempt, ErrorKind, Evidence, ExecutorClass, JobName, Task, TaskId};

use crate::Result;

/// Where a task's jobs run: a `local` child process or a Kubernetes Job. A runtime names
/// each job deterministically from `(task_id, attempt)`; the dispatch role decides whether
/// a job may be started at all (see `dispatch::handoff`), the runtime only starts it.
pub(crate) trait Runtime: Send + Sync + 'static {
    /// One job of this runtime, as it is followed.
    type Job: Job;

    /// Prefix of this runtime's dispatch ids, so reconciliation touches only its own tasks.
    fn instance(&self) -> &str;

    /// The spec of the task's class with the image its job runs (a runtime without images
    /// returns the spec as it is).
    ///
    /// # Errors
    /// No usable image; transient when an image service does not answer.
    fn resolve_image(
        &self,
        task: &Task,
        spec: &ExecutorSpec,
    ) -> impl Future<Output = Result<ExecutorSpec>> + Send;

    /// Whether the class can run `task` at all, before anything is recorded for it.
    ///
    /// # Errors
    /// [`crate::Error::Unrunnable`] with the reason.
    fn admit(&self, _task: &Task, _spec: &ExecutorSpec) -> Result<()> {
        Ok(())
    }

    /// Starts the job of `task`, or finds it; whether it existed already.
    ///
    /// # Errors
    /// The job cannot be started (missing program, refused by the API server, full disk).
    fn start(
        &self,
        task: &Task,
        spec: &ExecutorSpec,
        dispatch_id: &str,
    ) -> impl Future<Output = Result<(Self::Job, bool)>> + Send;

    /// Starts a warm executor of `spec`'s class named `name`, serving the tasks handed to it
    /// on `queue` (and its orders on `<queue>.control`) until it drains or idles out.
    ///
    /// # Errors
    /// The executor cannot be started (missing program, refused by the API server).
    fn start_warm(
        &self,
        name: &JobName,
        class: &ExecutorClass,
        spec: &ExecutorSpec,
        warm: &WarmSpec,
        queue: &str,
    ) -> impl Future<Output = Result<Self::Job>> + Send;

    /// Finishes what a start left undone for an attempt whose job exists (a Kubernetes
    /// Job's Secret); never starts a job.
    ///
    /// # Errors
    /// The write is refused.
    fn complete(
        &self,
        _task: &Task,
        _spec: &ExecutorSpec,
    ) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// The evidence of a job so far.
    fn evidence(&self, name: &JobName) -> Evidence;

    /// Whether a job runs as soon as it is started (a local process): its `running` is
    /// recorded at hand-off. Otherwise [`Runtime::running`] says when.
    fn runs_at_start(&self) -> bool;

    /// Waits until the job runs: its evidence and start time. `None` if it ended first, or
    /// if the runtime said so at start already.
    fn running(
        &self,
        _job: &Self::Job,
    ) -> impl Future<Output = Option<(Evidence, Option<DateTime<Utc>>)>> + Send {
        async { None }
    }

    /// Waits for the job to end and says how.
    fn wait(&self, job: Self::Job) -> impl Future<Output = JobEnd> + Send;

    /// Stops the job of a cancelled task.
    ///
    /// # Errors
    /// The stop is refused.
    fn cancel(&self, name: &JobName) -> impl Future<Output = Result<()>> + Send;

    /// Notes that a job's end has been dealt with.
    fn mark_handled(&self, _name: &JobName) {}

    /// Removes what jobs dealt with long ago left behind.
    fn sweep(&self) {}

    /// Jobs found at start: `(job, still running)`.
    ///
    /// # Errors
    /// The runtime's state cannot be read.
    fn scan(&self) -> Result<Vec<(Self::Job, bool)>>;

    /// Whether the job exists.
    fn knows(&self, name: &JobName) -> bool;
}

/// A job as a runtime follows it.
pub(crate) trait Job: Send + 'static {
    fn name(&self) -> &JobName;
    fn task_id(&self) -> TaskId;
    fn attempt(&self) -> Attempt;
    /// The executor class it runs.
    fn executor(&self) -> &str;
    /// When it started, where the runtime knows it at once.
    fn started_at(&self) -> Option<DateTime<Utc>> {
        None
    }
    /// When it was created, where the runtime makes jobs that run later (a Job).
    fn created_at(&self) -> Option<DateTime<Utc>> {
        None
    }
    /// Whether it is a warm executor, serving many tasks (then `task_id` and `attempt`
    /// mean nothing).
    fn is_warm(&self) -> bool {
        self.name().is_warm()
    }
}

/// How a job ended, as far as the runtime can tell.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum End {
    /// The executor reported its result itself.
    Published,
    /// The job outlived its deadline and was stopped.
    Deadline,
    /// The executor ended without reporting (crash, lost).
    Crashed,
    /// The runtime knows better what happened (OOM, eviction, image pull, …).
    Failure {
        kind: ErrorKind,
        retryable: bool,
        reason: &'static str,
    },
}

/// How a job ended, with what a result published on its behalf needs.
#[derive(Debug, Clone)]
pub(crate) struct JobEnd {
    pub(crate) task_id: TaskId,
    pub(crate) attempt: Attempt,
    pub(crate) job_name: JobName,
    pub(crate) end: End,
    /// Exit code, signal or cluster reason, in words.
    pub(crate) exit: String,
    /// The end of the executor's log, for the failure message.
    pub(crate) log_tail: String,
    pub(crate) evidence: Evidence,
}
