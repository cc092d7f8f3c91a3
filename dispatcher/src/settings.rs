//! The dispatcher's configuration: the shared [`Config`] plus a `dispatcher:` section of the
//! same YAML file, then `GANTRY_*` environment variables, then command-line flags.
//!
//! ```yaml
//! prefix: gantry
//! dispatcher:
//!   runtime: local
//!   roles: [dispatch, record]
//!   catalog: /etc/gantry/catalog.yaml
//!   state_dir: /var/lib/gantry
//! ```

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

/// The `dispatcher:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatcherSection {
    pub runtime: RuntimeKind,
    pub roles: Vec<Role>,
    /// Executor catalog file; the built-in catalog (class `echo`) when unset.
    pub catalog: Option<PathBuf>,
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
}

impl Default for DispatcherSection {
    fn default() -> Self {
        DispatcherSection {
            runtime: RuntimeKind::Local,
            roles: vec![Role::Dispatch, Role::Record],
            catalog: None,
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
    pub catalog: Catalog,
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
            "GANTRY_UNSCHEDULABLE_LIMIT",
            &mut d.kubernetes.unschedulable_limit,
        )?;
        if let Some(v) = env("GANTRY_NAMESPACE") {
            d.kubernetes.namespace = Some(v);
        }
        Ok(d)
    }

    /// Loads the catalog and the shared configuration.
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
        let catalog = Catalog::load(dispatcher.catalog.as_deref())?;
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
        }
    }
}
