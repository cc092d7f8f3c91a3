//! `gantry.task/v1`: the envelope on the wire and the validated [`Task`].

use std::fmt;

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::amqp::{FieldTableExt, headers, short};
use super::attempt::Attempt;
use super::names::{ExecutorClass, InvalidName, TaskId, TaskName};
use super::rejection::Rejection;
use super::schema::{CONTENT_TYPE, TASK_SCHEMA};

/// The body of a task message, exactly as it travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEnvelope {
    pub task_id: TaskId,
    pub task: String,
    pub executor: String,
    #[serde(default)]
    pub payload: Value,
    /// Absolute end-to-end deadline; the message TTL is derived from it.
    pub deadline: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    pub submitted_at: DateTime<Utc>,
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// The caller wants the work's progress (an LLM's tokens) as it is made, as
    /// `gantry.progress/v1` messages; see [`super::Progress`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

fn first_attempt() -> u32 {
    1
}

/// GPU resources a task asks for, within what its executor class allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
}

/// Limits applied when a task is received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted payload, in bytes of its JSON encoding.
    pub max_payload_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // Well under the 1 MiB a Kubernetes Secret can hold, where the payload is mounted.
        Limits {
            max_payload_bytes: 256 * 1024,
        }
    }
}

impl Limits {
    /// A body larger than this is refused before it is parsed.
    fn max_body_bytes(&self) -> usize {
        self.max_payload_bytes + 64 * 1024
    }
}

/// What a caller asks for; [`Task::new`] turns it into a task with an id and a deadline.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub executor: ExecutorClass,
    pub name: TaskName,
    pub payload: Value,
    pub ttl: std::time::Duration,
    pub reply_to: Option<String>,
    pub idempotency_key: Option<String>,
    pub priority: Option<u8>,
    pub resources: Option<Resources>,
}

