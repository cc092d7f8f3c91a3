//! The label sets of the dispatcher's metrics, the bounds of its histograms, and the fixed
//! list of dead-letter reasons: what keeps every family's series few (see `super`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// Bounds (seconds) of the waits before a job runs: from under 10 ms (a free class, a job
/// made at once) to `max_hold` (10 minutes by default) and a slow image pull.
pub(super) const WAIT_BUCKETS: [f64; 16] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// Bounds (seconds) of job run times: half a second (an echo) to a day.
pub(super) const RUN_BUCKETS: [f64; 14] = [
    0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
];
/// Bounds of the recorder's batch sizes, up to well past `record_batch` (200 by default).
pub(super) const BATCH_BUCKETS: [f64; 10] =
    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

pub(super) type Histograms<S> = Family<S, Histogram, fn() -> Histogram>;

pub(super) fn waits() -> Histogram {
    Histogram::new(WAIT_BUCKETS)
}

pub(super) fn runs() -> Histogram {
    Histogram::new(RUN_BUCKETS)
}

pub(super) fn batches() -> Histogram {
    Histogram::new(BATCH_BUCKETS)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ClassLabel {
    pub(super) class: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ClassState {
    pub(super) class: String,
    pub(super) state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ClassStatus {
    pub(super) class: String,
    pub(super) status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ClassEnd {
    pub(super) class: String,
    pub(super) end: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReasonLabel {
    pub(super) reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct WriterLabel {
    pub(super) writer: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ConsumerLabel {
    pub(super) consumer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CheckLabel {
    pub(super) check: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ApiCall {
    pub(super) verb: &'static str,
    pub(super) resource: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ApiError {
    pub(super) verb: &'static str,
    pub(super) resource: &'static str,
    pub(super) code: String,
}

/// The reasons a dead letter is counted under: the kinds Gantry and RabbitMQ give, and
/// `other` for anything else a message may say.
pub(super) const DEAD_LETTER_REASONS: [&str; 8] = [
    "invalid",
    "expired",
    "image",
    "delivery_limit",
    "max_attempts",
    "rejected",
    "maxlen",
    "unknown",
];

pub(super) fn class_label(class: &str) -> ClassLabel {
    ClassLabel {
        class: class.to_owned(),
    }
}
