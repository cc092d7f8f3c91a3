//! Why a message is not a valid task: each reason a dead letter can carry, in words an
//! operator can act on.

use chrono::{DateTime, Utc};

use super::names::TaskId;

/// Why a message is not a valid task. Its `Display` is the human-readable reason carried in
/// the dead letter's `x-gantry-reason` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("invalid: body is not JSON ({0})")]
    NotJson(String),
    #[error("invalid: wrong schema ({0})")]
    WrongSchema(String),
    #[error(
        "invalid: message has no correlation_id; publish with correlation_id = message_id = task_id"
    )]
    MissingCorrelationId,
    #[error("invalid: correlation_id {correlation_id:?} differs from task_id {task_id}")]
    IdMismatch {
        correlation_id: String,
        task_id: TaskId,
    },
    #[error("invalid: {field}: {detail}")]
    BadField { field: &'static str, detail: String },
    /// A payload that its class's engine cannot take; `field` is a path such as
    /// `payload.messages[1].role`.
    #[error("invalid: {field}: {detail}")]
    BadPayload { field: String, detail: String },
    #[error("invalid: payload is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("invalid: unknown executor {0:?}")]
    UnknownExecutor(String),
    #[error("expired: deadline {0} passed before the task was dispatched")]
    DeadlinePassed(DateTime<Utc>),
}

impl Rejection {
    /// The reason kind: `invalid` or `expired` (the text before the colon).
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::DeadlinePassed(_) => "expired",
            _ => "invalid",
        }
    }

    /// A label for counting rejections by cause.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Rejection::NotJson(_) => "not_json",
            Rejection::WrongSchema(_) => "wrong_schema",
            Rejection::MissingCorrelationId => "missing_correlation_id",
            Rejection::IdMismatch { .. } => "id_mismatch",
            Rejection::BadField { .. } => "bad_field",
            Rejection::BadPayload { .. } => "bad_payload",
            Rejection::PayloadTooLarge { .. } => "payload_too_large",
            Rejection::UnknownExecutor(_) => "unknown_executor",
            Rejection::DeadlinePassed(_) => "deadline_passed",
        }
    }
}
