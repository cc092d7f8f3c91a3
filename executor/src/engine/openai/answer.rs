//! Asking the server and reading its answer: whole, or streamed as server-sent events whose
//! pieces go to the progress publisher as they come. The output is the same either way.

use std::time::{Duration, Instant};

use gantry_shared::llm::RequestKind;
use gantry_shared::message::Usage;
use serde_json::{Value, json};
use tracing::Instrument;

use super::http::{Event, Events, Http, error_message, read_body};
use crate::engine::deltas::Deltas;

/// Why there is no answer.
#[derive(Debug)]
pub(super) enum Failure {
    /// The server refused the request (HTTP 4xx); another attempt would be refused too.
    Refused(String),
    /// The server failed (5xx), broke the connection or sent nonsense.
    Broken(String),
}

/// Where the time went.
#[derive(Debug)]
pub(super) struct Timings {
    /// From the engine's start until the server was ready (about 0 with an `endpoint`).
    pub(super) server_start: Duration,
    /// From the request until the first piece of text, when streaming.
    pub(super) first_token: Option<Duration>,
    /// From the request until the whole answer.
    pub(super) generation: Duration,
}

/// What the server answered.
#[derive(Debug, Default)]
pub(super) struct Answer {
    kind: Option<RequestKind>,
    /// The text, whole or joined from the stream's pieces.
    text: String,
    /// A chat answer's message as the server sent it (not streaming), with any fields
    /// besides its content (tool calls).
    message: Option<Value>,
    pub(super) finish_reason: Option<String>,
    /// The model the server says answered.
    model: Option<String>,
    /// Usage as the server reported it.
    usage: Option<Value>,
    /// Pieces of text received while streaming (one token each on the servers known).
    pieces: u64,
    pub(super) first_token: Option<Duration>,
}

impl Answer {
    /// Completion tokens: the server's count, else the pieces streamed.
    pub(super) fn completion_tokens(&self) -> Option<u64> {
        self.reported("completion_tokens")
            .or((self.pieces > 0).then_some(self.pieces))
    }

    fn reported(&self, field: &str) -> Option<u64> {
        self.usage.as_ref()?.get(field)?.as_u64()
    }

    /// Usage for the result: the server's numbers, or, when a streaming server sent none,
    /// the pieces counted (and no prompt count).
    pub(super) fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.reported("prompt_tokens"),
            completion_tokens: self.completion_tokens(),
            gpu_seconds: None,
        }
    }

    /// The task's output: the text (or message), why it stopped, usage, the model and the
    /// timings.
    pub(super) fn into_output(self, model: &str, timings: &Timings) -> Value {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let usage = self.usage();
        let mut output = json!({
            "finish_reason": self.finish_reason,
            "model": self.model.as_deref().unwrap_or(model),
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": self.reported("total_tokens").or_else(|| Some(usage.prompt_tokens? + usage.completion_tokens?)),
                "counted_by": if self.usage.is_some() { "server" } else { "executor" },
            },
            "timings": {
                "server_start_ms": ms(timings.server_start),
                "time_to_first_token_ms": timings.first_token.map(ms),
                "generation_ms": ms(timings.generation),
            },
        });
        match self.kind {
            Some(RequestKind::Chat) => {
                let message = self
                    .message
                    .unwrap_or_else(|| json!({"role": "assistant", "content": self.text}));
                output["message"] = message;
            }
            _ => output["text"] = Value::String(self.text),
        }
        output
    }
}

