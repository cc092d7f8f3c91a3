//! Results in the format of Celery's `rpc://` result backend: a JSON message to the
//! client's reply queue with `correlation_id` = task id and the body
//! `{task_id, status, result, traceback, children, date_done}`. For `FAILURE` and `REVOKED`
//! the result is `{exc_type, exc_message, exc_module}`, which the client turns back into an
//! exception that `get()` raises.

use chrono::{SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::ShortString;
use serde_json::{Value, json};

use super::origin::DeadlineFrom;
use crate::message::{ResultStatus, TaskError, TaskId, TaskResult};
use crate::store::{TaskRecord, TaskState};

/// A Celery task state, as the client reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum CeleryState {
    /// The job runs (sent when the client asked for `STARTED`).
    Started,
    /// The task's return value.
    Success(Value),
    /// `exc_module.exc_type(message)` is raised by `get()`.
    Failure {
        exc_module: &'static str,
        exc_type: &'static str,
        message: String,
    },
    /// Cancelled or expired: `get()` raises `TaskRevokedError(reason)`.
    Revoked(String),
}

impl CeleryState {
    /// The state a task's final result is reported in. A failure raises a `RuntimeError`
    /// whose message starts with Gantry's error kind; an expired task whose deadline came from
    /// its `timelimit` raises `TimeLimitExceeded`, any other expired task is `REVOKED`
    /// (`expired`), as a Celery worker reports a task past its `expires`.
    pub fn of_result(result: &TaskResult, deadline_from: DeadlineFrom) -> CeleryState {
        match result.status {
            ResultStatus::Succeeded => {
                CeleryState::Success(result.output.clone().unwrap_or(Value::Null))
            }
            ResultStatus::Failed => failure(result.error.as_ref()),
            ResultStatus::Expired => expired(deadline_from),
            ResultStatus::Cancelled => CeleryState::Revoked("revoked".into()),
        }
    }

    /// The state of a task as stored, when it ended without a result to forward
    /// (revoked, expired or dead-lettered before it ran); `None` while it has not ended.
    pub fn of_record(record: &TaskRecord, deadline_from: DeadlineFrom) -> Option<CeleryState> {
        let error = record
            .error
            .as_ref()
            .and_then(|e| serde_json::from_value::<TaskError>(e.clone()).ok());
        Some(match record.state {
            TaskState::Succeeded => CeleryState::Success(
                record
                    .result
                    .as_ref()
                    .and_then(|r| r.get("output"))
                    .cloned()
                    .unwrap_or(Value::Null),
            ),
            TaskState::Failed | TaskState::DeadLettered => failure(error.as_ref()),
            TaskState::Expired => expired(deadline_from),
            TaskState::Cancelled => CeleryState::Revoked("revoked".into()),
            TaskState::Received
            | TaskState::Dispatched
            | TaskState::Running
            | TaskState::Retrying => return None,
        })
    }

    /// The status name Celery uses.
    pub fn status(&self) -> &'static str {
        match self {
            CeleryState::Started => "STARTED",
            CeleryState::Success(_) => "SUCCESS",
            CeleryState::Failure { .. } => "FAILURE",
            CeleryState::Revoked(_) => "REVOKED",
        }
    }
}

fn failure(error: Option<&TaskError>) -> CeleryState {
    let message = match error {
        None => "failed: the task failed without an error".to_owned(),
        Some(e) if e.message.starts_with(&format!("{}:", e.kind)) => e.message.clone(),
        Some(e) => format!("{}: {}", e.kind, e.message),
    };
    CeleryState::Failure {
        exc_module: "builtins",
        exc_type: "RuntimeError",
        message,
    }
}

fn expired(deadline_from: DeadlineFrom) -> CeleryState {
    match deadline_from {
        DeadlineFrom::TimeLimit => CeleryState::Failure {
            exc_module: "celery.exceptions",
            exc_type: "TimeLimitExceeded",
            message: "the task's time limit passed".into(),
        },
        DeadlineFrom::Expires | DeadlineFrom::Default => CeleryState::Revoked("expired".into()),
    }
}

