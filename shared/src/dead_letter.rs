//! Dead letters: what a message in `gantry.dead` (or its audit copy) is, read the same way
//! by the recorder that records it and by `gantry dlq` that shows, replays and purges it.
//!
//! A dead letter's id is stable across copies and redeliveries: the dispatcher's
//! `x-gantry-dead-letter-id` when it dead-lettered the message itself, otherwise derived
//! from the message id and RabbitMQ's first `x-death` entry.

use chrono::{DateTime, TimeZone, Utc};
use lapin::BasicProperties;
use serde_json::Value;
use uuid::Uuid;

use crate::message::{FieldTableExt, TaskId, headers, value_to_json};

/// Bodies are kept up to this size in `dead_letters.body`.
pub const MAX_RECORDED_BODY: usize = 64 * 1024;

/// One dead letter, read from its message.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: Uuid,
    pub message_id: Option<String>,
    pub task_id: Option<TaskId>,
    pub attempt: Option<u32>,
    pub task: Option<String>,
    pub executor: Option<String>,
    /// `invalid: unknown executor "vlm"`, `expired: …`, `delivery_limit: …`, `max_attempts: …`
    pub reason: String,
    /// RabbitMQ's `x-death` history, as JSON.
    pub death: Option<Value>,
    /// Every header, as JSON.
    pub headers: Value,
    /// The body, cut at [`MAX_RECORDED_BODY`] bytes.
    pub body: Vec<u8>,
    pub body_truncated: bool,
    pub dead_at: DateTime<Utc>,
}

