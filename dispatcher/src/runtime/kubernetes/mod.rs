//! The `kubernetes` runtime: each task attempt becomes a `batch/v1` Job on a GPU node, with
//! its payload in a Secret the Job owns.
//!
//! This module holds what the runtime sends to the API server; the client, the watcher and
//! the mapping of Job and Pod ends to results build on it.

pub mod client;
pub mod job;
