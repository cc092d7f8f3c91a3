//! A Celery task message (protocol 2, JSON) parsed and checked, and the Gantry task it
//! becomes.
//!
//! Protocol 2 puts the task's identity in the headers (`task`, `id`, `eta`, `expires`,
//! `timelimit`, `retries`, `root_id`, `parent_id`, `group`, `ignore_result`, …) and
//! `[args, kwargs, embed]` in the body, `embed` holding the canvas (`callbacks`,
//! `errbacks`, `chain`, `chord`). Every refusal says what to change on the Celery side.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use lapin::BasicProperties;
use serde_json::{Map, Value, json};

use super::origin::{CeleryOrigin, DeadlineFrom};
use crate::message::{FieldTableExt, Limits, Rejection, TaskEnvelope, TaskId, TaskName};

/// A Celery task message, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CeleryTask {
    pub id: TaskId,
    pub name: TaskName,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    /// The hard time limit, else the soft one (Gantry has one limit: the deadline).
    pub time_limit: Option<Duration>,
    pub retries: u32,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    /// The client's reply queue, unless it wants no result.
    pub reply_to: Option<String>,
    pub priority: Option<u8>,
}

fn bad(field: &'static str, detail: impl Into<String>) -> Rejection {
    Rejection::BadField {
        field,
        detail: detail.into(),
    }
}

impl CeleryTask {
    /// Parses a Celery task message.
    ///
    /// # Errors
    /// A [`Rejection`] for the dead letter's reason: another serializer than JSON, message
    /// protocol 1, a missing or malformed header, a body that is not `[args, kwargs, embed]`,
    /// or a canvas (callbacks, chains, chords) Gantry does not run.
    pub fn from_amqp(
        props: &BasicProperties,
        body: &[u8],
        limits: &Limits,
    ) -> Result<CeleryTask, Rejection> {
        let content_type = props.content_type().as_ref().map(|c| c.as_str());
        if content_type != Some("application/json") {
            return Err(bad(
                "content_type",
                format!(
                    "{}: Gantry takes Celery tasks serialized as JSON only; set task_serializer = \"json\" in the Celery app (pickle, yaml and msgpack are refused)",
                    content_type.unwrap_or("none")
                ),
            ));
        }
        if let Some(encoding) = props.content_encoding().as_ref()
            && !encoding.as_str().eq_ignore_ascii_case("utf-8")
        {
            return Err(bad(
                "content_encoding",
                format!("{encoding}: only utf-8 is taken"),
            ));
        }
        let limit = limits.max_payload_bytes + 64 * 1024;
        if body.len() > limit {
            return Err(Rejection::PayloadTooLarge {
                size: body.len(),
                limit: limits.max_payload_bytes,
            });
        }
        let body: Value =
            serde_json::from_slice(body).map_err(|e| Rejection::NotJson(e.to_string()))?;
        let headers = props.headers().clone().unwrap_or_default().to_json();
        let Some(name) = headers.get("task") else {
            if body.get("task").is_some() {
                return Err(bad(
                    "protocol",
                    "Celery message protocol 1 is not supported; send with task_protocol = 2 (the default since Celery 4)",
                ));
            }
            return Err(bad(
                "headers.task",
                "missing: not a Celery protocol 2 task message",
            ));
        };
        let name = name
            .as_str()
            .ok_or_else(|| bad("headers.task", "must be a string"))?;
        let name = TaskName::parse(name).map_err(|e| bad("headers.task", e.0))?;
        let id = headers
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("headers.id", "missing or not a string"))?;
        let id: TaskId = id.parse().map_err(|_| {
            bad(
                "headers.id",
                format!(
                    "{id:?} is not a UUID; Gantry task ids are UUIDs, as Celery's default ids are"
                ),
            )
        })?;
        let (args, kwargs) = parts(body)?;
        let string = |key: &'static str| -> Result<Option<String>, Rejection> {
            match headers.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(bad(key, format!("{other} is not a string"))),
            }
        };
        let time = |key: &'static str| -> Result<Option<DateTime<Utc>>, Rejection> {
            string(key)?
                .map(|s| {
                    parse_time(&s).ok_or_else(|| bad(key, format!("{s:?} is not an ISO 8601 time")))
                })
                .transpose()
        };
        let retries = match headers.get("retries") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad("retries", format!("{v} is not a count")))?,
        };
        let ignore_result = headers
            .get("ignore_result")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let reply_to = props
            .reply_to()
            .as_ref()
            .map(|r| r.to_string())
            .filter(|r| !r.is_empty() && !ignore_result);
        Ok(CeleryTask {
            id,
            name,
            args,
            kwargs,
            eta: time("eta")?,
            expires: time("expires")?,
            time_limit: time_limit(headers.get("timelimit"))?,
            retries,
            root_id: string("root_id")?,
            parent_id: string("parent_id")?,
            group: string("group")?,
            reply_to,
            priority: props.priority().map(|p| p.min(9)),
        })
    }

    /// The Gantry task envelope this Celery task becomes, for `executor` with `ttl` as the
    /// deadline of a task sent without `expires`; with what is kept beside it, and the time
    /// before which it must not run (its `eta`, if in the future).
    ///
    /// The deadline is `expires`, else `ttl` after the task is due; a `timelimit` brings it
    /// forward to the limit after the task is due, since Gantry's deadline is the one limit
    /// a task has (it counts the wait for capacity too).
    pub fn envelope(
        &self,
        executor: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> (TaskEnvelope, CeleryOrigin, Option<DateTime<Utc>>) {
        let not_before = self.eta.filter(|eta| *eta > now);
        let due = not_before.unwrap_or(now);
        let after =
            |d: Duration| due + chrono::Duration::from_std(d).unwrap_or(chrono::TimeDelta::MAX);
        let (mut deadline, mut from) = match self.expires {
            Some(expires) => (expires, DeadlineFrom::Expires),
            None => (after(ttl), DeadlineFrom::Default),
        };
        if let Some(limit) = self.time_limit
            && after(limit) < deadline
        {
            (deadline, from) = (after(limit), DeadlineFrom::TimeLimit);
        }
        let envelope = TaskEnvelope {
            task_id: self.id,
            task: self.name.to_string(),
            executor: executor.to_owned(),
            payload: json!({"args": self.args, "kwargs": self.kwargs}),
            deadline,
            resources: None,
            idempotency_key: None,
            priority: self.priority,
            submitted_at: now,
            attempt: 1,
            stream: false,
        };
        let origin = CeleryOrigin {
            task_id: self.id,
            reply_to: self.reply_to.clone(),
            root_id: self.root_id.clone(),
            parent_id: self.parent_id.clone(),
            group: self.group.clone(),
            retries: self.retries,
            eta: self.eta,
            deadline_from: from,
        };
        (envelope, origin, not_before)
    }
}

