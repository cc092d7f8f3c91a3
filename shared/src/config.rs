//! Configuration shared by every binary, layered: built-in defaults, then an optional YAML
//! file (`--config` or `GANTRY_CONFIG`), then `GANTRY_*` environment variables, then flags
//! (applied by each binary). Secrets are [`SecretString`]s: they never reach a log.
//! [`tls`]: the TLS of the two connections.

pub mod tls;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::message::Limits;
use crate::topology::QueueSettings;
use crate::{Error, Result};

/// RabbitMQ on this machine, as Debian's package sets it up.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The `gantry` database and role that `scripts/setup.sh` creates.
pub const DEFAULT_DATABASE_URL: &str = "postgres://gantry:gantry@127.0.0.1:5432/gantry";

/// Settings every Gantry binary shares.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub amqp_url: SecretString,
    pub database_url: SecretString,
    /// The CA certificates (PEM) that signed the servers' certificates, for an `amqps://`
    /// URL and a Postgres URL with `sslmode=require`, `verify-ca` or `verify-full`. Written
    /// into those URLs that name no CA of their own ([`Config::apply_tls_ca_file`]); without
    /// it they trust the system's roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    pub limits: Limits,
    pub queues: QueueSettings,
    /// Longest wait for any one answer from RabbitMQ.
    #[serde(with = "humantime_serde_compat")]
    pub broker_timeout: Duration,
    /// Postgres connections per process.
    pub db_pool_size: usize,
    /// `text` (default) or `json` log lines.
    pub log_format: LogFormat,
    /// Where spans go over OTLP/HTTP (`http://collector:4318`; the exporter adds
    /// `/v1/traces`). Unset: no span leaves the process.
    pub otlp_endpoint: Option<String>,
    /// The dispatcher's own section of the same file, read by the dispatcher. Named here so
    /// that any other unknown key (a misspelling) is an error rather than ignored.
    pub dispatcher: Option<serde_norway::Value>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            amqp_url: DEFAULT_AMQP_URL.into(),
            database_url: DEFAULT_DATABASE_URL.into(),
            tls_ca_file: None,
            prefix: "gantry".into(),
            limits: Limits::default(),
            queues: QueueSettings::default(),
            broker_timeout: Duration::from_secs(15),
            db_pool_size: 8,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            dispatcher: None,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("log format {s:?} is neither \"text\" nor \"json\"")),
        }
    }
}

impl Config {
    /// Defaults, then the file (if any), then the environment.
    ///
    /// # Errors
    /// The file cannot be read or parsed, a `GANTRY_*` variable has a bad value, or the CA
    /// file (`tls_ca_file`) cannot be read.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        let mut config: Config = read_file(file)?;
        config.apply_env()?;
        config.queues.validate()?;
        config.apply_tls_ca_file()?;
        Ok(config)
    }

    /// Writes `tls_ca_file` into the URLs that ask for TLS and name no CA file of their own
    /// (`cacertfile=` of `amqps://`, `sslrootcert=` of Postgres), having checked that it
    /// holds certificates. The URLs carry it from there: to every connection, and to the
    /// executors a dispatcher starts. [`Config::load`] does it; call it again after setting
    /// a URL that may ask for TLS.
    ///
    /// # Errors
    /// [`Error::TlsCaFile`] when the file cannot be read or holds no certificate;
    /// [`Error::DatabaseUrl`] for a malformed Postgres URL.
    pub fn apply_tls_ca_file(&mut self) -> Result<()> {
        let Some(ca_file) = &self.tls_ca_file else {
            return Ok(());
        };
        tls::read_ca_file(ca_file)?;
        if let Some(url) = tls::amqp_with_ca_file(self.amqp_url.expose_secret(), ca_file) {
            self.amqp_url = url.into();
        }
        if let Some(url) = tls::postgres_with_ca_file(self.database_url.expose_secret(), ca_file)? {
            self.database_url = url.into();
        }
        Ok(())
    }

    fn apply_env(&mut self) -> Result<()> {
        if let Some(v) = env("GANTRY_AMQP_URL") {
            self.amqp_url = v.into();
        }
        if let Some(v) = env("GANTRY_DATABASE_URL") {
            self.database_url = v.into();
        }
        if let Some(v) = env("GANTRY_TLS_CA_FILE") {
            self.tls_ca_file = Some(v.into());
        }
        if let Some(v) = env("GANTRY_PREFIX") {
            self.prefix = v;
        }
        env_parse(
            "GANTRY_MAX_PAYLOAD_BYTES",
            &mut self.limits.max_payload_bytes,
        )?;
        env_parse("GANTRY_DELIVERY_LIMIT", &mut self.queues.delivery_limit)?;
        env_parse("GANTRY_DB_POOL_SIZE", &mut self.db_pool_size)?;
        env_parse("GANTRY_LOG_FORMAT", &mut self.log_format)?;
        env_duration("GANTRY_BROKER_TIMEOUT", &mut self.broker_timeout)?;
        // OpenTelemetry's own variable, where Gantry's is not set.
        if let Some(v) = env("GANTRY_OTLP_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        {
            self.otlp_endpoint = Some(v);
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            check_otlp_endpoint(endpoint)?;
        }
        Ok(())
    }

    /// The broker URL with its password hidden, for logs and error messages.
    pub fn amqp_url_redacted(&self) -> String {
        redact_url(self.amqp_url.expose_secret())
    }
}

