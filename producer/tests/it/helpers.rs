//! The test environment: a unique RabbitMQ prefix, a fresh Postgres database, and a
//! stand-in for the dispatcher and recorder that drives a task step by step.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use chrono::Utc;
use futures_util::FutureExt;
use gantry_shared::amqp;
use gantry_shared::config::{self, Config};
use gantry_shared::message::{ErrorKind, ReportedBy};
use gantry_shared::message::{
    Evidence, ExecutorClass, ResultStatus, Task, TaskError, TaskName, TaskResult, TaskSpec,
};
use gantry_shared::retry;
use gantry_shared::store::Store;
use gantry_shared::topology::{QueueSettings, Topology};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Channel, Connection};
use secrecy::ExposeSecret;
use serde_json::Value;
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
        let connection = amqp::connect(&config.amqp_url, "gantry-producer-test", PATIENCE)
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
        let t = &self.topology;
        let mut queues = vec![self.task_queue("echo")];
        queues.extend(
            QueueSettings::default()
                .retry_delays
                .iter()
                .map(|d| t.retry_queue(*d)),
        );
        queues.extend([t.results_queue(), t.dead_queue(), t.dead_audit_queue()]);
        let exchanges = [
            t.tasks_exchange(),
            t.retry_exchange(),
            t.results_exchange(),
            t.dlx(),
        ];
        // A test may have closed the channel (a conflict does); use a new one.
        let channel = self.connection.create_channel().await.unwrap();
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .unwrap();
        }
        for exchange in exchanges {
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

/// What a backend would submit.
pub(crate) fn spec(executor: &str, payload: Value) -> TaskSpec {
    TaskSpec {
        executor: ExecutorClass::parse(executor).unwrap(),
        name: TaskName::parse("demo.echo").unwrap(),
        payload,
        ttl: Duration::from_secs(60),
        reply_to: None,
        idempotency_key: None,
        priority: None,
        resources: None,
    }
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
