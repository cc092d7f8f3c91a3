//! [`TestEnv`]: one test's world (a fresh database, a unique prefix with its topology, a
//! state directory), removed when it is dropped, whatever the test's outcome; and the ways
//! into it that tests share.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use gantry_kube_double::KubeDouble;
use gantry_producer::Producer;
use gantry_shared::amqp::{self, Publisher, confirm_channel};
use gantry_shared::catalog::Catalog;
use gantry_shared::config::Config;
use gantry_shared::message::{ExecutorClass, TaskName, TaskSpec};
use gantry_shared::retry;
use gantry_shared::store::Store;
use gantry_shared::topology::{QueueSettings, Topology};
use lapin::Channel;
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use tokio_postgres::NoTls;

use crate::servers::{admin_database_url, amqp_url, queue_state, with_database};

/// An `echo` task named `name` carrying `payload`, with an hour to live.
///
/// # Errors
/// `name` is not a valid task name.
/// A task of `class` named `test.task` with `payload`, to end within `ttl`.
///
/// # Panics
/// `class` is not a valid class name (a test's own constant).
pub fn task_spec(class: &str, payload: Value, ttl: Duration) -> TaskSpec {
    TaskSpec {
        executor: ExecutorClass::parse(class).expect("a valid class name"),
        name: TaskName::parse("test.task").expect("a valid task name"),
        payload,
        ttl,
        reply_to: None,
        idempotency_key: None,
        priority: None,
        resources: None,
    }
}

pub fn echo_spec(name: &str, payload: Value) -> Result<TaskSpec> {
    Ok(TaskSpec {
        executor: ExecutorClass::parse("echo")?,
        name: TaskName::parse(name)?,
        payload,
        ttl: Duration::from_secs(3600),
        reply_to: None,
        idempotency_key: None,
        priority: None,
        resources: None,
    })
}

/// One test's world: its own database, prefix and state directory. Its queues, exchanges
/// and database are removed when it is dropped, whether the test passed, failed or
/// panicked (or earlier, by [`TestEnv::cleanup`]).
pub struct TestEnv {
    pub prefix: String,
    pub database: String,
    pub database_url: String,
    pub dir: tempfile::TempDir,
    pub catalog_path: PathBuf,
    pub catalog: Catalog,
    removed: bool,
}

impl TestEnv {
    /// A fresh database (migrated) and prefix with its topology; the catalog is
    /// `catalog_yaml` or the built-in one.
    pub async fn new(catalog_yaml: Option<&str>) -> Result<TestEnv> {
        TestEnv::create(catalog_yaml, true, true).await
    }

    /// [`TestEnv::new`] with an empty database: no Gantry schema, as before anyone ran
    /// `gantry db migrate` or a dispatcher.
    pub async fn without_schema(catalog_yaml: Option<&str>) -> Result<TestEnv> {
        TestEnv::create(catalog_yaml, false, true).await
    }

    /// [`TestEnv::new`] with nothing declared on the broker: no queue or exchange of the
    /// prefix exists, as before anyone ran `gantry topology apply` or a dispatcher.
    pub async fn without_topology(catalog_yaml: Option<&str>) -> Result<TestEnv> {
        TestEnv::create(catalog_yaml, true, false).await
    }