/// An OTLP endpoint must be plain `http://`: spans go out on the workspace's HTTP client,
/// which speaks no TLS (a collector beside the service, or a sidecar, takes them).
fn check_otlp_endpoint(endpoint: &str) -> Result<()> {
    let bad = |message: String| Error::Config {
        origin: "otlp_endpoint (GANTRY_OTLP_ENDPOINT)".into(),
        message,
    };
    let url = url::Url::parse(endpoint).map_err(|e| bad(format!("{endpoint:?}: {e}")))?;
    if url.scheme() != "http" || url.host_str().is_none() {
        return Err(bad(format!(
            "{endpoint:?} is not an http:// URL with a host; give the collector's OTLP/HTTP address, e.g. http://127.0.0.1:4318 (https is not supported: use a collector beside the service)"
        )));
    }
    Ok(())
}

/// Reads a YAML configuration file into `T` (its defaults where the file is silent), or
/// `T::default()` when there is no file.
///
/// # Errors
/// The file cannot be read or does not match `T`.
pub fn read_file<T: DeserializeOwned + Default>(file: Option<&Path>) -> Result<T> {
    let Some(path) = file else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
        path: path.display().to_string(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    serde_norway::from_str(&text).map_err(|e| Error::Config {
        origin: path.display().to_string(),
        message: e.to_string(),
    })
}

/// A non-empty environment variable.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Overrides `slot` with the parsed value of environment variable `name`, if set.
///
/// # Errors
/// The variable is set but does not parse.
pub fn env_parse<T: FromStr>(name: &str, slot: &mut T) -> Result<()>
where
    T::Err: std::fmt::Display,
{
    if let Some(v) = env(name) {
        *slot = v.parse().map_err(|e: T::Err| Error::Config {
            origin: name.to_owned(),
            message: format!("{v:?}: {e}"),
        })?;
    }
    Ok(())
}

/// Overrides `slot` with a human duration (`30s`, `5m`) from environment variable `name`.
///
/// # Errors
/// The variable is set but is not a duration.
pub fn env_duration(name: &str, slot: &mut Duration) -> Result<()> {
    if let Some(v) = env(name) {
        *slot = humantime::parse_duration(&v).map_err(|e| Error::Config {
            origin: name.to_owned(),
            message: format!("{v:?} is not a duration like 30s or 5m: {e}"),
        })?;
    }
    Ok(())
}

/// `scheme://user:***@host/...`: a URL without its password.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// Serde adapter for durations written as `30s`, `5m`, `1h 30m`.
pub mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_otlp_endpoint_is_a_plain_http_url_with_a_host() {
        assert!(check_otlp_endpoint("http://127.0.0.1:4318").is_ok());
        assert!(check_otlp_endpoint("http://otel-collector.observability:4318/").is_ok());
        for bad in [
            "https://collector:4318",
            "collector:4318",
            "http://",
            "grpc://c:4317",
        ] {
            let e = check_otlp_endpoint(bad).unwrap_err().to_string();
            assert!(e.contains("otlp_endpoint"), "{bad}: {e}");
        }
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact_url("postgres://host/db"), "postgres://host/db");
    }

    #[test]
    fn a_file_overrides_defaults_where_it_speaks() {
        let dir = std::env::temp_dir().join(format!("gantry-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.yaml");
        std::fs::write(
            &path,
            "prefix: x\nbroker_timeout: 3s\nqueues: { delivery_limit: 4 }\n",
        )
        .unwrap();
        let c: Config = read_file(Some(&path)).unwrap();
        assert_eq!(c.prefix, "x");
        assert_eq!(c.broker_timeout, Duration::from_secs(3));
        assert_eq!(c.queues.delivery_limit, 4);
        assert_eq!(c.queues.retry_delays.len(), 5);
        assert_eq!(c.db_pool_size, 8);
        std::fs::write(&path, "prefixx: x\n").unwrap();
        let typo = read_file::<Config>(Some(&path)).unwrap_err().to_string();
        assert!(typo.contains("prefixx"), "{typo}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_ca_file_goes_into_the_urls_that_ask_for_tls() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let mut config = Config {
            amqp_url: "amqps://u:p@broker:5671/%2f".into(),
            database_url: "postgres://u:p@db/gantry?sslmode=verify-full".into(),
            tls_ca_file: Some(ca.clone()),
            ..Config::default()
        };
        let missing = config.apply_tls_ca_file().unwrap_err().to_string();
        assert!(missing.contains("ca.pem"), "{missing}");

        std::fs::write(&ca, CA_PEM).unwrap();
        config.apply_tls_ca_file().unwrap();
        let path = ca.display();
        assert_eq!(
            config.amqp_url.expose_secret(),
            format!("amqps://u:p@broker:5671/%2f?cacertfile={path}")
        );
        assert_eq!(
            config.database_url.expose_secret(),
            format!("postgres://u:p@db/gantry?sslmode=verify-full&sslrootcert={path}")
        );

        let mut plain = Config {
            tls_ca_file: Some(ca),
            ..Config::default()
        };
        plain.apply_tls_ca_file().unwrap();
        assert_eq!(plain.amqp_url.expose_secret(), DEFAULT_AMQP_URL);
        assert_eq!(plain.database_url.expose_secret(), DEFAULT_DATABASE_URL);
    }

    /// A throwaway CA certificate (P-256), only ever read, never trusted by a connection.
    const CA_PEM: &str = "\
-----BEGIN CERTIFICATE-----
MIIBkTCCATegAwIBAgIUSsQvCnCmEDFSYL7BlbZXOPAo1vwwCgYIKoZIzj0EAwIw
HjEcMBoGA1UEAwwTR2FudHJ5IHVuaXQtdGVzdCBDQTAeFw0yNjEyMDQwNTI5Mzha
Fw0zNjEyMDEwNTI5MzhaMB4xHDAaBgNVBAMME0dhbnRyeSB1bml0LXRlc3QgQ0Ew
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAS/ECKLbDskvmNB0jAiNxI3WQJ9CpYn
T00Z/VNqIrpjvUe+4/Eh9ZYKCPo/8UQpeXGGct1Vo3XcJV3ihLqkdRrVo1MwUTAd
BgNVHQ4EFgQUNJvYATIIy9fk99ftGVoORqUck6IwHwYDVR0jBBgwFoAUNJvYATII
y9fk99ftGVoORqUck6IwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBF
AiEA7ryiZCFKjtJVHUTs6SP2ZqB3n59AL41tVB0rr0/LCyACIEdsjj5N9mMNr6q1
2YeGjN+eUrCA5BPBE2VuAnlH6HyX
-----END CERTIFICATE-----
";
}