/// Body and properties of the `rpc://` reply for `task_id` in `state`.
pub fn reply(task_id: TaskId, state: &CeleryState) -> (Vec<u8>, BasicProperties) {
    let exception = |module: &str, kind: &str, message: &str| json!({"exc_type": kind, "exc_message": [message], "exc_module": module});
    let result = match state {
        CeleryState::Started => json!({"pid": std::process::id(), "hostname": "gantry"}),
        CeleryState::Success(value) => value.clone(),
        CeleryState::Failure {
            exc_module,
            exc_type,
            message,
        } => exception(exc_module, exc_type, message),
        CeleryState::Revoked(reason) => exception("celery.exceptions", "TaskRevokedError", reason),
    };
    let done = !matches!(state, CeleryState::Started);
    let body = json!({
        "task_id": task_id.to_string(),
        "status": state.status(),
        "result": result,
        "traceback": null,
        "children": [],
        "date_done": done.then(|| Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)),
    });
    // Serializing a JSON value cannot fail.
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let props = BasicProperties::default()
        .with_correlation_id(ShortString::from(task_id.to_string()))
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(1);
    (body, props)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Attempt, ErrorKind};

    fn result(status: ResultStatus) -> TaskResult {
        TaskResult {
            task_id: TaskId::new(),
            status,
            output: Some(json!({"sum": 3})),
            error: Some(TaskError {
                kind: ErrorKind::named("command_failed"),
                message: "exit 1: boom".into(),
                retryable: false,
            }),
            attempt: Attempt::FIRST,
            evidence: Default::default(),
            started_at: None,
            finished_at: Utc::now(),
            usage: None,
            reported_by: Default::default(),
        }
    }

    fn body(task_id: TaskId, state: &CeleryState) -> Value {
        let (body, props) = reply(task_id, state);
        assert_eq!(
            props.correlation_id().as_ref().map(|c| c.to_string()),
            Some(task_id.to_string())
        );
        assert_eq!(
            props.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        serde_json::from_slice(&body).unwrap()
    }

    #[test]
    fn success_carries_the_output_and_failure_the_exception() {
        let ok = result(ResultStatus::Succeeded);
        let b = body(
            ok.task_id,
            &CeleryState::of_result(&ok, DeadlineFrom::Default),
        );
        assert_eq!(b["status"], "SUCCESS");
        assert_eq!(b["result"], json!({"sum": 3}));
        assert_eq!(b["task_id"], ok.task_id.to_string());
        assert!(b["date_done"].is_string());

        let failed = result(ResultStatus::Failed);
        let b = body(
            failed.task_id,
            &CeleryState::of_result(&failed, DeadlineFrom::Default),
        );
        assert_eq!(b["status"], "FAILURE");
        assert_eq!(b["result"]["exc_type"], "RuntimeError");
        assert_eq!(b["result"]["exc_module"], "builtins");
        assert_eq!(
            b["result"]["exc_message"],
            json!(["command_failed: exit 1: boom"])
        );
    }

    #[test]
    fn expiry_is_revoked_unless_the_time_limit_set_the_deadline() {
        let expired = result(ResultStatus::Expired);
        let b = body(
            expired.task_id,
            &CeleryState::of_result(&expired, DeadlineFrom::Expires),
        );
        assert_eq!(b["status"], "REVOKED");
        assert_eq!(b["result"]["exc_type"], "TaskRevokedError");
        assert_eq!(b["result"]["exc_module"], "celery.exceptions");
        let b = body(
            expired.task_id,
            &CeleryState::of_result(&expired, DeadlineFrom::TimeLimit),
        );
        assert_eq!(b["status"], "FAILURE");
        assert_eq!(b["result"]["exc_type"], "TimeLimitExceeded");
        let b = body(expired.task_id, &CeleryState::Started);
        assert_eq!(b["status"], "STARTED");
        assert!(b["date_done"].is_null());
    }
}
