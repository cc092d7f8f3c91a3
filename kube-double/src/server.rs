//! The HTTP/1.1 side: routing the API server's URL space to the verbs, injected faults, the
//! request log, and watches as chunked streams of JSON lines that replay remembered
//! changes from a resourceVersion on (410 Gone in an `ERROR` event when it is forgotten).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::api::{self, Query};
use crate::faults::{Fault, RequestRecord};
use crate::inner::Inner;
use crate::kinds::Kind;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{ApiError, ApiResult};
use crate::store::{Event, EventType, Key};

pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// Accepts connections until aborted; dropping the task drops every connection.
pub(crate) async fn serve(listener: TcpListener, inner: Arc<Inner>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let inner = inner.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| handle(inner.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The error that makes hyper close the connection without answering.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by an injected fault")
    }
}

impl std::error::Error for Dropped {}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Result<Response<Body>, Dropped> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let raw_query = req.uri().query().unwrap_or("").to_owned();
    let record = |status: Option<u16>| {
        inner.lock_requests().push(RequestRecord {
            method: method.to_string(),
            path: path.clone(),
            query: raw_query.clone(),
            status,
        });
    };
    if let Some(fault) = inner.take_fault(method.as_str(), &path) {
        let error = match fault {
            Fault::Latency(d) => {
                tokio::time::sleep(d).await;
                None
            }
            Fault::InternalError => Some(ApiError::internal("injected fault")),
            Fault::TooManyRequests { retry_after_secs } => {
                Some(ApiError::too_many_requests(retry_after_secs))
            }
            Fault::DropConnection => {
                record(None);
                return Err(Dropped);
            }
        };
        if let Some(e) = error {
            record(Some(e.code));
            return Ok(error_response(&e));
        }
    }
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let content_type = header(CONTENT_TYPE.as_str());
    let metadata_only = header("accept").contains("as=PartialObjectMetadata");
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            record(None);
            return Err(Dropped);
        }
    };
    let query = parse_query(&raw_query);
    let response = match route(
        &inner,
        &method,
        &path,
        &query,
        &body,
        &content_type,
        metadata_only,
    ) {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    record(Some(response.status().as_u16()));
    Ok(response)
}

/// What a URL names.
struct Target {
    kind: Kind,
    /// The namespace; `None` for cluster-scoped kinds and all-namespace collections.
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1", rest),
        ["apis", "batch", "v1", rest @ ..] => ("batch/v1", rest),
        _ => return None,
    };
    let text = |s: Option<&&str>| s.map(|s| (*s).to_owned());
    match rest {
        ["namespaces", ns, plural, tail @ ..]
            if tail.len() <= 2 && Kind::from_path(gv, plural).is_some_and(Kind::namespaced) =>
        {
            Some(Target {
                kind: Kind::from_path(gv, plural)?,
                namespace: Some((*ns).to_owned()),
                name: text(tail.first()),
                sub: text(tail.get(1)),
            })
        }
        [plural, tail @ ..] if tail.len() <= 2 => {
            let kind = Kind::from_path(gv, plural)?;
            if kind.namespaced() && !tail.is_empty() {
                return None;
            }
            Some(Target {
                kind,
                namespace: None,
                name: text(tail.first()),
                sub: text(tail.get(1)),
            })
        }
        _ => None,
    }
}

