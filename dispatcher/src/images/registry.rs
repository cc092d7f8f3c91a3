//! The optional executor registry service: `GET {url}/executors/{class}` answers
//!
//! ```json
//! { "image": "registry.example.com/ml/executor-vllm@sha256:…",
//!   "capabilities": { "tasks": ["llm.chat", "llm.complete"] } }
//! ```
//!
//! with 404 for a class it does not know; `GET {url}/executors` answers
//! `{ "executors": [ { "class": "vllm", "image": "…", "capabilities": {…} } ] }` and is read
//! once at start to fill the cache. Of the capabilities, `tasks` (the task names the image
//! handles; absent: any) is enforced; other keys are accepted and ignored.
//!
//! Answers, 404s included, are cached for `executor_registry_cache`. Each request is bounded
//! by `executor_registry_timeout` and retried with backoff; any answer but 200 or 404 (or an
//! unreadable one) counts as the service being unavailable. Then an answer cached less than
//! `executor_registry_stale` ago is used, else the caller is told to try later: the task
//! waits, it is not dead-lettered because a service is down.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use gantry_shared::config::redact_url;
use gantry_shared::message::ExecutorClass;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::ACCEPT;
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::{Error, Result};

/// Largest answer read from the service.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// What the service says about one class.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct Entry {
    pub(crate) image: String,
    #[serde(default)]
    pub(crate) capabilities: Capabilities,
}

/// What an executor image can do.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(crate) struct Capabilities {
    /// The task names the image handles; `None`: any.
    #[serde(default)]
    pub(crate) tasks: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct Listing {
    executors: Vec<ListedEntry>,
}

#[derive(Debug, Deserialize)]
struct ListedEntry {
    class: String,
    #[serde(flatten)]
    entry: Entry,
}

/// The service's answer about a class.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Answer {
    Found(Entry),
    /// 404: the service does not know the class.
    Unknown,
}

/// Timing of the client.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) cache: Duration,
    pub(crate) timeout: Duration,
    pub(crate) stale: Duration,
}

/// A client of the executor registry service, with its cache.
pub(crate) struct RegistryClient {
    base: String,
    /// The URL as logs and errors show it (no password).
    shown: String,
    http: Client<HttpConnector, Empty<Bytes>>,
    timing: Timing,
    retry: ExponentialBuilder,
    cache: Mutex<HashMap<String, (Instant, Answer)>>,
}

