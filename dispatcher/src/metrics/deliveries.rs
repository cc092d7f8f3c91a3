//! What became of each delivery from a task queue ([`Handled`]), counted by bucket and
//! reason for the counters line and by class as well for `/metrics`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

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

/// The labels of `gantry_deliveries_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DeliveryLabels {
    class: String,
    outcome: &'static str,
    reason: &'static str,
}

/// Deliveries by what became of them.
#[derive(Default)]
pub(crate) struct Deliveries {
    buckets: Mutex<BTreeMap<Handled, u64>>,
    pub(super) by_class: Family<DeliveryLabels, Counter>,
}

impl Deliveries {
    /// Counts one delivery from the queue of `class`.
    pub(crate) fn count(&self, class: &str, handled: Handled) {
        *self.lock().entry(handled).or_default() += 1;
        let (outcome, reason) = handled.bucket();
        self.by_class
            .get_or_create(&DeliveryLabels {
                class: class.to_owned(),
                outcome,
                reason,
            })
            .inc();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Handled, u64>> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The count of each bucket, in [`BUCKETS`] order, and the reasons as
    /// `{bucket.reason: N, …}`.
    pub(super) fn summary(&self) -> ([u64; 6], String) {
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

#[cfg(test)]
mod tests {
    use super::{Deliveries, DeliveryLabels, Handled};

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
            d.count("echo", h);
        }
        let (counts, reasons) = d.summary();
        assert_eq!(counts, [2, 0, 3, 1, 0, 0]);
        assert_eq!(
            reasons,
            "{skipped.claimed: 2, skipped.ended: 1, requeued.capacity: 1}"
        );
        let claimed = DeliveryLabels {
            class: "echo".into(),
            outcome: "skipped",
            reason: "claimed",
        };
        assert_eq!(d.by_class.get_or_create(&claimed).get(), 2);
    }
}