fn route(
    inner: &Arc<Inner>,
    method: &Method,
    path: &str,
    query: &Query,
    body: &[u8],
    content_type: &str,
    metadata_only: bool,
) -> ApiResult<Response<Body>> {
    if path == "/version" {
        return Ok(json_response(
            StatusCode::OK,
            &json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "", "gitTreeState": "clean",
                "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2", "compiler": "gc", "platform": "linux/amd64",
            }),
            &[],
        ));
    }
    let t = parse_path(path).ok_or_else(ApiError::no_such_path)?;
    let store = &inner.store;
    let ns = t.namespace.as_deref().unwrap_or("");
    let shape = |v: Value| {
        if metadata_only {
            partial_metadata(v)
        } else {
            v
        }
    };
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &shape(v), &[]));
    let written = |status: StatusCode, w: api::Written| {
        Ok(json_response(status, &shape(w.object), &w.warnings))
    };
    match (t.name.as_deref(), t.sub.as_deref()) {
        (None, _) => match *method {
            Method::GET if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) => {
                watch(
                    inner.clone(),
                    t.kind,
                    t.namespace.clone(),
                    query,
                    metadata_only,
                )
            }
            Method::GET => ok(api::list(store, t.kind, t.namespace.as_deref(), query)?),
            Method::POST if t.kind.namespaced() && t.namespace.is_none() => {
                Err(ApiError::method_not_allowed("POST"))
            }
            Method::POST => written(
                StatusCode::CREATED,
                api::create(store, t.kind, ns, body, query)?,
            ),
            Method::DELETE => written(
                StatusCode::OK,
                api::delete_collection(store, t.kind, t.namespace.as_deref(), body, query)?,
            ),
            _ => Err(ApiError::method_not_allowed(method.as_str())),
        },
        (Some(name), sub) => {
            let key = Key::new(t.kind, ns, name);
            match (sub, method.clone()) {
                (None | Some("status"), Method::GET) => ok(api::get(store, t.kind, ns, name)?),
                (None, Method::PUT) => written(
                    StatusCode::OK,
                    api::replace(store, &key, body, false, query)?,
                ),
                (Some("status"), Method::PUT) => written(
                    StatusCode::OK,
                    api::replace(store, &key, body, true, query)?,
                ),
                (None, Method::PATCH) => written(
                    StatusCode::OK,
                    api::patch(store, &key, body, content_type, false, query)?,
                ),
                (Some("status"), Method::PATCH) => written(
                    StatusCode::OK,
                    api::patch(store, &key, body, content_type, true, query)?,
                ),
                (None, Method::DELETE) => {
                    written(StatusCode::OK, api::delete(store, &key, body, query)?)
                }
                (Some("log"), Method::GET) if t.kind == Kind::Pod => {
                    pod_log(inner, ns, name, query)
                }
                (Some("status" | "log"), m) => Err(ApiError::method_not_allowed(m.as_str())),
                (None, m) => Err(ApiError::method_not_allowed(m.as_str())),
                _ => Err(ApiError::no_such_path()),
            }
        }
    }
}

fn pod_log(inner: &Inner, ns: &str, name: &str, query: &Query) -> ApiResult<Response<Body>> {
    api::get(&inner.store, Kind::Pod, ns, name)?;
    let Some(text) = inner.log_of(ns, name) else {
        return Err(ApiError::bad_request(format!(
            "container in pod \"{name}\" is waiting to start: ContainerCreating"
        )));
    };
    let text = match query.get("tailLines").and_then(|n| n.parse::<usize>().ok()) {
        Some(n) => {
            let lines: Vec<&str> = text.lines().collect();
            let mut t = lines[lines.len().saturating_sub(n)..].join("\n");
            if !t.is_empty() {
                t.push('\n');
            }
            t
        }
        None => text,
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(text)).boxed())
        .expect("a static response is valid"))
}

fn partial_metadata(v: Value) -> Value {
    if let Some(items) = v["items"].as_array() {
        let items: Vec<Value> = items
            .iter()
            .map(|i| json!({"metadata": i["metadata"]}))
            .collect();
        return json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": v["metadata"],
            "items": items,
        });
    }
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": v["metadata"]})
}

fn json_response(status: StatusCode, body: &Value, warnings: &[String]) -> Response<Body> {
    let mut b = Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json");
    for w in warnings {
        b = b.header("Warning", format!("299 - {w:?}"));
    }
    b.body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a JSON response is valid")
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.to_status(),
        &[],
    );
    if let Some(secs) = e.retry_after {
        r.headers_mut()
            .insert("Retry-After", HeaderValue::from(secs));
    }
    r
}

/// Percent-decoded query parameters (`+` is a space).
fn parse_query(q: &str) -> Query {
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    match hex {
                        Some(b) => {
                            out.push(b);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect::<BTreeMap<_, _>>()
}

/// A response body fed line by line from a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// What one watch sends.
struct WatchFilter {
    kind: Kind,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    metadata_only: bool,
}

impl WatchFilter {
    fn matches(&self, o: &Value) -> bool {
        self.labels.matches_object(o) && self.fields.matches(self.kind, o)
    }

    /// The event this watch sees for a change, if any: a change that makes an object
    /// (stop) match the selectors is seen as its addition (deletion).
    fn view<'e>(&self, e: &'e Event) -> Option<(&'static str, Cow<'e, Value>)> {
        if e.key.kind != self.kind
            || self
                .namespace
                .as_ref()
                .is_some_and(|n| *n != e.key.namespace)
        {
            return None;
        }
        let now = self.matches(&e.object);
        let was = e.old.as_deref().is_some_and(|o| self.matches(o));
        let ty = match (e.ty, was, now) {
            (EventType::Added, _, true) => "ADDED",
            (EventType::Modified, true, true) => "MODIFIED",
            (EventType::Modified, false, true) => "ADDED",
            (EventType::Modified, true, false) => "DELETED",
            (EventType::Deleted, true, _) => "DELETED",
            _ => return None,
        };
        Some((ty, self.shape(&e.object)))
    }

    /// The object as this watch sends it: serialized from the stored object itself, as
    /// the API server's watch cache serializes its own (no deep copy per watcher), unless
    /// only its metadata is asked for.
    fn shape<'a>(&self, v: &'a Value) -> Cow<'a, Value> {
        if self.metadata_only {
            Cow::Owned(partial_metadata(v.clone()))
        } else {
            Cow::Borrowed(v)
        }
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = if self.metadata_only {
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": metadata})
        } else {
            json!({"kind": self.kind.name(), "apiVersion": self.kind.api_version(), "metadata": metadata})
        };
        event("BOOKMARK", &object)
    }
}

