//! The `openai` engine: sends the task's chat or completion request to an OpenAI-compatible
//! model server (vLLM in production) and returns its answer with usage and timings.
//!
//! Unless the class names an `endpoint`, the server runs inside the job: started on a free
//! local port, ready once its readiness path answers (within `startup_timeout`), stopped
//! when the attempt ends, whatever ends it. With streaming on, each piece of text is sent
//! to the progress publisher as it arrives; the output's text is those pieces joined.
//!
//! How failures map to kinds: a server that never gets ready → `engine_start_failed`
//! (retryable); a request it refuses (HTTP 4xx) → `engine_refused`, not retryable, with its
//! message; an error answer (5xx) or a server that dies while answering → `engine_failed`
//! (retryable); `oom` instead of either when the server's log says memory ran out.

mod answer;
mod http;
mod server;

use std::path::Path;
use std::pin::pin;
use std::time::{Duration, Instant};

use gantry_shared::catalog::OpenAiEngine;
use gantry_shared::llm::LlmRequest;
use gantry_shared::message::{ErrorKind, TaskEnvelope, TaskError};
use tracing::{info, instrument};

use self::answer::{Answer, Timings};
use self::http::Http;
use self::server::Server;
use super::deltas::Deltas;
use super::finished::{Finished, StopReason, permanent};

/// A model server that takes requests: started in the job (and stopped by
/// [`Serving::close`]), or the class's `endpoint`.
pub(crate) struct Serving {
    http: Http,
    /// The server this executor started; locked only to ask how it ended.
    server: Option<tokio::sync::Mutex<Server>>,
    /// How long it took to get ready (about 0 with an `endpoint`).
    server_start: Duration,
}

impl Serving {
    /// Stops the server this executor started, if any.
    pub(crate) async fn close(self, group_file: Option<&Path>) {
        if let Some(server) = self.server {
            server.into_inner().stop(group_file).await;
        }
    }

    /// How the server this executor started ended, if it has.
    pub(crate) async fn exited(&self) -> Option<std::process::ExitStatus> {
        match &self.server {
            Some(server) => server.lock().await.exited(),
            None => None,
        }
    }
}

/// Runs `task` on `engine` until it is answered or `stop` fires: starts the server (unless
/// the class names an endpoint), asks it, and stops it.
#[instrument(skip_all, fields(model = %engine.model))]
pub(super) async fn run(
    engine: &OpenAiEngine,
    task: &TaskEnvelope,
    group_file: Option<&Path>,
    deltas: Option<&Deltas>,
    stop: impl Future<Output = StopReason>,
) -> Finished {
    let mut stop = pin!(stop);
    let serving = match open(engine, group_file, &mut stop).await {
        Ok(serving) => serving,
        Err(finished) => return finished,
    };
    let finished = ask(engine, &serving, task, deltas, stop).await;
    serving.close(group_file).await;
    finished
}

/// Gets the engine's server ready: started on a free port and answering its readiness
/// path within `startup_timeout`, or the class's endpoint.
///
/// # Errors
/// How the attempt ends instead: the server did not start or get ready, or `stop` fired.
pub(crate) async fn open(
    engine: &OpenAiEngine,
    group_file: Option<&Path>,
    stop: &mut (impl Future<Output = StopReason> + Unpin),
) -> Result<Serving, Finished> {
    let began = Instant::now();
    if let Some(endpoint) = &engine.endpoint {
        return Ok(Serving {
            http: Http::new(endpoint),
            server: None,
            server_start: began.elapsed(),
        });
    }
    let mut started = match Server::start(engine, group_file).await {
        Ok(server) => server,
        Err(error) => return Err(Finished::Failed(error)),
    };
    let ready = tokio::select! {
        ready = started.wait_ready(&engine.ready_path, engine.startup_timeout) => ready,
        reason = stop => {
            started.stop(group_file).await;
            return Err(Finished::Stopped(reason));
        }
    };
    if let Err(error) = ready {
        started.stop(group_file).await;
        return Err(Finished::Failed(error));
    }
    Ok(Serving {
        http: started.http().clone(),
        server: Some(tokio::sync::Mutex::new(started)),
        server_start: began.elapsed(),
    })
}

/// Sends `task`'s request to the server of `serving` until it is answered or `stop` fires;
/// leaves the server running.
pub(crate) async fn ask(
    engine: &OpenAiEngine,
    serving: &Serving,
    task: &TaskEnvelope,
    deltas: Option<&Deltas>,
    stop: impl Future<Output = StopReason>,
) -> Finished {
    let request = match LlmRequest::from_payload(&task.payload, &engine.model) {
        Ok(request) => request,
        Err(e) => return Finished::Failed(permanent(ErrorKind::InvalidPayload, e.to_string())),
    };
    let http = &serving.http;
    let stream = task.stream && deltas.is_some();
    let body = request.body(&engine.model, stream);
    let asked = Instant::now();
    let answered = tokio::select! {
        answered = answer::ask(http, request.kind(), &body, stream, deltas) => answered,
        // Dropping the request closes its connection, which aborts the generation.
        reason = stop => return Finished::Stopped(reason),
    };
    let generation = asked.elapsed();
    match answered {
        Ok(answer) => {
            let timings = Timings {
                server_start: serving.server_start,
                first_token: answer.first_token,
                generation,
            };
            info!(
                finish_reason = answer.finish_reason.as_deref(),
                completion_tokens = answer.completion_tokens(),
                ?generation,
                "answered"
            );
            success(answer, &engine.model, &timings)
        }
        Err(answer::Failure::Refused(message)) => Finished::Failed(TaskError {
            kind: ErrorKind::EngineRefused,
            message: format!("the model server refused the request ({message})"),
            retryable: false,
        }),
        Err(answer::Failure::Broken(message)) => Finished::Failed(match &serving.server {
            Some(server) => {
                let mut server = server.lock().await;
                let what = match server.exited() {
                    Some(status) => {
                        format!("the model server died ({status}) while answering: {message}")
                    }
                    None => format!("the model server failed the request: {message}"),
                };
                server.failure(ErrorKind::EngineFailed, what)
            }
            None => TaskError {
                kind: ErrorKind::EngineFailed,
                message: format!(
                    "the model server at {} failed the request: {message}",
                    http.base()
                ),
                retryable: true,
            },
        }),
    }
}

fn success(answer: Answer, model: &str, timings: &Timings) -> Finished {
    let usage = answer.usage();
    Finished::Output {
        output: answer.into_output(model, timings),
        usage: Some(usage),
    }
}