/// Sends `body` to the endpoint of `kind` and reads the answer; with `stream`, sends each
/// piece of text to `deltas` as it arrives. The request is a span of the task's trace named
/// and described by OpenTelemetry's GenAI conventions (`chat <model>`, the model asked
/// for and the one that answered, the tokens in and out).
pub(super) async fn ask(
    http: &Http,
    kind: RequestKind,
    body: &Value,
    stream: bool,
    deltas: Option<&Deltas>,
) -> Result<Answer, Failure> {
    let operation = match kind {
        RequestKind::Chat => "chat",
        RequestKind::Completion => "text_completion",
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let span = tracing::info_span!(
        target: gantry_shared::telemetry::trace::TARGET,
        "gen_ai",
        otel.name = %format_args!("{operation} {model}"),
        otel.kind = "client",
        gen_ai.operation.name = operation,
        gen_ai.system = "openai",
        gen_ai.provider.name = "openai",
        gen_ai.request.model = model,
        gen_ai.request.stream = stream,
        server.address = http.base(),
        gen_ai.response.model = tracing::field::Empty,
        gen_ai.response.finish_reasons = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    let answered = ask_server(http, kind, body, stream, deltas)
        .instrument(span.clone())
        .await;
    match &answered {
        Ok(answer) => {
            let usage = answer.usage();
            span.record("gen_ai.response.model", answer.model.as_deref());
            span.record(
                "gen_ai.response.finish_reasons",
                answer.finish_reason.as_deref(),
            );
            // As integers: the span layer would write a u64 as text.
            let tokens = |n: Option<u64>| n.and_then(|n| i64::try_from(n).ok());
            span.record("gen_ai.usage.input_tokens", tokens(usage.prompt_tokens));
            span.record(
                "gen_ai.usage.output_tokens",
                tokens(usage.completion_tokens),
            );
        }
        Err(Failure::Refused(_)) => {
            span.record("error.type", "refused");
        }
        Err(Failure::Broken(_)) => {
            span.record("error.type", "broken");
        }
    }
    answered
}

/// [`ask`], without its span.
async fn ask_server(
    http: &Http,
    kind: RequestKind,
    body: &Value,
    stream: bool,
    deltas: Option<&Deltas>,
) -> Result<Answer, Failure> {
    let asked = Instant::now();
    let response = http
        .post(kind.path(), body)
        .await
        .map_err(Failure::Broken)?;
    let status = response.status();
    if !status.is_success() {
        let body = read_body(response.into_body()).await.unwrap_or_default();
        let message = error_message(status, &body);
        return Err(if status.is_client_error() {
            Failure::Refused(message)
        } else {
            Failure::Broken(message)
        });
    }
    let mut answer = Answer {
        kind: Some(kind),
        ..Answer::default()
    };
    if !stream {
        let bytes = read_body(response.into_body())
            .await
            .map_err(Failure::Broken)?;
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Failure::Broken(format!("the answer is not JSON: {e}")))?;
        answer.take_whole(kind, &json)?;
        return Ok(answer);
    }
    let mut events = Events::new(response.into_body());
    loop {
        match events.next().await.map_err(Failure::Broken)? {
            Some(Event::Data(chunk)) => {
                if let Some(piece) = answer.take_chunk(kind, &chunk)?
                    && !piece.is_empty()
                {
                    answer.first_token.get_or_insert_with(|| asked.elapsed());
                    answer.pieces += 1;
                    answer.text.push_str(&piece);
                    if let Some(deltas) = deltas {
                        // The publisher gone means progress is lost, never the answer.
                        let _ = deltas.send(piece);
                    }
                }
            }
            Some(Event::Done) => break,
            None if answer.finish_reason.is_some() => break,
            None => {
                return Err(Failure::Broken(
                    "the stream ended before the answer was finished".into(),
                ));
            }
        }
    }
    Ok(answer)
}

impl Answer {
    fn take_whole(&mut self, kind: RequestKind, json: &Value) -> Result<(), Failure> {
        let choice = first_choice(json)?;
        self.model = json.get("model").and_then(Value::as_str).map(str::to_owned);
        self.usage = json.get("usage").filter(|u| u.is_object()).cloned();
        self.finish_reason = finish_reason(choice);
        match kind {
            RequestKind::Chat => {
                let message = choice
                    .get("message")
                    .filter(|m| m.is_object())
                    .ok_or_else(|| Failure::Broken("the answer's choice has no message".into()))?;
                self.text = message
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                self.message = Some(message.clone());
            }
            RequestKind::Completion => {
                self.text = choice
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Failure::Broken("the answer's choice has no text".into()))?
                    .to_owned();
            }
        }
        Ok(())
    }

    /// Takes what a stream chunk says and returns its piece of text, if it has one.
    fn take_chunk(&mut self, kind: RequestKind, chunk: &Value) -> Result<Option<String>, Failure> {
        if let Some(error) = chunk.get("error") {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_owned);
            return Err(Failure::Broken(format!(
                "the server reported an error mid-stream: {message}"
            )));
        }
        if let Some(model) = chunk.get("model").and_then(Value::as_str) {
            self.model = Some(model.to_owned());
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage.clone());
        }
        // The chunk that carries usage may have no choices.
        let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        else {
            return Ok(None);
        };
        if let Some(reason) = finish_reason(choice) {
            self.finish_reason = Some(reason);
        }
        let piece = match kind {
            RequestKind::Chat => choice.pointer("/delta/content"),
            RequestKind::Completion => choice.get("text"),
        };
        Ok(piece.and_then(Value::as_str).map(str::to_owned))
    }
}

