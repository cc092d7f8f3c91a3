//! Dead letters: what a message in `gantry.dead` (or its audit copy) is, read the same way
//! by the recorder that records it and by `gantry dlq` that shows, replays and purges it.
//!
//! A dead letter's id is stable across copies and redeliveries: the dispatcher's
//! `x-gantry-dead-letter-id` when it dead-lettered the message itself, otherwise derived
//! from the message id and RabbitMQ's first `x-death` entry.

use chrono::{DateTime, TimeZone, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::message::{FieldTableExt, TaskId, headers, value_to_json};

/// Bodies are kept up to this size in `dead_letters.body`.
pub const MAX_RECORDED_BODY: usize = 64 * 1024;

/// What a dead letter says about itself: enough to select it, list it, replay it and
/// record its replay. Reading it copies neither the headers nor the body, which only the
/// record of a dead letter keeps ([`DeadLetter`]): a replay or purge reads every message
/// of the queue, and most of them have nothing to do with its selection.
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    pub id: Uuid,
    pub message_id: Option<String>,
    pub task_id: Option<TaskId>,
    pub attempt: Option<u32>,
    pub task: Option<String>,
    pub executor: Option<String>,
    /// `invalid: unknown executor "vlm"`, `expired: …`, `delivery_limit: …`, `max_attempts: …`
    pub reason: String,
    pub dead_at: DateTime<Utc>,
}

/// One dead letter, as the recorder records it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub label: Label,
    /// RabbitMQ's `x-death` history, as JSON.
    pub death: Option<Value>,
    /// Every header, as JSON.
    pub headers: Value,
    /// The body, cut at [`MAX_RECORDED_BODY`] bytes.
    pub body: Vec<u8>,
    pub body_truncated: bool,
}

impl Label {
    /// Reads a dead letter's label from its properties and body, whatever shape the body
    /// has.
    pub fn read(props: &BasicProperties, data: &[u8]) -> Label {
        Label::read_with(props, data, first_death(headers_of(props)))
    }

    /// [`Label::read`], given RabbitMQ's first `x-death` entry as JSON (a record converts
    /// the whole history anyway).
    fn read_with(props: &BasicProperties, data: &[u8], first_death: Option<Value>) -> Label {
        let table = headers_of(props);
        let reason = match table.get_str(headers::REASON) {
            Some(r) => r.to_owned(),
            None => rabbit_reason(first_death.as_ref()),
        };
        let body = BodyFields::read(data);
        let message_id = props.message_id().as_ref().map(|m| m.to_string());
        let attempt = body
            .attempt
            .as_ref()
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
        let string = |v: Option<Value>| match v {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        // A Celery task message refused as it came names its task in its headers.
        let celery = crate::celery::is_celery_message(table);
        let celery_header = |key: &str| {
            celery
                .then(|| table.get_str(key).map(str::to_owned))
                .flatten()
        };
        Label {
            id,
            task_id: string(body.task_id)
                .or_else(|| celery_header("id"))
                .and_then(|t| t.parse::<TaskId>().ok()),
            message_id,
            attempt,
            task: string(body.task).or_else(|| celery_header("task")),
            executor: string(body.executor),
            reason,
            dead_at,
        }
    }

    /// The reason kind: the text before the first colon (`invalid`, `expired`, …).
    pub fn reason_kind(&self) -> &str {
        reason_kind(&self.reason)
    }
}

/// The kind of a dead letter's `reason`: the text before the first colon (`invalid`,
/// `expired`, …).
pub fn reason_kind(reason: &str) -> &str {
    reason.split_once(':').map_or(reason, |(k, _)| k).trim()
}

impl DeadLetter {
    /// Reads a dead letter from its properties and body, whatever shape the body has.
    pub fn from_message(props: &BasicProperties, data: &[u8]) -> DeadLetter {
        let table = headers_of(props);
        let death = table.inner().get(headers::X_DEATH).map(value_to_json);
        let first_death = death.as_ref().and_then(|d| d.get(0)).cloned();
        DeadLetter {
            label: Label::read_with(props, data, first_death),
            death,
            headers: table.to_json(),
            body: data[..data.len().min(MAX_RECORDED_BODY)].to_vec(),
            body_truncated: data.len() > MAX_RECORDED_BODY,
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
}

/// A message's headers (an empty table when it has none).
fn headers_of(props: &BasicProperties) -> &FieldTable {
    static EMPTY: std::sync::LazyLock<FieldTable> = std::sync::LazyLock::new(FieldTable::default);
    props.headers().as_ref().unwrap_or(&EMPTY)
}

/// RabbitMQ's first `x-death` entry (its oldest death), as JSON.
fn first_death(table: &FieldTable) -> Option<Value> {
    match table.inner().get(headers::X_DEATH)? {
        AMQPValue::FieldArray(deaths) => deaths.as_slice().first().map(value_to_json),
        _ => None,
    }
}

/// The fields of a body that a dead letter is known by, each as it is in the body (a
/// dead letter's body can be anything). Read without building the rest of the body: a
/// replay reads every dead letter of the queue, and the payload is most of a task.
#[derive(Debug, Default)]
struct BodyFields {
    task_id: Option<Value>,
    task: Option<Value>,
    executor: Option<Value>,
    attempt: Option<Value>,
}

impl BodyFields {
    /// The fields of `data`; none when it is not a JSON object. As in a parsed
    /// [`Value`], a key given twice counts with its last value.
    fn read(data: &[u8]) -> BodyFields {
        serde_json::from_slice(data).unwrap_or_default()
    }
}

impl<'de> serde::Deserialize<'de> for BodyFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BodyFields, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, Visitor};

