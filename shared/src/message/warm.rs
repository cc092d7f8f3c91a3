//! What the dispatcher sends a warm executor (one job serving many tasks of its class):
//! each task it hands over, on the executor's own task queue, and the executor's orders
//! (cancel one task, drain and end), on its control queue. Only the dispatcher publishes
//! to either; see `docs/decisions.md` (warm executors).

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::{Deserialize, Serialize};

use super::amqp::{FieldTableExt, headers, short};
use super::names::TaskId;
use super::rejection::Rejection;
use super::schema::{CONTENT_TYPE, TASK_SCHEMA};
use super::task::{Task, TaskEnvelope};

/// Header: the dispatch id of the attempt handed over.
pub const DISPATCH_ID: &str = "x-gantry-dispatch-id";
/// Header: the attempt's place among the tasks handed to the executor, from 1.
pub const WARM_SEQ: &str = "x-gantry-warm-seq";

/// A task as a warm executor receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct HandedTask {
    pub envelope: TaskEnvelope,
    pub dispatch_id: String,
    pub seq: u32,
    pub reply_to: Option<String>,
    pub traceparent: Option<String>,
}

impl HandedTask {
    /// Body and properties of `task` handed over as `seq` under `dispatch_id`. Unlike a
    /// task on a class queue, it carries no TTL: it must reach the executor (which expires
    /// it at its deadline) rather than vanish from a queue without a dead-letter exchange.
    ///
    /// # Errors
    /// The reply-to name is too long for AMQP, or the body cannot be encoded.
    pub fn to_amqp(
        task: &Task,
        dispatch_id: &str,
        seq: u32,
    ) -> Result<(Vec<u8>, BasicProperties), Rejection> {
        let body =
            serde_json::to_vec(&task.envelope()).map_err(|e| Rejection::NotJson(e.to_string()))?;
        let mut table = FieldTable::default();
        table.insert(
            headers::SCHEMA.into(),
            AMQPValue::LongString(TASK_SCHEMA.into()),
        );
        table.insert(
            DISPATCH_ID.into(),
            AMQPValue::LongString(dispatch_id.into()),
        );
        table.insert(WARM_SEQ.into(), AMQPValue::LongLongInt(seq.into()));
        if let Some(tp) = &task.traceparent {
            table.insert(
                headers::TRACEPARENT.into(),
                AMQPValue::LongString(tp.as_str().into()),
            );
        }
        let id = ShortString::from(task.id.to_string());
        let mut props = BasicProperties::default()
            .with_message_id(id.clone())
            .with_correlation_id(id)
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_headers(table);
        if let Some(reply_to) = &task.reply_to {
            props = props.with_reply_to(short("reply_to", reply_to)?);
        }
        Ok((body, props))
    }

    /// Reads a handed-over task.
    ///
    /// # Errors
    /// What is missing or malformed, in words.
    pub fn from_amqp(props: &BasicProperties, body: &[u8]) -> Result<HandedTask, String> {
        let envelope: TaskEnvelope = serde_json::from_slice(body)
            .map_err(|e| format!("the body is not a gantry.task/v1 task ({e})"))?;
        let table = props.headers().clone().unwrap_or_default();
        let dispatch_id = table
            .get_str(DISPATCH_ID)
            .ok_or_else(|| format!("the {DISPATCH_ID} header is missing"))?
            .to_owned();
        let seq = table
            .get_i64(WARM_SEQ)
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("the {WARM_SEQ} header is missing or not a count from 1"))?;
        Ok(HandedTask {
            envelope,
            dispatch_id,
            seq,
            reply_to: props.reply_to().as_ref().map(|r| r.to_string()),
            traceparent: table.get_str(headers::TRACEPARENT).map(str::to_owned),
        })
    }
}

/// An order to a warm executor, on its control queue (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WarmOrder {
    /// Abort this task if it runs; skip it if it arrives later.
    Cancel { task_id: TaskId },
    /// Take no more tasks, finish those in hand, and end.
    Drain,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ExecutorClass, Limits, TaskName, TaskSpec};
    use serde_json::json;

    #[test]
    fn a_handed_task_reads_back_with_its_dispatch_and_place() {
        let task = Task::new(
            TaskSpec {
                executor: ExecutorClass::parse("echo").unwrap(),
                name: TaskName::parse("t").unwrap(),
                payload: json!({"a": 1}),
                ttl: std::time::Duration::from_secs(60),
                reply_to: Some("replies".into()),
                idempotency_key: None,
                priority: None,
                resources: None,
            },
            &Limits::default(),
        )
        .unwrap();
        let (body, props) = HandedTask::to_amqp(&task, "i.d", 7).unwrap();
        assert!(props.expiration().is_none());
        let handed = HandedTask::from_amqp(&props, &body).unwrap();
        assert_eq!(handed.envelope, task.envelope());
        assert_eq!((handed.dispatch_id.as_str(), handed.seq), ("i.d", 7));
        assert_eq!(handed.reply_to.as_deref(), Some("replies"));
        assert_eq!(handed.traceparent, task.traceparent);
        let bare = BasicProperties::default();
        assert!(
            HandedTask::from_amqp(&bare, &body)
                .unwrap_err()
                .contains(DISPATCH_ID)
        );
    }

    #[test]
    fn orders_are_small_json() {
        let id = TaskId::new();
        let text = serde_json::to_string(&WarmOrder::Cancel { task_id: id }).unwrap();
        assert_eq!(text, format!(r#"{{"cancel":{{"task_id":"{id}"}}}}"#));
        assert_eq!(
            serde_json::from_str::<WarmOrder>(r#""drain""#).unwrap(),
            WarmOrder::Drain
        );
    }
}
