//! Runtimes: where a task's job runs. Every runtime names jobs deterministically from
//! `(task_id, attempt)`, so starting a job that exists finds it instead of making a second.
//!
//! - `local`: the executor as a child process on this machine.
//! - [`kubernetes`]: a `batch/v1` Job per attempt.

pub mod kubernetes;
pub(crate) mod local;

use chrono::{DateTime, Utc};
use gantry_shared::catalog::ExecutorSpec;
use gantry_shared::message::{Evidence, JobName, Task, TaskId};

use self::kubernetes::runtime::{KubeJob, KubeRuntime};
use self::local::{LocalJob, LocalRuntime};
use crate::{Error, Result};

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
        kind: &'static str,
        retryable: bool,
        reason: &'static str,
    },
}

/// How a job ended, with what the synthesized result needs.
#[derive(Debug, Clone)]
pub(crate) struct JobEnd {
    pub(crate) task_id: TaskId,
    pub(crate) attempt: u32,
    pub(crate) job_name: JobName,
    pub(crate) end: End,
    /// Exit code, signal or cluster reason, in words.
    pub(crate) exit: String,
    /// The end of the executor's log, for the failure message.
    pub(crate) log_tail: String,
    pub(crate) evidence: Evidence,
}

/// The runtime of this dispatcher.
pub(crate) enum Runtime {
    Local(LocalRuntime),
    Kubernetes(Box<KubeRuntime>),
}

/// A job of either runtime.
pub(crate) enum RuntimeJob {
    Local(Box<LocalJob>),
    Kube(KubeJob),
}

impl RuntimeJob {
    pub(crate) fn name(&self) -> &JobName {
        match self {
            RuntimeJob::Local(j) => &j.name,
            RuntimeJob::Kube(j) => &j.name,
        }
    }

    pub(crate) fn executor(&self) -> &str {
        match self {
            RuntimeJob::Local(j) => &j.executor,
            RuntimeJob::Kube(j) => &j.executor,
        }
    }
}

impl Runtime {
    /// Prefix of this runtime's dispatch ids, so reconciliation touches only its own tasks.
    pub(crate) fn instance(&self) -> String {
        match self {
            Runtime::Local(rt) => rt.instance().to_owned(),
            Runtime::Kubernetes(rt) => rt.instance(),
        }
    }

    /// The spec of the task's class with the image its job runs: resolved by the
    /// `kubernetes` runtime (see [`crate::images`]); the local runtime runs no image.
    ///
    /// # Errors
    /// As [`crate::images`] resolution: transient when the registry service does not answer.
    pub(crate) async fn resolve_image(
        &self,
        task: &Task,
        spec: &ExecutorSpec,
    ) -> Result<ExecutorSpec> {
        match self {
            Runtime::Local(_) => Ok(spec.clone()),
            Runtime::Kubernetes(rt) => rt.resolve_image(task, spec).await,
        }
    }

