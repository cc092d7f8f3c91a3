//! The dispatcher's HTTP endpoint (`http_addr`): `/livez` and `/readyz` for the kubelet's
//! probes, `/metrics` for Prometheus. It is bound first at start, so that the probes answer
//! while the dispatcher connects, and stopped last, after the roles have drained, so that
//! Prometheus can scrape the drain.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::health::Health;
use crate::metrics::{self, Metrics};
use crate::{Error, Result};

/// The longest a client may take to send its request's head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connections still open at the end have to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The endpoint, bound and not serving yet.
pub(crate) struct Endpoint {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Endpoint {
    /// Binds `addr`.
    ///
    /// # Errors
    /// [`Error::HttpAddr`]: the address is taken, or not this machine's.
    pub(crate) async fn bind(addr: SocketAddr) -> Result<Endpoint> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::HttpAddr {
                addr: addr.to_string(),
                source,
            })?;
        let addr = listener.local_addr().unwrap_or(addr);
        Ok(Endpoint { listener, addr })
    }

    /// Serves until the returned server is stopped (or dropped).
    pub(crate) fn serve(self, health: Arc<Health>, metrics: Arc<Metrics>) -> Server {
        let stop = CancellationToken::new();
        info!(addr = %self.addr, "serving /livez, /readyz and /metrics");
        let running = tokio::spawn(accept(self.listener, health, metrics, stop.clone()));
        Server {
            stop: stop.drop_guard(),
            running,
        }
    }
}

/// The endpoint serving: dropping it stops it; [`Server::stop`] also waits.
pub(crate) struct Server {
    stop: tokio_util::sync::DropGuard,
    running: JoinHandle<()>,
}

impl Server {
    /// Stops accepting, lets the requests in flight finish, and returns.
    pub(crate) async fn stop(self) {
        drop(self.stop);
        let _ = self.running.await;
    }
}

async fn accept(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: pause rather than spin.
                    warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (health, metrics, stop) = (health.clone(), metrics.clone(), stop.clone());
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let response = respond(&health, &metrics, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served {
                debug!(error = %e, "HTTP connection ended with an error");
            }
        });
        while connections.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// The answer to one request.
fn respond(
    health: &Health,
    metrics: &Metrics,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut refused = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        refused
            .headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return refused;
    }
    match request.uri().path() {
        "/livez" => probe(health.liveness()),
        "/readyz" => probe(health.readiness()),
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: the dispatcher serves /livez, /readyz and /metrics\n".into(),
        ),
    }
}

/// 200 or 503, with the probe's explanation.
fn probe((ok, body): (bool, String)) -> Response<Full<Bytes>> {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, body)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
