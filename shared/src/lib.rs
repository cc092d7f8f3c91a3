//! Gantry's shared core: the message contract every part speaks, the queue topology, the
//! configuration, the Postgres store and the AMQP plumbing with reconnects.
//!
//! # Layout
//!
//! - [`message`]: `gantry.task/v1` and `gantry.result/v1`, parsed into validated domain types,
//!   and their mapping to and from AMQP properties and headers.
//! - [`topology`]: exchange and queue names under a prefix, and `apply` that declares them.
//! - [`celery`]: Celery's protocol 2 task messages, `rpc://` results and revokes, for the
//!   dispatcher's Celery bridge.
//! - [`catalog`]: the executor catalog (executor class → engine, capacity, image, resources).
//! - [`config`]: layered configuration (defaults → file → `GANTRY_*` environment).
//! - `cli` (feature `cli`): the flags every binary shares (`--config`, `--amqp-url`,
//!   `--database-url`, `--prefix`), the configuration's last layer.
//! - [`llm`]: the payload of a task for the `openai` engine, checked before any job starts.
//! - [`dead_letter`]: reading a dead letter out of its message, for the recorder and the CLI.
//! - [`store`]: the Postgres schema, its embedded migrations, the task state machine, and
//!   Gantry's types as Postgres columns.
//! - [`amqp`]: connections with backoff, a publisher with confirms that survives reconnects.
//! - [`telemetry`]: tracing set-up shared by the binaries.
//! - [`version`]: image tags read as versions, and their order.
//! - [`retry`]: the backoff policy used for every reconnect.
//! - [`probe`]: a health probe as a command (an image's `HEALTHCHECK`), without curl.

pub mod amqp;
pub mod catalog;
pub mod celery;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod dead_letter;
mod error;
pub mod llm;
pub mod message;
pub mod probe;
pub mod retry;
pub mod store;
pub mod telemetry;
pub mod topology;
pub mod version;

pub use error::{Error, Result};
