//! The names of the contract's schemas and its content type.

/// The schema of a task message, carried in the `x-gantry-schema` header.
pub const TASK_SCHEMA: &str = "gantry.task/v1";
/// The schema of a result message, carried in the `x-gantry-schema` header.
pub const RESULT_SCHEMA: &str = "gantry.result/v1";
/// The schema of a progress message, carried in the `x-gantry-schema` header.
pub const PROGRESS_SCHEMA: &str = "gantry.progress/v1";
/// Every Gantry message body is JSON.
pub const CONTENT_TYPE: &str = "application/json";
