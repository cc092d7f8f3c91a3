//! The test environment: a unique RabbitMQ prefix, a fresh Postgres database, and a
//! stand-in for the dispatcher and recorder that drives a task step by step.

use std::panic::AssertUnwindSafe;
use std::process::Output;
use std::time::Duration;

use chrono::Utc;
use futures_util::{FutureExt, StreamExt};
use gantry_cli::topology::Declared;
use gantry_shared::amqp;
use gantry_shared::config::{self, Config};
use gantry_shared::message::{ErrorKind, ReportedBy};
use gantry_shared::message::{
    Evidence, ExecutorClass, Limits, ResultStatus, Task, TaskError, TaskResult,
};
use gantry_shared::retry;
use gantry_shared::store::Store;
use gantry_shared::topology::{QueueSettings, Topology};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio_postgres::NoTls;
use uuid::Uuid;

/// Longest a test waits for something that should happen at once.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

pub(crate) fn amqp_url() -> String {
    config::env("GANTRY_AMQP_URL").unwrap_or_else(|| config::DEFAULT_AMQP_URL.to_owned())
}

pub(crate) fn database_url() -> String {
    config::env("GANTRY_DATABASE_URL").unwrap_or_else(|| config::DEFAULT_DATABASE_URL.to_owned())
}

/// `url` with its database name replaced by `name` (query parameters kept).
pub(crate) fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    format!("{}/{name}{query}", &base[..host_end])
}

/// Everything one test uses; removed by [`scenario`] when the test ends, pass or fail.
pub(crate) struct Env {
    /// Configuration pointing at this test's prefix and database.
    pub(crate) config: Config,
    pub(crate) topology: Topology,
    /// A channel of the test's own (no confirms), for declaring, inspecting and deleting.
    pub(crate) channel: Channel,
    connection: Connection,
    /// The name of this test's database.
    pub(crate) database: String,
}

/// Runs `test` in a fresh environment, its database with Gantry's schema as a dispatcher
/// creates it, and removes the environment afterwards, even when the test panics.
pub(crate) async fn scenario(test: impl AsyncFnOnce(&Env)) {
    run(true, test).await;
}

/// [`scenario`] with an empty database: no Gantry schema.
pub(crate) async fn scenario_without_schema(test: impl AsyncFnOnce(&Env)) {
    run(false, test).await;
}

