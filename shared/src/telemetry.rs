//! Tracing set-up shared by the binaries: `RUST_LOG`-style filtering (default `info`) and
//! text or JSON lines on stderr.

use tracing_subscriber::EnvFilter;

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
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
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
