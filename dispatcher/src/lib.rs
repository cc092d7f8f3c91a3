//! `gantry-dispatcher`: consumes tasks and turns each into a job on a runtime, follows every
//! job to a terminal state, and records results and dead letters in Postgres.
//!
//! # Layout
//!
//! - [`settings`]: the dispatcher's configuration (runtime, roles, state directory, …).
//! - `service`: [`run`], which starts the roles and drains them on shutdown.
//! - `catalog`: the executor catalog in force, from a file or a watched ConfigMap.
//! - `classes`: one consumer per class, kept in step with the catalog's reloads.
//! - `dispatch`: the per-executor-class consumers: validate → image → job → `dispatched` →
//!   ack.
//! - [`images`]: which image a task's Job runs (registry service, catalog, nodes), checked.
//! - `dead_letter`: publishing a rejected message to the dead-letter exchange with a reason.
//! - `runtime`: where jobs run; `local` runs the executor as a child process.
//! - `recorder`: results and dead letters into Postgres, then forwarding to `reply_to`.
//! - `consume`: the reconnecting consumer loop every role shares.
//! - `metrics`: counters, logged periodically and at shutdown.
//! - `render`: [`render_job`], the Job and Secret a task would get, as YAML.

mod catalog;
mod classes;
mod consume;
mod dead_letter;
mod dispatch;
mod error;
pub mod images;
mod lifecycle;
mod metrics;
mod recorder;
mod render;
pub mod runtime;
mod service;
pub mod settings;

pub use error::{Error, Result};
pub use render::render_job;
pub use service::run;
pub use settings::{Role, RuntimeKind, Settings};
