//! The model server the executor starts inside its job: on a free local port, in a process
//! group of its own, its output passed through to the executor's log with the tail kept for
//! error messages, ready once its readiness path answers, stopped with SIGTERM and then
//! SIGKILL after a grace.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_shared::catalog::OpenAiEngine;
use gantry_shared::message::{ErrorKind, TaskError};
use tokio::io::AsyncRead;
use tokio::process::Command;
use tracing::{info, warn};

use super::http::Http;
use crate::engine::capture::{Tail, forward_into};
use crate::engine::group::{Group, HIDDEN_ENV};

/// How much of the server's output is kept for error messages.
const LOG_TAIL: usize = 4 * 1024;
/// How often readiness is asked while the server starts.
const READY_POLL: Duration = Duration::from_millis(200);
/// Longest wait for one readiness answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// What a server writes when a GPU (or the host) runs out of memory.
const OOM_MARKERS: [&str; 4] = [
    "CUDA out of memory",
    "OutOfMemoryError",
    "CUDA error: out of memory",
    "failed to allocate",
];

/// A running model server.
pub(super) struct Server {
    group: Group,
    log: Arc<Mutex<Tail>>,
    http: Http,
    grace: Duration,
}

impl Server {
    /// Starts the server of `engine` on a free port. `group_file`, when given, holds its
    /// process group id while it runs, so the runtime can stop it if this executor dies.
    ///
    /// # Errors
    /// An `engine_start_failed` error when no port is free or the program cannot start.
    pub(super) async fn start(
        engine: &OpenAiEngine,
        group_file: Option<&Path>,
    ) -> Result<Server, TaskError> {
        let port =
            free_port().map_err(|e| start_failed(format!("no free local port: {e}"), false))?;
        let argv = engine.server_argv(port);
        let Some((program, args)) = argv.split_first() else {
            return Err(start_failed("engine.server names no program".into(), false));
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in HIDDEN_ENV {
            command.env_remove(name);
        }
        let child = command.spawn().map_err(|e| {
            start_failed(
                format!(
                    "cannot start the model server {program:?}: {e}; check the class's engine.server and that the image has it"
                ),
                false,
            )
        })?;
        let Some(mut group) = Group::new(child) else {
            return Err(start_failed(
                format!("the model server {program:?} exited before its process id could be read"),
                true,
            ));
        };
        info!(pid = group.pid.as_raw(), port, command = ?argv, "model server started");
        if let Some(file) = group_file
            && let Err(e) = std::fs::write(file, group.pid.as_raw().to_string())
        {
            warn!(file = %file.display(), error = %e, "cannot record the model server's process group");
        }
        let log = Arc::new(Mutex::new(Tail::new(LOG_TAIL)));
        for output in [
            group
                .child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn AsyncRead + Unpin + Send>),
            group
                .child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            tokio::spawn(forward_into(output, Arc::clone(&log)));
        }
        Ok(Server {
            group,
            log,
            http: Http::new(&format!("http://127.0.0.1:{port}")),
            grace: engine.stop_grace,
        })
    }

    pub(super) fn http(&self) -> &Http {
        &self.http
    }

    /// Waits until the server answers `ready_path`, for at most `timeout`.
    ///
    /// # Errors
    /// `engine_start_failed` (or `oom`, by its log) when the server exits first or the
    /// timeout passes, with the tail of its log.
    pub(super) async fn wait_ready(
        &mut self,
        ready_path: &str,
        timeout: Duration,
    ) -> Result<(), TaskError> {
        let began = Instant::now();
        loop {
            let last = match self.http.probe(ready_path, PROBE_TIMEOUT).await {
                Ok(status) if status.is_success() => {
                    info!(elapsed = ?began.elapsed(), "model server ready");
                    return Ok(());
                }
                Ok(status) => format!("HTTP {}", status.as_u16()),
                Err(e) => e,
            };
            if let Some(status) = self.exited() {
                return Err(self.failure(
                    ErrorKind::EngineStartFailed,
                    format!("the model server exited ({status}) before it was ready"),
                ));
            }
            if began.elapsed() >= timeout {
                return Err(self.failure(
                    ErrorKind::EngineStartFailed,
                    format!(
                        "the model server was not ready within its startup_timeout of {timeout:?}: GET {}{ready_path} never answered 200 (the last answer: {last})",
                        self.http.base()
                    ),
                ));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// How the server ended, if it has.
    pub(super) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.group.child.try_wait().ok().flatten()
    }

    /// A retryable failure of `kind` with the log's tail; `oom` instead when the log says
    /// memory ran out (then not retryable: the same request would run out again).
    pub(super) fn failure(&self, kind: ErrorKind, what: String) -> TaskError {
        let tail = self.log_tail();
        let oom = OOM_MARKERS.iter().any(|m| tail.contains(m));
        let log = if tail.is_empty() {
            " (the server wrote nothing)".to_owned()
        } else {
            format!("; the server's log ends: {tail}")
        };
        TaskError {
            kind: if oom { ErrorKind::Oom } else { kind },
            message: format!("{what}{log}"),
            retryable: !oom,
        }
    }

    fn log_tail(&self) -> String {
        self.log
            .lock()
            .map(|tail| tail.snapshot())
            .unwrap_or_default()
    }

    /// Stops the server: SIGTERM, then SIGKILL after its grace; reaps it.
    pub(super) async fn stop(mut self, group_file: Option<&Path>) {
        self.group.terminate(self.grace).await;
        if let Some(file) = group_file {
            let _ = std::fs::remove_file(file);
        }
        info!("model server stopped");
    }
}

fn start_failed(message: String, retryable: bool) -> TaskError {
    TaskError {
        kind: ErrorKind::EngineStartFailed,
        message,
        retryable,
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