impl DeadLetter {
    /// Reads a dead letter from its properties and body, whatever shape the body has.
    pub fn from_message(props: &BasicProperties, data: &[u8]) -> DeadLetter {
        let table = props.headers().clone().unwrap_or_default();
        let death = table.inner().get(headers::X_DEATH).map(value_to_json);
        let first_death = death.as_ref().and_then(|d| d.get(0)).cloned();
        let reason = match table.get_str(headers::REASON) {
            Some(r) => r.to_owned(),
            None => rabbit_reason(first_death.as_ref()),
        };
        let body: Option<Value> = serde_json::from_slice(data).ok();
        let field = |k: &str| {
            body.as_ref()
                .and_then(|b| b.get(k))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let message_id = props.message_id().as_ref().map(|m| m.to_string());
        let attempt = body
            .as_ref()
            .and_then(|b| b.get("attempt"))
            .and_then(Value::as_u64)
            .or_else(|| {
                table
                    .get_i64(headers::ATTEMPT)
                    .and_then(|a| u64::try_from(a).ok())
            })
            .and_then(|a| u32::try_from(a).ok());
        let dead_at = table
            .get_i64(headers::DEAD_AT)
            .or_else(|| {
                first_death
                    .as_ref()
                    .and_then(|d| d.get("time"))
                    .and_then(Value::as_i64)
            })
            .and_then(|t| Utc.timestamp_opt(t, 0).single())
            .unwrap_or_else(Utc::now);
        let id = table
            .get_str(headers::DEAD_LETTER_ID)
            .and_then(|s| Uuid::parse_str(s).ok())
            .unwrap_or_else(|| derived_id(message_id.as_deref(), first_death.as_ref(), data));
        DeadLetter {
            id,
            task_id: field("task_id").and_then(|t| t.parse::<TaskId>().ok()),
            message_id,
            attempt,
            task: field("task"),
            executor: field("executor"),
            reason,
            death,
            headers: table.to_json(),
            body: data[..data.len().min(MAX_RECORDED_BODY)].to_vec(),
            body_truncated: data.len() > MAX_RECORDED_BODY,
            dead_at,
        }
    }

    /// Whether this dead letter ends its task. A refused *result* message names a task
    /// whose job may still run and report properly, so it does not.
    pub fn ends_task(&self) -> bool {
        // Task queues are `<prefix>.tasks.<class>` and a class has no dots, so only the
        // results queue ends with `.results`.
        !self
            .headers
            .get(headers::ORIGINAL_QUEUE)
            .and_then(Value::as_str)
            .is_some_and(|q| q.ends_with(".results"))
    }

    /// The reason kind: the text before the first colon (`invalid`, `expired`, …).
    pub fn reason_kind(&self) -> &str {
        self.reason
            .split_once(':')
            .map_or(self.reason.as_str(), |(k, _)| k)
            .trim()
    }
}

/// The reason RabbitMQ recorded in `x-death`, in words.
fn rabbit_reason(first_death: Option<&Value>) -> String {
    let get = |k: &str| {
        first_death
            .and_then(|d| d.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    let queue = get("queue");
    match get("reason") {
        "expired" => format!("expired: the task's TTL ran out while it waited in {queue}"),
        "delivery_limit" => format!(
            "delivery_limit: delivered too many times from {queue} without being acknowledged (poison message)"
        ),
        "rejected" => format!("rejected: refused by a consumer of {queue}"),
        "maxlen" => format!("maxlen: {queue} was full"),
        "" => "unknown: the dead letter carries no reason".into(),
        other => format!("{other}: dead-lettered from {queue}"),
    }
}

/// A stable id for a dead letter RabbitMQ produced itself.
fn derived_id(message_id: Option<&str>, first_death: Option<&Value>, body: &[u8]) -> Uuid {
    let mut key = Vec::new();
    key.extend_from_slice(message_id.unwrap_or_default().as_bytes());
    if let Some(d) = first_death {
        // `count` grows when the copy in gantry.dead is requeued; the death itself does not.
        for k in ["queue", "reason", "time", "exchange"] {
            key.extend_from_slice(
                d.get(k)
                    .map(Value::to_string)
                    .unwrap_or_default()
                    .as_bytes(),
            );
        }
    }
    if message_id.is_none() {
        key.extend_from_slice(body);
    }
    Uuid::new_v5(&Uuid::NAMESPACE_OID, &key)
}

/// A dead letter made ready to publish again, as a new attempt.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The executor class: the routing key on the tasks exchange.
    pub routing_key: String,
    pub body: Vec<u8>,
    pub props: BasicProperties,
    /// Set when the body is a task: its id and the attempt this replay starts.
    pub task: Option<(TaskId, u32)>,
}

/// Headers RabbitMQ or Gantry's dead-lettering added; a replay starts without them.
/// (A copied `x-death` that names a queue can make RabbitMQ drop the message silently.)
const DEATH_HEADERS: &[&str] = &[
    headers::X_DEATH,
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
    headers::REASON,
    headers::DEAD_LETTER_ID,
    headers::DEAD_AT,
    headers::ORIGINAL_QUEUE,
    headers::ORIGINAL_ROUTING_KEY,
    crate::topology::RETRY_TIER_HEADER,
];

impl DeadLetter {
    /// The message to publish for replaying this dead letter (whose full body is `data`):
    /// a task gets the next attempt and a fresh deadline `ttl` from `now` (never the stale
    /// expiration); anything else goes back as it was, to be judged again. History is kept
    /// in `x-gantry-history`.
    ///
    /// `None` when no routing key can be found (no executor in the body or the headers).
    pub fn replay(
        &self,
        props: &BasicProperties,
        data: &[u8],
        ttl: std::time::Duration,
        now: DateTime<Utc>,
    ) -> Option<Replay> {
        use lapin::types::{AMQPValue, FieldTable};

        let old = props.headers().clone().unwrap_or_default();
        let mut table = FieldTable::default();
        for (k, v) in &old {
            if !DEATH_HEADERS.contains(&k.as_str()) && k.as_str() != headers::HISTORY {
                table.insert(k.clone(), v.clone());
            }
        }
        let mut history: Vec<Value> = old
            .get_str(headers::HISTORY)
            .and_then(|h| serde_json::from_str(h).ok())
            .unwrap_or_default();
        history.push(serde_json::json!({
            "attempt": self.attempt,
            "reason": self.reason,
            "dead_at": self.dead_at,
            "dead_letter_id": self.id,
        }));
        table.insert(
            headers::HISTORY.into(),
            AMQPValue::LongString(Value::Array(history).to_string().into()),
        );

        let envelope = serde_json::from_slice::<crate::message::TaskEnvelope>(data).ok();
        let (body, task) = match envelope {
            Some(mut env) => {
                env.attempt = env.attempt.saturating_add(1);
                env.deadline = now + chrono::Duration::from_std(ttl).ok()?;
                table.insert(
                    headers::ATTEMPT.into(),
                    AMQPValue::LongLongInt(env.attempt.into()),
                );
                let body = serde_json::to_vec(&env).ok()?;
                (body, Some((env.task_id, env.attempt)))
            }
            None => (data.to_vec(), None),
        };
        let routing_key = self
            .executor
            .clone()
            .or_else(|| {
                old.get_str(headers::ORIGINAL_ROUTING_KEY)
                    .map(str::to_owned)
            })
            .or_else(|| {
                self.death.as_ref().and_then(|d| {
                    d.get(0)?
                        .get("routing-keys")?
                        .get(0)?
                        .as_str()
                        .map(str::to_owned)
                })
            })?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut out = BasicProperties::default()
            .with_headers(table)
            .with_delivery_mode(2)
            .with_expiration(ttl_ms.to_string().into())
            .with_timestamp(now.timestamp().max(0) as u64);
        if let Some(v) = props.content_type().clone() {
            out = out.with_content_type(v);
        }
        if let Some(v) = props.correlation_id().clone() {
            out = out.with_correlation_id(v);
        }
        if let Some(v) = props.message_id().clone() {
            out = out.with_message_id(v);
        }
        if let Some(v) = props.reply_to().clone() {
            out = out.with_reply_to(v);
        }
        if let Some(v) = *props.priority() {
            out = out.with_priority(v);
        }
        Some(Replay {
            routing_key,
            body,
            props: out,
            task,
        })
    }
}
