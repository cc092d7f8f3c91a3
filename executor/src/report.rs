//! The executor's final word to its runtime: whether the result was published, with what
//! status, and why not. It goes to `exit.json` in the job directory and, as one line of at
//! most 4096 bytes, to the termination log (Kubernetes shows it as the container's
//! termination message).

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use gantry_shared::message::ResultStatus;
use serde::{Deserialize, Serialize};
use tracing::instrument;

/// Where Kubernetes reads a container's termination message by default.
const KUBERNETES_TERMINATION_LOG: &str = "/dev/termination-log";
/// Kubernetes keeps at most this much of a termination message.
const MAX_TERMINATION_MESSAGE: usize = 4096;
/// Longest error text kept in the report; the full chain is in the log.
const MAX_ERROR: usize = 3000;

/// The final status of one executor run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExitReport {
    /// Whether the broker confirmed the result.
    pub(crate) published: bool,
    /// The status of the result (published or not).
    pub(crate) status: ResultStatus,
    /// Why nothing was published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    pub(crate) finished_at: DateTime<Utc>,
}

impl ExitReport {
    /// A report finished now; a long error is shortened.
    pub(crate) fn new(published: bool, status: ResultStatus, error: Option<String>) -> Self {
        ExitReport {
            published,
            status,
            error: error.map(|e| shorten(e, MAX_ERROR)),
            finished_at: Utc::now(),
        }
    }

    /// The report as one line of JSON, short enough for a termination message.
    pub(crate) fn termination_message(&self) -> String {
        let mut report = self.clone();
        let mut budget = MAX_ERROR;
        loop {
            let line = serde_json::to_string(&report).unwrap_or_default();
            if line.len() <= MAX_TERMINATION_MESSAGE || report.error.is_none() {
                return line;
            }
            // Escaping can make the error text longer than its bytes: shorten until it fits.
            budget /= 2;
            report.error = report.error.map(|e| shorten(e, budget));
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
fn shorten(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The termination log to write: the flag's path, else Kubernetes' default if it exists.
pub(crate) fn termination_log_path(flag: Option<PathBuf>) -> Option<PathBuf> {
    termination_log_or(flag, Path::new(KUBERNETES_TERMINATION_LOG))
}

/// The flag's path, else `default` if it exists (outside a pod it does not).
fn termination_log_or(flag: Option<PathBuf>, default: &Path) -> Option<PathBuf> {
    flag.or_else(|| default.exists().then(|| default.to_owned()))
}

/// Writes the report's one-line termination message to `path`.
///
/// # Errors
/// The file cannot be written.
#[instrument(skip(report))]
pub(crate) async fn write_termination_log(path: &Path, report: &ExitReport) -> std::io::Result<()> {
    tokio::fs::write(path, report.termination_message()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_termination_message_is_one_short_line() {
        let report = ExitReport::new(
            false,
            ResultStatus::Failed,
            Some(format!("line one\nline two {}", "é\"".repeat(5000))),
        );
        let message = report.termination_message();
        assert!(
            message.len() <= MAX_TERMINATION_MESSAGE,
            "{}",
            message.len()
        );
        assert!(!message.contains('\n'));
        assert!(
            message
                .starts_with(r#"{"published":false,"status":"failed","error":"line one\nline two"#)
        );
    }

    #[test]
    fn an_explicit_termination_log_wins() {
        let path = PathBuf::from("/tmp/x");
        assert_eq!(termination_log_path(Some(path.clone())), Some(path));
    }

    #[test]
    fn without_a_flag_the_default_log_is_used_only_where_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("termination-log");
        assert_eq!(termination_log_or(None, &default), None, "outside a pod");
        std::fs::write(&default, b"").unwrap();
        assert_eq!(termination_log_or(None, &default), Some(default.clone()));
        let flag = dir.path().join("other");
        assert_eq!(termination_log_or(Some(flag.clone()), &default), Some(flag));
    }

    #[tokio::test]
    async fn the_termination_log_holds_the_report() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("termination-log");
        let report = ExitReport::new(true, ResultStatus::Succeeded, None);
        write_termination_log(&path, &report).await.unwrap();
        let back: ExitReport =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, report);
    }
}