/// A validated task, with the AMQP context it arrived in.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: TaskId,
    pub name: TaskName,
    pub executor: ExecutorClass,
    pub payload: Value,
    pub deadline: DateTime<Utc>,
    pub resources: Option<Resources>,
    pub idempotency_key: Option<String>,
    pub priority: Option<u8>,
    pub submitted_at: DateTime<Utc>,
    pub attempt: Attempt,
    /// Whether progress is published while the work runs (see [`TaskEnvelope::stream`]).
    pub stream: bool,
    pub reply_to: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl Task {
    /// A new first attempt of `spec`, submitted now.
    ///
    /// # Errors
    /// The same rejections a receiver would apply, so a bad task never leaves the caller.
    pub fn new(spec: TaskSpec, limits: &Limits) -> Result<Task, Rejection> {
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(spec.ttl).map_err(|_| Rejection::BadField {
            field: "ttl",
            detail: "too long".into(),
        })?;
        if spec.ttl.is_zero() {
            return Err(Rejection::BadField {
                field: "ttl",
                detail: "must be more than zero".into(),
            });
        }
        let task = Task {
            id: TaskId::new(),
            name: spec.name,
            executor: spec.executor,
            payload: spec.payload,
            deadline: now + ttl,
            resources: spec.resources,
            idempotency_key: spec.idempotency_key,
            priority: spec.priority,
            submitted_at: now,
            attempt: Attempt::FIRST,
            stream: false,
            reply_to: spec.reply_to,
            traceparent: Some(traceparent::generate()),
            tracestate: None,
        };
        task.check(limits, now)?;
        Ok(task)
    }

    /// The wire envelope of this task.
    pub fn envelope(&self) -> TaskEnvelope {
        TaskEnvelope {
            task_id: self.id,
            task: self.name.to_string(),
            executor: self.executor.to_string(),
            payload: self.payload.clone(),
            deadline: self.deadline,
            resources: self.resources.clone(),
            idempotency_key: self.idempotency_key.clone(),
            priority: self.priority,
            submitted_at: self.submitted_at,
            attempt: self.attempt.get(),
            stream: self.stream,
        }
    }

    /// Body and AMQP properties for publishing this task, with the TTL left until `now`.
    ///
    /// # Errors
    /// The deadline has passed, or the reply-to name is too long for AMQP.
    pub fn to_amqp(&self, now: DateTime<Utc>) -> Result<(Vec<u8>, BasicProperties), Rejection> {
        let ttl_ms = (self.deadline - now).num_milliseconds();
        if ttl_ms <= 0 {
            return Err(Rejection::DeadlinePassed(self.deadline));
        }
        let body =
            serde_json::to_vec(&self.envelope()).map_err(|e| Rejection::NotJson(e.to_string()))?;
        let mut table = FieldTable::default();
        table.insert(
            headers::SCHEMA.into(),
            AMQPValue::LongString(TASK_SCHEMA.into()),
        );
        table.insert(
            headers::ATTEMPT.into(),
            AMQPValue::LongLongInt(self.attempt.get().into()),
        );
        if let Some(tp) = &self.traceparent {
            table.insert(
                headers::TRACEPARENT.into(),
                AMQPValue::LongString(tp.as_str().into()),
            );
        }
        if let Some(ts) = &self.tracestate {
            table.insert(
                headers::TRACESTATE.into(),
                AMQPValue::LongString(ts.as_str().into()),
            );
        }
        let id = ShortString::from(self.id.to_string());
        let mut props = BasicProperties::default()
            .with_message_id(id.clone())
            .with_correlation_id(id)
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_expiration(ttl_ms.to_string().into())
            .with_timestamp(now.timestamp().max(0) as u64)
            .with_headers(table);
        if let Some(reply_to) = &self.reply_to {
            props = props.with_reply_to(short("reply_to", reply_to)?);
        }
        if let Some(p) = self.priority {
            props = props.with_priority(p);
        }
        Ok((body, props))
    }

    /// Parses and validates a task message. Every field is checked; the executor class is
    /// checked against the catalog by the caller, which knows it.
    ///
    /// # Errors
    /// A [`Rejection`] whose text says what is wrong, for the dead letter's reason.
    pub fn from_amqp(
        props: &BasicProperties,
        body: &[u8],
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Result<Task, Rejection> {
        if body.len() > limits.max_body_bytes() {
            return Err(Rejection::PayloadTooLarge {
                size: body.len(),
                limit: limits.max_payload_bytes,
            });
        }
        let json: Value =
            serde_json::from_slice(body).map_err(|e| Rejection::NotJson(e.to_string()))?;
        let headers = props.headers().clone().unwrap_or_default();
        match headers.get_str(headers::SCHEMA) {
            Some(TASK_SCHEMA) => {}
            Some(other) => {
                return Err(Rejection::WrongSchema(format!(
                    "header {} is {other:?}, expected {TASK_SCHEMA:?}",
                    headers::SCHEMA
                )));
            }
            None => {
                return Err(Rejection::WrongSchema(format!(
                    "header {} is missing, expected {TASK_SCHEMA:?}",
                    headers::SCHEMA
                )));
            }
        }
        let envelope: TaskEnvelope =
            serde_json::from_value(json).map_err(|e| Rejection::WrongSchema(e.to_string()))?;
        let correlation_id = props
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().to_owned())
            .ok_or(Rejection::MissingCorrelationId)?;
        if correlation_id.parse::<TaskId>().ok() != Some(envelope.task_id) {
            return Err(Rejection::IdMismatch {
                correlation_id,
                task_id: envelope.task_id,
            });
        }
        let tracestate = headers.get_str(headers::TRACESTATE).map(str::to_owned);
        let mut task = Task::from_envelope(envelope, limits, now)?;
        task.reply_to = props.reply_to().as_ref().map(|r| r.to_string());
        task.traceparent = headers
            .get_str(headers::TRACEPARENT)
            .filter(|tp| traceparent::is_valid(tp))
            .map(str::to_owned);
        task.tracestate = tracestate;
        task.check(limits, now)?;
        Ok(task)
    }

    /// Validates a task envelope on its own (no AMQP context: no reply-to, no trace).
    ///
    /// # Errors
    /// A [`Rejection`] saying what is wrong.
    pub fn from_envelope(
        envelope: TaskEnvelope,
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Result<Task, Rejection> {
        let bad = |field: &'static str| {
            move |e: super::names::InvalidName| Rejection::BadField { field, detail: e.0 }
        };
        let task = Task {
            id: envelope.task_id,
            name: TaskName::parse(&envelope.task).map_err(bad("task"))?,
            executor: ExecutorClass::parse(&envelope.executor).map_err(bad("executor"))?,
            payload: envelope.payload,
            deadline: envelope.deadline,
            resources: envelope.resources,
            idempotency_key: envelope.idempotency_key,
            priority: envelope.priority,
            submitted_at: envelope.submitted_at,
            attempt: Attempt::new(envelope.attempt)
                .ok_or_else(|| bad("attempt")(InvalidName("must be 1 or more".into())))?,
            stream: envelope.stream,
            reply_to: None,
            traceparent: None,
            tracestate: None,
        };
        task.check(limits, now)?;
        Ok(task)
    }

    /// The checks shared by submitting and receiving.
    fn check(&self, limits: &Limits, now: DateTime<Utc>) -> Result<(), Rejection> {
        let bad = |field: &'static str, detail: String| Rejection::BadField { field, detail };
        let size = serde_json::to_vec(&self.payload).map_or(usize::MAX, |v| v.len());
        if size > limits.max_payload_bytes {
            return Err(Rejection::PayloadTooLarge {
                size,
                limit: limits.max_payload_bytes,
            });
        }
        if let Some(p) = self.priority
            && p > 9
        {
            return Err(bad("priority", format!("{p} is out of range 0..=9")));
        }
        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > 200)
        {
            return Err(bad("idempotency_key", "must be 1 to 200 bytes".into()));
        }
        if let Some(r) = &self.resources
            && r.gpu_count.is_some_and(|n| n > 64)
        {
            return Err(bad("resources.gpu_count", "must be at most 64".into()));
        }
        if let Some(reply_to) = &self.reply_to {
            short("reply_to", reply_to)?;
        }
        if self.deadline <= now {
            return Err(Rejection::DeadlinePassed(self.deadline));
        }
        Ok(())
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} on {}, attempt {})",
            self.id, self.name, self.executor, self.attempt
        )
    }
}