/// One line of a watch stream, `{"type":…,"object":…}`, in the API server's order: its
/// `WatchEvent` is a Go struct whose `Type` comes first. (A `json!` map would sort `object`
/// first, which clients must then buffer whole before they know what to parse it as.)
fn event(ty: &str, object: &Value) -> Bytes {
    let mut b = format!("{{\"type\":{},\"object\":{object}}}", Value::from(ty)).into_bytes();
    b.push(b'\n');
    Bytes::from(b)
}

fn watch(
    inner: Arc<Inner>,
    kind: Kind,
    namespace: Option<String>,
    query: &Query,
    metadata_only: bool,
) -> ApiResult<Response<Body>> {
    let filter = WatchFilter {
        kind,
        namespace,
        labels: LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?,
        fields: FieldSelector::parse(kind, query.get("fieldSelector").map_or("", String::as_str))?,
        metadata_only,
    };
    let rv_param = query.get("resourceVersion").map_or("", String::as_str);
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let start: Option<u64> = match rv_param {
        "" | "0" => None,
        _ if send_initial => None,
        v => Some(
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {v:?}")))?,
        ),
    };
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        run_watch(inner, filter, start, send_initial, bookmarks, timeout, tx).await;
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(ChannelBody(rx).boxed())
        .expect("a watch response is valid"))
}

async fn run_watch(
    inner: Arc<Inner>,
    filter: WatchFilter,
    start: Option<u64>,
    send_initial: bool,
    bookmarks: bool,
    timeout: Option<Duration>,
    tx: mpsc::Sender<Bytes>,
) {
    let mut changed = inner.store.subscribe();
    let mut ends = inner.watch_ends.subscribe();
    let mut shutdown = inner.shutdown.subscribe();
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut cursor = match start {
        Some(rv) => rv,
        None => {
            let (objects, rv) = inner.store.read(|st| {
                let objects: Vec<Value> = st
                    .list(filter.kind, filter.namespace.as_deref())
                    .filter(|o| filter.matches(o))
                    .cloned()
                    .collect();
                (objects, st.rv())
            });
            for o in objects {
                if tx.send(event("ADDED", &filter.shape(&o))).await.is_err() {
                    return;
                }
            }
            if send_initial && tx.send(filter.bookmark(rv, true)).await.is_err() {
                return;
            }
            rv
        }
    };
    let interval = inner.options.bookmark_interval;
    let mut next_bookmark = tokio::time::Instant::now() + interval;
    loop {
        changed.borrow_and_update();
        let batch = inner
            .store
            .read(|st| st.events_after(cursor).map(|e| (e, st.rv())));
        match batch {
            Err(oldest) => {
                let gone = ApiError::gone(format!("too old resource version: {cursor} ({oldest})"));
                let _ = tx.send(event("ERROR", &gone.to_status())).await;
                return;
            }
            Ok((events, rv)) => {
                for e in events {
                    if let Some((ty, object)) = filter.view(&e)
                        && tx.send(event(ty, &object)).await.is_err()
                    {
                        return;
                    }
                }
                cursor = cursor.max(rv);
            }
        }
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)) => return,
            _ = tokio::time::sleep_until(next_bookmark), if bookmarks => {
                next_bookmark = tokio::time::Instant::now() + interval;
                if tx.send(filter.bookmark(cursor, false)).await.is_err() {
                    return;
                }
            }
            _ = ends.changed() => return,
            _ = shutdown.changed() => return,
            _ = tx.closed() => return,
        }
    }
}
