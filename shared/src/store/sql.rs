//! What the store's statements share: the error of a failed one, the values Postgres would
//! refuse made acceptable, the cache of prepared statements, and the channel terminal
//! states are announced on.

use deadpool_postgres::Transaction;
use tokio_postgres::Statement;

use crate::{Error, Result};

/// Channel on which the store announces (payload: the task id) that a task's attempt ended:
/// it reached a terminal state, or `retrying`. A listener that waits for the task's end
/// reads the task again on each announcement.
pub const DONE_CHANNEL: &str = "gantry_task_done";

/// A statement of the task lifecycle's hot path, prepared once per connection (the pool's
/// cache): Postgres parses and plans it once, and each use is one round trip, not two.
pub(super) async fn cached(tx: &Transaction<'_>, sql: &str) -> Result<Statement> {
    tx.prepare_cached(sql)
        .await
        .map_err(pg("prepare a task statement"))
}

/// The same JSON without NUL characters, which Postgres refuses in `jsonb` (U+0000 becomes
/// U+FFFD): one odd byte in an output must not make a whole batch unrecordable.
pub(crate) fn scrub(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let clean = |s: &str| s.replace('\u{0}', "\u{FFFD}");
    match v {
        Value::String(s) if s.contains('\u{0}') => Value::String(clean(s)),
        Value::Array(a) => Value::Array(a.iter().map(scrub).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (clean(k), scrub(v))).collect()),
        other => other.clone(),
    }
}

/// Text without NUL characters, which Postgres refuses in `text` columns.
pub(crate) fn clean(s: Option<&str>) -> Option<String> {
    s.map(|s| s.replace('\u{0}', "\u{FFFD}"))
}

pub(super) fn pg(operation: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |source| Error::Postgres { operation, source }
}
