//! The HTTP API the dispatcher's client speaks (`dispatcher/src/images/registry.rs`):
//!
//! - `GET /executors/{class}`: 200 `{"image": "…@sha256:…", "capabilities": {"tasks": […], …},
//!   …}`, 404 for a class the catalog does not have;
//! - `GET /executors`: 200 `{"executors": [{"class": …, "image": …, "capabilities": …}, …],
//!   "refused": […], "health": {…}}`;
//! - `POST /executors/refresh`: refreshes now; 200 with what changed, 502 when a registry
//!   could not be read (the catalog in force stays);
//! - `GET /health`: 200 `ok` or `degraded`, 503 `starting`.
//!
//! Until every source has been listed once, the executor endpoints answer 503: a 404 then
//! would be a guess, and the dispatcher makes a task wait on a 503 instead.
//!
//! On shutdown the server stops accepting, lets every connection finish the answer in
//! flight, and returns.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::message::ExecutorClass;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::watcher::Watcher;

/// Longest wait for connections to finish their answer at shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves until `stop`, then drains.
pub(crate) async fn serve(listener: TcpListener, watcher: Arc<Watcher>, stop: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (watcher, stop) = (watcher.clone(), stop.clone());
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let watcher = watcher.clone();
                async move { Ok::<_, Infallible>(answer(&watcher, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let served = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                debug!(error = %e, "connection ended");
            }
        });
        while connections.try_join_next().is_some() {}
    }
    let drained = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            left = connections.len(),
            "connections still open at shutdown; closing them"
        );
        connections.abort_all();
    }
}

async fn answer(watcher: &Watcher, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().trim_end_matches('/');
    let method = req.method().clone();
    match (path, method) {
        ("/health", Method::GET) => health(watcher),
        ("/executors", Method::GET) => listing(watcher),
        ("/executors/refresh", Method::POST) => refresh(watcher).await,
        (p, Method::GET) if p.starts_with("/executors/") => {
            lookup(watcher, &p["/executors/".len()..])
        }
        ("/health" | "/executors", _) => not_allowed("GET"),
        ("/executors/refresh", _) => not_allowed("GET, POST"),
        (p, _) if p.starts_with("/executors/") => not_allowed("GET"),
        _ => json(
            StatusCode::NOT_FOUND,
            json!({"error": "no such endpoint; see GET /executors, GET /executors/{class}, POST /executors/refresh, GET /health"}),
        ),
    }
}

fn health(watcher: &Watcher) -> Response<Full<Bytes>> {
    let health = watcher.view().health;
    let status = if health.loaded() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, json!(health))
}

fn not_loaded(watcher: &Watcher) -> Option<Response<Full<Bytes>>> {
    let health = watcher.view().health;
    (!health.loaded()).then(|| {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": format!("the catalog is not loaded yet: {}", health.message)}),
        )
    })
}

fn listing(watcher: &Watcher) -> Response<Full<Bytes>> {
    if let Some(r) = not_loaded(watcher) {
        return r;
    }
    let view = watcher.view();
    json(
        StatusCode::OK,
        json!({"executors": view.executors(), "refused": view.refused, "health": view.health}),
    )
}

fn lookup(watcher: &Watcher, class: &str) -> Response<Full<Bytes>> {
    if let Some(r) = not_loaded(watcher) {
        return r;
    }
    if let Err(e) = ExecutorClass::parse(class) {
        return json(StatusCode::NOT_FOUND, json!({"error": e.to_string()}));
    }
    let view = watcher.view();
    match view.catalog.get(class) {
        Some(entry) => json(StatusCode::OK, json!(entry)),
        None => {
            let refused: Vec<&crate::Refusal> = view
                .refused
                .iter()
                .filter(|r| r.repository.ends_with(&format!("/executor-{class}")))
                .collect();
            json(
                StatusCode::NOT_FOUND,
                json!({"error": format!("no accepted image for executor class {class}"), "refused": refused}),
            )
        }
    }
}

async fn refresh(watcher: &Watcher) -> Response<Full<Bytes>> {
    let summary = watcher.refresh().await;
    let status = if summary.errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    json(status, json!(summary))
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = json(
        StatusCode::METHOD_NOT_ALLOWED,
        json!({"error": format!("use {allow}")}),
    );
    r.headers_mut()
        .insert(ALLOW, hyper::header::HeaderValue::from_static(allow));
    r
}

fn json(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
