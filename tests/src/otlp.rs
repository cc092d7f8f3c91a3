//! A real OTLP receiver: oteltest's OTLP/HTTP sink (from PyPI, in the venv
//! `scripts/otel-receiver.sh` makes) run by `tests/otlp/receiver.py` on a free port, which
//! prints every span it decodes as a JSON line; [`OtlpReceiver`] keeps them for the tests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::eventually;
use crate::venv::{python_of, workspace};

/// One span as the receiver got it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// The exporting process's `service.name`.
    pub service: String,
    pub name: String,
    /// OTLP's span kind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i64,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub attributes: Value,
}

impl ReceivedSpan {
    fn parse(line: &Value) -> Option<ReceivedSpan> {
        let text = |k: &str| line.get(k).and_then(Value::as_str).map(str::to_owned);
        Some(ReceivedSpan {
            service: text("service").unwrap_or_default(),
            name: text("name")?,
            kind: line.get("kind").and_then(Value::as_i64)?,
            trace_id: text("trace_id")?,
            span_id: text("span_id")?,
            parent_span_id: text("parent_span_id")?,
            attributes: line.get("attributes").cloned().unwrap_or(Value::Null),
        })
    }

    /// The attribute `key`.
    pub fn attribute(&self, key: &str) -> &Value {
        self.attributes.get(key).unwrap_or(&Value::Null)
    }
}

/// A running receiver; stopped when dropped.
pub struct OtlpReceiver {
    child: Child,
    endpoint: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpReceiver {
    /// Starts the receiver on a free port and waits until it listens.
    ///
    /// # Errors
    /// No venv with oteltest (`scripts/otel-receiver.sh` fails, see its output), or the
    /// receiver does not start within 30 seconds.
    pub async fn start() -> Result<OtlpReceiver> {
        let python = python_of(
            "scripts/otel-receiver.sh",
            "GANTRY_OTEL_PYTHON",
            "has oteltest",
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let script = workspace().join("tests/otlp/receiver.py");
        let mut child = Command::new(&python)
            .arg(&script)
            .arg(port.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} {}", python.display(), script.display()))?;
        let mut lines =
            BufReader::new(child.stdout.take().context("the receiver's stdout")?).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("the OTLP receiver did not listen within 30 s")??;
        if first
            .as_deref()
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .and_then(|v| v.get("listening").cloned())
            .is_none()
        {
            bail!("the OTLP receiver said {first:?} instead of listening");
        }
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let span = serde_json::from_str::<Value>(&line)
                    .ok()
                    .as_ref()
                    .and_then(ReceivedSpan::parse);
                if let (Some(span), Ok(mut all)) = (span, kept.lock()) {
                    all.push(span);
                }
            }
        });
        Ok(OtlpReceiver {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            spans,
        })
    }

    /// The receiver's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The endpoint to give a Gantry process (`GANTRY_OTLP_ENDPOINT`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The spans received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until the spans received say `done`, and returns them.
    ///
    /// # Errors
    /// `done` is not met within `timeout`; the error lists what arrived.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Result<Vec<ReceivedSpan>> {
        let found = eventually(what, timeout, || async {
            let spans = self.spans();
            Ok(done(&spans).then_some(spans))
        })
        .await;
        found.with_context(|| {
            let names: Vec<String> = self
                .spans()
                .iter()
                .map(|s| format!("{} ({}, trace {})", s.name, s.service, s.trace_id))
                .collect();
            format!("spans received: {names:?}")
        })
    }
}
