//! Header names and helpers for reading AMQP field tables.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Map, Value, json};

use super::rejection::Rejection;

/// Header names Gantry reads and writes.
pub mod headers {
    /// Schema of the body: `gantry.task/v1` or `gantry.result/v1`.
    pub const SCHEMA: &str = "x-gantry-schema";
    /// Attempt number of a task (1 for the first).
    pub const ATTEMPT: &str = "x-gantry-attempt";
    /// Human-readable reason on a dead letter Gantry published itself.
    pub const REASON: &str = "x-gantry-reason";
    /// Unique id of a dead letter Gantry published itself (idempotent auditing).
    pub const DEAD_LETTER_ID: &str = "x-gantry-dead-letter-id";
    /// When Gantry dead-lettered the message (AMQP timestamp).
    pub const DEAD_AT: &str = "x-gantry-dead-at";
    /// Queue the dead letter was taken from.
    pub const ORIGINAL_QUEUE: &str = "x-gantry-original-queue";
    /// Routing key the dead letter was originally published with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-gantry-original-routing-key";
    /// Earlier deaths and replays of a task, as a JSON array (Gantry's own history; the
    /// broker's `x-death` is stripped on every republish).
    pub const HISTORY: &str = "x-gantry-history";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    /// RabbitMQ's own dead-letter history.
    pub const X_DEATH: &str = "x-death";
}

/// Reading typed values out of a [`FieldTable`].
pub trait FieldTableExt {
    /// A string header (short or long string), if present and UTF-8.
    fn get_str(&self, key: &str) -> Option<&str>;
    /// An integer header of any integer width.
    fn get_i64(&self, key: &str) -> Option<i64>;
    /// The whole table as JSON, for logs and the dead-letter record.
    fn to_json(&self) -> Value;
}

impl FieldTableExt for FieldTable {
    fn get_str(&self, key: &str) -> Option<&str> {
        match self.inner().get(key)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn get_i64(&self, key: &str) -> Option<i64> {
        value_i64(self.inner().get(key)?)
    }

    fn to_json(&self) -> Value {
        Value::Object(
            self.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), value_to_json(v)))
                .collect::<Map<_, _>>(),
        )
    }
}

fn value_i64(v: &AMQPValue) -> Option<i64> {
    Some(match *v {
        AMQPValue::ShortShortInt(i) => i.into(),
        AMQPValue::ShortShortUInt(i) => i.into(),
        AMQPValue::ShortInt(i) => i.into(),
        AMQPValue::ShortUInt(i) => i.into(),
        AMQPValue::LongInt(i) => i.into(),
        AMQPValue::LongUInt(i) => i.into(),
        AMQPValue::LongLongInt(i) => i,
        AMQPValue::Timestamp(t) => i64::try_from(t).ok()?,
        _ => return None,
    })
}

/// `props` with `traceparent` as its `traceparent` header (in place of one it had), beside
/// the headers it has.
pub fn with_traceparent(props: BasicProperties, traceparent: &str) -> BasicProperties {
    let mut table = props.headers().clone().unwrap_or_default();
    table.insert(
        headers::TRACEPARENT.into(),
        AMQPValue::LongString(traceparent.into()),
    );
    props.with_headers(table)
}

/// Converts any AMQP value into JSON (byte strings that are not UTF-8 become lossy text).
pub fn value_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(d) => json!(d),
        AMQPValue::DecimalValue(d) => json!({"scale": d.scale, "value": d.value}),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::FieldTable(t) => t.to_json(),
        AMQPValue::ByteArray(b) => json!(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::Void => Value::Null,
        other => value_i64(other).map_or(Value::Null, |i| json!(i)),
    }
}

/// An AMQP short string from caller input, refusing (not panicking on) more than 255 bytes.
pub(crate) fn short(field: &'static str, s: &str) -> Result<ShortString, Rejection> {
    ShortString::try_new(s).map_err(|e| Rejection::BadField {
        field,
        detail: e.to_string(),
    })
}
