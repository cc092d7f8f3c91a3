//! How a task is shown: an aligned key/value block for people, one JSON object for scripts.
//! The block and the timestamp format are shared with `gantry dlq` (see `dlq_view`).

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use gantry_producer::TaskEvent;
use gantry_shared::message::{Attempt, TaskId};
use gantry_shared::store::{TaskRecord, TaskState};
use serde::Serialize;
use serde_json::Value;

/// The task as `status`, `wait` and `submit --wait` show it. Every key is always present
/// (`null` when unknown), so scripts can rely on the shape; `events` only from `status`.
#[derive(Debug, Serialize)]
pub(crate) struct TaskView<'a> {
    task_id: TaskId,
    task: &'a str,
    executor: &'a str,
    state: TaskState,
    /// The same as `state`, under the name the result message uses.
    status: TaskState,
    attempt: Attempt,
    /// `result.output`: what the task produced.
    output: Option<&'a Value>,
    /// `{kind, message, retryable}` when the attempt failed.
    error: Option<&'a Value>,
    /// The stored result envelope, as the executor (or the dispatcher) reported it.
    result: Option<&'a Value>,
    dispatch_id: Option<&'a str>,
    job_name: Option<&'a str>,
    pod_name: Option<&'a str>,
    node: Option<&'a str>,
    /// Set when the attempt ran on a warm executor: its place among that job's tasks.
    warm_seq: Option<u32>,
    terminal_reason: Option<&'a str>,
    reply_to: Option<&'a str>,
    submitted_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    dispatched_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    deadline: DateTime<Utc>,
    forwarded_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<&'a [TaskEvent]>,
}

impl<'a> TaskView<'a> {
    pub(crate) fn new(record: &'a TaskRecord, events: Option<&'a [TaskEvent]>) -> Self {
        let from_result = |key: &str| {
            record
                .result
                .as_ref()
                .and_then(|r| r.get(key))
                .filter(|v| !v.is_null())
        };
        TaskView {
            task_id: record.task_id,
            task: &record.task,
            executor: &record.executor,
            state: record.state,
            status: record.state,
            attempt: record.attempt,
            output: from_result("output"),
            error: record.error.as_ref().or_else(|| from_result("error")),
            result: record.result.as_ref(),
            dispatch_id: record.dispatch_id.as_deref(),
            job_name: record.job_name.as_deref(),
            pod_name: record.pod_name.as_deref(),
            node: record.node.as_deref(),
            warm_seq: record.warm_seq,
            terminal_reason: record.terminal_reason.as_deref(),
            reply_to: record.reply_to.as_deref(),
            submitted_at: record.submitted_at,
            received_at: record.received_at,
            dispatched_at: record.dispatched_at,
            started_at: record.started_at,
            finished_at: record.finished_at,
            deadline: record.deadline,
            forwarded_at: record.forwarded_at,
            events,
        }
    }

    /// One pretty-printed JSON object.
    pub(crate) fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }

    /// The aligned block people read; fields with no value are left out.
    pub(crate) fn to_human(&self) -> String {
        let mut block = Block::default();
        block.row("task_id", self.task_id.to_string());
        block.row("task", self.task);
        block.row("executor", self.executor);
        block.row("state", self.state.as_str());
        block.row("attempt", self.attempt.to_string());
        block.row("submitted_at", timestamp(self.submitted_at));
        block.row("received_at", timestamp(self.received_at));
        block.opt("dispatched_at", self.dispatched_at.map(timestamp));
        block.opt("started_at", self.started_at.map(timestamp));
        block.opt("finished_at", self.finished_at.map(timestamp));
        block.row("deadline", timestamp(self.deadline));
        block.opt("dispatch_id", self.dispatch_id);
        block.opt("job_name", self.job_name);
        block.opt("pod_name", self.pod_name);
        block.opt("node", self.node);
        block.opt(
            "warm",
            self.warm_seq
                .map(|n| format!("yes, task {n} of its warm executor")),
        );
        block.opt("terminal_reason", self.terminal_reason);
        block.opt("reply_to", self.reply_to);
        block.opt("forwarded_at", self.forwarded_at.map(timestamp));
        block.opt("error", self.error.map(describe_error));
        block.opt("output", self.output.map(pretty));
        let mut text = block.render();
        if let Some(events) = self.events.filter(|e| !e.is_empty()) {
            text.push_str("\nhistory\n");
            let width = events.iter().map(|e| e.event.len()).max().unwrap_or(0);
            let _ = writeln!(text, "  attempt  {:width$}  at", "event");
            for e in events {
                let _ = writeln!(
                    text,
                    "  {:<7}  {:width$}  {}",
                    e.attempt,
                    e.event,
                    timestamp(e.at)
                );
            }
        }
        text
    }
}

/// The key column: the longest key (`terminal_reason`) and two spaces, so every task's
/// block lines up the same whichever fields it has.
const KEY_WIDTH: usize = "terminal_reason".len() + 2;

/// Rows of `key  value`, the values aligned; a multi-line value continues under itself.
#[derive(Default)]
pub(crate) struct Block {
    rows: Vec<(&'static str, String)>,
}

impl Block {
    pub(crate) fn row(&mut self, key: &'static str, value: impl Into<String>) {
        self.rows.push((key, value.into()));
    }

    pub(crate) fn opt(&mut self, key: &'static str, value: Option<impl Into<String>>) {
        if let Some(value) = value {
            self.row(key, value);
        }
    }

