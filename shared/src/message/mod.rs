//! The message contract: `gantry.task/v1` and `gantry.result/v1`.
//!
//! Wire envelopes (`TaskEnvelope`, `TaskResult`) are plain serde types. A task read from the
//! broker is parsed, never trusted: [`Task::from_amqp`] turns properties and body into
//! validated domain types or a [`Rejection`] whose text becomes the dead letter's reason.

mod amqp;
mod attempt;
mod kind;
mod names;
mod rejection;
mod result;
mod schema;
mod task;

pub use amqp::{FieldTableExt, headers, value_to_json};
pub use attempt::Attempt;
pub use kind::{ErrorKind, ReportedBy};
pub use names::{ExecutorClass, InvalidName, JobName, TaskId, TaskName};
pub use rejection::Rejection;
pub use result::{Evidence, ResultStatus, TaskError, TaskResult, Usage};
pub use schema::{CONTENT_TYPE, RESULT_SCHEMA, TASK_SCHEMA};
pub use task::{Limits, Resources, Task, TaskEnvelope, TaskSpec, traceparent};
