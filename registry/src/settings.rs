//! The service's configuration, layered: defaults, then an optional YAML file (`--config`
//! or `GANTRY_REGISTRY_CONFIG`), then `GANTRY_REGISTRY_*` environment variables, then flags.
//!
//! ```yaml
//! listen: 0.0.0.0:8080
//! sources:                       # allowed registry/namespace pairs, first wins per class
//!   - https://registry.example.com/ml
//!   - http://robot:secret@registry.internal:5000/team
//! # classes: [vllm, echo]      # only for registries that do not list their repositories
//! refresh_interval: 1m
//! cache_ttl: 1h
//! audit_log: /var/log/gantry/registry-audit.jsonl   # "-": standard output
//! ```
//!
//! Its own file, not the shared `GANTRY_CONFIG` one: the service needs neither the broker
//! nor the database, and the shared file refuses keys it does not know.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use gantry_shared::config::{
    self, LogFormat, env, env_duration, env_parse, humantime_serde_compat,
};
use gantry_shared::message::ExecutorClass;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::Result;

/// Everything the service needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address of the HTTP server.
    pub listen: SocketAddr,
    /// The registries and namespaces watched, in order of precedence. Only repositories
    /// `<namespace>/executor-<class>` of these are accepted.
    pub sources: Vec<Source>,
    /// The classes whose repositories are read by name, for registries that do not list
    /// their repositories (`/v2/_catalog`: Docker Hub, GHCR and most hosted ones). Empty
    /// (the default): every source's registry is listed and every `executor-<class>` of it
    /// is found. Set: no registry is listed, and only `<namespace>/executor-<class>` of
    /// these classes is read in each source.
    pub classes: Vec<ExecutorClass>,
    /// How often the catalog is rebuilt from the registries.
    #[serde(with = "humantime_serde_compat")]
    pub refresh_interval: Duration,
    /// How long what was read about an image digest (its labels, or why it was refused) is
    /// reused before the registry is asked again; a refusal is logged once per period.
    #[serde(with = "humantime_serde_compat")]
    pub cache_ttl: Duration,
    /// Longest wait for any one answer from a registry.
    #[serde(with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// Version tags examined per repository, newest first, looking for an acceptable image.
    pub max_tags: usize,
    /// Where the audit log's JSON lines are appended: a file, `-` for standard output, or
    /// empty for nowhere.
    pub audit_log: String,
    /// `text` (default) or `json` log lines on standard error.
    pub log_format: LogFormat,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            sources: Vec::new(),
            classes: Vec::new(),
            refresh_interval: Duration::from_secs(60),
            cache_ttl: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(10),
            max_tags: 20,
            audit_log: "-".into(),
            log_format: LogFormat::Text,
        }
    }
}

impl Settings {
    /// Defaults → file → environment; flags are applied by the caller, then
    /// [`Settings::check`].
    ///
    /// # Errors
    /// An unreadable or invalid file or environment variable.
    pub fn load(file: Option<&Path>) -> Result<Settings> {
        let mut s: Settings = config::read_file(file)?;
        env_parse("GANTRY_REGISTRY_LISTEN", &mut s.listen)?;
        if let Some(sources) = env_list("GANTRY_REGISTRY_SOURCES", Source::parse)? {
            s.sources = sources;
        }
        if let Some(classes) = env_list("GANTRY_REGISTRY_CLASSES", |c| {
            ExecutorClass::parse(c).map_err(|e| e.to_string())
        })? {
            s.classes = classes;
        }
        env_duration("GANTRY_REGISTRY_REFRESH_INTERVAL", &mut s.refresh_interval)?;
        env_duration("GANTRY_REGISTRY_CACHE_TTL", &mut s.cache_ttl)?;
        env_duration("GANTRY_REGISTRY_TIMEOUT", &mut s.request_timeout)?;
        env_parse("GANTRY_REGISTRY_MAX_TAGS", &mut s.max_tags)?;
        if let Some(v) = env("GANTRY_REGISTRY_AUDIT_LOG") {
            s.audit_log = v;
        }
        env_parse("GANTRY_LOG_FORMAT", &mut s.log_format)?;
        Ok(s)
    }

