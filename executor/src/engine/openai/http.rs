//! Plain HTTP/1.1 to the model server: a readiness probe, a JSON request, and its answer
//! read whole or as server-sent events.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Most bytes of a whole (not streamed) answer, and of one event of a stream.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// A client of one server, `http://host:port`.
#[derive(Clone)]
pub(super) struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    pub(super) fn new(base: &str) -> Http {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_nodelay(true);
        Http {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    pub(super) fn base(&self) -> &str {
        &self.base
    }

    /// What `GET path` answers within `timeout`: its status, or why there is none.
    pub(super) async fn probe(&self, path: &str, timeout: Duration) -> Result<StatusCode, String> {
        let request = Request::get(format!("{}{path}", self.base))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response.status()),
            Ok(Err(e)) => Err(error_chain(&e)),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    /// Sends `body` as JSON to `path` and returns the response once its head arrives.
    ///
    /// # Errors
    /// The connection failed or was closed before the response's head.
    pub(super) async fn post(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<Response<Incoming>, String> {
        let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.base))
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, text/event-stream")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        self.client
            .request(request)
            .await
            .map_err(|e| error_chain(&e))
    }
}

/// Reads a whole body, up to [`MAX_BODY`].
///
/// # Errors
/// The connection broke before the end, or the body is too large.
pub(super) async fn read_body(mut body: Incoming) -> Result<Bytes, String> {
    let mut bytes = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| error_chain(&e))?;
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
            if bytes.len() > MAX_BODY {
                return Err(format!("the answer is larger than {MAX_BODY} bytes"));
            }
        }
    }
    Ok(bytes.freeze())
}

/// The server's own words for a refused or failed request: `error.message` of an
/// OpenAI-style error body, else the body's first 2 KiB.
pub(super) fn error_message(status: StatusCode, body: &[u8]) -> String {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let said = json.as_ref().and_then(|j| {
        j.pointer("/error/message")
            .or_else(|| j.get("detail"))
            .or_else(|| j.get("message"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let said = said.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(&body[..body.len().min(2048)]);
        text.trim().to_owned()
    });
    format!("HTTP {}: {said}", status.as_u16())
}

/// One item of a server-sent event stream.
#[derive(Debug, PartialEq)]
pub(super) enum Event {
    /// A `data:` payload that is JSON.
    Data(Value),
    /// `data: [DONE]`: the server's end of the stream.
    Done,
}

/// Splits a server-sent event stream into its `data:` lines, frame by frame.
pub(super) struct Events {
    body: Incoming,
    pending: BytesMut,
    ended: bool,
}

impl Events {
    pub(super) fn new(body: Incoming) -> Events {
        Events {
            body,
            pending: BytesMut::new(),
            ended: false,
        }
    }

    /// The next event; `Ok(None)` at the end of the body.
    ///
    /// # Errors
    /// The connection broke, a line is over [`MAX_BODY`], or a `data:` line is not JSON.
    pub(super) async fn next(&mut self) -> Result<Option<Event>, String> {
        loop {
            if let Some(line) = take_line(&mut self.pending) {
                if let Some(event) = parse_line(&line)? {
                    return Ok(Some(event));
                }
                continue;
            }
            if self.ended {
                // A last line without its newline still counts.
                let rest = std::mem::take(&mut self.pending);
                return match rest.is_empty() {
                    true => Ok(None),
                    false => parse_line(&rest),
                };
            }
            match self.body.frame().await {
                None => self.ended = true,
                Some(Err(e)) => return Err(error_chain(&e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                        if self.pending.len() > MAX_BODY {
                            return Err(format!("an event is larger than {MAX_BODY} bytes"));
                        }
                    }
                }
            }
        }
    }
}

/// The first complete line of `pending` (without its `\n` or `\r\n`), removed from it.
fn take_line(pending: &mut BytesMut) -> Option<BytesMut> {
    let end = pending.iter().position(|&b| b == b'\n')?;
    let mut line = pending.split_to(end + 1);
    line.truncate(end);
    if line.last() == Some(&b'\r') {
        line.truncate(end - 1);
    }
    Some(line)
}

/// The event of one line: `data:` lines are events; blank lines, comments and other fields
/// are not.
fn parse_line(line: &[u8]) -> Result<Option<Event>, String> {
    let Some(data) = line.strip_prefix(b"data:") else {
        return Ok(None);
    };
    let mut data = data;
    if data.first() == Some(&b' ') {
        data.advance(1);
    }
    if data == b"[DONE]" {
        return Ok(Some(Event::Done));
    }
    serde_json::from_slice(data)
        .map(|value| Some(Event::Data(value)))
        .map_err(|e| {
            let head = String::from_utf8_lossy(&data[..data.len().min(200)]);
            format!("the server sent an event that is not JSON ({e}): {head:?}")
        })
}

/// An error and its sources, in one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_are_split_on_newlines_with_or_without_carriage_returns() {
        let mut pending = BytesMut::from(&b"data: {\"a\":1}\r\n\r\ndata: [DONE]\npartial"[..]);
        let first = take_line(&mut pending).unwrap();
        assert_eq!(
            parse_line(&first).unwrap(),
            Some(Event::Data(json!({"a": 1})))
        );
        let blank = take_line(&mut pending).unwrap();
        assert_eq!(parse_line(&blank).unwrap(), None);
        let done = take_line(&mut pending).unwrap();
        assert_eq!(parse_line(&done).unwrap(), Some(Event::Done));
        assert!(take_line(&mut pending).is_none());
        assert_eq!(&pending[..], b"partial");
        assert_eq!(parse_line(b": keep-alive").unwrap(), None);
        assert!(parse_line(b"data: {oops").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn the_servers_own_message_is_kept() {
        let body = br#"{"error":{"message":"Requested tokens (900) exceed context window of 512","code":"context_length_exceeded"}}"#;
        assert_eq!(
            error_message(StatusCode::BAD_REQUEST, body),
            "HTTP 400: Requested tokens (900) exceed context window of 512"
        );
        assert_eq!(
            error_message(StatusCode::INTERNAL_SERVER_ERROR, b"  boom "),
            "HTTP 500: boom"
        );
    }
}
