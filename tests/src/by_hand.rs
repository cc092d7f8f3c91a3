//! Gantry driven one step at a time, without a dispatcher: the test stands in for the
//! dispatcher and the recorder ([`dispatch_one`], with the [`result`] an executor would
//! publish), and runs the `gantry` binary as an operator would ([`gantry`]). What the client
//! library and the command line do is then checked against each step, never against a
//! sleep.

use std::process::{Output, Stdio};

use anyhow::{Context, Result};
use chrono::Utc;
use futures_util::StreamExt;
use gantry_shared::message::{
    ErrorKind, Evidence, Limits, ReportedBy, ResultStatus, Task, TaskError, TaskResult,
};
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;

use crate::{PATIENCE, TestEnv, amqp_url, bin_path};

/// The result an executor would publish for `task`: its payload back on success, a
/// `command_failed` error ("exit status 3") otherwise, and the evidence of a pod
/// (`test-pod` on `test-node`).
pub fn result(task: &Task, status: ResultStatus) -> TaskResult {
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
            warm_seq: None,
        },
        started_at: Some(Utc::now()),
        finished_at: Utc::now(),
        usage: None,
        reported_by: ReportedBy::Executor,
    }
}

/// Does what the dispatcher and recorder would with the next task of `class`: takes it
/// from its queue, records it received and then finished with `status` (its [`result`]),
/// and acks it.
///
/// # Errors
/// No task comes within [`PATIENCE`], it is not a valid task, or the broker or Postgres
/// refuses.
pub async fn dispatch_one(env: &TestEnv, class: &str, status: ResultStatus) -> Result<Task> {
    let store = env.store().await?;
    let channel = env.channel().await?;
    let mut consumer = channel
        .basic_consume(
            env.task_queue(class)?.as_str().into(),
            "gantry-tests/stand-in".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let delivery = tokio::time::timeout(PATIENCE, consumer.next())
        .await
        .with_context(|| format!("no task of class {class} was published within {PATIENCE:?}"))?
        .context("the consumer closed")??;
    let task = Task::from_amqp(
        &delivery.properties,
        &delivery.data,
        &Limits::default(),
        Utc::now(),
    )?;
    store.record_received(&task).await?;
    store.record_results(&[result(&task, status)]).await?;
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(task)
}

/// The `gantry` binary pointed at this test's broker, prefix and database (by its global
/// flags), with no configuration file and no `RUST_LOG` of the test's: for a test that
/// needs the process itself. Killed when dropped.
pub fn gantry_command(env: &TestEnv) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(bin_path("gantry"));
    command
        .arg("--amqp-url")
        .arg(amqp_url())
        .arg("--database-url")
        .arg(&env.database_url)
        .arg("--prefix")
        .arg(&env.prefix)
        .env_remove("GANTRY_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs `gantry args` against this test's world ([`gantry_command`]) and returns what it
/// printed and how it exited.
///
/// # Errors
/// It cannot be started, or has not finished within [`PATIENCE`].
pub async fn gantry(env: &TestEnv, args: &[&str]) -> Result<Output> {
    let run = gantry_command(env).args(args).output();
    tokio::time::timeout(PATIENCE, run)
        .await
        .with_context(|| format!("gantry {args:?} did not finish within {PATIENCE:?}"))?
        .context("running gantry")
}

/// What a run printed on stdout, as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What a run printed on stderr, as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
