//! The dispatchers a test runs: [`InProcessDispatcher`] (through `gantry_dispatcher::run`,
//! the default) and [`Dispatcher`] (the `gantry-dispatcher` binary, for a test that needs
//! the process: its log, its exit status, SIGTERM and SIGKILL).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gantry_dispatcher::settings::{DispatcherSection, HttpAddr, RuntimeKind, Settings};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use secrecy::ExposeSecret;

use crate::servers::{bin_path, queue_state};
use crate::waiting::eventually;
use crate::world::TestEnv;

impl TestEnv {
    /// Runs a dispatcher for this world in this process, through
    /// `gantry_dispatcher::run`, on the `local` runtime with the built executor; returns
    /// once it consumes every class's queue.
    ///
    /// # Errors
    /// Its settings are refused, or it stops or fails to consume within a minute.
    pub async fn dispatcher(&self) -> Result<InProcessDispatcher> {
        InProcessDispatcher::start(self, |_| {}).await
    }

    /// [`TestEnv::dispatcher`] with `edit` applied to its `dispatcher:` settings.
    ///
    /// # Errors
    /// As [`TestEnv::dispatcher`].
    pub async fn dispatcher_with(
        &self,
        edit: impl FnOnce(&mut DispatcherSection),
    ) -> Result<InProcessDispatcher> {
        InProcessDispatcher::start(self, edit).await
    }

    /// Starts the `gantry-dispatcher` binary for this world, for a test that needs the
    /// process itself (its log, its exit status, SIGKILL), waiting until it is ready.
    ///
    /// # Errors
    /// It cannot be started, or exits or stays silent for a minute.
    pub fn dispatcher_process(&self) -> Result<Dispatcher> {
        Dispatcher::start(self, &[])
    }
}

/// A dispatcher running inside the test's process through `gantry_dispatcher::run`: the
/// default for a test that drives the system and watches Postgres and the broker. Dropping
/// it asks it to stop; [`InProcessDispatcher::stop`] also waits until it has drained.
pub struct InProcessDispatcher {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    running: tokio::task::JoinHandle<gantry_dispatcher::Result<()>>,
}

impl InProcessDispatcher {
    async fn start(
        env: &TestEnv,
        edit: impl FnOnce(&mut DispatcherSection),
    ) -> Result<InProcessDispatcher> {
        let mut dispatcher = DispatcherSection {
            runtime: RuntimeKind::Local,
            catalog: Some(env.catalog_path.clone()),
            state_dir: env.dir.path().join("state"),
            executor_bin: Some(bin_path("gantry-executor")),
            job_retention: Duration::from_secs(3600),
            // Any free port: many tests run dispatchers side by side.
            http_addr: HttpAddr(Some(([127, 0, 0, 1], 0).into())),
            ..DispatcherSection::default()
        };
        edit(&mut dispatcher);
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
            // Any free port (the log says which): many tests run dispatchers side by side.
            .env("GANTRY_HTTP_ADDR", "127.0.0.1:0")
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
