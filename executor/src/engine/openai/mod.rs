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
use std::time::Instant;

use gantry_shared::catalog::OpenAiEngine;
use gantry_shared::llm::LlmRequest;
use gantry_shared::message::{ErrorKind, TaskEnvelope, TaskError};
use tracing::{info, instrument};

use self::answer::{Answer, Timings};
use self::http::Http;
use self::server::Server;
use super::deltas::Deltas;
use super::finished::{Finished, StopReason, permanent};

/// Runs `task` on `engine` until it is answered or `stop` fires.
#[instrument(skip_all, fields(model = %engine.model))]
pub(super) async fn run(
    engine: &OpenAiEngine,
    task: &TaskEnvelope,
    group_file: Option<&Path>,
    deltas: Option<&Deltas>,
    stop: impl Future<Output = StopReason>,
) -> Finished {
    let request = match LlmRequest::from_payload(&task.payload, &engine.model) {
        Ok(request) => request,
        Err(e) => return Finished::Failed(permanent(ErrorKind::InvalidPayload, e.to_string())),
    };
    let mut stop = pin!(stop);
    let began = Instant::now();
    let mut server = None;
    let http = match &engine.endpoint {
        Some(endpoint) => Http::new(endpoint),
        None => {
            let mut started = match Server::start(engine, group_file).await {
                Ok(server) => server,
                Err(error) => return Finished::Failed(error),
            };
            let ready = tokio::select! {
                ready = started.wait_ready(&engine.ready_path, engine.startup_timeout) => ready,
                reason = &mut stop => {
                    started.stop(group_file).await;
                    return Finished::Stopped(reason);
                }
            };
            if let Err(error) = ready {
                started.stop(group_file).await;
                return Finished::Failed(error);
            }
            let http = started.http().clone();
            server = Some(started);
            http
        }
    };
    let server_start = began.elapsed();
    let stream = task.stream && deltas.is_some();
    let body = request.body(&engine.model, stream);
    let asked = Instant::now();
    let answered = tokio::select! {
        answered = answer::ask(&http, request.kind(), &body, stream, deltas) => answered,
        reason = &mut stop => {
            // Dropping the request closes its connection, which aborts the generation.
            if let Some(server) = server {
                server.stop(group_file).await;
            }
            return Finished::Stopped(reason);
        }
    };
    let generation = asked.elapsed();
    let finished = match answered {
        Ok(answer) => {
            let timings = Timings {
                server_start,
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
        Err(failure) => Finished::Failed(match (&mut server, failure) {
            (_, answer::Failure::Refused(message)) => TaskError {
                kind: ErrorKind::EngineRefused,
                message: format!("the model server refused the request ({message})"),
                retryable: false,
            },
            (Some(server), answer::Failure::Broken(message)) => {
                let what = match server.exited() {
                    Some(status) => {
                        format!("the model server died ({status}) while answering: {message}")
                    }
                    None => format!("the model server failed the request: {message}"),
                };
                server.failure(ErrorKind::EngineFailed, what)
            }
            (None, answer::Failure::Broken(message)) => TaskError {
                kind: ErrorKind::EngineFailed,
                message: format!(
                    "the model server at {} failed the request: {message}",
                    http.base()
                ),
                retryable: true,
            },
        }),
    };
    if let Some(server) = server {
        server.stop(group_file).await;
    }
    finished
}

fn success(answer: Answer, model: &str, timings: &Timings) -> Finished {
    let usage = answer.usage();
    Finished::Output {
        output: answer.into_output(model, timings),
        usage: Some(usage),
    }
}