/// `args` and `kwargs` of a protocol-2 body `[args, kwargs, embed]`, refusing a canvas.
fn parts(body: Value) -> Result<(Vec<Value>, Map<String, Value>), Rejection> {
    let shape = "the body must be [args, kwargs, embed], as Celery protocol 2 sends it";
    let Value::Array(items) = body else {
        return Err(bad("body", shape));
    };
    let [args, kwargs, embed]: [Value; 3] = items.try_into().map_err(|_| bad("body", shape))?;
    let (Value::Array(args), Value::Object(kwargs)) = (args, kwargs) else {
        return Err(bad("body", shape));
    };
    let canvas = ["callbacks", "errbacks", "chain", "chord"]
        .into_iter()
        .filter(|k| {
            embed
                .get(k)
                .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        })
        .collect::<Vec<_>>();
    if !canvas.is_empty() {
        return Err(bad(
            "body.embed",
            format!(
                "{} given: Gantry does not run Celery canvas (link, link_error, chain, chord); send the tasks one by one and combine their results in the caller",
                canvas.join(", ")
            ),
        ));
    }
    Ok((args, kwargs))
}

/// `timelimit` = `[hard, soft]`, each seconds or null: the hard limit, else the soft one.
fn time_limit(value: Option<&Value>) -> Result<Option<Duration>, Rejection> {
    let field = "timelimit";
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Some([hard, soft]) = value
        .as_array()
        .map(Vec::as_slice)
        .and_then(|a| <&[Value; 2]>::try_from(a).ok())
    else {
        return Err(bad(field, format!("{value} is not [hard, soft]")));
    };
    for limit in [hard, soft] {
        if limit.is_null() {
            continue;
        }
        let seconds = limit
            .as_f64()
            .filter(|s| s.is_finite() && *s > 0.0)
            .ok_or_else(|| bad(field, format!("{limit} is not a number of seconds")))?;
        return Ok(Some(Duration::from_secs_f64(seconds.min(1e9))));
    }
    Ok(None)
}

