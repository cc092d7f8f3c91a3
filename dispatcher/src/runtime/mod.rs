//! Runtimes: where a task's jobs run. Every runtime names jobs deterministically from
//! `(task_id, attempt)`, so starting a job that exists finds it instead of making a second.
//!
//! - `contract`: what every runtime provides ([`Runtime`], [`Job`], [`JobEnd`]).
//! - `local`: the executor as a child process on this machine.
//! - [`kubernetes`]: a `batch/v1` Job per attempt.

mod contract;
pub mod kubernetes;
pub(crate) mod local;

pub(crate) use contract::{End, Job, JobEnd, Runtime};
