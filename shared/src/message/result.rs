//! `gantry.result/v1`: what an executor (or the dispatcher, on its behalf) reports.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::amqp::{FieldTableExt, headers};
use super::attempt::Attempt;
use super::kind::{ErrorKind, ReportedBy};
use super::names::TaskId;
use super::rejection::Rejection;
use super::schema::{CONTENT_TYPE, RESULT_SCHEMA};

/// How a task attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    Succeeded,
    Failed,
    Expired,
    Cancelled,
}

impl ResultStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            ResultStatus::Succeeded => "succeeded",
            ResultStatus::Failed => "failed",
            ResultStatus::Expired => "expired",
            ResultStatus::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ResultStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ResultStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(Value::String(s.to_owned()))
            .map_err(|_| format!("unknown result status {s:?}"))
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError {
    /// A stable machine-readable kind: `command_failed`, `deadline_exceeded`, `oom`, …
    pub kind: ErrorKind,
    pub message: String,
    /// Whether another attempt may succeed.
    #[serde(default)]
    pub retryable: bool,
}

/// Where and how the attempt ran: the runtime's evidence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal_reason: Option<String>,
    /// Set when the attempt ran on a warm executor (a job that serves many tasks): the
    /// attempt's place among the tasks handed to that job, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_seq: Option<u32>,
}

/// Resource usage, where the engine knows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_seconds: Option<f64>,
}

/// The body of a result message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task_id: TaskId,
    pub status: ResultStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    pub attempt: Attempt,
    #[serde(default)]
    pub evidence: Evidence,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// `executor` when the executor reported it, `dispatcher` when the runtime synthesized it
    /// because the executor could not (crash, deadline, lost node).
    #[serde(default)]
    pub reported_by: ReportedBy,
}

impl TaskResult {
    /// A result the dispatcher publishes on an executor's behalf, for an attempt that
    /// ended without one (it never started, crashed, was lost or stopped): no output, the
    /// error, the evidence so far with its `terminal_reason`, finished now.
    pub fn on_behalf(
        task_id: TaskId,
        attempt: Attempt,
        status: ResultStatus,
        error: TaskError,
        evidence: Evidence,
        terminal_reason: &str,
    ) -> TaskResult {
        TaskResult {
            task_id,
            status,
            output: None,
            error: Some(error),
            attempt,
            evidence: Evidence {
                terminal_reason: Some(terminal_reason.to_owned()),
                ..evidence
            },
            started_at: None,
            finished_at: Utc::now(),
            usage: None,
            reported_by: ReportedBy::Dispatcher,
        }
    }

    /// Body and properties for publishing to the results exchange.
    ///
    /// # Errors
    /// Only if the result cannot be serialized (it always can).
    pub fn to_amqp(&self) -> Result<(Vec<u8>, BasicProperties), serde_json::Error> {
        let body = serde_json::to_vec(self)?;
        let mut table = FieldTable::default();
        table.insert(
            headers::SCHEMA.into(),
            AMQPValue::LongString(RESULT_SCHEMA.into()),
        );
        table.insert(
            headers::ATTEMPT.into(),
            AMQPValue::LongLongInt(self.attempt.get().into()),
        );
        let id = ShortString::from(self.task_id.to_string());
        let props = BasicProperties::default()
            .with_message_id(id.clone())
            .with_correlation_id(id)
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_timestamp(Utc::now().timestamp().max(0) as u64)
            .with_headers(table);
        Ok((body, props))
    }

    /// Parses a result message.
    ///
    /// # Errors
    /// A [`Rejection`] saying what is wrong.
    pub fn from_amqp(props: &BasicProperties, body: &[u8]) -> Result<TaskResult, Rejection> {
        let json: Value =
            serde_json::from_slice(body).map_err(|e| Rejection::NotJson(e.to_string()))?;
        let schema = props
            .headers()
            .as_ref()
            .and_then(|h| h.get_str(headers::SCHEMA).map(str::to_owned));
        if schema.as_deref() != Some(RESULT_SCHEMA) {
            return Err(Rejection::WrongSchema(format!(
                "header {} is {schema:?}, expected {RESULT_SCHEMA:?}",
                headers::SCHEMA
            )));
        }
        let result: TaskResult =
            serde_json::from_value(json).map_err(|e| Rejection::WrongSchema(e.to_string()))?;
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn a_result_survives_the_round_trip_through_amqp() {
        let result = TaskResult {
            task_id: TaskId::new(),
            status: ResultStatus::Failed,
            output: None,
            error: Some(TaskError {
                kind: ErrorKind::CommandFailed,
                message: "exit 3".into(),
                retryable: false,
            }),
            attempt: Attempt::FIRST.next(),
            evidence: Evidence {
                job_name: Some("gantry-x-a2".into()),
                ..Evidence::default()
            },
            started_at: Some(Utc::now()),
            finished_at: Utc::now(),
            usage: Some(Usage {
                gpu_seconds: Some(1.5),
                ..Usage::default()
            }),
            reported_by: ReportedBy::Executor,
        };
        let (body, props) = result.to_amqp().unwrap();
        assert_eq!(TaskResult::from_amqp(&props, &body).unwrap(), result);
        assert!(TaskResult::from_amqp(&BasicProperties::default(), &body).is_err());
        assert_eq!("expired".parse::<ResultStatus>(), Ok(ResultStatus::Expired));
    }
}
