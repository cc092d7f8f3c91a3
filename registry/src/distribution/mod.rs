//! The OCI distribution API, as far as the service reads it: the repositories of a
//! registry (`/v2/_catalog`), the tags of one (`/v2/<name>/tags/list`), manifests and blobs,
//! every list followed through its `Link` pages. Anonymous first; a 401 is answered as it
//! asks (`auth`): Basic with the source's credentials, or a Bearer token from its realm.
//! What comes back is checked against its sha256 digest, and each request is bounded by
//! `request_timeout`. Plain `http://` and `https://` (rustls, the system's CA roots).

mod auth;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{
    ACCEPT, AUTHORIZATION, CONTENT_TYPE, LINK, LOCATION, USER_AGENT, WWW_AUTHENTICATE,
};
use hyper::{HeaderMap, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::{instrument, warn};

use self::auth::Challenge;
use crate::manifest::ACCEPT_MANIFESTS;
use crate::settings::Source;
use crate::{Error, Result};

/// Largest answer read (a catalog page, a manifest, a config blob).
const MAX_BODY: usize = 8 * 1024 * 1024;
/// Entries asked per page of a list.
const PAGE: usize = 1000;
/// Pages followed at most (a million repositories or tags).
const MAX_PAGES: usize = 1000;
/// Redirects followed at most (blob storage behind a registry redirects).
const MAX_REDIRECTS: usize = 3;

/// A manifest as served: its digest (computed), its media type, its bytes.
pub(crate) struct Fetched {
    pub(crate) digest: String,
    pub(crate) content_type: Option<String>,
    pub(crate) body: Bytes,
}

/// A client of any number of registries.
pub(crate) struct Client {
    http: HttpClient<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
    /// `Authorization` per registry and scope, reused until the registry refuses it.
    auth: Mutex<HashMap<(String, String), String>>,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Deserialize)]