    async fn create(catalog_yaml: Option<&str>, schema: bool, topology: bool) -> Result<TestEnv> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("t-{}", &id[..12]);
        let database = format!("gantry_test_{id}");
        let admin = admin_database_url();
        let (client, conn) = tokio_postgres::connect(&with_database(&admin, "postgres")?, NoTls)
            .await
            .context("connecting to Postgres as the test role; run scripts/setup.sh")?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE \"{database}\""))
            .await
            .context("creating the test database")?;
        let dir = tempfile::tempdir()?;
        let yaml = catalog_yaml.map(str::to_owned).unwrap_or_else(|| {
            "executors:\n  echo:\n    engine: { kind: echo }\n    max_active_jobs: 8\n".into()
        });
        let catalog_path = dir.path().join("catalog.yaml");
        std::fs::write(&catalog_path, &yaml)?;
        let catalog = Catalog::parse(&yaml, "test catalog")?;
        let env = TestEnv {
            database_url: with_database(&admin, &database)?,
            prefix,
            database,
            dir,
            catalog_path,
            catalog,
            removed: false,
        };
        if topology {
            env.apply_topology().await?;
        }
        if schema {
            // The schema, as a dispatcher creates it at start: `gantry` and the client
            // library only read it, and a test may use them before any dispatcher runs.
            env.store().await?;
        }
        Ok(env)
    }

    /// The shared configuration pointing at this test's world.
    pub fn config(&self) -> Config {
        Config {
            amqp_url: amqp_url().into(),
            database_url: self.database_url.clone().into(),
            prefix: self.prefix.clone(),
            broker_timeout: Duration::from_secs(10),
            ..Config::default()
        }
    }

    pub fn topology(&self) -> Topology {
        Topology::new(&self.prefix).expect("test prefixes are valid")
    }

    /// The task queue of executor class `class`.
    ///
    /// # Errors
    /// `class` is not a valid class name.
    pub fn task_queue(&self, class: &str) -> Result<String> {
        Ok(self.topology().task_queue(&ExecutorClass::parse(class)?))
    }

    async fn apply_topology(&self) -> Result<()> {
        let conn =
            amqp::connect(&amqp_url().into(), "gantry-tests", Duration::from_secs(10)).await?;
        let channel = confirm_channel(&conn, Duration::from_secs(10)).await?;
        self.topology()
            .apply(&channel, &self.catalog.classes(), &QueueSettings::default())
            .await?;
        let _ = conn.close(200, "ok".into()).await;
        Ok(())
    }

    /// The store of this test's database.
    pub async fn store(&self) -> Result<Store> {
        Ok(Store::connect(
            &self.database_url.clone().into(),
            4,
            retry::for_at_most(Duration::from_secs(10)),
        )
        .await?)
    }

    /// A plain connection to this test's database, for looking at it (or changing it)
    /// directly.
    pub async fn sql(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.database_url, NoTls)
            .await
            .context("connecting to the test's database")?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// The tables of this test's database, by name: whether anything created a schema.
    pub async fn tables(&self) -> Result<Vec<String>> {
        let rows = self
            .sql()
            .await?
            .query(
                "SELECT table_name::text FROM information_schema.tables
                  WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
                  ORDER BY 1",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    pub async fn producer(&self) -> Result<Producer> {
        Ok(Producer::connect(&self.config()).await?)
    }

    /// A confirm-mode publisher for hand-made messages.
    pub async fn publisher(&self) -> Result<Publisher> {
        Ok(Publisher::connect(&amqp_url().into(), "gantry-tests", Duration::from_secs(10)).await?)
    }

    /// Publishes `body` as a task of `class` with only a content type and a message id:
    /// `{not json` is refused by the dispatcher and dead-lettered.
    ///
    /// # Errors
    /// The broker refuses or does not confirm within 10 seconds.
    pub async fn publish_raw(&self, class: &str, body: &[u8]) -> Result<()> {
        let props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(uuid::Uuid::new_v4().to_string().into());
        let publisher = self.publisher().await?;
        publisher
            .publish(
                &self.topology().tasks_exchange(),
                class,
                body,
                props,
                true,
                retry::for_at_most(Duration::from_secs(10)),
            )
            .await?;
        publisher.close().await;
        Ok(())
    }

    /// A channel of the test's own (no confirms) on a connection of its own, for declaring,
    /// inspecting and taking messages by hand; the connection closes with the channel.
    pub async fn channel(&self) -> Result<Channel> {
        let conn =
            amqp::connect(&amqp_url().into(), "gantry-tests", Duration::from_secs(10)).await?;
        Ok(conn.create_channel().await?)
    }

    /// A queue of `channel`'s own, named by the broker and gone with its connection: a
    /// caller's `reply_to`.
    pub async fn reply_queue(&self, channel: &Channel) -> Result<String> {
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(queue.name().to_string())
    }

    /// Messages ready in a queue right now (a passive declare: it takes nothing).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32> {
        Ok(queue_state(queue).await?.0)
    }

    /// Deletes the queues, exchanges and database of this test now.
    ///
    /// # Errors
    /// The broker or Postgres refuses.
    pub async fn cleanup(mut self) -> Result<()> {
        remove_world(&self.prefix, &self.catalog, &self.database).await?;
        self.removed = true;
        Ok(())
    }
}

impl Drop for TestEnv {
    /// Removes what the test left, on a thread of its own (a drop cannot await), when the
    /// test did not: it failed or panicked before [`TestEnv::cleanup`].
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let (prefix, catalog, database) = (
            self.prefix.clone(),
            self.catalog.clone(),
            self.database.clone(),
        );
        let removing = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(remove_world(&prefix, &catalog, &database))
        });
        match removing.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("gantry-tests: could not remove the test's world: {e:#}"),
            Err(_) => eprintln!("gantry-tests: removing the test's world panicked"),
        }
    }
}

/// Deletes the queues and exchanges of `prefix` (for `catalog`'s classes) and the database.
async fn remove_world(prefix: &str, catalog: &Catalog, database: &str) -> Result<()> {
    let conn = amqp::connect(&amqp_url().into(), "gantry-tests", Duration::from_secs(10)).await?;
    let channel = conn.create_channel().await?;
    let t = Topology::new(prefix)?;
    let mut queues: Vec<String> = catalog.classes().iter().map(|c| t.task_queue(c)).collect();
    queues.extend(
        QueueSettings::default()
            .retry_delays
            .iter()
            .map(|d| t.retry_queue(*d)),
    );
    queues.extend([t.results_queue(), t.dead_queue(), t.dead_audit_queue()]);
    for q in queues {
        channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    for e in [
        t.tasks_exchange(),
        t.retry_exchange(),
        t.results_exchange(),
        t.progress_exchange(),
        t.dlx(),
    ] {
        channel
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    let _ = conn.close(200, "ok".into()).await;
    let (client, conn) =
        tokio_postgres::connect(&with_database(&admin_database_url(), "postgres")?, NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .await?;
    Ok(())
}

/// Readies a double for a `kubernetes` dispatcher of `env`: the `gantry-amqp` Secret its
/// executors take the broker URL from (never inline), and a kubeconfig file in the state
/// directory, whose path is returned (for `KUBECONFIG`).
///
/// # Errors
/// The file cannot be written.
pub fn point_at_double(double: &KubeDouble, env: &TestEnv) -> Result<PathBuf> {
    double.create_secret("gantry-amqp", "url", &amqp_url());
    let kubeconfig = env.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, double.kubeconfig())?;
    Ok(kubeconfig)
}
