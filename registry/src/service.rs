//! [`run`]: the watcher refreshing on its period and the HTTP server, until shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::http;
use crate::settings::Settings;
use crate::watcher::Watcher;
use crate::{Error, Result};

/// Runs the service until `shutdown` resolves; then stops refreshing, lets the answers in
/// flight finish, and returns.
///
/// # Errors
/// Invalid settings, an audit log that cannot be opened, or an address that cannot be
/// listened on.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<()> {
    settings.check()?;
    let sources: Vec<String> = settings.sources.iter().map(ToString::to_string).collect();
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: settings.listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Listen {
        addr: settings.listen.to_string(),
        source,
    })?;
    let interval = settings.refresh_interval;
    let watcher = Arc::new(Watcher::new(settings)?);
    let stop = CancellationToken::new();
    let refresher = tokio::spawn(watcher.clone().refresh_every(stop.clone()));
    let server = tokio::spawn(http::serve(listener, watcher, stop.clone()));
    info!(%addr, ?sources, refresh_interval = ?interval, "gantry-registry listening");
    shutdown.await;
    info!("shutting down: no new connections; finishing the answers in flight");
    stop.cancel();
    let _ = refresher.await;
    let _ = server.await;
    info!("gantry-registry stopped");
    Ok(())
}

/// Refreshes once and returns the catalog as `GET /executors` would answer it, and whether
/// every registry was read: `gantry-registry --once`.
///
/// # Errors
/// Invalid settings, or an audit log that cannot be opened.
pub async fn once(settings: Settings) -> Result<(serde_json::Value, bool)> {
    settings.check()?;
    let watcher = Watcher::new(settings)?;
    let summary = watcher.refresh().await;
    let view = watcher.view();
    Ok((
        serde_json::json!({"executors": view.executors(), "refused": view.refused, "errors": summary.errors}),
        summary.errors.is_empty(),
    ))
}