struct CatalogPage {
    repositories: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct TagsPage {
    tags: Option<Vec<String>>,
}

impl Client {
    /// A client whose requests each end within `timeout`.
    ///
    /// # Errors
    /// TLS cannot be set up.
    pub(crate) fn new(timeout: Duration) -> Result<Client> {
        let provider = rustls::crypto::ring::default_provider();
        let builder = match hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider.clone())
        {
            Ok(builder) => builder,
            Err(e) => {
                warn!(error = %e, "no CA certificates on this system; https sources will fail (http ones work)");
                let config = rustls::ClientConfig::builder_with_provider(provider.into())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| Error::Tls(e.to_string()))?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
            }
        };
        let connector = builder.https_or_http().enable_http1().build();
        Ok(Client {
            http: HttpClient::builder(TokioExecutor::new()).build(connector),
            timeout,
            auth: Mutex::new(HashMap::new()),
        })
    }

    /// Every repository of the source's registry (all namespaces).
    ///
    /// # Errors
    /// The registry cannot be reached, refuses, or answers out of the API.
    #[instrument(skip_all, fields(registry = %source.base_url()))]
    pub(crate) async fn repositories(&self, source: &Source) -> Result<Vec<String>> {
        let first = format!("{}/v2/_catalog?n={PAGE}", source.base_url());
        self.pages(source, first, "registry:catalog:*", |body, url| {
            let page: CatalogPage = json(url, body)?;
            Ok(page.repositories.unwrap_or_default())
        })
        .await
    }

    /// The API's base (`GET /v2/`), which every registry serves: whether it answers and
    /// takes the source's credentials, for a source whose repositories are named rather
    /// than listed.
    ///
    /// # Errors
    /// As [`Client::repositories`].
    #[instrument(skip_all, fields(registry = %source.base_url()))]
    pub(crate) async fn ping(&self, source: &Source) -> Result<()> {
        let url = format!("{}/v2/", source.base_url());
        self.get(source, &url, "application/json", "").await?;
        Ok(())
    }

    /// The tags of a repository; `None` when the registry does not know it.
    ///
    /// # Errors
    /// As [`Client::repositories`].
    #[instrument(skip_all, fields(repository))]
    pub(crate) async fn tags(
        &self,
        source: &Source,
        repository: &str,
    ) -> Result<Option<Vec<String>>> {
        let first = format!("{}/v2/{repository}/tags/list?n={PAGE}", source.base_url());
        let scope = format!("repository:{repository}:pull");
        let listed = self
            .pages(source, first, &scope, |body, url| {
                let page: TagsPage = json(url, body)?;
                Ok(page.tags.unwrap_or_default())
            })
            .await;
        match listed {
            Err(Error::Status { status: 404, .. }) => Ok(None),
            other => other.map(Some),
        }
    }

    /// A manifest or index by tag or digest, its digest computed from its bytes.
    ///
    /// # Errors
    /// As [`Client::repositories`], and content that does not match the digest asked for
    /// or the one the registry states.
    #[instrument(skip_all, fields(repository, reference))]
    pub(crate) async fn manifest(
        &self,
        source: &Source,
        repository: &str,
        reference: &str,
    ) -> Result<Fetched> {
        let url = format!(
            "{}/v2/{repository}/manifests/{reference}",
            source.base_url()
        );
        let scope = format!("repository:{repository}:pull");
        let answer = self.get(source, &url, ACCEPT_MANIFESTS, &scope).await?;
        let digest = sha256(&answer.body);
        let stated = answer
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok());
        let expected = reference
            .starts_with("sha256:")
            .then_some(reference)
            .or(stated.filter(|s| s.starts_with("sha256:")));
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(Error::Malformed {
                url,
                message: format!("the manifest's content has digest {digest}, not {expected}"),
            });
        }
        Ok(Fetched {
            digest,
            content_type: header(&answer.headers, CONTENT_TYPE.as_str()),
            body: answer.body,
        })
    }

    /// A blob (an image config), checked against its digest.
    ///
    /// # Errors
    /// As [`Client::repositories`], and content that does not match the digest.
    #[instrument(skip_all, fields(repository, digest))]
    pub(crate) async fn blob(
        &self,
        source: &Source,
        repository: &str,
        digest: &str,
    ) -> Result<Bytes> {
        let url = format!("{}/v2/{repository}/blobs/{digest}", source.base_url());
        if !digest.starts_with("sha256:") {
            return Err(Error::Malformed {
                url,
                message: "only sha256 digests are read".into(),
            });
        }
        let scope = format!("repository:{repository}:pull");
        let answer = self.get(source, &url, "*/*", &scope).await?;
        let actual = sha256(&answer.body);
        if actual != digest {
            return Err(Error::Malformed {
                url,
                message: format!("the blob's content has digest {actual}"),
            });
        }
        Ok(answer.body)
    }

    /// The items of every page of a list, following `Link: <…>; rel="next"`.
    async fn pages<T>(
        &self,
        source: &Source,
        first: String,
        scope: &str,
        read: impl Fn(&[u8], &str) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        let mut url = first;
        let mut all = Vec::new();
        for _ in 0..MAX_PAGES {
            let answer = self.get(source, &url, "application/json", scope).await?;
            all.extend(read(&answer.body, &url)?);
            match next_page(&answer.headers) {
                Some(next) => url = absolute(&source.base_url(), &next),
                None => return Ok(all),
            }
        }
        Ok(all)
    }

    /// A GET answered 2xx: redirects followed, and a 401 answered once as it asks.
    async fn get(&self, source: &Source, url: &str, accept: &str, scope: &str) -> Result<Answer> {
        let base = source.base_url();
        let key = (base.clone(), scope.to_owned());
        let mut authorization = self.lock_auth().get(&key).cloned();
        let mut challenged = false;
        let mut target = url.to_owned();
        let mut redirects = 0;
        loop {
            // Credentials never leave the registry (a redirect to blob storage is signed).
            let ours = target.starts_with(&format!("{base}/"));
            let answer = self
                .send(&target, accept, authorization.as_deref().filter(|_| ours))
                .await?;
            let status = answer.status;
            if status.is_success() {
                return Ok(answer);
            }
            if status.is_redirection()
                && let Some(location) = header(&answer.headers, LOCATION.as_str())
                && redirects < MAX_REDIRECTS
            {
                redirects += 1;
                target = absolute(&base, &location);
                continue;
            }
            if status == StatusCode::UNAUTHORIZED && ours && !challenged {
                challenged = true;
                let granted = self
                    .authorize(source, &target, &answer.headers, scope)
                    .await?;
                self.lock_auth().insert(key.clone(), granted.clone());
                authorization = Some(granted);
                continue;
            }
            if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                self.lock_auth().remove(&key);
                let how = if authorization.is_some() {
                    "with the credentials it asked for"
                } else {
                    "to an anonymous request"
                };
                return Err(Error::Unauthorized {
                    url: target,
                    message: format!("answered {status} {how}: {}", error_text(&answer.body)),
                });
            }
            return Err(Error::Status {
                url: target,
                status: status.as_u16(),
                message: error_text(&answer.body),
            });
        }
    }

    /// The `Authorization` a 401 asks for.
    async fn authorize(
        &self,
        source: &Source,
        url: &str,
        headers: &HeaderMap,
        scope: &str,
    ) -> Result<String> {
        let asked = header(headers, WWW_AUTHENTICATE.as_str()).unwrap_or_default();
        let unauthorized = |message: String| Error::Unauthorized {
            url: url.to_owned(),
            message,
        };
        let basic = source.credentials().map(|(u, p)| auth::basic(u, p));
        match auth::parse(&asked) {
            Some(Challenge::Basic) => basic.ok_or_else(|| {
                unauthorized("it asks for Basic credentials and the source has none".into())
            }),
            Some(Challenge::Bearer {
                realm,
                service,
                scope: named,
            }) => {
                let token_url = auth::token_url(
                    &realm,
                    service.as_deref(),
                    named.as_deref().unwrap_or(scope),
                );
                let answer = self
                    .send(&token_url, "application/json", basic.as_deref())
                    .await?;
                if !answer.status.is_success() {
                    return Err(unauthorized(format!(
                        "its token service {realm} answered {}: {}",
                        answer.status,
                        error_text(&answer.body)
                    )));
                }
                auth::bearer(&answer.body).map_err(|message| Error::Malformed {
                    url: realm,
                    message,
                })
            }
            None => Err(unauthorized(format!(
                "answered 401 asking for {asked:?}, which is neither Basic nor Bearer"
            ))),
        }
    }

    /// One request within the timeout.
    async fn send(&self, url: &str, accept: &str, authorization: Option<&str>) -> Result<Answer> {
        let malformed = |message: String| Error::Malformed {
            url: url.to_owned(),
            message,
        };
        let uri: Uri = url
            .parse()
            .map_err(|e| malformed(format!("bad URL: {e}")))?;
        let mut request = Request::get(uri).header(ACCEPT, accept).header(
            USER_AGENT,
            concat!("gantry-registry/", env!("CARGO_PKG_VERSION")),
        );
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| malformed(format!("bad request: {e}")))?;
        let unreachable = |message: String| Error::Unreachable {
            url: url.to_owned(),
            message,
        };
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| unreachable(gantry_shared::telemetry::chain(&e)))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
    }

    fn lock_auth(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), String>> {
        self.auth.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `sha256:<hex>` of some bytes.
pub(crate) fn sha256(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn json<T: serde::de::DeserializeOwned>(url: &str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Malformed {
        url: url.to_owned(),
        message: format!("unreadable answer: {e}"),
    })
}

/// The next page of a list: `Link: </v2/_catalog?last=x&n=1000>; rel="next"`.
fn next_page(headers: &HeaderMap) -> Option<String> {
    let link = headers.get(LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
    })
}

