//! The watcher: the catalog in force, its health and the last refusals, and the refresh
//! that renews them, on its period or when asked. One refresh runs at a time; readers are
//! never held up by one (they see the previous catalog until it ends).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::Result;
use crate::audit::AuditLog;
use crate::catalog::{self, Catalog, Change};
use crate::distribution::Client;
use crate::health::Health;
use crate::refresh::{self, Verdicts};
use crate::refusal::Refusal;
use crate::settings::Settings;

/// What the server reads.
#[derive(Debug, Clone, Default)]
pub(crate) struct View {
    pub(crate) catalog: Catalog,
    pub(crate) refused: Vec<Refusal>,
    pub(crate) health: Health,
}

impl View {
    /// The classes as `GET /executors` lists them: each entry with its `class`.
    pub(crate) fn executors(&self) -> Vec<serde_json::Value> {
        self.catalog
            .iter()
            .map(|(class, entry)| {
                let mut e = serde_json::json!(entry);
                e["class"] = serde_json::json!(class);
                e
            })
            .collect()
    }
}

/// What one refresh did, as `POST /executors/refresh` answers it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    pub(crate) classes: usize,
    pub(crate) added: Vec<String>,
    pub(crate) changed: Vec<String>,
    pub(crate) removed: Vec<String>,
    pub(crate) refused: usize,
    pub(crate) errors: Vec<String>,
}

pub(crate) struct Watcher {
    settings: Settings,
    client: Client,
    verdicts: Verdicts,
    audit: AuditLog,
    view: RwLock<View>,
    /// Refusals logged, and when: each is logged again only after `cache_ttl`.
    noted: Mutex<HashMap<String, Instant>>,
    running: tokio::sync::Mutex<()>,
}

impl Watcher {
    /// # Errors
    /// TLS cannot be set up, or the audit log cannot be opened.
    pub(crate) fn new(settings: Settings) -> Result<Watcher> {
        Ok(Watcher {
            client: Client::new(settings.request_timeout)?,
            verdicts: Verdicts::new(settings.cache_ttl),
            audit: AuditLog::open(&settings.audit_log)?,
            view: RwLock::new(View::default()),
            noted: Mutex::new(HashMap::new()),
            running: tokio::sync::Mutex::new(()),
            settings,
        })
    }

    /// A copy of what is served now.
    pub(crate) fn view(&self) -> View {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads every source and puts the new catalog in force; logs and audits what changed
    /// and what was refused.
    #[instrument(skip_all)]
    pub(crate) async fn refresh(&self) -> Summary {
        let _one_at_a_time = self.running.lock().await;
        let pass = refresh::pass(&self.client, &self.settings, &self.verdicts).await;
        let now = Utc::now();
        let previous = self.view().catalog;
        let (next, changes) = catalog::merge(&previous, &pass.found, now);
        let mut summary = Summary {
            classes: next.len(),
            added: Vec::new(),
            changed: Vec::new(),
            removed: Vec::new(),
            refused: pass.refusals.len(),
            errors: pass.errors.clone(),
        };
        for change in &changes {
            match change {
                Change::Added { class, entry } => {
                    info!(class, image = %entry.image, tag = %entry.tag, owner = %entry.owner, "executor image added");
                    summary.added.push(class.clone());
                }
                Change::Changed {
                    class,
                    previous,
                    entry,
                } => {
                    info!(class, image = %entry.image, tag = %entry.tag, previous = %previous.image, owner = %entry.owner, "executor image changed");
                    summary.changed.push(class.clone());
                }
                Change::Removed {
                    class,
                    previous,
                    reason,
                } => {
                    warn!(class, previous = %previous.image, reason, "executor class removed");
                    summary.removed.push(class.clone());
                }
            }
            self.audit.change(now, change);
        }
        for refusal in &pass.refusals {
            if self.first_notice(refusal) {
                warn!(repository = %refusal.repository, tag = refusal.tag.as_deref().unwrap_or(""), reason = %refusal.reason, kind = refusal.kind, "executor image refused");
                self.audit.refusal(now, refusal);
            }
        }
        for error in &pass.errors {
            warn!(error = %error, "registry not read; its classes keep their last image");
        }
        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
        view.health.record(
            now,
            pass.found.failed_sources.is_empty(),
            pass.errors,
            next.len(),
        );
        view.catalog = next;
        view.refused = pass.refusals;
        summary
    }

    /// Refreshes now and then every `refresh_interval` (every 2 s while the catalog is not
    /// loaded), until `stop`.
    pub(crate) async fn refresh_every(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let summary = tokio::select! {
                s = self.refresh() => s,
                () = stop.cancelled() => return,
            };
            let loaded = self.view().health.loaded();
            if loaded && summary.errors.is_empty() {
                tracing::debug!(classes = summary.classes, "catalog refreshed");
            }
            let wait = if loaded {
                self.settings.refresh_interval
            } else {
                self.settings.refresh_interval.min(Duration::from_secs(2))
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Whether a refusal is new (or last logged more than `cache_ttl` ago).
    fn first_notice(&self, refusal: &Refusal) -> bool {
        let key = refusal.to_string();
        let mut noted = self.noted.lock().unwrap_or_else(|p| p.into_inner());
        let ttl = self.settings.cache_ttl;
        noted.retain(|_, at| at.elapsed() < ttl);
        if noted.contains_key(&key) {
            return false;
        }
        noted.insert(key, Instant::now());
        true
    }
}