    pub(crate) fn render(&self) -> String {
        let width = self
            .rows
            .iter()
            .map(|(k, _)| k.len() + 2)
            .max()
            .unwrap_or(0)
            .max(KEY_WIDTH);
        let mut text = String::new();
        for (key, value) in &self.rows {
            let mut lines = value.lines();
            let _ = writeln!(text, "{key:width$}{}", lines.next().unwrap_or_default());
            for line in lines {
                let _ = writeln!(text, "{:width$}{line}", "");
            }
        }
        text
    }
}

/// RFC 3339 in UTC with milliseconds.
pub(crate) fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// `kind: message (retryable)` for a task error, its JSON otherwise.
fn describe_error(e: &Value) -> String {
    let field = |k: &str| e.get(k).and_then(Value::as_str);
    match (field("kind"), field("message")) {
        (Some(kind), Some(message)) => {
            let retryable = e.get("retryable").and_then(Value::as_bool) == Some(true);
            let suffix = if retryable { " (retryable)" } else { "" };
            // Dead-letter reasons already start with their kind ("invalid: …").
            if message.starts_with(&format!("{kind}:")) {
                format!("{message}{suffix}")
            } else {
                format!("{kind}: {message}{suffix}")
            }
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn succeeded() -> TaskRecord {
        let at: DateTime<Utc> = "2025-11-23T10:00:00Z".parse().unwrap();
        let id: TaskId = "5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90".parse().unwrap();
        TaskRecord {
            task_id: id,
            task: "demo.echo".into(),
            executor: "echo".into(),
            state: TaskState::Succeeded,
            attempt: Attempt::FIRST,
            reply_to: None,
            deadline: at + chrono::Duration::hours(1),
            submitted_at: at,
            received_at: at,
            dispatched_at: Some(at),
            started_at: Some(at),
            finished_at: Some(at + chrono::Duration::seconds(2)),
            dispatch_id: Some("d-1".into()),
            job_name: Some("gantry-5b0e7a643d8c4f0e9a518f4e2c1d7b90-a1".into()),
            pod_name: None,
            node: Some("gpu-1".into()),
            terminal_reason: None,
            warm_seq: None,
            result: Some(json!({
                "task_id": id,
                "status": "succeeded",
                "output": {"hello": "world"},
                "attempt": 1,
                "finished_at": "2025-11-23T10:00:02Z",
            })),
            error: None,
            forwarded_at: None,
        }
    }

    #[test]
    fn the_json_view_has_every_key_scripts_rely_on() {
        let record = succeeded();
        let v: Value =
            serde_json::from_str(&TaskView::new(&record, None).to_json().unwrap()).unwrap();
        for key in [
            "task_id",
            "task",
            "executor",
            "state",
            "status",
            "attempt",
            "output",
            "error",
            "result",
            "dispatch_id",
            "job_name",
            "pod_name",
            "node",
            "terminal_reason",
            "submitted_at",
            "received_at",
            "dispatched_at",
            "started_at",
            "finished_at",
            "deadline",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["status"], "succeeded");
        assert_eq!(v["state"], "succeeded");
        assert_eq!(v["output"], json!({"hello": "world"}));
        assert_eq!(v["error"], Value::Null);
        assert_eq!(v["pod_name"], Value::Null);
        assert_eq!(v["result"]["status"], "succeeded");
        assert_eq!(v["task_id"], "5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90");
        assert_eq!(v["finished_at"], "2025-11-23T10:00:02Z");
        assert!(v.get("events").is_none());
    }

    #[test]
    fn a_failure_shows_its_error_and_no_output() {
        let mut record = succeeded();
        record.state = TaskState::Failed;
        let reason = json!({"kind": "invalid", "message": "invalid: unknown executor \"vlm\""});
        assert_eq!(describe_error(&reason), "invalid: unknown executor \"vlm\"");
        let error = json!({"kind": "oom", "message": "OOMKilled", "retryable": true});
        record.result = Some(json!({"status": "failed", "error": error}));
        record.error = Some(error.clone());
        record.terminal_reason = Some("OOMKilled".into());
        let view = TaskView::new(&record, None);
        let v: Value = serde_json::from_str(&view.to_json().unwrap()).unwrap();
        assert_eq!(v["output"], Value::Null);
        assert_eq!(v["error"], error);
        assert!(
            view.to_human()
                .contains("error            oom: OOMKilled (retryable)\n")
        );
    }

    #[test]
    fn the_human_view_aligns_values_and_indents_output() {
        let record = succeeded();
        let events = [TaskEvent {
            attempt: Attempt::FIRST,
            event: "received".into(),
            detail: None,
            at: record.received_at,
        }];
        let text = TaskView::new(&record, Some(&events)).to_human();
        assert!(text.starts_with("task_id          5b0e7a64-"), "{text}");
        assert!(text.contains("\nstate            succeeded\n"), "{text}");
        assert!(
            text.contains("\noutput           {\n                   \"hello\": \"world\"\n                 }\n"),
            "{text}"
        );
        assert!(!text.contains("pod_name"), "{text}");
        assert!(
            text.contains(
                "history\n  attempt  event     at\n  1        received  2025-11-23T10:00:00.000Z\n"
            ),
            "{text}"
        );
        let v: Value =
            serde_json::from_str(&TaskView::new(&record, Some(&events)).to_json().unwrap())
                .unwrap();
        assert_eq!(v["events"][0]["event"], "received");
    }
}
