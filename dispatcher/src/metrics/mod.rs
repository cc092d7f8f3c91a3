//! What the dispatcher counts ([`Metrics`]): the Prometheus metrics that `/metrics` serves
//! ([`Metrics::encode`], the Prometheus text format through `prometheus-client`), and the
//! `dispatcher counters` line logged every minute and at shutdown from the same counts.
//!
//! Every label has a bounded set of values: executor classes come from the catalog; states,
//! outcomes, reasons, error kinds, verbs, writers and checks from Gantry's own fixed lists;
//! HTTP codes from the API server. No label carries a task id, a job name, a queue of a
//! caller or an error message. docs/observability.md lists the metrics and what they mean.
//!
//! - `deliveries`: what became of each delivery from a task queue ([`Handled`]).
//! - `labels`: the label sets, the histograms' bounds, the dead-letter reasons.
//! - `handles`: what other modules hold to count with ([`Groups`], [`InUse`], [`ApiCalls`]).

mod deliveries;
mod handles;
mod labels;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_shared::store::TaskState;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tracing::info;

pub(crate) use deliveries::{Deliveries, Handled};
pub(crate) use handles::{ApiCalls, Groups, InUse};
use labels::{
    CheckLabel, ClassEnd, ClassLabel, ClassState, ClassStatus, ConsumerLabel, DEAD_LETTER_REASONS,
    Histograms, ReasonLabel, WriterLabel, batches, class_label, runs, waits,
};

