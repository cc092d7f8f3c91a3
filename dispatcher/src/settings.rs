//! The dispatcher's configuration: the shared [`Config`] plus a `dispatcher:` section of the
//! same YAML file, then `GANTRY_*` environment variables, then command-line flags.
//!
//! ```yaml
//! prefix: gantry
//! dispatcher:
//!   runtime: local
//!   roles: [dispatch, record]
//!   catalog: /etc/gantry/catalog.yaml      # or catalog_configmap: gantry-catalog
//!   state_dir: /var/lib/gantry
//!   http_addr: 127.0.0.1:8380
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use gantry_shared::catalog::Catalog;
use gantry_shared::config::{self, Config, env, env_duration, env_parse, humantime_serde_compat};
use serde::Deserialize;

use crate::Result;

/// Where jobs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// The executor runs as a child process on this machine.
    Local,
    /// Each attempt is a `batch/v1` Job.
    Kubernetes,
}

impl FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(RuntimeKind::Local),
            "kubernetes" => Ok(RuntimeKind::Kubernetes),
            _ => Err(format!(
                "unknown runtime {s:?}; use \"local\" or \"kubernetes\""
            )),
        }
    }
}

/// What this dispatcher process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Consume tasks and run them as jobs.
    Dispatch,
    /// Record results and dead letters in Postgres and forward results to `reply_to`.
    Record,
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dispatch" => Ok(Role::Dispatch),
            "record" => Ok(Role::Record),
            _ => Err(format!(
                "unknown role {s:?}; use \"dispatch\" or \"record\""
            )),
        }
    }
}

/// Where the dispatcher serves `/livez`, `/readyz` and `/metrics`: an IP address and port,
/// or nowhere (`off`). Port 0 takes any free port (the log says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HttpAddr(pub Option<SocketAddr>);

impl HttpAddr {
    /// `127.0.0.1:8380`: this machine only. In a cluster, set `0.0.0.0:8380` so that the
    /// kubelet and Prometheus reach it.
    pub const DEFAULT: HttpAddr = HttpAddr(Some(SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        8380,
    )));
}

impl FromStr for HttpAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "off" => Ok(HttpAddr(None)),
            addr => addr.parse().map(|a| HttpAddr(Some(a))).map_err(|_| {
                "not an IP address and port such as 127.0.0.1:8380 or 0.0.0.0:8380, nor \"off\""
                    .to_owned()
            }),
        }
    }
}

impl TryFrom<String> for HttpAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for HttpAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("off"),
        }
    }
}

/// The `dispatcher:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatcherSection {
    pub runtime: RuntimeKind,
    pub roles: Vec<Role>,
    /// Executor catalog file; the built-in catalog (class `echo`) when unset.
    pub catalog: Option<PathBuf>,
    /// The ConfigMap holding the executor catalog (key `catalog.yaml`), `NAME` in the
    /// dispatcher's namespace or `NAMESPACE/NAME`; watched and reloaded on change. Exclusive
    /// with `catalog`.
    pub catalog_configmap: Option<String>,
    /// Where the local runtime keeps its job directories.
    pub state_dir: PathBuf,
    /// The `gantry-executor` program the local runtime starts.
    pub executor_bin: Option<PathBuf>,
    /// Most results or dead letters written to Postgres in one transaction.
    pub record_batch: usize,
    /// How long the recorder waits to fill a batch.
    #[serde(with = "humantime_serde_compat")]
    pub record_linger: Duration,
    /// Deliveries held waiting for capacity, at most, per executor class.
    pub max_waiting: u16,
    /// Longest a delivery is held waiting for capacity before it is put back at the end of
    /// its queue; keep `max_waiting` × this under RabbitMQ's `consumer_timeout` (30 min).
    #[serde(with = "humantime_serde_compat")]
    pub max_hold: Duration,
    /// After a task's deadline, how long its executor has to report before it is stopped.
    #[serde(with = "humantime_serde_compat")]
    pub deadline_grace: Duration,
    /// Between SIGTERM and SIGKILL when a job is stopped.
    #[serde(with = "humantime_serde_compat")]
    pub kill_grace: Duration,
    /// How long a finished local job's directory (task, logs) is kept.
    #[serde(with = "humantime_serde_compat")]
    pub job_retention: Duration,
    /// Name of this machine in the runtime evidence.
    pub node_name: Option<String>,
    /// How the `kubernetes` runtime makes Jobs.
    pub kubernetes: KubernetesSection,
    /// Where `/livez`, `/readyz` and `/metrics` are served.
    pub http_addr: HttpAddr,
    /// The Celery bridge: Celery clients' tasks in, their results back (docs/celery.md).
    pub celery: CelerySection,
}