/// W3C trace context (`traceparent`) carried from the caller to the Job and the result.
pub mod traceparent {
    use uuid::Uuid;

    /// A new sampled trace context: `00-<32 hex trace id>-<16 hex span id>-01`.
    pub fn generate() -> String {
        let trace = Uuid::new_v4().simple().to_string();
        let span = &Uuid::new_v4().simple().to_string()[..16];
        format!("00-{trace}-{span}-01")
    }

    /// Whether `s` is a well-formed version-00 `traceparent`.
    pub fn is_valid(s: &str) -> bool {
        let parts: Vec<&str> = s.split('-').collect();
        let hex = |p: &str, n: usize| {
            p.len() == n
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        parts.len() == 4
            && hex(parts[0], 2)
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && hex(parts[3], 2)
            && parts[1] != "0".repeat(32)
            && parts[2] != "0".repeat(16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn spec() -> TaskSpec {
        TaskSpec {
            executor: ExecutorClass::parse("echo").unwrap(),
            name: TaskName::parse("demo.echo").unwrap(),
            payload: json!({"hello": "world"}),
            ttl: Duration::from_secs(60),
            reply_to: Some("amq.gen-reply".into()),
            idempotency_key: None,
            priority: Some(3),
            resources: None,
        }
    }

    #[test]
    fn a_task_survives_the_round_trip_through_amqp() {
        let limits = Limits::default();
        let task = Task::new(spec(), &limits).unwrap();
        let now = Utc::now();
        let (body, props) = task.to_amqp(now).unwrap();
        assert_eq!(
            props.correlation_id().as_ref().unwrap().as_str(),
            task.id.to_string()
        );
        assert_eq!(props.message_id(), props.correlation_id());
        assert_eq!(props.delivery_mode(), &Some(2));
        let ttl: i64 = props
            .expiration()
            .as_ref()
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        assert!((59_000..=60_000).contains(&ttl), "ttl {ttl}");
        let back = Task::from_amqp(&props, &body, &limits, now).unwrap();
        assert_eq!(back, task);
    }

    /// A valid message with `edit` applied to its body and `props` to its properties.
    fn received(
        edit: impl FnOnce(&mut Value),
        props_edit: impl FnOnce(BasicProperties) -> BasicProperties,
    ) -> Result<Task, Rejection> {
        let limits = Limits::default();
        let now = Utc::now();
        let (body, props) = Task::new(spec(), &limits).unwrap().to_amqp(now).unwrap();
        let mut json: Value = serde_json::from_slice(&body).unwrap();
        edit(&mut json);
        let body = serde_json::to_vec(&json).unwrap();
        Task::from_amqp(&props_edit(props), &body, &limits, now)
    }

    fn same(p: BasicProperties) -> BasicProperties {
        p
    }

    #[test]
    fn every_invalid_field_is_rejected_with_a_reason_that_names_it() {
        let limits = Limits::default();
        let now = Utc::now();
        let (_, props) = Task::new(spec(), &limits).unwrap().to_amqp(now).unwrap();
        let not_json = Task::from_amqp(&props, b"{oops", &limits, now).unwrap_err();
        assert!(matches!(not_json, Rejection::NotJson(_)), "{not_json}");

        let wrong_header = received(
            |_| {},
            |p| {
                let mut h = p.headers().clone().unwrap();
                h.insert(
                    headers::SCHEMA.into(),
                    AMQPValue::LongString("other/v9".into()),
                );
                p.with_headers(h)
            },
        )
        .unwrap_err();
        assert!(
            wrong_header.to_string().contains("\"other/v9\""),
            "{wrong_header}"
        );

        let missing =
            received(|j| drop(j.as_object_mut().unwrap().remove("task_id")), same).unwrap_err();
        assert!(matches!(missing, Rejection::WrongSchema(_)), "{missing}");

        let no_corr = received(
            |_| {},
            |p| BasicProperties::default().with_headers(p.headers().clone().unwrap()),
        )
        .unwrap_err();
        assert_eq!(no_corr, Rejection::MissingCorrelationId);

        let other = TaskId::new().to_string();
        let mismatch =
            received(|_| {}, |p| p.with_correlation_id(other.as_str().into())).unwrap_err();
        assert!(
            matches!(mismatch, Rejection::IdMismatch { .. }),
            "{mismatch}"
        );

        let name = received(|j| j["task"] = json!("a b"), same).unwrap_err();
        assert!(name.to_string().starts_with("invalid: task: "), "{name}");

        let class = received(|j| j["executor"] = json!("GPU!"), same).unwrap_err();
        assert!(
            class.to_string().starts_with("invalid: executor: "),
            "{class}"
        );

        let big = received(|j| j["payload"] = json!("x".repeat(300 * 1024)), same).unwrap_err();
        assert!(matches!(big, Rejection::PayloadTooLarge { .. }), "{big}");

        let past = received(|j| j["deadline"] = json!("2020-01-01T00:00:00Z"), same).unwrap_err();
        assert_eq!(past.kind(), "expired");

        let priority = received(|j| j["priority"] = json!(10), same).unwrap_err();
        assert!(priority.to_string().contains("priority"), "{priority}");

        let attempt = received(|j| j["attempt"] = json!(0), same).unwrap_err();
        assert!(attempt.to_string().contains("attempt"), "{attempt}");

        let gpus = received(|j| j["resources"] = json!({"gpu_count": 65}), same).unwrap_err();
        assert!(gpus.to_string().contains("gpu_count"), "{gpus}");
    }

    #[test]
    fn a_task_that_breaks_a_limit_never_leaves_the_caller() {
        let mut s = spec();
        s.ttl = Duration::ZERO;
        assert!(Task::new(s, &Limits::default()).is_err());
        let mut s = spec();
        s.payload = json!("x".repeat(10));
        assert!(
            Task::new(
                s,
                &Limits {
                    max_payload_bytes: 5
                }
            )
            .is_err()
        );
        let mut s = spec();
        s.reply_to = Some("q".repeat(300));
        assert!(Task::new(s, &Limits::default()).is_err());
    }

    #[test]
    fn traceparents_are_well_formed() {
        assert!(traceparent::is_valid(&traceparent::generate()));
        assert!(!traceparent::is_valid("00-abc-def-01"));
    }
}