/// The `Content-Type` of [`Metrics::encode`]'s text.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Everything the dispatcher counts, registered once in its registry.
pub(crate) struct Metrics {
    registry: Registry,
    /// What became of each delivery from the task queues.
    pub(crate) deliveries: Deliveries,
    tasks: Family<ClassState, Counter>,
    /// Jobs (and claims) found at start, or left by a gone dispatcher, and taken over.
    pub(crate) reconciled: Counter,
    results_recorded: Family<ClassStatus, Counter>,
    results_recorded_total: Counter,
    pub(crate) results_duplicate: Counter,
    pub(crate) synthesized: Counter,
    pub(crate) forwarded: Counter,
    dead_letters: Family<ReasonLabel, Counter>,
    dead_letters_total: Counter,
    retries: Family<ClassLabel, Counter>,
    retries_total: Counter,
    /// Catalog versions swapped in, and refused as invalid.
    pub(crate) catalog_reloads: Counter,
    pub(crate) catalog_refused: Counter,
    /// The lifecycle writer's: writes, and the transactions that committed them.
    pub(crate) lifecycle: Arc<Groups>,
    record_results: Groups,
    record_dead_letters: Groups,
    batch_sizes: Histograms<WriterLabel>,
    to_job: Histograms<ClassLabel>,
    to_running: Histograms<ClassLabel>,
    run_time: Histograms<ClassEnd>,
    capacity_in_use: Family<ClassLabel, Gauge>,
    capacity_limit: Family<ClassLabel, Gauge>,
    /// The `kubernetes` runtime's API calls.
    pub(crate) api: ApiCalls,
    reconnects: Family<ConsumerLabel, Counter>,
    checks: Family<CheckLabel, Gauge>,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    rejected_by: Family<ReasonLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric, registered under the prefix `gantry_`.
    pub(crate) fn new() -> Metrics {
        let mut r = Registry::with_prefix("gantry");
        let build = Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]);
        r.register("build", "The running gantry-dispatcher's version", build);
        let deliveries = Deliveries::default();
        r.register(
            "deliveries",
            "Deliveries from the task queues, by executor class and what became of them (outcome, reason)",
            deliveries.by_class.clone(),
        );
        let commits = Family::<WriterLabel, Counter>::default();
        let writes = Family::<WriterLabel, Counter>::default();
        r.register(
            "postgres_group_commits",
            "Transactions that committed a group of writes, by writer (lifecycle: received, dispatched, running; results and dead_letters: the recorder's batches)",
            commits.clone(),
        );
        r.register(
            "postgres_group_writes",
            "Writes committed in those transactions, by writer",
            writes.clone(),
        );
        let groups = (commits, writes);
        let api = ApiCalls::default();
        r.register(
            "kube_api_writes",
            "Writes of the kubernetes runtime to the API server, each try counted, by verb and resource",
            api.writes.clone(),
        );
        r.register(
            "kube_api_errors",
            "Calls of the kubernetes runtime that the API server refused or that failed on the way, each try counted, by verb, resource and HTTP code (transport: no answer)",
            api.errors.clone(),
        );
        let metrics = Metrics {
            deliveries,
            tasks: family(
                &mut r,
                "tasks",
                "Task states this dispatcher recorded in Postgres, by executor class and the state entered",
            ),
            reconciled: counter(
                &mut r,
                "jobs_reconciled",
                "Jobs (and claims) found at start, or left by a gone dispatcher, and taken over",
            ),
            results_recorded: family(
                &mut r,
                "results_recorded",
                "Results that changed a task, by executor class and result status",
            ),
            results_recorded_total: Counter::default(),
            results_duplicate: counter(
                &mut r,
                "results_duplicate",
                "Results that changed nothing: duplicates and late results",
            ),
            synthesized: counter(
                &mut r,
                "results_synthesized",
                "Results the dispatcher published for jobs whose executor did not",
            ),
            forwarded: counter(
                &mut r,
                "results_forwarded",
                "Final results forwarded to the caller's reply_to queue",
            ),
            dead_letters: family(
                &mut r,
                "dead_letters",
                "Dead letters the recorder recorded, by reason kind",
            ),
            dead_letters_total: Counter::default(),
            retries: family(
                &mut r,
                "retries",
                "Retries published to a delay queue, by executor class",
            ),
            retries_total: Counter::default(),
            catalog_reloads: counter(
                &mut r,
                "catalog_reloads",
                "Executor catalog versions swapped in",
            ),
            catalog_refused: counter(
                &mut r,
                "catalog_refused",
                "Executor catalog versions refused as invalid (the previous one stays)",
            ),
            lifecycle: Arc::new(Groups::from(&groups, "lifecycle")),
            record_results: Groups::from(&groups, "results"),
            record_dead_letters: Groups::from(&groups, "dead_letters"),
            batch_sizes: histograms(
                &mut r,
                "recorder_batch_size",
                "Deliveries in each batch the recorder committed, by writer (results, dead_letters)",
                batches,
            ),
            to_job: histograms(
                &mut r,
                "task_to_job_seconds",
                "From a task's delivery to the dispatcher to its Job created (its process started, on the local runtime), capacity waits included, by executor class",
                waits,
            ),
            to_running: histograms(
                &mut r,
                "job_to_running_seconds",
                "From a Job created to its pod running (kubernetes runtime), by executor class",
                waits,
            ),
            run_time: histograms(
                &mut r,
                "job_run_seconds",
                "How long jobs ran, from running to their end, by executor class and how they ended",
                runs,
            ),
            capacity_in_use: family(
                &mut r,
                "capacity_in_use",
                "Units of capacity held by this dispatcher (jobs it follows, warm executors it keeps), by executor class",
            ),
            capacity_limit: family(
                &mut r,
                "capacity_limit",
                "max_active_jobs of each executor class in service",
            ),
            api,
            reconnects: family(
                &mut r,
                "amqp_reconnects",
                "RabbitMQ connections reopened after they or their channel broke, by consumer or publisher",
            ),
            checks: family(
                &mut r,
                "ready_check",
                "1 while the readiness check passes, 0 while it fails, by check",
            ),
            rejected: Mutex::default(),
            rejected_by: family(
                &mut r,
                "rejected",
                "Messages refused and dead-lettered by the dispatcher or the recorder, by cause",
            ),
            registry: r,
        };
        for reason in DEAD_LETTER_REASONS.into_iter().chain(["other"]) {
            let _ = metrics.dead_letters.get_or_create(&ReasonLabel { reason });
        }
        metrics
    }

    /// Every metric, in the Prometheus text format ([`CONTENT_TYPE`]).
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }

    /// Counts one rejected message by its cause; how many of that cause so far.
    pub(crate) fn rejected(&self, label: &'static str) -> u64 {
        self.rejected_by
            .get_or_create(&ReasonLabel { reason: label })
            .inc();
        let mut map = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(label).or_default();
        *n += 1;
        *n
    }

    /// Counts a task of `class` entering `state`, as recorded in Postgres.
    pub(crate) fn task_entered(&self, class: &str, state: TaskState) {
        self.tasks
            .get_or_create(&ClassState {
                class: class.to_owned(),
                state: state.as_str(),
            })
            .inc();
    }

    /// Counts a result that changed its task.
    pub(crate) fn result_recorded(&self, class: &str, status: &'static str) {
        self.results_recorded
            .get_or_create(&ClassStatus {
                class: class.to_owned(),
                status,
            })
            .inc();
        self.results_recorded_total.inc();
    }

    /// Counts a dead letter recorded, by the kind of its reason (`other` when it is none
    /// of Gantry's or RabbitMQ's).
    pub(crate) fn dead_letter_recorded(&self, kind: &str) {
        let reason = DEAD_LETTER_REASONS
            .into_iter()
            .find(|r| *r == kind)
            .unwrap_or("other");
        self.dead_letters
            .get_or_create(&ReasonLabel { reason })
            .inc();
        self.dead_letters_total.inc();
    }

    /// Counts a retry published for a task of `class`.
    pub(crate) fn retry_scheduled(&self, class: &str) {
        self.retries.get_or_create(&class_label(class)).inc();
        self.retries_total.inc();
    }

    /// Observes the time from a task's delivery to its Job created.
    pub(crate) fn task_to_job(&self, class: &str, took: Duration) {
        self.to_job
            .get_or_create(&class_label(class))
            .observe(took.as_secs_f64());
    }

    /// Observes the time from a Job created to its pod running.
    pub(crate) fn job_to_running(&self, class: &str, took: Duration) {
        self.to_running
            .get_or_create(&class_label(class))
            .observe(took.as_secs_f64());
    }

    /// Observes how long a job ran, and how it ended (`reported`, `deadline`, `crashed`, or
    /// the kind of failure the runtime saw).
    pub(crate) fn job_ran(&self, class: &str, end: &'static str, took: Duration) {
        let labels = ClassEnd {
            class: class.to_owned(),
            end,
        };
        self.run_time
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// A unit of `class`'s capacity in use until the guard is dropped.
    pub(crate) fn capacity_in_use(&self, class: &str) -> InUse {
        let gauge = self
            .capacity_in_use
            .get_or_create_owned(&class_label(class));
        gauge.inc();
        InUse(gauge)
    }

    /// Sets `class`'s `max_active_jobs`, 0 once it leaves service. A class entering service
    /// gets its series at zero, so that they exist before its first task.
    pub(crate) fn capacity_limit(&self, class: &str, size: u32) {
        let labels = class_label(class);
        self.capacity_limit
            .get_or_create(&labels)
            .set(i64::from(size));
        let _ = self.capacity_in_use.get_or_create(&labels);
        let _ = self.to_job.get_or_create(&labels);
        let _ = self.to_running.get_or_create(&labels);
        let _ = self.retries.get_or_create(&labels);
    }

    /// Gives the connection `consumer` (a consumer's, or the publisher's) its reconnect
    /// counter, at zero.
    pub(crate) fn consumer(&self, consumer: &str) {
        let _ = self.reconnects.get_or_create(&ConsumerLabel {
            consumer: consumer.to_owned(),
        });
    }

    /// Counts a consumer session, or the publisher's connection, reopened after it broke.
    pub(crate) fn reconnected(&self, consumer: &str) {
        self.reconnects
            .get_or_create(&ConsumerLabel {
                consumer: consumer.to_owned(),
            })
            .inc();
    }

    /// Sets whether the readiness check `check` passes.
    pub(crate) fn ready_check(&self, check: &'static str, ok: bool) {
        self.checks
            .get_or_create(&CheckLabel { check })
            .set(i64::from(ok));
    }

    /// Counts a batch the recorder committed for `stream` (`results`, `dead_letters`).
    pub(crate) fn batch_recorded(&self, stream: &'static str, size: usize) {
        let groups = match stream {
            "results" => &self.record_results,
            _ => &self.record_dead_letters,
        };
        groups.committed(size);
        self.batch_sizes
            .get_or_create(&WriterLabel { writer: stream })
            .observe(size as f64);
    }

    /// Logs the counters line, `when` saying why (`periodic`, `shutdown`).
    pub(crate) fn log(&self, when: &str) {
        let rejected = self
            .rejected
            .lock()
            .map(|m| format!("{m:?}"))
            .unwrap_or_default();
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
            reconciled = self.reconciled.get(),
            results_recorded = self.results_recorded_total.get(),
            results_duplicate = self.results_duplicate.get(),
            synthesized = self.synthesized.get(),
            forwarded = self.forwarded.get(),
            retries = self.retries_total.get(),
            dead_letters_recorded = self.dead_letters_total.get(),
            catalog_reloads = self.catalog_reloads.get(),
            catalog_refused = self.catalog_refused.get(),
            lifecycle_writes = self.lifecycle.writes.get(),
            lifecycle_commits = self.lifecycle.commits.get(),
            %rejected,
            "dispatcher counters"
        );
    }
}

