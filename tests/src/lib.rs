//! Test support for Gantry's end-to-end tests and benchmarks: a fresh Postgres database and
//! a unique RabbitMQ prefix per test, the real binaries started as processes, and helpers
//! that wait for conditions instead of sleeping.
//!
//! # Layout
//!
//! - [`TestEnv`]: the database, the prefix, a state directory, and their clean-up, even
//!   when a test fails or panics; also without the schema, or without the topology.
//! - [`InProcessDispatcher`]: a dispatcher run in the test's process, the default.
//! - [`Dispatcher`]: a `gantry-dispatcher` process, for what needs one: its log, its exit
//!   status, SIGTERM and SIGKILL.
//! - [`bin_path`]: where the built binaries are.
//! - [`by_hand`]: Gantry driven one step at a time, without a dispatcher: the test stands in
//!   for the dispatcher and the recorder, and runs the `gantry` binary as an operator would.
//! - [`duplicate`]: at-least-once delivery on purpose: copies of task messages, sent late.
//! - [`executions`]: a class whose work leaves a record of every execution.
//! - [`replicas`]: dispatchers side by side: the claims they hold at once, and every task
//!   ended once.
//! - [`point_at_double`]: a `kubernetes` dispatcher's way to the Kubernetes API double
//!   (`gantry-kube-double`).
//! - [`services`]: restarts of this machine's RabbitMQ and PostgreSQL.
//! - [`echo_spec`]: an `echo` task, as the tests and the benchmarks submit them.
//! - [`container_registry`]: a real container registry, images pushed to it, and the
//!   executor registry service (`gantry-registry`) in front of it.
//! - [`celery`]: the real Celery client (from PyPI, in a venv of `scripts/celery-client.sh`)
//!   driven line by line, and a dispatcher with its Celery bridge on.
//! - [`otlp`]: a real OTLP receiver (oteltest's, from PyPI, in a venv of
//!   `scripts/otel-receiver.sh`) and the spans it received.
//! - [`warm`]: the evidence every task run by a warm executor shows.
//! - [`tls`]: a throwaway CA, and a RabbitMQ node and a Postgres cluster of the test's own
//!   with TLS listeners.
//!
//! They live in `world` (the test environment), `dispatchers`, `servers` (this machine's
//! broker and Postgres, the built binaries) and `waiting` (for a condition).

pub mod by_hand;
pub mod celery;
pub mod container_registry;
pub mod duplicate;
pub mod executions;
pub mod llm;
pub mod observability;
pub mod otlp;
pub mod replicas;
pub mod services;
pub mod tls;
pub mod warm;

mod dispatchers;
mod servers;
mod venv;
mod waiting;
mod world;

pub use dispatchers::{Dispatcher, InProcessDispatcher, counters_in};
pub use servers::{PATIENCE, admin_database_url, amqp_url, bin_path, queue_state};
pub use waiting::{eventually, process_gone};
pub use world::{TestEnv, echo_spec, point_at_double, task_spec};