/// A `Location` or `Link` target made absolute against the registry.
fn absolute(base: &str, target: &str) -> String {
    if target.contains("://") {
        target.to_owned()
    } else {
        format!("{base}/{}", target.trim_start_matches('/'))
    }
}

/// A registry's error answer as text: its `errors` codes and messages, else the start of it.
fn error_text(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(e) = serde_json::from_slice::<Errors>(body)
        && !e.errors.is_empty()
    {
        return e
            .errors
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e.code.as_deref().unwrap_or_default(),
                    e.message.as_deref().unwrap_or_default()
                )
                .trim()
                .to_owned()
            })
            .collect::<Vec<_>>()
            .join("; ");
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None if text.is_empty() => "(no body)".into(),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_pages_and_locations_resolve_against_the_registry() {
        let mut headers = HeaderMap::new();
        headers.insert(
            LINK,
            "</v2/_catalog?last=b&n=2>; rel=\"next\"".parse().unwrap(),
        );
        let next = next_page(&headers).unwrap();
        assert_eq!(next, "/v2/_catalog?last=b&n=2");
        assert_eq!(
            absolute("http://r:5000", &next),
            "http://r:5000/v2/_catalog?last=b&n=2"
        );
        assert_eq!(
            absolute("http://r", "https://s3/x?sig=1"),
            "https://s3/x?sig=1"
        );
        assert_eq!(next_page(&HeaderMap::new()), None);
    }

    #[test]
    fn error_answers_read_as_text() {
        assert_eq!(
            error_text(br#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#),
            "NAME_UNKNOWN repository name not known to registry"
        );
        assert_eq!(error_text(b""), "(no body)");
        assert_eq!(error_text(&[b'x'; 300]).chars().count(), 201);
    }

    #[test]
    fn digests_are_sha256_of_the_bytes() {
        assert_eq!(
            sha256(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
