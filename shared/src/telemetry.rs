//! Tracing set-up shared by the binaries: `RUST_LOG`-style filtering (default `info`),
//! text or JSON lines on stderr, and, where `otlp_endpoint` is set, a task's spans exported
//! over OTLP ([`trace`]).

#[cfg(feature = "otlp")]
mod otlp;
pub mod trace;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::LogFormat;

/// Default filter of the services: `info`, without lapin's per-message chatter (a returned
/// message is logged with its whole payload at `warn`).
pub const SERVICE_FILTER: &str = "info,lapin=warn,lapin::returned_messages=error";

/// Installs the global subscriber with the services' default filter.
pub fn init(format: LogFormat) {
    init_with_default(format, SERVICE_FILTER);
}

/// Installs the global subscriber; `RUST_LOG` overrides `default_filter`. Safe to call once
/// per process.
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let _ = Registry::default()
        .with(log_lines(format, default_filter))
        .try_init();
}

/// Installs the global subscriber (`RUST_LOG` overrides `default_filter`, which
/// [`SERVICE_FILTER`] is for a service) and, when `otlp_endpoint` is set, exports the spans
/// of a task's trace as `service` (a binary's name). Call it from inside the Tokio runtime,
/// which carries the exports, and end with [`Traces::shutdown`], which sends the last spans.
pub fn init_service(
    format: LogFormat,
    default_filter: &str,
    service: &str,
    otlp_endpoint: Option<&str>,
) -> Traces {
    let lines = log_lines(format, default_filter);
    #[cfg(feature = "otlp")]
    if let Some(endpoint) = otlp_endpoint {
        match otlp::pipeline(service, endpoint) {
            Ok((exporting, layer)) => {
                let _ = Registry::default().with(lines).with(layer).try_init();
                tracing::info!(endpoint, service, "exporting spans over OTLP");
                return Traces(Some(exporting));
            }
            Err(e) => {
                let _ = Registry::default().with(lines).try_init();
                tracing::warn!(endpoint, error = %e, "cannot export spans; running without");
                return Traces(None);
            }
        }
    }
    let _ = Registry::default().with(lines).try_init();
    if otlp_endpoint.is_some() {
        tracing::warn!(
            service,
            "otlp_endpoint is set, but this build exports no spans"
        );
    }
    Traces::default()
}

/// The span export of a process, if it has one.
#[derive(Debug, Default)]
#[must_use = "call shutdown() at exit, or the last spans are lost"]
pub struct Traces(#[cfg(feature = "otlp")] Option<otlp::Exporting>);

impl Traces {
    /// Sends the spans still queued (waiting a few seconds at most) and stops exporting.
    pub async fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(exporting) = self.0 {
            exporting.shutdown().await;
        }
    }
}

/// Text or JSON lines on stderr, filtered by `RUST_LOG`, else `default_filter`.
fn log_lines(format: LogFormat, default_filter: &str) -> impl Layer<Registry> + Send + Sync {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let lines = match format {
        LogFormat::Json => lines.json().boxed(),
        LogFormat::Text => lines.boxed(),
    };
    lines.with_filter(filter)
}

/// Formats an error with its whole cause chain: `a: b: c`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}
