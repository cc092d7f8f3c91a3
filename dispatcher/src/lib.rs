//! `gantry-dispatcher`: consumes tasks and turns each into a job on a runtime, follows every
//! job to a terminal state, and records results and dead letters in Postgres.
//!
//! # Layout
//!
//! Data flows one way: `service` wires things up and starts the roles; the roles use the
//! runtime, the context and `shared`; no module imports the module that started it.
//!
//! - `service`: [`run`], which opens everything, starts the roles and drains them on
//!   shutdown.
//! - `context`: what every role shares (settings, topology, store, publisher, counters,
//!   catalog in force, shutdown) and its two common acts: write through an outage,
//!   publish a result.
//! - `dispatch/`: the dispatch role: a consumer per class → hand-off → disposition of the
//!   delivery → following the job; reconciliation at start; cancellations.
//! - `recorder/`: the record role: results and dead letters into Postgres, then retries,
//!   dead letters and forwards to `reply_to`.
//! - [`runtime`]: where jobs run: the `Runtime` contract, `local` (child processes) and
//!   [`runtime::kubernetes`] (Jobs).
//! - [`images`]: which image a task's Job runs (registry service, catalog, nodes), checked.
//! - `catalog`: the executor catalog in force, from a file or a watched ConfigMap.
//! - `queues`: the task queues of the classes in service, in step with the catalog.
//! - `session`: the reconnecting consumer session every role's consumers use.
//! - `lifecycle`: the dispatch role's Postgres writes, committed in groups.
//! - `dead_letter`: publishing a refused message to the dead-letter exchange with a reason.
//! - `metrics`: what the dispatcher counts, served on `/metrics` and logged periodically
//!   and at shutdown.
//! - `health`: what `/livez` and `/readyz` answer: the loops that must run, the checks of
//!   the broker, Postgres and the API server.
//! - `http`: the HTTP endpoint (`http_addr`) serving `/livez`, `/readyz` and `/metrics`.
//! - `render`: [`render_job`], the Job and Secret a task would get, as YAML.
//! - [`settings`]: the dispatcher's configuration (runtime, roles, state directory, …).

mod catalog;
mod celery;
mod context;
mod dead_letter;
mod dispatch;
mod error;
mod health;
mod http;
pub mod images;
mod lifecycle;
mod metrics;
mod queues;
mod recorder;
mod render;
pub mod runtime;
mod service;
mod session;
pub mod settings;

pub use error::{Error, Result};
pub use render::render_job;
pub use service::run;
pub use settings::{HttpAddr, Role, RuntimeKind, Settings};
