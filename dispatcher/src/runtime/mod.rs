//! Runtimes: where a task's job runs. Every runtime names jobs deterministically from
//! `(task_id, attempt)`, so starting a job that exists finds it instead of making a second.

pub(crate) mod local;

use gantry_shared::message::{Evidence, JobName, TaskId};

/// How a job ended, as far as the runtime can tell.
#[derive(Debug, Clone)]
pub(crate) struct JobEnd {
    pub(crate) task_id: TaskId,
    pub(crate) attempt: u32,
    pub(crate) job_name: JobName,
    /// Whether the executor said it published its result.
    pub(crate) published: bool,
    /// The runtime stopped the job because its deadline passed.
    pub(crate) stopped_at_deadline: bool,
    /// Exit code or signal, in words.
    pub(crate) exit: String,
    /// The end of the executor's log, for the failure message.
    pub(crate) log_tail: String,
    pub(crate) evidence: Evidence,
}
pub mod kubernetes;