impl Default for DispatcherSection {
    fn default() -> Self {
        DispatcherSection {
            runtime: RuntimeKind::Local,
            roles: vec![Role::Dispatch, Role::Record],
            catalog: None,
            catalog_configmap: None,
            state_dir: default_state_dir(),
            executor_bin: None,
            record_batch: 200,
            record_linger: Duration::from_millis(5),
            max_waiting: 2,
            max_hold: Duration::from_secs(600),
            deadline_grace: Duration::from_secs(5),
            kill_grace: Duration::from_secs(5),
            job_retention: Duration::from_secs(600),
            node_name: None,
            kubernetes: KubernetesSection::default(),
            http_addr: HttpAddr::DEFAULT,
            celery: CelerySection::default(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    if let Some(dir) = env("STATE_DIRECTORY") {
        return PathBuf::from(dir);
    }
    match env("HOME") {
        Some(home) if home != "/" && home != "/root" => {
            Path::new(&home).join(".local/state/gantry")
        }
        _ => PathBuf::from("/var/lib/gantry"),
    }
}

#[derive(Debug, Default, Deserialize)]
struct FileLayout {
    #[serde(default)]
    dispatcher: DispatcherSection,
}

/// Everything the dispatcher needs, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub common: Config,
    pub dispatcher: DispatcherSection,
    /// The catalog file's (or the built-in) catalog; `None` when it comes from a ConfigMap,
    /// read at start.
    pub catalog: Option<Catalog>,
    /// The configuration file, passed on to executors.
    pub config_file: Option<PathBuf>,
}

impl Settings {
    /// Defaults → file → environment. Flags are applied by the caller, then
    /// [`Settings::resolve`] loads the catalog.
    ///
    /// # Errors
    /// An unreadable or invalid file or environment variable.
    pub fn load(file: Option<&Path>) -> Result<DispatcherSection> {
        let layout: FileLayout = config::read_file(file)?;
        let mut d = layout.dispatcher;
        env_parse("GANTRY_RUNTIME", &mut d.runtime)?;
        if let Some(roles) = env("GANTRY_ROLES") {
            d.roles = roles
                .split(',')
                .map(|r| r.trim().parse::<Role>())
                .collect::<Result<_, _>>()
                .map_err(|message| gantry_shared::Error::Config {
                    origin: "GANTRY_ROLES".into(),
                    message,
                })?;
        }
        if let Some(v) = env("GANTRY_CATALOG") {
            d.catalog = Some(v.into());
        }
        if let Some(v) = env("GANTRY_CATALOG_CONFIGMAP") {
            d.catalog_configmap = Some(v);
        }
        if let Some(v) = env("GANTRY_STATE_DIR") {
            d.state_dir = v.into();
        }
        if let Some(v) = env("GANTRY_EXECUTOR_BIN") {
            d.executor_bin = Some(v.into());
        }
        if let Some(v) = env("GANTRY_NODE_NAME") {
            d.node_name = Some(v);
        }
        env_parse("GANTRY_RECORD_BATCH", &mut d.record_batch)?;
        env_parse("GANTRY_HTTP_ADDR", &mut d.http_addr)?;
        env_parse("GANTRY_MAX_WAITING", &mut d.max_waiting)?;
        env_duration("GANTRY_MAX_HOLD", &mut d.max_hold)?;
        env_duration("GANTRY_RECORD_LINGER", &mut d.record_linger)?;
        env_duration("GANTRY_DEADLINE_GRACE", &mut d.deadline_grace)?;
        env_duration("GANTRY_KILL_GRACE", &mut d.kill_grace)?;
        env_duration("GANTRY_JOB_RETENTION", &mut d.job_retention)?;
        env_duration(
            "GANTRY_IMAGE_PULL_LIMIT",
            &mut d.kubernetes.image_pull_limit,
        )?;
        env_duration(
            "GANTRY_TTL_AFTER_FINISHED",
            &mut d.kubernetes.ttl_after_finished,
        )?;
        env_duration(
            "GANTRY_UNSCHEDULABLE_LIMIT",
            &mut d.kubernetes.unschedulable_limit,
        )?;
        if let Some(v) = env("GANTRY_NAMESPACE") {
            d.kubernetes.namespace = Some(v);
        }
        let k = &mut d.kubernetes;
        if let Some(v) = env("GANTRY_ALLOWED_REGISTRIES") {
            k.allowed_registries = v.split(',').map(|r| r.trim().to_owned()).collect();
        }
        env_parse("GANTRY_DEV_MODE", &mut k.dev_mode)?;
        if let Some(v) = env("GANTRY_EXECUTOR_REGISTRY") {
            k.executor_registry = Some(v);
        }
        env_duration(
            "GANTRY_EXECUTOR_REGISTRY_CACHE",
            &mut k.executor_registry_cache,
        )?;
        env_duration(
            "GANTRY_EXECUTOR_REGISTRY_TIMEOUT",
            &mut k.executor_registry_timeout,
        )?;
        if let Some(v) = env("GANTRY_EXECUTOR_CA_CONFIGMAP") {
            k.executor_ca_configmap = Some(v);
        }
        d.celery.read_env()?;
        Ok(d)
    }

    /// Loads the catalog (from its file; a ConfigMap is read at start by the service) and
    /// checks the settings that depend on each other.
    ///
    /// # Errors
    /// An invalid catalog or configuration.
    pub fn resolve(
        common: Config,
        mut dispatcher: DispatcherSection,
        config_file: Option<PathBuf>,
    ) -> Result<Settings> {
        if dispatcher.roles.is_empty() {
            dispatcher.roles = DispatcherSection::default().roles;
        }
        dispatcher.record_batch = dispatcher.record_batch.max(1);
        dispatcher.max_waiting = dispatcher.max_waiting.max(1);
        let invalid = |origin: &str, message: String| gantry_shared::Error::Config {
            origin: origin.into(),
            message,
        };
        if dispatcher.catalog_configmap.is_some() && dispatcher.catalog.is_some() {
            return Err(invalid(
                "dispatcher.catalog_configmap",
                "set either a catalog file (catalog, --catalog, GANTRY_CATALOG) or catalog_configmap, not both".into(),
            )
            .into());
        }
        if let Some(name) = &dispatcher.catalog_configmap {
            configmap_ref(name).map_err(|m| invalid("dispatcher.catalog_configmap", m))?;
        }
        if let Some(url) = &dispatcher.kubernetes.executor_registry {
            crate::images::check_registry_url(url).map_err(|m| {
                invalid(
                    "dispatcher.kubernetes.executor_registry",
                    format!("{}: {m}", config::redact_url(url)),
                )
            })?;
        }
        if let Some(name) = &dispatcher.kubernetes.executor_ca_configmap {
            match configmap_ref(name) {
                Ok((None, _)) => {}
                Ok((Some(_), _)) => {
                    return Err(invalid(
                        "dispatcher.kubernetes.executor_ca_configmap",
                        format!("{name:?}: a pod mounts only ConfigMaps of its own namespace; give the NAME of one in the Jobs' namespace"),
                    )
                    .into());
                }
                Err(m) => {
                    return Err(invalid("dispatcher.kubernetes.executor_ca_configmap", m).into());
                }
            }
        }
        let catalog = match dispatcher.catalog_configmap {
            Some(_) => None,
            None => Some(Catalog::load(dispatcher.catalog.as_deref())?),
        };
        Ok(Settings {
            common,
            dispatcher,
            catalog,
            config_file,
        })
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.dispatcher.roles.contains(&role)
    }
}

/// `(namespace, name)` of `catalog_configmap` (`NAME` or `NAMESPACE/NAME`).
///
/// # Errors
/// A part is empty or not a DNS-1123 name.
pub fn configmap_ref(value: &str) -> Result<(Option<&str>, &str), String> {
    let (namespace, name) = match value.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, value),
    };
    let dns = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    if namespace.is_some_and(|ns| !dns(ns)) || !dns(name) {
        return Err(format!(
            "{value:?} is not NAME or NAMESPACE/NAME (lowercase letters, digits, '-' and '.')"
        ));
    }
    Ok((namespace, name))
}

