//! What `GET /health` says: `starting` until every source has been listed once (the
//! catalog is then complete), `ok` while refreshes succeed, `degraded` while they fail:
//! the catalog of the last refresh is served all the same, and the answer says since when
//! and why.

use chrono::{DateTime, Utc};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    Starting,
    Ok,
    Degraded,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Health {
    pub(crate) status: Status,
    pub(crate) message: String,
    pub(crate) classes: usize,
    /// When every source was first listed: from then on the catalog is served.
    pub(crate) loaded_at: Option<DateTime<Utc>>,
    pub(crate) last_refresh: Option<DateTime<Utc>>,
    /// The last refresh that read everything.
    pub(crate) last_success: Option<DateTime<Utc>>,
    /// Since when refreshes fail, while they do.
    pub(crate) failing_since: Option<DateTime<Utc>>,
    /// What the last refresh could not read.
    pub(crate) errors: Vec<String>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            status: Status::Starting,
            message: "no refresh yet".into(),
            classes: 0,
            loaded_at: None,
            last_refresh: None,
            last_success: None,
            failing_since: None,
            errors: Vec::new(),
        }
    }
}

impl Health {
    /// Whether the catalog is served (`/executors…` answer from it).
    pub(crate) fn loaded(&self) -> bool {
        self.loaded_at.is_some()
    }

    /// Takes in a refresh: `every_source_listed` when no registry failed to list.
    pub(crate) fn record(
        &mut self,
        now: DateTime<Utc>,
        every_source_listed: bool,
        errors: Vec<String>,
        classes: usize,
    ) {
        self.last_refresh = Some(now);
        self.classes = classes;
        if every_source_listed && self.loaded_at.is_none() {
            self.loaded_at = Some(now);
        }
        if errors.is_empty() {
            self.last_success = Some(now);
            self.failing_since = None;
        } else {
            self.failing_since.get_or_insert(now);
        }
        let since = self
            .failing_since
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        let first_error = errors.first().cloned().unwrap_or_default();
        let more = match errors.len() {
            0 | 1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        (self.status, self.message) = match (self.loaded(), errors.is_empty()) {
            (false, _) => (
                Status::Starting,
                format!("no registry listing yet, failing since {since}: {first_error}{more}"),
            ),
            (true, true) => (Status::Ok, format!("{classes} executor classes")),
            (true, false) => (
                Status::Degraded,
                format!(
                    "refreshes fail since {since}: {first_error}{more}; serving the last catalog ({classes} classes; last complete refresh {})",
                    self.last_success
                        .map_or_else(|| "never".to_owned(), |t| t.to_rfc3339())
                ),
            ),
        };
        self.errors = errors;
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn starting_then_ok_then_degraded_since_the_first_failure_then_ok() {
        let t = |s| Utc.timestamp_opt(s, 0).unwrap();
        let mut h = Health::default();
        h.record(t(1), false, vec!["registry down".into()], 0);
        assert_eq!(h.status, Status::Starting);
        assert!(!h.loaded());
        h.record(t(2), true, vec![], 2);
        assert_eq!((h.status, h.loaded_at), (Status::Ok, Some(t(2))));
        h.record(t(3), false, vec!["a".into(), "b".into()], 2);
        h.record(t(4), false, vec!["a".into()], 2);
        assert_eq!(h.status, Status::Degraded);
        assert_eq!(h.failing_since, Some(t(3)));
        assert!(
            h.message.contains("serving the last catalog (2 classes"),
            "{}",
            h.message
        );
        h.record(t(5), true, vec![], 2);
        assert_eq!((h.status, h.failing_since), (Status::Ok, None));
    }
}
