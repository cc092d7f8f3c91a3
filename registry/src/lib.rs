//! `gantry-registry`: the executor registry service. It watches container registries
//! through the OCI distribution API for repositories `<namespace>/executor-<class>` in the
//! allowed registries and namespaces, keeps a catalog of each class's newest accepted
//! image pinned to its digest, with the capabilities its labels declare, and serves it to
//! the dispatcher (`GET /executors/{class}`). Images without the required labels, or
//! outside the allowlist, are refused with the reason; every change is audited.
//!
//! # Layout
//!
//! Data flows one way: `service` starts the `watcher` and the `http` server; the watcher
//! runs a `refresh` and merges it into the `catalog`; a refresh reads registries through
//! `distribution` and what they serve through `manifest`, `labels` and `version`.
//!
//! - `service`: [`run`], the service until shutdown, and [`once`], one refresh.
//! - `http`: the API the dispatcher and operators use.
//! - `watcher`: the catalog in force, its health and refusals, refreshed on a period.
//! - `refresh`: one pass over the sources, with what was read per digest cached.
//! - [`catalog`]: entries per class, and how a refresh's findings change them.
//! - `health`: `starting`, `ok` or `degraded`, and why.
//! - `audit`: the audit log, JSON lines.
//! - `distribution`: the registry API client (pages, auth challenges, digests checked).
//! - `manifest`: manifests, indexes and image configs, read.
//! - [`labels`]: the labels an executor image must carry, read into capabilities.
//! - `version`: tags as versions, newest first.
//! - [`refusal`]: why an image is kept out.
//! - [`settings`]: the configuration (defaults → file → `GANTRY_REGISTRY_*` → flags).

mod audit;
pub mod catalog;
mod distribution;
mod error;
mod health;
mod http;
pub mod labels;
mod manifest;
mod refresh;
pub mod refusal;
mod service;
pub mod settings;
mod version;
mod watcher;

pub use error::{Error, Result};
pub use refusal::Refusal;
pub use service::{once, run};
pub use settings::{Settings, Source};
