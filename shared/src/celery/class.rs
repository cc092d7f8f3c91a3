//! The `celery:` settings of an executor class: the Celery task names it runs, and the
//! deadline of a Celery task sent without `expires`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `celery:` part of an executor class in the catalog.
///
/// ```yaml
/// executors:
///   thumbnails:
///     engine: { kind: command, command: [python3, /opt/thumbnail.py] }
///     celery:
///       tasks: [media.thumbnail, "media.thumbnails.*"]
///       ttl: 30m
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CeleryClass {
    /// Celery task names this class runs: exact names, or patterns where `*` stands for any
    /// run of characters (`media.*`).
    pub tasks: Vec<String>,
    /// The deadline of a task sent without `expires`, from when it is due.
    #[serde(
        default = "default_ttl",
        with = "crate::config::humantime_serde_compat"
    )]
    pub ttl: Duration,
}

fn default_ttl() -> Duration {
    Duration::from_secs(3600)
}

impl CeleryClass {
    /// What is wrong with these settings, if anything.
    pub fn problem(&self) -> Option<String> {
        if self.tasks.is_empty() {
            return Some("celery.tasks must name at least one Celery task name or pattern".into());
        }
        if let Some(bad) = self.tasks.iter().find(|p| p.trim().is_empty()) {
            return Some(format!("celery.tasks has an empty pattern {bad:?}"));
        }
        if self.ttl.is_zero() {
            return Some("celery.ttl must be more than zero".into());
        }
        None
    }
}