/// The `celery:` part of the `dispatcher:` section: the Celery bridge of the dispatch role.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CelerySection {
    /// Consume Celery task messages and revokes (off by default).
    pub enabled: bool,
    /// The Celery queues to consume (a Celery app's `task_default_queue` and its
    /// `task_routes` queues).
    pub queues: Vec<String>,
    /// Celery's control exchange, where `revoke` is broadcast: `<control_exchange>.pidbox`
    /// for a Celery app's `control_exchange` (default `celery`).
    pub control_exchange: String,
    /// Celery deliveries taken at once per queue.
    pub prefetch: u16,
    /// Send `STARTED` when a task's job runs (Celery's `task_track_started`).
    pub track_started: bool,
}

impl Default for CelerySection {
    fn default() -> Self {
        CelerySection {
            enabled: false,
            queues: vec!["celery".into()],
            control_exchange: "celery.pidbox".into(),
            prefetch: 64,
            track_started: false,
        }
    }
}

impl CelerySection {
    /// `GANTRY_CELERY`, `GANTRY_CELERY_QUEUES` (comma-separated),
    /// `GANTRY_CELERY_CONTROL_EXCHANGE`, `GANTRY_CELERY_PREFETCH`,
    /// `GANTRY_CELERY_TRACK_STARTED`.
    fn read_env(&mut self) -> Result<()> {
        env_parse("GANTRY_CELERY", &mut self.enabled)?;
        if let Some(v) = env("GANTRY_CELERY_QUEUES") {
            self.queues = v
                .split(',')
                .map(|q| q.trim().to_owned())
                .filter(|q| !q.is_empty())
                .collect();
        }
        if let Some(v) = env("GANTRY_CELERY_CONTROL_EXCHANGE") {
            self.control_exchange = v;
        }
        env_parse("GANTRY_CELERY_PREFETCH", &mut self.prefetch)?;
        env_parse("GANTRY_CELERY_TRACK_STARTED", &mut self.track_started)?;
        Ok(())
    }
}