fn first_choice(json: &Value) -> Result<&Value, Failure> {
    json.get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or_else(|| Failure::Broken(format!("the answer has no choices: {json}")))
}

fn finish_reason(choice: &Value) -> Option<String> {
    choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_chat_is_joined_and_counted_when_the_server_reports_no_usage() {
        let mut answer = Answer {
            kind: Some(RequestKind::Chat),
            ..Answer::default()
        };
        let chunks = [
            json!({"model": "tiny", "choices": [{"delta": {"role": "assistant"}, "finish_reason": null}]}),
            json!({"choices": [{"delta": {"content": "Hel"}, "finish_reason": null}]}),
            json!({"choices": [{"delta": {"content": "lo"}, "finish_reason": null}]}),
            json!({"choices": [{"delta": {}, "finish_reason": "length"}]}),
        ];
        for chunk in &chunks {
            if let Some(piece) = answer.take_chunk(RequestKind::Chat, chunk).unwrap()
                && !piece.is_empty()
            {
                answer.pieces += 1;
                answer.text.push_str(&piece);
            }
        }
        let timings = Timings {
            server_start: Duration::from_millis(1500),
            first_token: Some(Duration::from_millis(20)),
            generation: Duration::from_millis(90),
        };
        let usage = answer.usage();
        assert_eq!(usage.completion_tokens, Some(2));
        assert_eq!(usage.prompt_tokens, None);
        let output = answer.into_output("tiny", &timings);
        assert_eq!(output["message"]["content"], "Hello");
        assert_eq!(output["finish_reason"], "length");
        assert_eq!(output["usage"]["counted_by"], "executor");
        assert_eq!(output["usage"]["total_tokens"], Value::Null);
        assert_eq!(output["timings"]["server_start_ms"], 1500);
        assert_eq!(output["timings"]["time_to_first_token_ms"], 20);
    }

    #[test]
    fn a_whole_completion_keeps_the_servers_usage() {
        let mut answer = Answer {
            kind: Some(RequestKind::Completion),
            ..Answer::default()
        };
        answer
            .take_whole(
                RequestKind::Completion,
                &json!({"model": "tiny", "choices": [{"text": " there", "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}),
            )
            .unwrap();
        let usage = answer.usage();
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens),
            (Some(3), Some(2))
        );
        let timings = Timings {
            server_start: Duration::ZERO,
            first_token: None,
            generation: Duration::from_millis(5),
        };
        let output = answer.into_output("tiny", &timings);
        assert_eq!(output["text"], " there");
        assert_eq!(output["usage"]["total_tokens"], 5);
        assert_eq!(output["usage"]["counted_by"], "server");
        assert!(matches!(
            Answer::default().take_whole(RequestKind::Chat, &json!({"choices": []})),
            Err(Failure::Broken(_))
        ));
    }
}
