//! The message contract: `gantry.task/v1`, `gantry.result/v1` and `gantry.progress/v1`.
//!
//! Wire envelopes (`TaskEnvelope`, `TaskResult`) are plain serde types. A task read from the
//! broker is parsed, never trusted: [`Task::from_amqp`] turns properties and body into
//! validated domain types or a [`Rejection`] whose text becomes the dead letter's reason.
//!
//! # Layout
//!
//! - `task`: the task envelope, [`Task`] and its checks. `result`: [`TaskResult`].
//!   `progress`: [`Progress`], a piece of a streamed answer.
//! - `names`: [`TaskId`], [`TaskName`], [`ExecutorClass`], [`JobName`]. `attempt`: [`Attempt`].
//! - `kind`: [`ErrorKind`] and [`ReportedBy`], the stable names results carry.
//! - `rejection`: why a message is refused. `schema`: the schema names and content type.
//! - `amqp`: the header names and reading AMQP values.
//! - `warm`: [`HandedTask`] and [`WarmOrder`], what a warm executor receives.

mod amqp;
mod attempt;
mod kind;
mod names;
mod progress;
mod rejection;
mod result;
mod schema;
mod task;
mod warm;

pub use amqp::{FieldTableExt, headers, value_to_json, with_traceparent};
pub use attempt::Attempt;
pub use kind::{ErrorKind, ReportedBy};
pub use names::{ExecutorClass, InvalidName, JobName, TaskId, TaskName};
pub use progress::Progress;
pub use rejection::Rejection;
pub use result::{Evidence, ResultStatus, TaskError, TaskResult, Usage};
pub use schema::{CONTENT_TYPE, PROGRESS_SCHEMA, RESULT_SCHEMA, TASK_SCHEMA};
pub use task::{Limits, Resources, Task, TaskEnvelope, TaskSpec, traceparent};
pub use warm::{DISPATCH_ID, HandedTask, WARM_SEQ, WarmOrder};
