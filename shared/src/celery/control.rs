//! `app.control.revoke(...)`: Celery broadcasts
//! `{"method": "revoke", "arguments": {"task_id": ID or [IDs], "terminate": bool, "signal": NAME}, "destination": …}`
//! on its control exchange (`celery.pidbox`, fanout), serialized as JSON. Other control
//! methods (`ping`, `inspect`, rate limits, …) are not Gantry's to answer.

use serde_json::Value;

use crate::message::TaskId;

/// A revoke broadcast: the tasks to cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoke {
    pub task_ids: Vec<TaskId>,
    /// Celery's `terminate=True`. Gantry stops a revoked task's job either way.
    pub terminate: bool,
    /// Ids that are not UUIDs, so no Gantry task has them.
    pub ignored: Vec<String>,
}

impl Revoke {
    /// The revoke in a control message, `None` for any other message (another method,
    /// another serializer, a body that does not parse).
    pub fn from_body(content_type: Option<&str>, body: &[u8]) -> Option<Revoke> {
        if content_type.is_some_and(|c| c != "application/json") {
            return None;
        }
        let message: Value = serde_json::from_slice(body).ok()?;
        if message.get("method")?.as_str()? != "revoke" {
            return None;
        }
        let arguments = message.get("arguments")?;
        let ids: Vec<String> = match arguments.get("task_id")? {
            Value::String(id) => vec![id.clone()],
            Value::Array(ids) => ids
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => return None,
        };
        let (task_ids, ignored): (Vec<_>, Vec<_>) =
            ids.into_iter().partition(|id| id.parse::<TaskId>().is_ok());
        Some(Revoke {
            task_ids: task_ids.iter().filter_map(|id| id.parse().ok()).collect(),
            terminate: arguments
                .get("terminate")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            ignored,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoke_names_its_tasks_and_other_methods_are_not_revokes() {
        let id = TaskId::new();
        let one = format!(
            r#"{{"method": "revoke", "arguments": {{"task_id": "{id}", "terminate": true, "signal": "SIGTERM"}}, "destination": null}}"#
        );
        let revoke = Revoke::from_body(Some("application/json"), one.as_bytes()).unwrap();
        assert_eq!(revoke.task_ids, vec![id]);
        assert!(revoke.terminate);
        let many =
            format!(r#"{{"method": "revoke", "arguments": {{"task_id": ["{id}", "custom-id"]}}}}"#);
        let revoke = Revoke::from_body(None, many.as_bytes()).unwrap();
        assert_eq!(revoke.task_ids, vec![id]);
        assert_eq!(revoke.ignored, vec!["custom-id".to_owned()]);
        assert!(!revoke.terminate);
        let ping = br#"{"method": "ping", "arguments": {}}"#;
        assert_eq!(Revoke::from_body(Some("application/json"), ping), None);
        assert_eq!(
            Revoke::from_body(Some("application/x-python-serialize"), b"x"),
            None
        );
    }
}