fn counter(r: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::default();
    r.register(name, help, c.clone());
    c
}

fn family<S, M>(r: &mut Registry, name: &str, help: &str) -> Family<S, M>
where
    Family<S, M>: prometheus_client::registry::Metric + Clone + Default,
{
    let f = Family::<S, M>::default();
    r.register(name, help, f.clone());
    f
}

fn histograms<S>(
    r: &mut Registry,
    name: &str,
    help: &str,
    buckets: fn() -> Histogram,
) -> Histograms<S>
where
    S: Clone + std::hash::Hash + Eq,
    Histograms<S>: prometheus_client::registry::Metric,
{
    let f = Histograms::<S>::new_with_constructor(buckets);
    r.register(name, help, f.clone());
    f
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use gantry_shared::store::TaskState;

    use super::Metrics;

    #[test]
    fn the_text_names_each_metric_with_its_labels_and_the_log_keeps_its_totals() {
        let m = Metrics::new();
        m.capacity_limit("echo", 8);
        m.consumer("gantry-recorder/results");
        m.task_entered("echo", TaskState::Dispatched);
        m.result_recorded("echo", "succeeded");
        m.dead_letter_recorded("expired");
        m.dead_letter_recorded("something a producer made up");
        m.retry_scheduled("echo");
        m.task_to_job("echo", Duration::from_millis(30));
        m.batch_recorded("results", 3);
        m.lifecycle.committed(4);
        let in_use = m.capacity_in_use("echo");
        m.api.tried("create", "jobs");
        m.api.failed("create", "jobs", "409".into());
        m.ready_check("broker", true);
        let text = m.encode();
        for line in [
            "gantry_tasks_total{class=\"echo\",state=\"dispatched\"} 1",
            "gantry_results_recorded_total{class=\"echo\",status=\"succeeded\"} 1",
            "gantry_dead_letters_total{reason=\"expired\"} 1",
            "gantry_dead_letters_total{reason=\"other\"} 1",
            "gantry_retries_total{class=\"echo\"} 1",
            "gantry_task_to_job_seconds_bucket{class=\"echo\",le=\"0.05\"} 1",
            "gantry_task_to_job_seconds_count{class=\"echo\"} 1",
            "gantry_recorder_batch_size_sum{writer=\"results\"} 3.0",
            "gantry_postgres_group_commits_total{writer=\"results\"} 1",
            "gantry_postgres_group_writes_total{writer=\"lifecycle\"} 4",
            "gantry_capacity_in_use{class=\"echo\"} 1",
            "gantry_kube_api_writes_total{verb=\"create\",resource=\"jobs\"} 1",
            "gantry_kube_api_errors_total{verb=\"create\",resource=\"jobs\",code=\"409\"} 1",
            "gantry_capacity_limit{class=\"echo\"} 8",
            "gantry_job_to_running_seconds_count{class=\"echo\"} 0",
            "gantry_dead_letters_total{reason=\"max_attempts\"} 0",
            "gantry_amqp_reconnects_total{consumer=\"gantry-recorder/results\"} 0",
            "gantry_ready_check{check=\"broker\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
        drop(in_use);
        assert!(
            m.encode()
                .contains("gantry_capacity_in_use{class=\"echo\"} 0")
        );
        assert_eq!(m.results_recorded_total.get(), 1);
        assert_eq!(m.dead_letters_total.get(), 2);
        assert_eq!(m.lifecycle.commits.get(), 1);
    }
}
