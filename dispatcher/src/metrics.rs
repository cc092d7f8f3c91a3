//! Counters of what the dispatcher did, logged every minute and at shutdown.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::info;

/// What became of one delivery from a task queue. Every delivery ends in exactly one of
/// these, so the counts add up: deliveries = dispatched + adopted + skipped + requeued +
/// dead-lettered + failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Handled {
    /// A Job was created for the attempt (a process started, on the local runtime).
    Dispatched,
    /// The attempt's claim was this delivery's, but its Job existed already (left by a
    /// dispatcher that stopped between creating it and recording that): followed, not made.
    Adopted,
    /// Acked without a Job, because of the reason: the attempt is over, or another delivery
    /// of it claimed its Job.
    Skipped(&'static str),
    /// Back in its queue (republished or returned) for the reason, to be handled later.
    Requeued(&'static str),
    /// Refused and dead-lettered, counted by the rejection's label.
    DeadLettered(&'static str),
    /// Its Job could not be created: the attempt is failed with the reason.
    Failed(&'static str),
}

impl Handled {
    fn bucket(&self) -> (&'static str, &'static str) {
        match *self {
            Handled::Dispatched => ("dispatched", ""),
            Handled::Adopted => ("adopted", ""),
            Handled::Skipped(r) => ("skipped", r),
            Handled::Requeued(r) => ("requeued", r),
            Handled::DeadLettered(r) => ("dead_lettered", r),
            Handled::Failed(r) => ("failed", r),
        }
    }
}

impl fmt::Display for Handled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bucket() {
            (bucket, "") => f.write_str(bucket),
            (bucket, reason) => write!(f, "{bucket} ({reason})"),
        }
    }
}

/// Deliveries by what became of them.
#[derive(Default)]
pub(crate) struct Deliveries(Mutex<BTreeMap<Handled, u64>>);

impl Deliveries {
    pub(crate) fn count(&self, handled: Handled) {
        *self.lock().entry(handled).or_default() += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Handled, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The count of each bucket, in [`BUCKETS`] order, and the reasons as
    /// `{bucket.reason: N, …}`.
    fn summary(&self) -> ([u64; 6], String) {
        let map = self.lock();
        let mut counts = [0; 6];
        let mut reasons = Vec::new();
        for (handled, n) in map.iter() {
            let (bucket, reason) = handled.bucket();
            if let Some(i) = BUCKETS.iter().position(|b| *b == bucket) {
                counts[i] += n;
            }
            if !reason.is_empty() {
                reasons.push(format!("{bucket}.{reason}: {n}"));
            }
        }
        (counts, format!("{{{}}}", reasons.join(", ")))
    }
}

/// The buckets of [`Handled`], in the order they are logged.
const BUCKETS: [&str; 6] = [
    "dispatched",
    "adopted",
    "skipped",
    "requeued",
    "dead_lettered",
    "failed",
];

#[derive(Default)]
pub(crate) struct Metrics {
    /// What became of each delivery from the task queues.
    pub(crate) deliveries: Deliveries,
    /// Jobs found at start and followed from there.
    pub(crate) reconciled: AtomicU64,
    pub(crate) results_recorded: AtomicU64,
    pub(crate) results_duplicate: AtomicU64,
    pub(crate) synthesized: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) dead_letters_recorded: AtomicU64,
    /// Catalog versions swapped in, and refused as invalid.
    pub(crate) catalog_reloads: AtomicU64,
    pub(crate) catalog_refused: AtomicU64,
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
        let (
            [
                dispatched,
                adopted,
                skipped,
                requeued,
                dead_lettered,
                failed,
            ],
            reasons,
        ) = self.deliveries.summary();
        info!(
            when,
            deliveries = dispatched + adopted + skipped + requeued + dead_lettered + failed,
            dispatched,
            adopted,
            skipped,
            requeued,
            dead_lettered,
            failed,
            delivery_reasons = %reasons,
            reconciled = get(&self.reconciled),
            results_recorded = get(&self.results_recorded),
            results_duplicate = get(&self.results_duplicate),
            synthesized = get(&self.synthesized),
            forwarded = get(&self.forwarded),
            dead_letters_recorded = get(&self.dead_letters_recorded),
            catalog_reloads = get(&self.catalog_reloads),
            catalog_refused = get(&self.catalog_refused),
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

#[cfg(test)]
mod tests {
    use super::{Deliveries, Handled};

    #[test]
    fn each_delivery_is_counted_in_one_bucket_with_its_reason() {
        let d = Deliveries::default();
        for h in [
            Handled::Dispatched,
            Handled::Dispatched,
            Handled::Skipped("claimed"),
            Handled::Skipped("ended"),
            Handled::Skipped("claimed"),
            Handled::Requeued("capacity"),
        ] {
            d.count(h);
        }
        let (counts, reasons) = d.summary();
        assert_eq!(counts, [2, 0, 3, 1, 0, 0]);
        assert_eq!(
            reasons,
            "{skipped.claimed: 2, skipped.ended: 1, requeued.capacity: 1}"
        );
    }
}
