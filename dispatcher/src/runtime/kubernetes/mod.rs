//! The `kubernetes` runtime: each task attempt becomes a `batch/v1` Job on a GPU node, with
//! its payload in a Secret the Job owns, followed to its end through one watch.
//!
//! - [`job`]: the Job and Secret of an attempt (also printed by `render-job`).
//! - [`client`]: the API writes, throttled and retried.
//! - `runtime`: the watch caches and the mapping of Job and Pod ends to results.

pub mod client;
pub mod job;
pub(crate) mod runtime;