async fn run(with_schema: bool, test: impl AsyncFnOnce(&Env)) {
    let env = Env::start(with_schema).await;
    let outcome = AssertUnwindSafe(test(&env)).catch_unwind().await;
    env.stop().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

impl Env {
    async fn start(with_schema: bool) -> Env {
        let id = Uuid::new_v4().simple().to_string();
        let database = format!("gantry_test_{id}");
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .expect("the test role may create databases");
        let url = with_database(&database_url(), &database).into();
        if with_schema {
            Store::connect(&url, 1, retry::for_at_most(PATIENCE))
                .await
                .expect("the schema is created");
        }
        let prefix = format!("gantry-test-{}", &id[..12]);
        let config = Config {
            amqp_url: amqp_url().into(),
            database_url: url,
            prefix: prefix.clone(),
            broker_timeout: Duration::from_secs(5),
            db_pool_size: 2,
            ..Config::default()
        };
        let connection = amqp::connect(&config.amqp_url, "gantry-cli-test", PATIENCE)
            .await
            .expect("RabbitMQ runs");
        let channel = connection.create_channel().await.unwrap();
        Env {
            config,
            topology: Topology::new(&prefix).unwrap(),
            channel,
            connection,
            database,
        }
    }

    /// Declares the topology for `classes`, as `gantry topology apply` or the dispatcher do.
    pub(crate) async fn apply(&self, classes: &[&str]) {
        let classes = parse_classes(classes);
        self.topology
            .apply(&self.channel, &classes, &QueueSettings::default())
            .await
            .unwrap();
    }

    /// The queue of one executor class.
    pub(crate) fn task_queue(&self, class: &str) -> String {
        self.topology
            .task_queue(&ExecutorClass::parse(class).unwrap())
    }

    /// A second connection to this test's database, as the dispatcher holds (the schema is
    /// there already: this changes nothing).
    pub(crate) async fn store(&self) -> Store {
        Store::connect_existing(
            &self.config.database_url,
            2,
            retry::for_at_most(Duration::from_secs(10)),
        )
        .await
        .unwrap()
    }

    /// A plain connection to this test's database, for looking at it directly.
    pub(crate) async fn sql(&self) -> tokio_postgres::Client {
        let url = self.config.database_url.expose_secret();
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .expect("Postgres runs");
        tokio::spawn(connection);
        client
    }

    /// The tables of this test's database, by name.
    pub(crate) async fn tables(&self) -> Vec<String> {
        self.sql()
            .await
            .query(
                "SELECT table_name::text FROM information_schema.tables
                  WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
                  ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// Deletes every queue and exchange the prefix may have, and drops the database.
    async fn stop(self) {
        let declared = Declared::new(
            &self.topology,
            &parse_classes(&["echo"]),
            &QueueSettings::default(),
        );
        // A test may have closed the channel (a conflict does); use a new one.
        let channel = self.connection.create_channel().await.unwrap();
        for queue in declared.queues() {
            channel
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await
                .unwrap();
        }
        for (exchange, _) in &declared.exchanges {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .unwrap();
        }
        let _ = self.connection.close(200, "bye".into()).await;
        admin()
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .await
            .unwrap();
    }
}

fn parse_classes(classes: &[&str]) -> Vec<ExecutorClass> {
    classes
        .iter()
        .map(|c| ExecutorClass::parse(c).unwrap())
        .collect()
}

/// A connection to the `postgres` database of the test server, for CREATE and DROP.
async fn admin() -> tokio_postgres::Client {
    let url = with_database(&database_url(), "postgres");
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .expect("Postgres runs");
    tokio::spawn(connection);
    client
}

/// The result an executor would publish for `task`: its payload back on success.
pub(crate) fn result(task: &Task, status: ResultStatus) -> TaskResult {
    let failed = status != ResultStatus::Succeeded;
    TaskResult {
        task_id: task.id,
        status,
        output: (!failed).then(|| task.payload.clone()),
        error: failed.then(|| TaskError {
            kind: ErrorKind::CommandFailed,
            message: "exit status 3".into(),
            retryable: false,
        }),
        attempt: task.attempt,
        evidence: Evidence {
            dispatch_id: Some("test-dispatch".into()),
            job_name: Some(format!("gantry-{}-a1", task.id.as_uuid().simple())),
            pod_name: Some("test-pod".into()),
            node: Some("test-node".into()),
            terminal_reason: failed.then(|| "Failed".to_owned()),
        },
        started_at: Some(Utc::now()),
        finished_at: Utc::now(),
        usage: None,
        reported_by: ReportedBy::Executor,
    }
}

/// Does what the dispatcher and recorder would with the next task of `class`: takes it
/// from its queue, records it received and then finished with `status`, and acks it.
pub(crate) async fn dispatch_one(env: &Env, class: &str, status: ResultStatus) -> Task {
    let store = env.store().await;
    let mut consumer = env
        .channel
        .basic_consume(
            env.task_queue(class).into(),
            "gantry-cli-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(PATIENCE, consumer.next())
        .await
        .expect("a task is published")
        .expect("the consumer is open")
        .unwrap();
    let task = Task::from_amqp(
        &delivery.properties,
        &delivery.data,
        &Limits::default(),
        Utc::now(),
    )
    .unwrap();
    store.record_received(&task).await.unwrap();
    store
        .record_results(&[result(&task, status)])
        .await
        .unwrap();
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    task
}

/// Runs `gantry` against this test's broker prefix and database.
pub(crate) async fn gantry(env: &Env, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
        .arg("--amqp-url")
        .arg(env.config.amqp_url.expose_secret())
        .arg("--database-url")
        .arg(env.config.database_url.expose_secret())
        .arg("--prefix")
        .arg(env.topology.prefix())
        .args(args)
        .env_remove("GANTRY_CONFIG")
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(PATIENCE, run)
        .await
        .expect("gantry finishes")
        .unwrap()
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The payload the CLI tests submit.
pub(crate) fn hello() -> Value {
    json!({"hello": "world"})
}

#[test]
fn database_names_are_swapped_in_urls() {
    assert_eq!(
        with_database("postgres://u:p@h:5432/gantry", "postgres"),
        "postgres://u:p@h:5432/postgres"
    );
    assert_eq!(
        with_database("postgres://u@h/gantry?sslmode=disable", "x"),
        "postgres://u@h/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
}
