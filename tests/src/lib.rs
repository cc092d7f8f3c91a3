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
//! - [`point_at_double`]: a `kubernetes` dispatcher's way to the Kubernetes API double
//!   (`gantry-kube-double`).
//! - [`services`]: restarts of this machine's RabbitMQ and PostgreSQL.
//! - [`echo_spec`]: an `echo` task, as the tests and the benchmarks submit them.

pub mod by_hand;
pub mod duplicate;
pub mod executions;
pub mod services;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gantry_dispatcher::settings::{DispatcherSection, RuntimeKind, Settings};
use gantry_kube_double::KubeDouble;
use gantry_producer::Producer;
use gantry_shared::amqp::{self, Publisher, confirm_channel};
use gantry_shared::catalog::Catalog;
use gantry_shared::config::{Config, DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL};
use gantry_shared::message::{ExecutorClass, TaskName, TaskSpec};
use gantry_shared::retry;
use gantry_shared::store::Store;
use gantry_shared::topology::{QueueSettings, Topology};
use lapin::Channel;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use secrecy::ExposeSecret;
use serde_json::Value;
use tokio_postgres::NoTls;

/// Longest a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The broker every test uses (`GANTRY_AMQP_URL`, else this machine's).
pub fn amqp_url() -> String {
    std::env::var("GANTRY_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.into())
}

/// The Postgres server and role tests use (`GANTRY_DATABASE_URL`, else this machine's).
pub fn admin_database_url() -> String {
    std::env::var("GANTRY_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.into())
}

/// A built binary of the workspace (`cargo build --bins` first), found beside the running
/// test or benchmark executable, or in `GANTRY_BIN_DIR`.
pub fn bin_path(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("GANTRY_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    let mut dir = exe
        .parent()
        .expect("the test has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// An `echo` task named `name` carrying `payload`, with an hour to live.
///
/// # Errors
/// `name` is not a valid task name.
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

    /// A channel of the test's own (no confirms) on a connection of its own, for declaring,
    /// inspecting and taking messages by hand; the connection closes with the channel.
    pub async fn channel(&self) -> Result<Channel> {
        let conn =
            amqp::connect(&amqp_url().into(), "gantry-tests", Duration::from_secs(10)).await?;
        Ok(conn.create_channel().await?)
    }

    /// Messages ready in a queue right now (a passive declare: it takes nothing).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32> {
        Ok(queue_state(queue).await?.0)
    }

    /// Runs a dispatcher for this world in this process, through
    /// `gantry_dispatcher::run`, on the `local` runtime with the built executor; returns
    /// once it consumes every class's queue.
    ///
    /// # Errors
    /// Its settings are refused, or it stops or fails to consume within a minute.
    pub async fn dispatcher(&self) -> Result<InProcessDispatcher> {
        InProcessDispatcher::start(self).await
    }

    /// Starts the `gantry-dispatcher` binary for this world, for a test that needs the
    /// process itself (its log, its exit status, SIGKILL), waiting until it is ready.
    ///
    /// # Errors
    /// It cannot be started, or exits or stays silent for a minute.
    pub fn dispatcher_process(&self) -> Result<Dispatcher> {
        Dispatcher::start(self, &[])
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

/// The same URL with another database (its query parameters kept).
fn with_database(url: &str, database: &str) -> Result<String> {
    tokio_postgres::Config::from_str(url).context("GANTRY_DATABASE_URL is not a Postgres URL")?;
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    Ok(format!("{}/{database}{query}", &base[..host_end]))
}

/// A dispatcher running inside the test's process through `gantry_dispatcher::run`: the
/// default for a test that drives the system and watches Postgres and the broker. Dropping
/// it asks it to stop; [`InProcessDispatcher::stop`] also waits until it has drained.
pub struct InProcessDispatcher {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    running: tokio::task::JoinHandle<gantry_dispatcher::Result<()>>,
}

impl InProcessDispatcher {
    async fn start(env: &TestEnv) -> Result<InProcessDispatcher> {
        let dispatcher = DispatcherSection {
            runtime: RuntimeKind::Local,
            catalog: Some(env.catalog_path.clone()),
            state_dir: env.dir.path().join("state"),
            executor_bin: Some(bin_path("gantry-executor")),
            job_retention: Duration::from_secs(3600),
            ..DispatcherSection::default()
        };
        let settings = Settings::resolve(env.config(), dispatcher, None)
            .context("the test dispatcher's settings")?;
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(gantry_dispatcher::run(settings, async move {
            let _ = stop.await;
        }));
        let started = InProcessDispatcher {
            shutdown: Some(shutdown),
            running,
        };
        // Ready once every class's queue and the results queue have their consumer.
        let t = env.topology();
        let mut queues: Vec<String> = env
            .catalog
            .classes()
            .iter()
            .map(|c| t.task_queue(c))
            .collect();
        queues.push(t.results_queue());
        let ready = eventually(
            "the dispatcher to consume its queues",
            Duration::from_secs(60),
            || async {
                if started.running.is_finished() {
                    bail!("the dispatcher stopped before it was ready");
                }
                for q in &queues {
                    if queue_state(q).await?.1 == 0 {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            },
        )
        .await;
        match ready {
            Ok(()) => Ok(started),
            Err(e) if started.running.is_finished() => {
                let outcome = started.stop().await;
                Err(e.context(format!("{outcome:?}")))
            }
            Err(e) => Err(e),
        }
    }

    /// Asks the dispatcher to stop, as SIGTERM does, and waits until it has drained.
    ///
    /// # Errors
    /// It returned an error, or panicked.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        match (&mut self.running).await {
            Ok(outcome) => Ok(outcome?),
            Err(e) => bail!("the dispatcher panicked or was cancelled: {e}"),
        }
    }
}

impl Drop for InProcessDispatcher {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// A running `gantry-dispatcher` process.
pub struct Dispatcher {
    child: Child,
    pub log: PathBuf,
}

impl Dispatcher {
    /// Starts the dispatcher with extra environment, and waits until it is ready.
    pub fn start(env: &TestEnv, extra: &[(&str, &str)]) -> Result<Dispatcher> {
        let log = env
            .dir
            .path()
            .join(format!("dispatcher-{}.log", uuid::Uuid::new_v4().simple()));
        let out = std::fs::File::create(&log)?;
        let config = env.config();
        let child = Command::new(bin_path("gantry-dispatcher"))
            .env("GANTRY_RUNTIME", "local")
            .env("GANTRY_AMQP_URL", config.amqp_url.expose_secret())
            .env("GANTRY_DATABASE_URL", &env.database_url)
            .env("GANTRY_PREFIX", &env.prefix)
            .env("GANTRY_STATE_DIR", env.dir.path().join("state"))
            .env("GANTRY_CATALOG", &env.catalog_path)
            .env("GANTRY_EXECUTOR_BIN", bin_path("gantry-executor"))
            .env("GANTRY_JOB_RETENTION", "1h")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting gantry-dispatcher")?;
        let mut d = Dispatcher { child, log };
        d.wait_for_log("dispatcher ready", Duration::from_secs(60))?;
        Ok(d)
    }

    /// Waits until the log contains `needle` (or the process exits).
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "dispatcher exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "dispatcher did not log {needle:?} within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The numbers of the last `dispatcher counters` line of the log (`name=N` fields).
    pub fn counters(&self) -> Option<std::collections::BTreeMap<String, u64>> {
        counters_in(&self.log_text())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait for the exit status (bounded).
    pub fn terminate(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM)?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                bail!(
                    "dispatcher did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill_hard(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The numbers of the last `dispatcher counters` line of a dispatcher's log.
pub fn counters_in(log: &str) -> Option<std::collections::BTreeMap<String, u64>> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("dispatcher counters"))?;
    Some(
        line.split_whitespace()
            .filter_map(|field| {
                let (name, value) = field.split_once('=')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect(),
    )
}

/// Re-checks `probe` every 50 ms until it yields a value or `timeout` passes: waiting for a
/// condition, never for a fixed time.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(ready messages, consumers)` of a queue, by a passive declare (it takes nothing).
pub async fn queue_state(queue: &str) -> Result<(u32, u32)> {
    let conn = amqp::connect(&amqp_url().into(), "gantry-tests", Duration::from_secs(10)).await?;
    let channel = conn.create_channel().await?;
    let q = amqp::peek_queue(&channel, queue, Duration::from_secs(10)).await?;
    let _ = conn.close(200, "ok".into()).await;
    Ok((q.message_count(), q.consumer_count()))
}

/// Waits until process `pid` no longer exists.
pub async fn process_gone(what: &str, pid: i32, timeout: Duration) -> Result<()> {
    eventually(what, timeout, || async {
        let alive = kill(Pid::from_raw(pid), None).is_ok();
        Ok((!alive).then_some(()))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_names_are_swapped_in_urls() -> anyhow::Result<()> {
        assert_eq!(
            with_database("postgres://u:p@h:5432/gantry", "postgres")?,
            "postgres://u:p@h:5432/postgres"
        );
        assert_eq!(
            with_database("postgres://u@h/gantry?sslmode=disable", "x")?,
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x")?, "postgres://h/x");
        Ok(())
    }

    #[test]
    fn a_database_url_that_is_not_postgres_is_refused() {
        let e = with_database("mysql://h/gantry", "x").expect_err("not a Postgres URL");
        assert!(
            e.to_string()
                .contains("GANTRY_DATABASE_URL is not a Postgres URL"),
            "{e:#}"
        );
    }
}
