//! The client side of Gantry: what a backend links to submit GPU tasks and learn how they
//! ended. The operator's `gantry` command line is built on it, in `gantry-cli`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use gantry_producer::{Config, ExecutorClass, Producer, TaskName, TaskSpec};
//!
//! let config = Config::load(None)?; // defaults, then GANTRY_* variables
//! let producer = Producer::connect(&config).await?;
//! let id = producer
//!     .submit(TaskSpec {
//!         executor: ExecutorClass::parse("echo")?,
//!         name: TaskName::parse("demo.echo")?,
//!         payload: serde_json::json!({"hello": "world"}),
//!         ttl: Duration::from_secs(3600),
//!         reply_to: None,
//!         idempotency_key: None,
//!         priority: None,
//!         resources: None,
//!     })
//!     .await?;
//! let record = producer.wait(id, Duration::from_secs(600)).await?;
//! println!("{id}: {}", record.state);
//! producer.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`Producer`]: publishes tasks with confirms, checked against the executor catalog when
//!   given one; follows them through its tracker.
//! - [`Tracker`]: reads a task's state and history from Postgres and waits for its end.
//! - [`TaskStream`]: a task submitted with streaming on, followed as it is made (an LLM's
//!   tokens, as [`StreamEvent::Progress`]) to its end ([`StreamEvent::Finished`]).
//! - [`Error`]: everything that can go wrong here, each variant saying what to do.

mod endings;
mod error;
mod producer;
mod stream;
mod tracker;

pub use error::{Error, Result, human_duration};
pub use producer::Producer;
pub use stream::{StreamEvent, TaskStream};
pub use tracker::{TaskEvent, Tracker};

// A library user names these in `submit`, `wait` and streams; re-exported so one import
// suffices.
pub use gantry_shared::catalog::Catalog;
pub use gantry_shared::config::Config;
pub use gantry_shared::message::{
    Attempt, ExecutorClass, Progress, Task, TaskId, TaskName, TaskSpec,
};
pub use gantry_shared::store::{TaskRecord, TaskState};
