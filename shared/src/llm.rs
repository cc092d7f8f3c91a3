//! LLM work for the `openai` engine: the payload a task carries, checked field by field
//! before any job starts, and the request body the executor sends to the model server.
//!
//! A payload is OpenAI-shaped: `{"messages": [...]}` for a chat or `{"prompt": "..."}` for
//! a completion, with `max_tokens`, `temperature`, `top_p`, `stop`, `seed` and
//! `response_format` passed through. The model is the class's, never the payload's: a
//! payload may name it only if it names the same one. Streaming is the task's flag
//! (`gantry submit --stream`, `Producer::submit_streaming`), not a payload field.

use serde_json::{Map, Value, json};

use crate::message::Rejection;

/// Fields a payload may carry besides `messages` or `prompt`.
const PARAMETERS: [&str; 6] = [
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "response_format",
];
/// Roles a chat message may have.
const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];
/// The most stop sequences the OpenAI API takes.
const MAX_STOP: usize = 4;

/// A checked LLM request: what kind it is and the payload's fields, ready to be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmRequest {
    kind: RequestKind,
    /// `messages` or `prompt`, and the parameters, as the payload gave them.
    fields: Map<String, Value>,
}

/// Chat or completion: which endpoint a request goes to and what its answer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `POST /v1/chat/completions`; the answer is a message.
    Chat,
    /// `POST /v1/completions`; the answer is text.
    Completion,
}

impl RequestKind {
    /// The endpoint's path on an OpenAI-compatible server.
    pub fn path(self) -> &'static str {
        match self {
            RequestKind::Chat => "/v1/chat/completions",
            RequestKind::Completion => "/v1/completions",
        }
    }
}

impl LlmRequest {
    /// Checks a task's payload for a class that serves `model`.
    ///
    /// # Errors
    /// [`Rejection::BadPayload`] naming the first field that is wrong (for example
    /// `payload.messages[1].role`) and what it should be.
    pub fn from_payload(payload: &Value, model: &str) -> Result<LlmRequest, Rejection> {
        let Value::Object(object) = payload else {
            return Err(bad(
                "payload",
                "must be a JSON object with \"messages\" (a chat) or \"prompt\" (a completion)",
            ));
        };
        let kind = match (object.get("messages"), object.get("prompt")) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "payload",
                    "has both \"messages\" and \"prompt\"; give one: messages for a chat, prompt for a completion",
                ));
            }
            (Some(messages), None) => {
                check_messages(messages)?;
                RequestKind::Chat
            }
            (None, Some(prompt)) => {
                match prompt {
                    Value::String(p) if !p.is_empty() => {}
                    Value::String(_) => return Err(bad("payload.prompt", "is empty")),
                    _ => return Err(bad("payload.prompt", "must be a string")),
                }
                RequestKind::Completion
            }
            (None, None) => {
                return Err(bad(
                    "payload",
                    "has neither \"messages\" (a chat) nor \"prompt\" (a completion)",
                ));
            }
        };
        let mut fields = Map::new();
        for (name, value) in object {
            match name.as_str() {
                "messages" | "prompt" => {}
                "model" => {
                    if value.as_str() != Some(model) {
                        return Err(bad(
                            "payload.model",
                            format!(
                                "is {value}, but this class serves {model:?}; leave the model out (the class's is used)"
                            ),
                        ));
                    }
                    continue;
                }
                "stream" => {
                    return Err(bad(
                        "payload.stream",
                        "streaming is the task's flag, not the payload's: submit with `gantry submit --stream` or Producer::submit_streaming",
                    ));
                }
                name if PARAMETERS.contains(&name) => check_parameter(name, value)?,
                other => {
                    return Err(bad(
                        &format!("payload.{other}"),
                        format!(
                            "is not a field of an openai task; accepted: messages or prompt, {}",
                            PARAMETERS.join(", ")
                        ),
                    ));
                }
            }
            fields.insert(name.clone(), value.clone());
        }
        Ok(LlmRequest { kind, fields })
    }

    pub fn kind(&self) -> RequestKind {
        self.kind
    }

    /// The most tokens the payload asks for, if it says.
    pub fn max_tokens(&self) -> Option<u64> {
        self.fields.get("max_tokens").and_then(Value::as_u64)
    }

    /// The JSON body for the server: the payload's fields, the class's `model` and, when
    /// `stream` is on, server-sent events with usage in the last chunk (servers that
    /// ignore `stream_options` leave usage out; the executor counts it then).
    pub fn body(&self, model: &str, stream: bool) -> Value {
        let mut body = self.fields.clone();
        body.insert("model".into(), Value::String(model.to_owned()));
        if stream {
            body.insert("stream".into(), Value::Bool(true));
            body.insert("stream_options".into(), json!({"include_usage": true}));
        }
        Value::Object(body)
    }
}

fn bad(field: &str, detail: impl Into<String>) -> Rejection {
    Rejection::BadPayload {
        field: field.to_owned(),
        detail: detail.into(),
    }
}

