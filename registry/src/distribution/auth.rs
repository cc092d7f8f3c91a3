//! Registry authentication as the distribution API asks for it in a 401's
//! `WWW-Authenticate`: `Basic` (the credentials of the source, sent as they are), or
//! `Bearer realm=…,service=…,scope=…` (a token fetched from the realm, with the credentials
//! when there are some, anonymously otherwise). Parsing only; the client does the asking.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

/// What a registry asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Reads a `WWW-Authenticate` header; `None` for a scheme the service does not speak.
pub(crate) fn parse(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    let mut scope = None;
    for (key, value) in params_of(params) {
        match key.to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value),
            "service" => service = Some(value),
            "scope" => scope = Some(value),
            _ => {}
        }
    }
    Some(Challenge::Bearer {
        realm: realm?,
        service,
        scope,
    })
}

/// `key="value", key=value` pairs; commas inside quotes belong to the value (scopes have
/// them: `repository:a:pull,push`).
fn params_of(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_owned();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            after.split_once(',').unwrap_or((after, ""))
        };
        pairs.push((key, value.to_owned()));
        rest = next.trim_start().trim_start_matches(',');
    }
    pairs
}

/// The token request of a Bearer challenge; `scope` when the challenge names none (none
/// for the API's base, `/v2/`, which needs no scope).
pub(crate) fn token_url(realm: &str, service: Option<&str>, scope: &str) -> String {
    let mut url = realm.to_owned();
    let mut sep = if realm.contains('?') { '&' } else { '?' };
    if let Some(service) = service {
        url.push_str(&format!("{sep}service={}", encode(service)));
        sep = '&';
    }
    if !scope.is_empty() {
        url.push_str(&format!("{sep}scope={}", encode(scope)));
    }
    url
}

/// Percent-encoding of a query value, keeping what scopes are made of readable.
fn encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/*,".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `Basic base64(user:password)`.
pub(crate) fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

#[derive(Deserialize)]
struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
}

/// The `Authorization` value from a token endpoint's answer.
///
/// # Errors
/// The answer has no token.
pub(crate) fn bearer(answer: &[u8]) -> Result<String, String> {
    let t: TokenAnswer =
        serde_json::from_slice(answer).map_err(|e| format!("unreadable token answer: {e}"))?;
    t.token
        .or(t.access_token)
        .filter(|t| !t.is_empty())
        .map(|t| format!("Bearer {t}"))
        .ok_or_else(|| "the token answer has no token".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_challenges_are_read() {
        assert_eq!(
            parse(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:ml/executor-x:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:ml/executor-x:pull,push".into()),
            })
        );
        assert_eq!(
            parse(r#"Basic realm="basic-realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse("Negotiate abc"), None);
        assert_eq!(parse(r#"Bearer service="x""#), None, "no realm");
    }

    #[test]
    fn token_requests_and_answers() {
        assert_eq!(
            token_url(
                "https://auth.example/token",
                Some("reg x"),
                "registry:catalog:*"
            ),
            "https://auth.example/token?service=reg%20x&scope=registry:catalog:*"
        );
        assert_eq!(
            token_url("http://a/t?x=1", None, "repository:a/b:pull"),
            "http://a/t?x=1&scope=repository:a/b:pull"
        );
        assert_eq!(
            token_url("https://auth.example/token", Some("reg"), ""),
            "https://auth.example/token?service=reg"
        );
        assert_eq!(bearer(br#"{"token":"abc"}"#).unwrap(), "Bearer abc");
        assert_eq!(bearer(br#"{"access_token":"def"}"#).unwrap(), "Bearer def");
        assert!(bearer(br#"{"token":""}"#).is_err());
        assert_eq!(basic("robot", "pw"), "Basic cm9ib3Q6cHc=");
    }
}