    /// Whether the class can run `task` at all, before anything is recorded for it.
    ///
    /// # Errors
    /// [`Error::Unrunnable`] with the reason (more GPUs than the class allows).
    pub(crate) fn admit(&self, task: &Task, spec: &ExecutorSpec) -> Result<()> {
        match self {
            Runtime::Local(_) => Ok(()),
            Runtime::Kubernetes(_) => {
                kubernetes::job::admit(task, spec).map_err(|e| Error::Unrunnable {
                    task: task.id.to_string(),
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Starts the job of `task`, or finds it; whether it existed already.
    pub(crate) async fn start(
        &self,
        task: &Task,
        spec: &ExecutorSpec,
        dispatch_id: &str,
    ) -> Result<(RuntimeJob, bool)> {
        match self {
            Runtime::Local(rt) => Ok(match rt.start(task, spec, dispatch_id)? {
                local::Started::Created(j) => (RuntimeJob::Local(Box::new(j)), false),
                local::Started::Running(j) | local::Started::Ended(j) => {
                    (RuntimeJob::Local(Box::new(j)), true)
                }
            }),
            Runtime::Kubernetes(rt) => {
                let (job, is_new) = rt.start(task, spec, dispatch_id).await?;
                Ok((RuntimeJob::Kube(job), !is_new))
            }
        }
    }

    /// Finishes what a start left undone for an attempt whose job exists (the Kubernetes
    /// Job's Secret); never starts a job.
    ///
    /// # Errors
    /// The API refused the write.
    pub(crate) async fn complete(&self, task: &Task, spec: &ExecutorSpec) -> Result<()> {
        match self {
            Runtime::Local(_) => Ok(()),
            Runtime::Kubernetes(rt) => rt.complete(task, spec).await,
        }
    }

    pub(crate) fn evidence(&self, name: &JobName) -> Evidence {
        match self {
            Runtime::Local(rt) => rt.evidence(name),
            Runtime::Kubernetes(rt) => rt.evidence(name),
        }
    }

    /// When the job started, where the runtime knows it at once (a local process).
    pub(crate) fn started_at(&self, job: &RuntimeJob) -> Option<DateTime<Utc>> {
        match job {
            RuntimeJob::Local(j) => j.started_at,
            RuntimeJob::Kube(_) => None,
        }
    }

    /// A local process runs as soon as it is started; a pod runs when the cluster says so.
    pub(crate) fn runs_at_start(&self) -> bool {
        matches!(self, Runtime::Local(_))
    }

    /// Waits until a pod runs: its evidence and start time (kubernetes only).
    pub(crate) async fn running(
        &self,
        job: &RuntimeJob,
    ) -> Option<(Evidence, Option<DateTime<Utc>>)> {
        match (self, job) {
            (Runtime::Kubernetes(rt), RuntimeJob::Kube(j)) => rt.running(j).await,
            _ => None,
        }
    }

    pub(crate) async fn wait(&self, job: RuntimeJob) -> JobEnd {
        match (self, job) {
            (Runtime::Local(rt), RuntimeJob::Local(j)) => rt.wait(*j).await,
            (Runtime::Kubernetes(rt), RuntimeJob::Kube(j)) => rt.wait(&j).await,
            (_, job) => JobEnd {
                task_id: TaskId::new(),
                attempt: 0,
                job_name: job.name().clone(),
                end: End::Crashed,
                exit: "job of another runtime".into(),
                log_tail: String::new(),
                evidence: Evidence::default(),
            },
        }
    }

    /// Stops the job of a cancelled task.
    pub(crate) async fn cancel(&self, name: &JobName) -> Result<()> {
        match self {
            Runtime::Local(rt) => {
                rt.cancel(name).await;
                Ok(())
            }
            Runtime::Kubernetes(rt) => rt.delete(name).await,
        }
    }

    pub(crate) fn mark_handled(&self, name: &JobName) {
        if let Runtime::Local(rt) = self {
            rt.mark_handled(name);
        }
    }

    pub(crate) fn sweep(&self) {
        if let Runtime::Local(rt) = self {
            rt.sweep();
        }
    }

    /// Jobs found at start: `(job, still running)`.
    pub(crate) fn scan(&self) -> Result<Vec<(RuntimeJob, bool)>> {
        Ok(match self {
            Runtime::Local(rt) => rt
                .scan()?
                .into_iter()
                .map(|(j, r)| (RuntimeJob::Local(Box::new(j)), r))
                .collect(),
            Runtime::Kubernetes(rt) => rt
                .scan()
                .into_iter()
                .map(|(j, r)| (RuntimeJob::Kube(j), r))
                .collect(),
        })
    }

    pub(crate) fn knows(&self, name: &JobName) -> bool {
        match self {
            Runtime::Local(rt) => rt.knows(name),
            Runtime::Kubernetes(rt) => rt.knows(name),
        }
    }
}
