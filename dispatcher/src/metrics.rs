//! Counters of what the dispatcher did, logged every minute and at shutdown.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::info;

#[derive(Default)]
pub(crate) struct Metrics {
    pub(crate) dispatched: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) results_recorded: AtomicU64,
    pub(crate) results_duplicate: AtomicU64,
    pub(crate) synthesized: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) dead_letters_recorded: AtomicU64,
    /// Catalog versions swapped in, and refused as invalid.
    pub(crate) catalog_reloads: AtomicU64,
    pub(crate) catalog_refused: AtomicU64,
    /// Tasks put back in their queue because their image could not be resolved yet.
    pub(crate) image_waits: AtomicU64,
    /// The lifecycle writer's: writes, and the transactions that committed them.
    pub(crate) lifecycle: Arc<Groups>,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// Counts one rejected message by its cause.
    pub(crate) fn rejected(&self, label: &'static str) -> u64 {
        let mut map = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(label).or_default();
        *n += 1;
        *n
    }

    pub(crate) fn log(&self, when: &str) {
        let rejected = self
            .rejected
            .lock()
            .map(|m| format!("{m:?}"))
            .unwrap_or_default();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        info!(
            when,
            dispatched = get(&self.dispatched),
            skipped = get(&self.skipped),
            results_recorded = get(&self.results_recorded),
            results_duplicate = get(&self.results_duplicate),
            synthesized = get(&self.synthesized),
            forwarded = get(&self.forwarded),
            dead_letters_recorded = get(&self.dead_letters_recorded),
            catalog_reloads = get(&self.catalog_reloads),
            catalog_refused = get(&self.catalog_refused),
            image_waits = get(&self.image_waits),
            lifecycle_writes = get(&self.lifecycle.writes),
            lifecycle_commits = get(&self.lifecycle.commits),
            %rejected,
            "dispatcher counters"
        );
    }
}

/// Writes committed in groups, and the groups' transactions.
#[derive(Default)]
pub(crate) struct Groups {
    pub(crate) writes: AtomicU64,
    pub(crate) commits: AtomicU64,
}

impl Groups {
    pub(crate) fn committed(&self, writes: usize) {
        self.writes.fetch_add(writes as u64, Ordering::Relaxed);
        inc(&self.commits);
    }
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
