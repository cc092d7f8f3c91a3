//! The baseline's client: one HTTP/1.1 POST to the model server on a connection of its own
//! (as the executor makes it), read to its end; when streaming, the time to the first
//! server-sent event that carries text is noted on the way.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::sample::Sample;

/// Sends `body` (JSON, `stream` on or off) to `path` on 127.0.0.1:`port` and reads the
/// whole answer. Latency runs from the connect to the answer's last byte; the first token
/// is the first event that carries text.
///
/// # Errors
/// The server cannot be reached, does not answer 200, or answers something that is not a
/// chat answer.
pub(crate) async fn post(port: u16, path: &str, body: &[u8], stream: bool) -> Result<Sample> {
    let start = Instant::now();
    let mut conn = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    conn.set_nodelay(true)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body).await?;

    let mut raw = Vec::with_capacity(8 * 1024);
    let mut buf = vec![0; 16 * 1024];
    let mut first_token = None;
    loop {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if stream && first_token.is_none() && has_text(&Answer::of(&raw)?.data()) {
            first_token = Some(start.elapsed());
        }
    }
    let latency = start.elapsed();

    let answer = Answer::of(&raw)?;
    let status = answer.status.context("an answer without its headers")?;
    let data = answer.data();
    ensure!(
        status == 200,
        "the server answered {status}: {}",
        String::from_utf8_lossy(&data)
    );
    let completion_tokens = if stream {
        ensure!(first_token.is_some(), "a stream without text");
        let events = events(&data);
        events
            .iter()
            .find_map(|e| {
                e.pointer("/usage/completion_tokens")
                    .and_then(Value::as_u64)
            })
            .unwrap_or_else(|| events.iter().filter(|e| piece(e).is_some()).count() as u64)
    } else {
        let json: Value = serde_json::from_slice(&data).context("an answer that is not JSON")?;
        ensure!(
            json.pointer("/choices/0/message").is_some(),
            "an answer without a message: {json}"
        );
        json.pointer("/usage/completion_tokens")
            .and_then(Value::as_u64)
            .with_context(|| format!("an answer without usage: {json}"))?
    };
    Ok(Sample {
        latency,
        first_token,
        completion_tokens,
        stages: None,
        executor: None,
    })
}

/// An answer as far as it has come: its status, once its headers are in, and its body.
struct Answer<'a> {
    status: Option<u16>,
    chunked: bool,
    body: &'a [u8],
}

impl<'a> Answer<'a> {
    fn of(raw: &'a [u8]) -> Result<Answer<'a>> {
        let Some(end) = find(raw, b"\r\n\r\n") else {
            return Ok(Answer {
                status: None,
                chunked: false,
                body: &[],
            });
        };
        let head = String::from_utf8_lossy(&raw[..end]);
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("an answer without a status: {head}"))?;
        let chunked = head.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("transfer-encoding:") && l.contains("chunked")
        });
        Ok(Answer {
            status: Some(status),
            chunked,
            body: &raw[end + 4..],
        })
    }

    /// The body's data so far: the chunks that have come, the last one perhaps in part.
    fn data(&self) -> Vec<u8> {
        if !self.chunked {
            return self.body.to_vec();
        }
        let mut data = Vec::with_capacity(self.body.len());
        let mut rest = self.body;
        while let Some(line) = find(rest, b"\r\n") {
            let size = std::str::from_utf8(&rest[..line]).unwrap_or_default();
            let size = size.split(';').next().unwrap_or_default().trim();
            let Ok(size) = usize::from_str_radix(size, 16) else {
                break;
            };
            rest = &rest[line + 2..];
            if size == 0 {
                break;
            }
            let taken = size.min(rest.len());
            data.extend_from_slice(&rest[..taken]);
            rest = rest.get(size + 2..).unwrap_or_default();
        }
        data
    }
}

/// The JSON of each complete `data:` line of a stream.
fn events(data: &[u8]) -> Vec<Value> {
    let whole = match data.iter().rposition(|b| *b == b'\n') {
        Some(end) => &data[..end],
        None => return Vec::new(),
    };
    String::from_utf8_lossy(whole)
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

/// Whether a piece of text has come in the stream so far.
fn has_text(data: &[u8]) -> bool {
    events(data).iter().any(|e| piece(e).is_some())
}

/// The text a chat stream's event carries, if any.
fn piece(event: &Value) -> Option<&str> {
    event
        .pointer("/choices/0/delta/content")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::{Answer, events, has_text};

    fn chunk(s: &str) -> String {
        format!("{:x}\r\n{s}\r\n", s.len())
    }

    #[test]
    fn a_chunked_stream_is_read_as_far_as_it_has_come() -> anyhow::Result<()> {
        let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let role = format!(
            "{}{}",
            chunk(r#"data: {"choices":[{"delta":"#),
            chunk("{\"role\":\"assistant\"}}]}\n")
        );
        let text = chunk("data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n");
        let so_far = format!("{head}{role}{}", &text[..text.len() - 6]);

        let answer = Answer::of(so_far.as_bytes())?;
        assert_eq!(answer.status, Some(200));
        assert_eq!(events(&answer.data()).len(), 1);
        assert!(!has_text(&answer.data()));
        let whole = format!("{head}{role}{text}0\r\n\r\n");
        assert!(has_text(&Answer::of(whole.as_bytes())?.data()));
        Ok(())
    }
}