impl RegistryClient {
    /// A client of the service at `url` (`http://host[:port][/path]`).
    ///
    /// # Errors
    /// The URL is not an `http://` URL.
    pub(crate) fn new(url: &str, timing: Timing) -> Result<RegistryClient> {
        let shown = redact_url(url);
        check_url(url).map_err(|message| Error::CatalogSource {
            origin: "dispatcher.kubernetes.executor_registry".into(),
            message: format!("{shown}: {message}"),
        })?;
        Ok(RegistryClient {
            base: url.trim_end_matches('/').to_owned(),
            shown,
            http: Client::builder(TokioExecutor::new()).build_http(),
            timing,
            retry: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(2))
                .with_jitter()
                .with_max_times(3),
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.shown
    }

    /// Fills the cache from `GET /executors`; a failure is only logged (lookups ask again).
    pub(crate) async fn prefetch(&self) {
        let answer = self.get(&format!("{}/executors", self.base)).await;
        let listing = answer.and_then(|(status, body)| match status {
            StatusCode::OK => serde_json::from_slice::<Listing>(&body)
                .map_err(|e| format!("unreadable listing: {e}")),
            other => Err(format!("answered {other}")),
        });
        match listing {
            Ok(listing) => {
                let now = Instant::now();
                let mut cache = self.lock_cache();
                for e in &listing.executors {
                    cache.insert(e.class.clone(), (now, Answer::Found(e.entry.clone())));
                }
                info!(url = %self.shown, classes = listing.executors.len(), "executor registry listed");
            }
            Err(message) => {
                warn!(url = %self.shown, %message, "cannot list the executor registry; classes are looked up one by one")
            }
        }
    }

    /// The service's answer about `class`: from the cache while fresh, else asked.
    ///
    /// # Errors
    /// [`Error::RegistryUnavailable`] when the service does not answer (after retries) and
    /// no answer younger than `executor_registry_stale` is cached.
    pub(crate) async fn lookup(&self, class: &ExecutorClass) -> Result<Answer> {
        let key = class.as_str();
        let cached = self.lock_cache().get(key).cloned();
        if let Some((at, answer)) = &cached
            && at.elapsed() < self.timing.cache
        {
            return Ok(answer.clone());
        }
        let url = format!("{}/executors/{key}", self.base);
        let asked = (|| self.ask(&url))
            .retry(self.retry)
            .notify(|message, delay| {
                debug!(url = %self.shown, class = key, %message, ?delay, "executor registry did not answer; retrying");
            })
            .await;
        match asked {
            Ok(answer) => {
                self.lock_cache()
                    .insert(key.to_owned(), (Instant::now(), answer.clone()));
                Ok(answer)
            }
            Err(message) => match cached {
                Some((at, answer)) if at.elapsed() < self.timing.stale => {
                    warn!(url = %self.shown, class = key, %message, age = ?at.elapsed(), "executor registry unavailable; using its last answer");
                    Ok(answer)
                }
                _ => Err(Error::RegistryUnavailable {
                    url: self.shown.clone(),
                    class: key.to_owned(),
                    message,
                }),
            },
        }
    }

    /// One request for a class; `Err` is a failure worth retrying.
    async fn ask(&self, url: &str) -> Result<Answer, String> {
        let (status, body) = self.get(url).await?;
        match status {
            StatusCode::OK => serde_json::from_slice::<Entry>(&body)
                .map(Answer::Found)
                .map_err(|e| format!("unreadable answer: {e}")),
            StatusCode::NOT_FOUND => Ok(Answer::Unknown),
            other => Err(format!("answered {other}")),
        }
    }

    /// A GET within the timeout: the status and the body (at most [`MAX_ANSWER_BYTES`]).
    async fn get(&self, url: &str) -> Result<(StatusCode, Bytes), String> {
        let uri: Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
        let request = Request::get(uri)
            .header(ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| format!("bad request: {e}"))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| gantry_shared::telemetry::chain(&e))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timing.timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {:?}", self.timing.timeout))?
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Answer)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Checks the service URL: `http://` with a host.
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("not a URL ({e}); write it as http://host[:port][/path]"))?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some() => Ok(()),
        Some("https") => {
            Err("https is not supported yet; use the service's in-cluster http:// address".into())
        }
        _ => Err("write it as http://host[:port][/path]".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_listings_parse_and_unknown_capabilities_are_ignored() {
        let e: Entry = serde_json::from_str(
            r#"{"image": "r.example/executor-x@sha256:00", "capabilities": {"tasks": ["llm.chat"], "gpus": 2}}"#,
        )
        .unwrap();
        assert_eq!(e.capabilities.tasks, Some(vec!["llm.chat".to_owned()]));
        let bare: Entry = serde_json::from_str(r#"{"image": "r.example/x:1"}"#).unwrap();
        assert_eq!(bare.capabilities, Capabilities::default());
        let l: Listing = serde_json::from_str(
            r#"{"executors": [{"class": "x", "image": "r.example/x:1", "capabilities": {}}]}"#,
        )
        .unwrap();
        assert_eq!(l.executors[0].class, "x");
        assert!(serde_json::from_str::<Entry>(r#"{"capabilities": {}}"#).is_err());
    }

    #[test]
    fn only_plain_http_urls_are_accepted() {
        assert!(check_url("http://executor-registry.platform:8080").is_ok());
        assert!(check_url("http://127.0.0.1:9/base/").is_ok());
        assert!(
            check_url("https://registry.example.com")
                .unwrap_err()
                .contains("https is not supported")
        );
        assert!(check_url("executor-registry:8080").is_err());
        assert!(check_url("not a url").is_err());
    }
}