fn check_messages(messages: &Value) -> Result<(), Rejection> {
    let Value::Array(list) = messages else {
        return Err(bad(
            "payload.messages",
            "must be an array of {\"role\": ..., \"content\": ...} objects",
        ));
    };
    if list.is_empty() {
        return Err(bad(
            "payload.messages",
            "is empty; give at least one message",
        ));
    }
    for (i, message) in list.iter().enumerate() {
        let at = |field: &str| format!("payload.messages[{i}]{field}");
        let Value::Object(message) = message else {
            return Err(bad(
                &at(""),
                "must be an object with \"role\" and \"content\"",
            ));
        };
        match message.get("role").and_then(Value::as_str) {
            Some(role) if ROLES.contains(&role) => {}
            Some(role) => {
                return Err(bad(
                    &at(".role"),
                    format!("is {role:?}; use one of {}", ROLES.join(", ")),
                ));
            }
            None => return Err(bad(&at(".role"), "is missing or not a string")),
        }
        match message.get("content") {
            Some(Value::String(_) | Value::Array(_)) => {}
            // An assistant message that only calls tools has no content.
            Some(Value::Null) | None if message.contains_key("tool_calls") => {}
            Some(_) => {
                return Err(bad(
                    &at(".content"),
                    "must be a string or an array of content parts",
                ));
            }
            None => return Err(bad(&at(".content"), "is missing")),
        }
    }
    Ok(())
}

fn check_parameter(name: &str, value: &Value) -> Result<(), Rejection> {
    let field = format!("payload.{name}");
    let number_in = |low: f64, high: f64| match value.as_f64() {
        Some(x) if (low..=high).contains(&x) => Ok(()),
        _ => Err(bad(
            &field,
            format!("must be a number from {low} to {high}, not {value}"),
        )),
    };
    match name {
        "max_tokens" => match value.as_u64() {
            Some(n) if n >= 1 => Ok(()),
            _ => Err(bad(
                &field,
                format!("must be a whole number of at least 1, not {value}"),
            )),
        },
        "temperature" => number_in(0.0, 2.0),
        "top_p" => match value.as_f64() {
            Some(x) if x > 0.0 && x <= 1.0 => Ok(()),
            _ => Err(bad(
                &field,
                format!("must be a number above 0 and at most 1, not {value}"),
            )),
        },
        "seed" => match value {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(()),
            _ => Err(bad(&field, format!("must be a whole number, not {value}"))),
        },
        "stop" => match value {
            Value::String(_) => Ok(()),
            Value::Array(stops)
                if stops.len() <= MAX_STOP && stops.iter().all(Value::is_string) =>
            {
                Ok(())
            }
            _ => Err(bad(
                &field,
                format!("must be a string or an array of at most {MAX_STOP} strings"),
            )),
        },
        "response_format" => match value.get("type").and_then(Value::as_str) {
            Some("text" | "json_object" | "json_schema") => Ok(()),
            _ => Err(bad(
                &field,
                "must be an object whose \"type\" is \"text\", \"json_object\" or \"json_schema\"",
            )),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(payload: Value) -> String {
        match LlmRequest::from_payload(&payload, "tiny") {
            Ok(request) => panic!("accepted {payload}: {request:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_chat_and_a_completion_are_accepted_and_sent_with_the_class_model() {
        let chat = LlmRequest::from_payload(
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
                    "temperature": 0, "stop": ["\n"], "seed": 7,
                    "response_format": {"type": "json_object"}, "model": "tiny"}),
            "tiny",
        )
        .unwrap();
        assert_eq!(chat.kind(), RequestKind::Chat);
        assert_eq!(chat.max_tokens(), Some(16));
        let body = chat.body("tiny", true);
        assert_eq!(body["model"], "tiny");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["seed"], 7);
        assert_eq!(body["messages"][0]["content"], "hi");

        let completion = LlmRequest::from_payload(&json!({"prompt": "Once"}), "m").unwrap();
        assert_eq!(completion.kind(), RequestKind::Completion);
        assert_eq!(completion.kind().path(), "/v1/completions");
        let body = completion.body("m", false);
        assert_eq!(body, json!({"prompt": "Once", "model": "m"}));
    }

    #[test]
    fn every_bad_field_is_named_in_the_reason() {
        let cases = [
            (json!("hi"), "invalid: payload: must be a JSON object"),
            (json!({}), "invalid: payload: has neither"),
            (json!({"prompt": "a", "messages": []}), "has both"),
            (json!({"messages": []}), "payload.messages: is empty"),
            (
                json!({"messages": "hi"}),
                "payload.messages: must be an array",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}),
                "payload.messages[1].role: is \"robot\"",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "payload.messages[0].content: is missing",
            ),
            (
                json!({"messages": [{"role": "user", "content": 3}]}),
                "payload.messages[0].content: must be a string",
            ),
            (json!({"prompt": ""}), "payload.prompt: is empty"),
            (json!({"prompt": 5}), "payload.prompt: must be a string"),
            (
                json!({"prompt": "a", "max_tokens": 0}),
                "payload.max_tokens",
            ),
            (
                json!({"prompt": "a", "max_tokens": 1.5}),
                "payload.max_tokens",
            ),
            (
                json!({"prompt": "a", "temperature": 3}),
                "payload.temperature",
            ),
            (json!({"prompt": "a", "top_p": 0}), "payload.top_p"),
            (json!({"prompt": "a", "seed": "x"}), "payload.seed"),
            (
                json!({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}),
                "payload.stop",
            ),
            (
                json!({"prompt": "a", "response_format": {"type": "xml"}}),
                "payload.response_format",
            ),
            (json!({"prompt": "a", "model": "gpt-4"}), "payload.model"),
            (json!({"prompt": "a", "stream": true}), "payload.stream"),
            (json!({"prompt": "a", "n": 2}), "payload.n: is not a field"),
        ];
        for (payload, expected) in cases {
            let reason = reason(payload.clone());
            assert!(
                reason.contains(expected),
                "{payload}: {reason:?} lacks {expected:?}"
            );
            assert!(reason.starts_with("invalid: payload"), "{reason}");
        }
    }
}