/// The `kubernetes:` part of the `dispatcher:` section: how Jobs are made.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesSection {
    /// Namespace of the Jobs; default: the dispatcher's own (in a cluster), else `default`.
    pub namespace: Option<String>,
    /// How long a finished Job (and its pod and Secret) is kept (`ttlSecondsAfterFinished`).
    #[serde(with = "humantime_serde_compat")]
    pub ttl_after_finished: Duration,
    /// The Secret and key holding the AMQP URL executors publish with; never inlined.
    pub amqp_secret_name: String,
    pub amqp_secret_key: String,
    /// Where the task Secret is mounted in the executor's container.
    pub task_mount_path: String,
    /// The non-root user the executor runs as.
    pub run_as_user: i64,
    /// API writes per second at most (token bucket), and the burst allowed above it.
    pub writes_per_second: f64,
    pub write_burst: u32,
    /// A pod that cannot pull its image this long fails the attempt (`image_pull`).
    #[serde(with = "humantime_serde_compat")]
    pub image_pull_limit: Duration,
    /// A pod no node can take this long fails the attempt (`unschedulable`, retryable).
    #[serde(with = "humantime_serde_compat")]
    pub unschedulable_limit: Duration,
    /// Registries executor images may come from (`registry.example.com`,
    /// `ghcr.io/acme`); an image from anywhere else is refused. Empty: any.
    pub allowed_registries: Vec<String>,
    /// Development mode: a class without an image runs the newest `executor-<class>` image
    /// the nodes report, and images need not be pinned to a digest.
    pub dev_mode: bool,
    /// The executor registry service (`http://host[:port][/path]`), asked first.
    pub executor_registry: Option<String>,
    /// How long the registry's answers (404s included) are reused.
    #[serde(with = "humantime_serde_compat")]
    pub executor_registry_cache: Duration,
    /// Longest wait for one answer of the registry.
    #[serde(with = "humantime_serde_compat")]
    pub executor_registry_timeout: Duration,
    /// While the registry does not answer, an answer cached less than this long ago is used.
    #[serde(with = "humantime_serde_compat")]
    pub executor_registry_stale: Duration,
    /// A ConfigMap of the Jobs' namespace whose key `ca.crt` holds the CA certificates
    /// (PEM) the executors trust for `amqps://`: mounted in every executor pod and named
    /// by its `GANTRY_TLS_CA_FILE`. Unset: the executors trust the CA their URL names, or
    /// the system's roots.
    pub executor_ca_configmap: Option<String>,
}