        #[derive(serde::Deserialize)]
        #[serde(field_identifier, rename_all = "snake_case")]
        enum Key {
            TaskId,
            Task,
            Executor,
            Attempt,
            #[serde(other)]
            Other,
        }

        struct Fields;

        impl<'de> Visitor<'de> for Fields {
            type Value = BodyFields;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BodyFields, A::Error> {
                let mut fields = BodyFields::default();
                while let Some(key) = map.next_key::<Key>()? {
                    let slot = match key {
                        Key::TaskId => &mut fields.task_id,
                        Key::Task => &mut fields.task,
                        Key::Executor => &mut fields.executor,
                        Key::Attempt => &mut fields.attempt,
                        Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(fields)
            }
        }

        d.deserialize_map(Fields)
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

/// One death of a task, as `x-gantry-history` lists it (the keys in the order a JSON
/// object sorts them).
#[derive(Serialize)]
struct Death<'a> {
    attempt: Option<u32>,
    dead_at: DateTime<Utc>,
    dead_letter_id: Uuid,
    reason: &'a str,
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

impl Label {
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
        let old = headers_of(props);
        let mut table = FieldTable::default();
        for (k, v) in old {
            if !DEATH_HEADERS.contains(&k.as_str()) && k.as_str() != headers::HISTORY {
                table.insert(k.clone(), v.clone());
            }
        }
        let death = Death {
            attempt: self.attempt,
            dead_at: self.dead_at,
            dead_letter_id: self.id,
            reason: &self.reason,
        };
        let earlier: Option<Vec<Value>> = old
            .get_str(headers::HISTORY)
            .and_then(|h| serde_json::from_str(h).ok());
        let history = match earlier {
            Some(mut earlier) => serde_json::to_value(&death).map(|d| {
                earlier.push(d);
                Value::Array(earlier).to_string()
            }),
            None => serde_json::to_string(&[death]),
        }
        .ok()?;
        table.insert(
            headers::HISTORY.into(),
            AMQPValue::LongString(history.into()),
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
                first_death(old)?
                    .get("routing-keys")?
                    .get(0)?
                    .as_str()
                    .map(str::to_owned)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lapin::types::{AMQPValue, FieldArray, FieldTable};
    use serde_json::json;

    use super::*;

    fn props(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert((*k).into(), v.clone());
        }
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_headers(table)
    }

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(s.into())
    }

    const TASK_ID: &str = "5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90";

    #[test]
    fn a_body_gives_its_four_fields_whatever_else_it_holds() {
        // A key given twice counts with its last value, as in a parsed `Value`, and an
        // escaped key is the same key.
        let body = format!(
            r#"{{"task": "first", "payload": {{"nested": [1, {{"task": "not this one"}}], "s": "\"q\""}},
                "task_id": "{TASK_ID}", "exec\u0075tor": "echo", "attempt": 3, "task": "demo.echo"}}"#
        );
        let label = Label::read(&props(&[]), body.as_bytes());
        assert_eq!(label.task_id, Some(TASK_ID.parse().unwrap()));
        assert_eq!(label.task.as_deref(), Some("demo.echo"));
        assert_eq!(label.executor.as_deref(), Some("echo"));
        assert_eq!(label.attempt, Some(3));
    }

