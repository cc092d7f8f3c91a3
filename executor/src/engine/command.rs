//! The `command` engine: runs a configured program with the task envelope (JSON) on its
//! stdin and takes the JSON value it prints on stdout as the output.
//!
//! The program runs in a process group of its own. Whatever happens — it finishes, the
//! deadline passes, the executor is told to stop, its output grows too large — the whole group
//! is killed with SIGKILL and the program is reaped before this engine returns, so nothing it
//! started outlives the attempt. Its stdin is a pipe, never the executor's own stdin (which
//! holds the `local` runtime's job lock).

use std::os::unix::process::ExitStatusExt;
use std::pin::pin;
use std::process::{ExitStatus, Stdio};

use gantry_shared::message::{ErrorKind, TaskEnvelope, TaskError};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tracing::{debug, info, instrument, warn};

use super::capture::{Captured, read_capped, tail_and_forward};
use super::finished::{Finished, StopReason, permanent};
use super::group::{Group, HIDDEN_ENV};

/// Most stdout accepted from the program.
const MAX_STDOUT: usize = 4 * 1024 * 1024;
/// How much of the program's stderr is kept for the error message.
const STDERR_TAIL: usize = 4 * 1024;
/// sysexits.h `EX_TEMPFAIL`: the program says another attempt may succeed.
const EX_TEMPFAIL: i32 = 75;

/// Runs `argv` for `task` until it exits or `stop` fires.
#[instrument(skip_all, fields(program = argv.first().map(String::as_str)))]
pub(super) async fn run(
    argv: &[String],
    task: &TaskEnvelope,
    group_file: Option<&std::path::Path>,
    stop: impl Future<Output = StopReason>,
) -> Finished {
    let Some((program, args)) = argv.split_first() else {
        return Finished::Failed(permanent(
            ErrorKind::SpawnFailed,
            "no command is configured; give --command / GANTRY_COMMAND a JSON array such as [\"python3\",\"/app/run.py\"]",
        ));
    };
    let input = match serde_json::to_vec(task) {
        Ok(input) => input,
        Err(e) => return Finished::Failed(permanent(ErrorKind::SpawnFailed, e.to_string())),
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for name in HIDDEN_ENV {
        command.env_remove(name);
    }
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Finished::Failed(permanent(
                ErrorKind::SpawnFailed,
                format!(
                    "cannot start {program:?}: {e}; check --command and that the program is installed and executable"
                ),
            ));
        }
    };
    let Some(mut group) = Group::new(child) else {
        return Finished::Failed(permanent(
            ErrorKind::SpawnFailed,
            format!("{program:?} exited before its process id could be read"),
        ));
    };
    info!(pid = group.pid.as_raw(), "command started");
    if let Some(file) = group_file
        && let Err(e) = std::fs::write(file, group.pid.as_raw().to_string())
    {
        warn!(file = %file.display(), error = %e, "cannot record the command's process group");
    }
    let finished = supervise(&mut group, input, stop).await;
    // The group is killed and reaped by now; its id must not outlive it.
    if let Some(file) = group_file {
        let _ = std::fs::remove_file(file);
    }
    finished
}

/// Feeds the program, collects its output and waits for it, stopping it on `stop`.
async fn supervise(
    group: &mut Group,
    input: Vec<u8>,
    stop: impl Future<Output = StopReason>,
) -> Finished {
    let mut stop = pin!(stop);
    if let Some(mut stdin) = group.child.stdin.take() {
        tokio::spawn(async move {
            // A program that does not read its input closes the pipe early: not an error.
            if let Err(e) = stdin.write_all(&input).await {
                debug!(error = %e, "the command did not read all of its input");
            }
        });
    }
    let (Some(stdout), Some(stderr)) = (group.child.stdout.take(), group.child.stderr.take())
    else {
        group.kill_and_reap().await;
        return Finished::Failed(permanent(
            ErrorKind::SpawnFailed,
            "the command has no output pipes",
        ));
    };
    let mut stdout = pin!(read_capped(stdout, MAX_STDOUT));
    let mut stderr = tokio::spawn(tail_and_forward(stderr, STDERR_TAIL));
    let mut captured = None;

    let status = loop {
        tokio::select! {
            status = group.child.wait() => break status,
            out = &mut stdout, if captured.is_none() => match out {
                Ok(Captured::TooLarge) => {
                    group.kill_and_reap().await;
                    return Finished::Failed(permanent(
                        ErrorKind::OutputTooLarge,
                        format!("the command wrote more than {MAX_STDOUT} bytes to stdout; it was stopped"),
                    ));
                }
                out => captured = Some(out),
            },
            reason = &mut stop => {
                info!(?reason, "stopping the command");
                group.kill_and_reap().await;
                return Finished::Stopped(reason);
            }
        }
    };
    // The program is done: anything it left behind in its group goes, which also closes
    // the pipes those leftovers held open.
    group.kill_and_reap().await;
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            return Finished::Failed(permanent(
                ErrorKind::CommandFailed,
                format!("cannot wait for the command: {e}"),
            ));
        }
    };
    let captured = match captured {
        Some(out) => out,
        None => tokio::select! {
            out = &mut stdout => out,
            reason = &mut stop => return Finished::Stopped(reason),
        },
    };
    let tail = tokio::select! {
        tail = &mut stderr => tail.unwrap_or_default(),
        reason = &mut stop => return Finished::Stopped(reason),
    };
    match captured {
        Ok(Captured::Complete(stdout)) => conclude(status, &stdout, &tail),
        Ok(Captured::TooLarge) => Finished::Failed(permanent(
            ErrorKind::OutputTooLarge,
            format!("the command wrote more than {MAX_STDOUT} bytes to stdout"),
        )),
        Err(e) => Finished::Failed(permanent(
            ErrorKind::BadOutput,
            format!("cannot read the command's stdout: {e}"),
        )),
    }
}

/// The verdict on a finished program from its exit status, stdout and stderr tail.
fn conclude(status: ExitStatus, stdout: &[u8], stderr_tail: &str) -> Finished {
    let stderr = if stderr_tail.is_empty() {
        " (nothing on stderr)".to_owned()
    } else {
        format!(": {stderr_tail}")
    };
    match (status.code(), status.signal()) {
        (Some(0), _) => match serde_json::from_slice(stdout) {
            Ok(output) => Finished::output(output),
            Err(e) => {
                let head = String::from_utf8_lossy(&stdout[..stdout.len().min(200)]);
                Finished::Failed(permanent(
                    ErrorKind::BadOutput,
                    format!(
                        "the command exited 0 but its stdout is not JSON ({e}); it began with {head:?}"
                    ),
                ))
            }
        },
        (Some(code), _) => Finished::Failed(TaskError {
            kind: ErrorKind::CommandFailed,
            message: format!("command exited with code {code}{stderr}"),
            retryable: code == EX_TEMPFAIL,
        }),
        (None, Some(signal)) => Finished::Failed(permanent(
            ErrorKind::CommandFailed,
            format!("killed by signal {signal}{stderr}"),
        )),
        (None, None) => Finished::Failed(permanent(
            ErrorKind::CommandFailed,
            format!("command ended with {status}{stderr}"),
        )),
    }
}

#[cfg(test)]
#[path = "command_tests.rs"]
mod tests;