impl Default for KubernetesSection {
    fn default() -> Self {
        KubernetesSection {
            namespace: None,
            ttl_after_finished: Duration::from_secs(300),
            amqp_secret_name: "gantry-amqp".into(),
            amqp_secret_key: "url".into(),
            task_mount_path: "/var/run/gantry/task".into(),
            run_as_user: 65532,
            writes_per_second: 20.0,
            write_burst: 40,
            image_pull_limit: Duration::from_secs(120),
            unschedulable_limit: Duration::from_secs(600),
            allowed_registries: Vec::new(),
            dev_mode: false,
            executor_registry: None,
            executor_registry_cache: Duration::from_secs(30),
            executor_registry_timeout: Duration::from_secs(2),
            executor_registry_stale: Duration::from_secs(300),
            executor_ca_configmap: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_catalog_configmap_is_a_name_or_a_namespaced_name() {
        assert_eq!(
            configmap_ref("gantry-catalog"),
            Ok((None, "gantry-catalog"))
        );
        assert_eq!(
            configmap_ref("ml-jobs/gantry-catalog"),
            Ok((Some("ml-jobs"), "gantry-catalog"))
        );
        for bad in ["", "/x", "ns/", "Gantry", "a/b/c", "-x"] {
            assert!(configmap_ref(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_http_address_is_an_ip_address_and_port_or_off() {
        let any: HttpAddr = "0.0.0.0:8380".parse().unwrap();
        assert_eq!(any.0, Some(SocketAddr::from(([0, 0, 0, 0], 8380))));
        assert_eq!("off".parse::<HttpAddr>(), Ok(HttpAddr(None)));
        let refused = "localhost:8380".parse::<HttpAddr>().unwrap_err();
        assert!(refused.contains("127.0.0.1:8380"), "{refused}");
        assert_eq!(
            DispatcherSection::default().http_addr.to_string(),
            "127.0.0.1:8380"
        );
        let d: DispatcherSection = serde_norway::from_str("http_addr: \"[::1]:0\"\n").unwrap();
        assert_eq!(d.http_addr.to_string(), "[::1]:0");
        let off: DispatcherSection = serde_norway::from_str("http_addr: \"off\"\n").unwrap();
        assert_eq!(off.http_addr, HttpAddr(None));
        assert!(serde_norway::from_str::<DispatcherSection>("http_addr: 8380\n").is_err());
    }

    #[test]
    fn the_celery_bridge_is_off_unless_asked_and_reads_its_queues() {
        assert!(!DispatcherSection::default().celery.enabled);
        assert_eq!(DispatcherSection::default().celery.queues, ["celery"]);
        let d: DispatcherSection = serde_norway::from_str(
            "celery:\n  enabled: true\n  queues: [celery, reports]\n  control_exchange: backend.pidbox\n  track_started: true\n",
        )
        .unwrap();
        assert!(d.celery.enabled && d.celery.track_started);
        assert_eq!(d.celery.queues, ["celery", "reports"]);
        assert_eq!(d.celery.control_exchange, "backend.pidbox");
        assert_eq!(d.celery.prefetch, 64);
        assert!(serde_norway::from_str::<DispatcherSection>("celery: { queue: x }\n").is_err());
    }

    #[test]
    fn the_image_settings_parse_from_the_file() {
        let d: DispatcherSection = serde_norway::from_str(
            "catalog_configmap: ml/gantry-catalog\nkubernetes:\n  dev_mode: true\n  executor_registry: http://executor-registry:8080\n  executor_registry_cache: 10s\n  allowed_registries: [registry.example.com]\n",
        )
        .unwrap();
        assert_eq!(d.catalog_configmap.as_deref(), Some("ml/gantry-catalog"));
        assert!(d.kubernetes.dev_mode);
        assert_eq!(
            d.kubernetes.executor_registry_cache,
            Duration::from_secs(10)
        );
        assert_eq!(
            d.kubernetes.executor_registry_timeout,
            Duration::from_secs(2)
        );
        let both = DispatcherSection {
            catalog: Some("/etc/catalog.yaml".into()),
            ..d.clone()
        };
        let refused = Settings::resolve(Config::default(), both, None)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("not both"), "{refused}");
        let https = DispatcherSection {
            kubernetes: KubernetesSection {
                executor_registry: Some("https://user:secret@r.example".into()),
                ..d.kubernetes.clone()
            },
            ..d
        };
        let refused = Settings::resolve(Config::default(), https, None)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("https is not supported"), "{refused}");
        assert!(!refused.contains("secret"), "{refused}");
    }
}