    #[test]
    fn a_field_of_the_wrong_type_or_a_body_that_is_no_object_gives_nothing() {
        let attempt = [(headers::ATTEMPT, AMQPValue::LongLongInt(2))];
        let odd = json!({"task_id": "not a uuid", "task": 5, "executor": null, "attempt": "9"});
        let label = Label::read(&props(&attempt), odd.to_string().as_bytes());
        assert_eq!(
            (label.task_id, label.task, label.executor, label.attempt),
            (None, None, None, Some(2)),
            "the attempt falls back to the header"
        );
        for body in [
            &b"[1, 2]"[..],
            b"\"echo\"",
            b"{\"task\": ",
            b"",
            b"{} trailing",
        ] {
            let label = Label::read(&props(&[]), body);
            assert_eq!(
                (label.task_id, label.task, label.executor, label.attempt),
                (None, None, None, None),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_dead_letter_rabbitmq_made_is_known_by_its_first_death() {
        let mut death = FieldTable::default();
        death.insert("queue".into(), text("g.tasks.echo"));
        death.insert("reason".into(), text("expired"));
        death.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
        death.insert("exchange".into(), text("g.tasks"));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![text("echo")])),
        );
        let deaths = AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)]));
        let props = props(&[(headers::X_DEATH, deaths)]);
        let letter = DeadLetter::from_message(&props, b"not json");
        let label = &letter.label;
        assert_eq!(
            label.reason,
            "expired: the task's TTL ran out while it waited in g.tasks.echo"
        );
        assert_eq!(label.reason_kind(), "expired");
        assert_eq!(label.dead_at.timestamp(), 1_700_000_000);
        assert_eq!(label, &Label::read(&props, b"not json"), "the same label");
        assert_eq!(
            letter.death.as_ref().and_then(|d| d.get(0)?.get("reason")),
            Some(&json!("expired"))
        );
        assert_eq!(letter.headers.get("x-death"), letter.death.as_ref());
        assert_eq!(letter.body, b"not json");
        // No executor in the body or the headers: the routing key of its death.
        let replay = label
            .replay(&props, b"not json", Duration::from_secs(60), Utc::now())
            .expect("a routing key");
        assert_eq!(replay.routing_key, "echo");
        assert_eq!(replay.body, b"not json", "not a task: sent back as it was");
        assert_eq!(replay.task, None);
    }

    #[test]
    fn each_replay_adds_its_death_to_the_history() {
        let body = json!({
            "task_id": TASK_ID,
            "task": "demo.echo",
            "executor": "echo",
            "payload": {"x": 1},
            "deadline": "2026-11-23T10:00:00Z",
            "submitted_at": "2026-11-23T09:00:00Z",
            "attempt": 1,
        });
        let dead = |id: &str, reason: &str, history: Option<&str>| {
            let mut headers = vec![
                (headers::REASON, text(reason)),
                (headers::DEAD_LETTER_ID, text(id)),
                (headers::DEAD_AT, AMQPValue::Timestamp(1_700_000_000)),
            ];
            headers.extend(history.map(|h| (headers::HISTORY, text(h))));
            props(&headers)
        };
        let now: DateTime<Utc> = "2026-12-03T10:00:00Z".parse().unwrap();
        let first_id = "11111111-1111-4111-8111-111111111111";
        let first = dead(first_id, "max_attempts: failed", None);
        let data = body.to_string();
        let replay = Label::read(&first, data.as_bytes())
            .replay(&first, data.as_bytes(), Duration::from_secs(60), now)
            .unwrap();
        let history = replay
            .props
            .headers()
            .as_ref()
            .unwrap()
            .get_str(headers::HISTORY)
            .unwrap()
            .to_owned();
        assert_eq!(
            history,
            format!(
                r#"[{{"attempt":1,"dead_at":"2023-11-14T22:13:20Z","dead_letter_id":"{first_id}","reason":"max_attempts: failed"}}]"#
            )
        );
        assert_eq!(replay.task, Some((TASK_ID.parse().unwrap(), 2)));
        let sent: Value = serde_json::from_slice(&replay.body).unwrap();
        assert_eq!(sent["attempt"], json!(2));
        assert_eq!(sent["deadline"], json!("2026-12-03T10:01:00Z"));
        assert_eq!(sent["payload"], json!({"x": 1}));

        let second = dead(
            "22222222-2222-4222-8222-222222222222",
            "expired: late",
            Some(&history),
        );
        let again = Label::read(&second, &replay.body)
            .replay(&second, &replay.body, Duration::from_secs(60), now)
            .unwrap();
        let history: Value = serde_json::from_str(
            again
                .props
                .headers()
                .as_ref()
                .unwrap()
                .get_str(headers::HISTORY)
                .unwrap(),
        )
        .unwrap();
        let reasons: Vec<&str> = history
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["reason"].as_str().unwrap())
            .collect();
        assert_eq!(reasons, ["max_attempts: failed", "expired: late"]);
        assert_eq!(history[1]["attempt"], json!(2));
        assert_eq!(again.task, Some((TASK_ID.parse().unwrap(), 3)));
    }
}