    /// Checks the settings that must hold before the service starts.
    ///
    /// # Errors
    /// No source, or a period, timeout or tag count of zero.
    pub fn check(&self) -> Result<()> {
        if self.sources.is_empty() {
            return Err(invalid(
                "sources",
                "no registry to watch; set GANTRY_REGISTRY_SOURCES (or `sources:` in the file, or --source) to URLs like https://registry.example.com/ml".into(),
            ));
        }
        for (name, d) in [
            ("refresh_interval", self.refresh_interval),
            ("request_timeout", self.request_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(name, "must be longer than 0s".into()));
            }
        }
        if self.max_tags == 0 {
            return Err(invalid("max_tags", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// The comma-separated items of the variable `name`, each parsed; `None` when it is unset.
fn env_list<T>(name: &str, parse: impl Fn(&str) -> Result<T, String>) -> Result<Option<Vec<T>>> {
    let Some(value) = env(name) else {
        return Ok(None);
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(parse)
        .collect::<Result<_, _>>()
        .map(Some)
        .map_err(|message| invalid(name, message))
}

fn invalid(origin: &str, message: String) -> crate::Error {
    gantry_shared::Error::Config {
        origin: origin.into(),
        message,
    }
    .into()
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// One allowed registry and namespace: `https://[user:password@]host[:port][/namespace]`.
/// Without a namespace, repositories at the registry's root (`executor-<class>`) are meant.
#[derive(Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct Source {
    pub scheme: Scheme,
    /// `host[:port]`, as images name it.
    pub host: String,
    /// `ml` or `ml/llm`; empty for the root.
    pub namespace: String,
    pub username: Option<String>,
    pub password: Option<SecretString>,
}

impl Source {
    /// Parses a source URL.
    ///
    /// # Errors
    /// Not `http://` or `https://`, no host, or a namespace that is not a repository path.
    pub fn parse(url: &str) -> Result<Source, String> {
        let hint = "write it as https://host[:port]/namespace";
        let (scheme, rest) = match url.split_once("://") {
            Some(("http", rest)) => (Scheme::Http, rest),
            Some(("https", rest)) => (Scheme::Https, rest),
            _ => return Err(format!("{}: {hint}", config::redact_url(url))),
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, authority),
        };
        let shown = config::redact_url(url);
        if host.is_empty() || host.contains(['?', '#', ' ']) {
            return Err(format!("{shown}: no host; {hint}"));
        }
        let namespace = path.trim_matches('/').to_owned();
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        };
        if !namespace.is_empty() && !namespace.split('/').all(part_ok) {
            return Err(format!(
                "{shown}: namespace {namespace:?} is not a repository path (lowercase letters, digits, '.', '_', '-', parts separated by '/')"
            ));
        }
        let (username, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((user, password)) => (Some(user.to_owned()), Some(password.into())),
                None => (Some(u.to_owned()), None),
            },
            None => (None, None),
        };
        Ok(Source {
            scheme,
            host: host.to_owned(),
            namespace,
            username,
            password,
        })
    }

    /// `scheme://host`, where the API lives.
    pub fn base_url(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        format!("{scheme}://{}", self.host)
    }

    /// The repository of a class in this source: `ml/executor-vllm`.
    pub fn repository(&self, class: &str) -> String {
        match self.namespace.as_str() {
            "" => format!("executor-{class}"),
            ns => format!("{ns}/executor-{class}"),
        }
    }

    /// The Basic credentials, if the URL has a user.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        let user = self.username.as_deref()?;
        Some((
            user,
            self.password.as_ref().map_or("", |p| p.expose_secret()),
        ))
    }
}

impl TryFrom<String> for Source {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Source::parse(&s)
    }
}

/// The URL without its password: `https://robot:***@host/ml`.
impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        write!(f, "{scheme}://")?;
        if let Some(user) = &self.username {
            write!(f, "{user}:***@")?;
        }
        write!(f, "{}", self.host)?;
        if !self.namespace.is_empty() {
            write!(f, "/{}", self.namespace)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Source({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_with_and_without_namespace_and_credentials() {
        let s = Source::parse("https://robot:hunter2@reg.example:5000/ml/llm/").unwrap();
        assert_eq!(s.scheme, Scheme::Https);
        assert_eq!(s.host, "reg.example:5000");
        assert_eq!(s.namespace, "ml/llm");
        assert_eq!(s.credentials(), Some(("robot", "hunter2")));
        assert_eq!(s.repository("vllm"), "ml/llm/executor-vllm");
        assert_eq!(s.base_url(), "https://reg.example:5000");
        assert_eq!(s.to_string(), "https://robot:***@reg.example:5000/ml/llm");
        assert!(!format!("{s:?}").contains("hunter2"));

        let root = Source::parse("http://127.0.0.1:5000").unwrap();
        assert_eq!(root.namespace, "");
        assert_eq!(root.repository("echo"), "executor-echo");
        assert_eq!(root.credentials(), None);
    }

    #[test]
    fn bad_sources_are_refused_with_a_hint_and_without_the_password() {
        let e = Source::parse("ftp://u:secret@reg/x").unwrap_err();
        assert!(
            e.contains("https://host[:port]/namespace") && !e.contains("secret"),
            "{e}"
        );
        assert!(
            Source::parse("https:///ml")
                .unwrap_err()
                .contains("no host")
        );
        assert!(
            Source::parse("https://reg/ML")
                .unwrap_err()
                .contains("namespace")
        );
        assert!(Source::parse("https://reg/a//b").is_err());
    }

    #[test]
    fn a_file_then_the_environment_and_a_typo_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.yaml");
        std::fs::write(
            &path,
            "listen: 127.0.0.1:9000\nsources: [\"http://reg:5000/team\"]\nrefresh_interval: 5s\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.sources[0].namespace, "team");
        assert_eq!(s.refresh_interval, Duration::from_secs(5));
        assert_eq!(s.cache_ttl, Duration::from_secs(3600));
        s.check().unwrap();

        std::fs::write(&path, "refresh_intervall: 5s\n").unwrap();
        let typo = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(typo.contains("refresh_intervall"), "{typo}");

        let none = Settings::default().check().unwrap_err().to_string();
        assert!(none.contains("GANTRY_REGISTRY_SOURCES"), "{none}");

        std::fs::write(&path, "classes: [vllm, echo]\n").unwrap();
        let named = Settings::load(Some(&path)).unwrap();
        assert_eq!(
            named.classes.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
            ["vllm", "echo"]
        );
        std::fs::write(&path, "classes: [Bad_Class]\n").unwrap();
        let bad = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(bad.contains("Bad_Class"), "{bad}");
    }
}
