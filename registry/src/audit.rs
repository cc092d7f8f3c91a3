//! The audit log: one JSON line per addition, change and removal of a class's image, and
//! per refusal (once per `cache_ttl`), appended to a file or written to standard output
//! (the service's own log goes to standard error). A line that cannot be written is logged
//! as an error; the service goes on.
//!
//! ```json
//! {"at":"…","event":"changed","class":"vllm","image":"reg/ml/executor-vllm@sha256:…","tag":"1.5.0","digest":"sha256:…","owner":"team-ml","capabilities":{…},"source":"https://reg/ml","previous":{"image":"…","tag":"1.4.2",…}}
//! ```

use std::io::Write;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tracing::error;

use crate::catalog::{Change, Entry};
use crate::refusal::Refusal;
use crate::{Error, Result};

pub(crate) struct AuditLog {
    out: Mutex<Box<dyn Write + Send>>,
    shown: String,
}

impl AuditLog {
    /// Appends to `path`, or writes to standard output for `-`; nowhere for an empty path.
    ///
    /// # Errors
    /// The file cannot be opened for appending.
    pub(crate) fn open(path: &str) -> Result<AuditLog> {
        let out: Box<dyn Write + Send> = if path == "-" {
            Box::new(std::io::stdout())
        } else if path.is_empty() {
            Box::new(std::io::sink())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| Error::Audit {
                        path: path.to_owned(),
                        source,
                    })?,
            )
        };
        Ok(AuditLog {
            out: Mutex::new(out),
            shown: if path == "-" {
                "standard output".into()
            } else {
                path.to_owned()
            },
        })
    }

    pub(crate) fn change(&self, at: DateTime<Utc>, change: &Change) {
        let line = match change {
            Change::Added { class, entry } => event(at, "added", class, Some(entry), None),
            Change::Changed {
                class,
                previous,
                entry,
            } => event(at, "changed", class, Some(entry), Some(previous)),
            Change::Removed {
                class,
                previous,
                reason,
            } => {
                let mut line = event(at, "removed", class, None, Some(previous));
                line["reason"] = json!(reason);
                line
            }
        };
        self.write(&line);
    }

    pub(crate) fn refusal(&self, at: DateTime<Utc>, refusal: &Refusal) {
        let mut line = json!({"at": at, "event": "refused"});
        if let (Value::Object(line), Ok(Value::Object(r))) =
            (&mut line, serde_json::to_value(refusal))
        {
            line.extend(r);
        }
        self.write(&line);
    }

    fn write(&self, line: &Value) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let written = writeln!(out, "{line}").and_then(|()| out.flush());
        if let Err(e) = written {
            error!(audit_log = %self.shown, error = %e, %line, "cannot write the audit log");
        }
    }
}

fn event(
    at: DateTime<Utc>,
    event: &str,
    class: &str,
    entry: Option<&Entry>,
    previous: Option<&Entry>,
) -> Value {
    let mut line = json!({"at": at, "event": event, "class": class});
    if let Some(e) = entry {
        line["image"] = json!(e.image);
        line["tag"] = json!(e.tag);
        line["digest"] = json!(e.digest);
        line["owner"] = json!(e.owner);
        line["capabilities"] = json!(e.capabilities);
        line["source"] = json!(e.source);
    }
    if let Some(p) = previous {
        line["previous"] = json!({
            "image": p.image, "tag": p.tag, "digest": p.digest, "owner": p.owner,
            "capabilities": p.capabilities, "added_at": p.added_at,
        });
    }
    line
}
