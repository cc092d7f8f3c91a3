//! End-to-end tests against the real RabbitMQ and Postgres of this machine. Each test has
//! its own prefix and its own fresh database, so they run in parallel.
//! The client library (`client_*`) and the `gantry` command line (`cli*`) are tested here
//! too, the test standing in for the dispatcher (`gantry_tests::by_hand`).
//! Build the binaries first: `cargo build --workspace --bins`.

mod bad_input;
mod cancel;
mod celery;
mod cli;
mod cli_db;
mod client_submit;
mod client_wait;
mod configuration;
mod contract;
mod deploy;
mod dlq;
mod forward;
mod images;
mod layout;
mod lifecycle;
mod llm;
mod llm_server;
mod llm_stream;
mod manifests;
mod migrations;
mod observability;
mod replicas;
mod restart;
mod retries;
mod store_batch;
mod topology;
mod traces;
mod warm;
