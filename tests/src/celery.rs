//! The real Celery client against Gantry: [`CeleryClient`] runs `tests/celery/client.py`
//! (the `celery` package from PyPI, in the venv `scripts/celery-client.sh` makes) and
//! drives it one JSON line at a time; [`CeleryNames`] gives a test's Celery queue and
//! control exchange under its prefix, so tests never meet; [`TestEnv::celery_dispatcher`]
//! runs a dispatcher with its Celery bridge on them.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use gantry_dispatcher::settings::CelerySection;
use gantry_shared::amqp;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::dispatchers::InProcessDispatcher;
use crate::servers::amqp_url;
use crate::venv::{python_of, workspace};
use crate::world::TestEnv;

/// The Python of the Celery venv: `GANTRY_CELERY_PYTHON` if set, else the venv of
/// `scripts/celery-client.sh` (run once per test process).
///
/// # Errors
/// The script fails (its output says why), or `HOME` is not set.
pub fn python() -> Result<PathBuf> {
    static PYTHON: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            python_of(
                "scripts/celery-client.sh",
                "GANTRY_CELERY_PYTHON",
                "has celery 5",
            )
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// A test's Celery names: the queue its client sends to and the app's control exchange
/// (`control_exchange`; Celery broadcasts on `<it>.pidbox`).
#[derive(Debug, Clone)]
pub struct CeleryNames {
    pub queue: String,
    pub control: String,
}

impl CeleryNames {
    pub fn of(env: &TestEnv) -> CeleryNames {
        CeleryNames {
            queue: format!("{}.celery", env.prefix),
            control: format!("{}.control", env.prefix),
        }
    }

    /// The exchange revokes are broadcast on.
    pub fn pidbox(&self) -> String {
        format!("{}.pidbox", self.control)
    }

    /// The dispatcher's `celery:` settings for these names, `STARTED` sent.
    pub fn section(&self) -> CelerySection {
        CelerySection {
            enabled: true,
            queues: vec![self.queue.clone()],
            control_exchange: self.pidbox(),
            track_started: true,
            ..CelerySection::default()
        }
    }

    /// Deletes what the bridge and the client declared under these names.
    ///
    /// # Errors
    /// The broker refuses.
    pub async fn remove(&self, env: &TestEnv) -> Result<()> {
        let conn =
            amqp::connect(&amqp_url().into(), "gantry-tests", Duration::from_secs(10)).await?;
        let channel = conn.create_channel().await?;
        for queue in [
            self.queue.clone(),
            format!("{}.celery.eta", env.prefix),
            format!("{}.celery.revoke", env.prefix),
        ] {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        // Celery declares an exchange named after its default queue.
        for exchange in [self.queue.clone(), self.pidbox()] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        let _ = conn.close(200, "ok".into()).await;
        Ok(())
    }
}

impl TestEnv {
    /// [`TestEnv::dispatcher`] with its Celery bridge on this test's [`CeleryNames`].
    ///
    /// # Errors
    /// As [`TestEnv::dispatcher`].
    pub async fn celery_dispatcher(&self) -> Result<InProcessDispatcher> {
        let names = CeleryNames::of(self);
        self.dispatcher_with(|d| d.celery = names.section()).await
    }
}

/// A Celery client process: `tests/celery/client.py`, configured only as docs/celery.md
/// says, taking one command per line.
pub struct CeleryClient {
    child: Child,
    stdin: ChildStdin,
    answers: Lines<BufReader<ChildStdout>>,
}

impl CeleryClient {
    /// Starts a client that sends to `names`.
    ///
    /// # Errors
    /// No Celery venv, or the client cannot be started.
    pub fn start(names: &CeleryNames) -> Result<CeleryClient> {
        let python = python()?;
        let script = workspace().join("tests/celery/client.py");
        let mut child = Command::new(&python)
            .arg(&script)
            .env("CELERY_BROKER_URL", amqp_url())
            .env("CELERY_QUEUE", &names.queue)
            .env("CELERY_CONTROL_EXCHANGE", &names.control)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} {}", python.display(), script.display()))?;
        let stdin = child.stdin.take().context("the client's stdin")?;
        let stdout = child.stdout.take().context("the client's stdout")?;
        Ok(CeleryClient {
            child,
            stdin,
            answers: BufReader::new(stdout).lines(),
        })
    }

    /// Sends one command and reads its answer. An answer with `error` is an error.
    ///
    /// # Errors
    /// The client died, answered with an error, or not within `patience`.
    pub async fn call(&mut self, command: Value, patience: Duration) -> Result<Value> {
        let mut line = serde_json::to_vec(&command)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await?;
        let answer = tokio::time::timeout(patience, self.answers.next_line())
            .await
            .with_context(|| format!("no answer to {command} within {patience:?}"))??;
        let Some(answer) = answer else {
            let status = self.child.wait().await?;
            bail!("the Celery client exited ({status}) before answering {command}");
        };
        let answer: Value = serde_json::from_str(&answer)
            .with_context(|| format!("the Celery client answered {answer:?}"))?;
        if let Some(error) = answer.get("error") {
            bail!("the Celery client failed on {command}: {error}");
        }
        Ok(answer)
    }

    /// `send_task(name, args, kwargs, **options)`; the task id.
    ///
    /// # Errors
    /// As [`CeleryClient::call`].
    pub async fn send(
        &mut self,
        name: &str,
        args: Value,
        kwargs: Value,
        options: Value,
    ) -> Result<String> {
        let answer = self
            .call(
                serde_json::json!({"op": "send", "name": name, "args": args, "kwargs": kwargs, "options": options}),
                Duration::from_secs(30),
            )
            .await?;
        answer["id"]
            .as_str()
            .map(str::to_owned)
            .context("send answered no id")
    }

    /// `AsyncResult(id).get(timeout)`: `{state, result}` or `{state, exc_type, exc_module,
    /// exc}` for what it raised.
    ///
    /// # Errors
    /// As [`CeleryClient::call`].
    pub async fn get(&mut self, id: &str, timeout: Duration) -> Result<Value> {
        self.call(
            serde_json::json!({"op": "get", "id": id, "timeout": timeout.as_secs_f64()}),
            timeout + Duration::from_secs(30),
        )
        .await
    }
}
