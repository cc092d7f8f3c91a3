//! The `kubernetes` runtime: each task attempt becomes a `batch/v1` Job on a GPU node, with
//! its payload in a Secret the Job owns, followed to its end through one watch.
//!
//! - [`job`]: the Job and Secret of an attempt (also printed by `render-job`).
//! - [`client`]: the API writes, throttled and retried.
//! - `cache`: the Jobs and Pods the watches keep, by Job name, pruned.
//! - `runtime`: the mapping of Job and Pod ends to results.

mod cache;
pub mod client;
pub mod job;
pub(crate) mod runtime;