/// An ISO 8601 time as Celery writes it (`datetime.isoformat()`); one without an offset is
/// taken as UTC.
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldArray, FieldTable};

    fn props(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert((*k).into(), v.clone());
        }
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_reply_to("9a1b-reply".into())
            .with_headers(table)
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(v.into())
    }

    const ID: &str = "5b4f0b5e-3c36-4d0a-9a7b-2f57e0f4a1d2";
    const BODY: &[u8] = br#"[[1, 2], {"x": "y"}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;

    fn good() -> Vec<(&'static str, AMQPValue)> {
        vec![
            ("task", s("proj.add")),
            ("id", s(ID)),
            ("eta", AMQPValue::Void),
            ("expires", s("2099-01-01T00:00:00+00:00")),
            ("retries", AMQPValue::LongLongInt(2)),
            (
                "timelimit",
                AMQPValue::FieldArray(FieldArray::from(vec![
                    AMQPValue::Void,
                    AMQPValue::Double(30.0),
                ])),
            ),
            ("root_id", s(ID)),
            ("parent_id", AMQPValue::Void),
        ]
    }

    #[test]
    fn a_protocol_2_message_becomes_a_gantry_task() {
        let task = CeleryTask::from_amqp(&props(&good()), BODY, &Limits::default()).unwrap();
        assert_eq!(task.id.to_string(), ID);
        assert_eq!(task.retries, 2);
        assert_eq!(task.time_limit, Some(Duration::from_secs(30)));
        assert_eq!(task.reply_to.as_deref(), Some("9a1b-reply"));
        let now = Utc::now();
        let (envelope, origin, not_before) = task.envelope("echo", Duration::from_secs(3600), now);
        assert_eq!(
            envelope.payload,
            json!({"args": [1, 2], "kwargs": {"x": "y"}})
        );
        assert_eq!(envelope.task, "proj.add");
        assert_eq!(origin.deadline_from, DeadlineFrom::TimeLimit);
        assert_eq!(envelope.deadline, now + chrono::Duration::seconds(30));
        assert_eq!(origin.root_id.as_deref(), Some(ID));
        assert!(not_before.is_none());
    }

    #[test]
    fn expires_or_the_class_ttl_set_the_deadline_and_an_eta_delays_it() {
        let mut headers = good();
        headers.retain(|(k, _)| *k != "timelimit" && *k != "expires");
        headers.push(("eta", s("2099-01-01T00:00:00.250000")));
        let task = CeleryTask::from_amqp(&props(&headers), BODY, &Limits::default()).unwrap();
        let (envelope, origin, not_before) =
            task.envelope("echo", Duration::from_secs(60), Utc::now());
        let eta: DateTime<Utc> = "2099-01-01T00:00:00.25Z".parse().unwrap();
        assert_eq!(not_before, Some(eta));
        assert_eq!(envelope.deadline, eta + chrono::Duration::seconds(60));
        assert_eq!(origin.deadline_from, DeadlineFrom::Default);
    }

    #[test]
    fn what_gantry_cannot_take_is_refused_with_what_to_change() {
        let limits = Limits::default();
        let refused = |p: BasicProperties, body: &[u8]| {
            CeleryTask::from_amqp(&p, body, &limits)
                .unwrap_err()
                .to_string()
        };
        let pickle = props(&good()).with_content_type("application/x-python-serialize".into());
        assert!(refused(pickle, b"\x80\x04").contains("task_serializer"));
        let v1 = br#"{"task": "proj.add", "id": "x", "args": [], "kwargs": {}}"#;
        assert!(refused(props(&[]), v1).contains("protocol 1"));
        let mut no_id = good();
        no_id.retain(|(k, _)| *k != "id");
        assert!(refused(props(&no_id), BODY).contains("headers.id"));
        let mut not_uuid = good();
        not_uuid.push(("id", s("my-task")));
        assert!(refused(props(&not_uuid), BODY).contains("not a UUID"));
        let mut bad_eta = good();
        bad_eta.push(("eta", s("tomorrow")));
        assert!(refused(props(&bad_eta), BODY).contains("eta"));
        assert!(refused(props(&good()), b"{\"args\": []}").contains("[args, kwargs, embed]"));
        let chain = br#"[[], {}, {"chain": [{"task": "b"}]}]"#;
        assert!(refused(props(&good()), chain).contains("canvas"));
        assert!(refused(props(&good()), b"[[], {}").contains("not JSON"));
    }

    #[test]
    fn ignore_result_means_no_reply() {
        let mut headers = good();
        headers.push(("ignore_result", AMQPValue::Boolean(true)));
        let task = CeleryTask::from_amqp(&props(&headers), BODY, &Limits::default()).unwrap();
        assert_eq!(task.reply_to, None);
    }
}
