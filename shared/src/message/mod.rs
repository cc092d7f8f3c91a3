//! The message contract: `gantry.task/v1` and `gantry.result/v1`.
//!
//! Wire envelopes (`TaskEnvelope`, `TaskResult`) are plain serde types. A task read from the
//! broker is parsed, never trusted: [`Task::from_amqp`] turns properties and body into
//! validated domain types or a [`Rejection`] whose text becomes the dead letter's reason.

mod amqp;
mod names;
mod result;
mod task;

pub use amqp::{FieldTableExt, headers, value_to_json};
pub use names::{ExecutorClass, InvalidName, JobName, TaskId, TaskName};
pub use result::{Evidence, ResultStatus, TaskError, TaskResult, Usage};
pub use task::{Limits, Rejection, Resources, Task, TaskEnvelope, TaskSpec, traceparent};

/// The schema of a task message, carried in the `x-gantry-schema` header.
pub const TASK_SCHEMA: &str = "gantry.task/v1";
/// The schema of a result message, carried in the `x-gantry-schema` header.
pub const RESULT_SCHEMA: &str = "gantry.result/v1";
/// Every Gantry message body is JSON.
pub const CONTENT_TYPE: &str = "application/json";
