//! The executor catalog: which executor classes exist, what engine runs each, how many of
//! its jobs may run at once, and what the Kubernetes runtime needs (image, GPU resources).
//!
//! Loaded from a YAML file; the built-in default has the class `echo`:
//!
//! ```yaml
//! executors:
//!   echo:
//!     engine: { kind: echo }
//!     max_active_jobs: 8
//!   summarize:
//!     engine: { kind: command, command: ["python3", "/opt/summarize.py"] }
//!     max_active_jobs: 2
//!     image: registry.example.com/executor-summarize@sha256:…
//!     resources: { gpu_count: 1, gpu_type: nvidia-l4 }
//!   chat:
//!     engine:
//!       kind: openai
//!       model: Qwen/Qwen2.5-7B-Instruct
//!       # server: ["vllm", "serve", "{model}", "--host", "127.0.0.1", "--port", "{port}"]
//!       # endpoint: http://127.0.0.1:8000      (instead of server: one already running)
//!       startup_timeout: 10m
//!     resources: { gpu_count: 1 }
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::message::{ExecutorClass, Resources};
use crate::{Error, Result};

/// How an executor does its work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Engine {
    /// Returns its payload; test knobs in the payload (`sleep_ms`, `fail`, `exit_code`).
    Echo,
    /// Runs a command: task JSON on stdin, result JSON on stdout.
    Command { command: Vec<String> },
    /// Sends the task's chat or completion request to an OpenAI-compatible model server
    /// (vLLM in production) that the executor starts inside its job, or to `endpoint`.
    Openai(OpenAiEngine),
}

impl Engine {
    /// The environment that tells an executor which engine to run, as both runtimes set
    /// it: `GANTRY_ENGINE`, and `GANTRY_COMMAND` or `GANTRY_OPENAI` (JSON) for the engines
    /// that have settings.
    pub fn executor_env(&self) -> Vec<(&'static str, String)> {
        // Serializing a list of strings or a struct of strings and numbers cannot fail.
        let json = |value: serde_json::Result<String>| value.unwrap_or_default();
        match self {
            Engine::Echo => vec![("GANTRY_ENGINE", "echo".into())],
            Engine::Command { command } => vec![
                ("GANTRY_ENGINE", "command".into()),
                ("GANTRY_COMMAND", json(serde_json::to_string(command))),
            ],
            Engine::Openai(openai) => vec![
                ("GANTRY_ENGINE", "openai".into()),
                ("GANTRY_OPENAI", json(serde_json::to_string(openai))),
            ],
        }
    }
}

/// The `openai` engine of a class: which model, and which server serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiEngine {
    /// The model the server serves; every task of the class uses it.
    pub model: String,
    /// The server's command line. `{model}` and `{port}` are replaced by the model and a
    /// free local port. Default: `vllm serve {model} --host 127.0.0.1 --port {port}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<Vec<String>>,
    /// A server that is already running (a sidecar or a shared server), instead of
    /// starting one: `http://host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Longest wait for the server to answer `ready_path` after it starts.
    #[serde(
        default = "default_startup_timeout",
        with = "crate::config::humantime_serde_compat"
    )]
    pub startup_timeout: Duration,
    /// The path that answers 200 once the server is ready: `/v1/models` works with vLLM
    /// and llama.cpp's servers; vLLM also has `/health`.
    #[serde(default = "default_ready_path")]
    pub ready_path: String,
    /// How long the server gets to exit after SIGTERM before it is killed.
    #[serde(
        default = "default_stop_grace",
        with = "crate::config::humantime_serde_compat"
    )]
    pub stop_grace: Duration,
}

impl OpenAiEngine {
    /// The server's command line with `{model}` and `{port}` filled in.
    pub fn server_argv(&self, port: u16) -> Vec<String> {
        let template = self.server.clone().unwrap_or_else(|| {
            [
                "vllm",
                "serve",
                "{model}",
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
            ]
            .map(String::from)
            .to_vec()
        });
        template
            .iter()
            .map(|arg| {
                arg.replace("{model}", &self.model)
                    .replace("{port}", &port.to_string())
            })
            .collect()
    }

    /// What is wrong with this engine's settings, if anything.
    fn problem(&self) -> Option<String> {
        if self.model.trim().is_empty() {
            return Some("engine.model must name the model the server serves".into());
        }
        if self.server.is_some() && self.endpoint.is_some() {
            return Some(
                "engine has both `server` and `endpoint`: give `server` to start one in each job, or `endpoint` to use a running one".into(),
            );
        }
        if let Some(server) = &self.server {
            if server.first().is_none_or(|program| program.is_empty()) {
                return Some("engine.server must name a program".into());
            }
            if !server.iter().any(|arg| arg.contains("{port}")) {
                return Some(
                    "engine.server must take the port the executor picks: put \"{port}\" in its arguments".into(),
                );
            }
        }
        if let Some(endpoint) = &self.endpoint {
            let rest = endpoint.strip_prefix("http://");
            if rest.is_none_or(|r| r.is_empty() || r.contains('/')) {
                return Some(format!(
                    "engine.endpoint {endpoint:?} must be http://host:port (no path; plain HTTP to a server in the pod or the cluster)"
                ));
            }
        }
        if !self.ready_path.starts_with('/') {
            return Some(format!(
                "engine.ready_path {:?} must be a path such as /v1/models",
                self.ready_path
            ));
        }
        if self.startup_timeout.is_zero() {
            return Some("engine.startup_timeout must be more than zero".into());
        }
        None
    }
}

fn default_startup_timeout() -> Duration {
    Duration::from_secs(600)
}

fn default_ready_path() -> String {
    "/v1/models".into()
}

fn default_stop_grace() -> Duration {
    Duration::from_secs(10)
}

/// One executor class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorSpec {
    pub engine: Engine,
    /// Most jobs of this class running at once; the rest waits in RabbitMQ.
    #[serde(default = "default_max_active_jobs")]
    pub max_active_jobs: u32,
    /// Container image for the Kubernetes runtime (digest-pinned in production).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// GPU resources of each job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// How failed attempts are retried.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Node labels a job's pod must run on (Kubernetes `nodeSelector`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints a job's pod tolerates (Kubernetes tolerations).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// CPU and memory of a job's container, as Kubernetes quantities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ContainerLimits>,
    /// Warm executors: each job loads its engine once and serves many tasks of the class
    /// (see [`WarmSpec`]); `max_active_jobs` then counts warm executors. Absent: one job
    /// per task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmSpec>,
    /// The Celery task names this class runs (see [`crate::celery`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub celery: Option<crate::celery::class::CeleryClass>,
}

impl ExecutorSpec {
    /// Most tasks of the class running at once: `max_active_jobs`, times each warm
    /// executor's `max_concurrency` for a warm class.
    pub fn task_capacity(&self) -> u32 {
        let per_job = self.warm.map_or(1, |w| u32::from(w.max_concurrency));
        self.max_active_jobs.saturating_mul(per_job)
    }
}

/// How the warm executors of a class serve tasks, and when each one ends.
///
/// ```yaml
/// warm: { max_concurrency: 8, max_tasks_per_job: 1000, idle_timeout: 2m, max_job_lifetime: 6h }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WarmSpec {
    /// Tasks one warm executor runs at once.
    pub max_concurrency: u16,
    /// Tasks one warm executor is handed in its life; then it finishes them and ends.
    pub max_tasks_per_job: u32,
    /// A warm executor with nothing to do for this long ends.
    #[serde(with = "crate::config::humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// A warm executor is handed no new task after this long and ends once its tasks are
    /// done; its job's deadline is this plus the longest task deadline it may still hold.
    #[serde(with = "crate::config::humantime_serde_compat")]
    pub max_job_lifetime: Duration,
}

impl Default for WarmSpec {
    fn default() -> Self {
        WarmSpec {
            max_concurrency: 8,
            max_tasks_per_job: 1000,
            idle_timeout: Duration::from_secs(120),
            max_job_lifetime: Duration::from_secs(6 * 3600),
        }
    }
}

impl WarmSpec {
    /// What is wrong with these settings, if anything.
    fn problem(&self) -> Option<&'static str> {
        if self.max_concurrency == 0 || self.max_concurrency > 1000 {
            return Some("warm.max_concurrency must be 1 to 1000");
        }
        if self.max_tasks_per_job == 0 {
            return Some("warm.max_tasks_per_job must be at least 1");
        }
        if self.idle_timeout.is_zero() {
            return Some("warm.idle_timeout must be more than zero, e.g. 2m");
        }
        if self.max_job_lifetime.is_zero() {
            return Some("warm.max_job_lifetime must be more than zero, e.g. 6h");
        }
        None
    }

    /// How long a warm executor's job may live, on every runtime (a Job's
    /// `activeDeadlineSeconds`, the local runtime's kill): its `max_job_lifetime`, then
    /// time for the tasks in hand to reach their own deadlines (a quarter more, at least
    /// ten minutes).
    pub fn job_deadline(&self) -> Duration {
        let life = self.max_job_lifetime;
        life.saturating_add((life / 4).max(Duration::from_secs(600)))
    }

    /// The settings as the executor reads them (`GANTRY_WARM`, JSON).
    pub fn executor_env(&self) -> (&'static str, String) {
        // A struct of numbers and durations always serializes.
        (
            "GANTRY_WARM",
            serde_json::to_string(self).unwrap_or_default(),
        )
    }
}

/// A Kubernetes toleration, as written in a pod spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Toleration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `Exists` or `Equal` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`; empty matches all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<i64>,
}

/// Container CPU and memory (requests equal limits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerLimits {
    /// e.g. `"4"` or `"500m"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// e.g. `"32Gi"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

/// Retries of one executor class: attempts, backoff, and which failures are worth another
/// attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never retry).
    pub max_attempts: u32,
    /// Delay before the second attempt; doubled (by `factor`) for each further one.
    #[serde(with = "crate::config::humantime_serde_compat")]
    pub min_delay: Duration,
    #[serde(with = "crate::config::humantime_serde_compat")]
    pub max_delay: Duration,
    pub factor: f32,
    /// Error kinds that are retried. Empty: the result's own `retryable` flag decides.
    pub retryable_kinds: Vec<String>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(600),
            factor: 2.0,
            retryable_kinds: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// Whether a failure of this kind (with this flag from its reporter) deserves a retry.
    pub fn is_retryable(&self, kind: &str, flagged: bool) -> bool {
        if self.retryable_kinds.is_empty() {
            flagged
        } else {
            self.retryable_kinds.iter().any(|k| k == kind)
        }
    }

    /// The delay before attempt `next` (2 for the first retry): exponential with jitter,
    /// between `min_delay` and `max_delay`.
    pub fn delay_before(&self, next: u32) -> Duration {
        use backon::BackoffBuilder;
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor.max(1.0))
            .with_jitter()
            .without_max_times()
            .build();
        let n = next.saturating_sub(2) as usize;
        delays.nth(n).unwrap_or(self.max_delay).min(self.max_delay)
    }
}

fn default_max_active_jobs() -> u32 {
    4
}

/// All executor classes, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    executors: BTreeMap<ExecutorClass, ExecutorSpec>,
}

impl Catalog {
    /// The built-in catalog: one class, `echo`.
    pub fn builtin() -> Catalog {
        let mut executors = BTreeMap::new();
        executors.insert(
            ExecutorClass::parse("echo").expect("\"echo\" is a valid class"),
            ExecutorSpec {
                engine: Engine::Echo,
                max_active_jobs: 8,
                image: None,
                resources: None,
                retry: RetryPolicy::default(),
                node_selector: BTreeMap::new(),
                tolerations: Vec::new(),
                limits: None,
                warm: None,
                celery: None,
            },
        );
        Catalog { executors }
    }

    /// Reads a catalog file, or the built-in catalog when `path` is `None`.
    ///
    /// # Errors
    /// The file cannot be read, is not valid YAML of this shape, or defines a class with no
    /// capacity or an empty command.
    pub fn load(path: Option<&Path>) -> Result<Catalog> {
        let Some(path) = path else {
            return Ok(Catalog::builtin());
        };
        let text = std::fs::read_to_string(path).map_err(|source| Error::CatalogRead {
            path: path.display().to_string(),
            source,
        })?;
        Catalog::parse(&text, &path.display().to_string())
    }

    /// Parses catalog YAML; `origin` names it in errors.
    ///
    /// # Errors
    /// As [`Catalog::load`].
    pub fn parse(text: &str, origin: &str) -> Result<Catalog> {
        let err = |message: String| Error::Catalog {
            origin: origin.to_owned(),
            message,
        };
        let catalog: Catalog = serde_norway::from_str(text).map_err(|e| err(e.to_string()))?;
        if catalog.executors.is_empty() {
            return Err(err("it defines no executor classes".into()));
        }
        for (class, spec) in &catalog.executors {
            if spec.max_active_jobs == 0 {
                return Err(err(format!("{class}: max_active_jobs must be at least 1")));
            }
            if let Some(problem) = spec.warm.as_ref().and_then(WarmSpec::problem) {
                return Err(err(format!("{class}: {problem}")));
            }
            if spec.retry.max_attempts == 0 {
                return Err(err(format!(
                    "{class}: retry.max_attempts must be at least 1"
                )));
            }
            match &spec.engine {
                Engine::Command { command } if command.first().is_none_or(|c| c.is_empty()) => {
                    return Err(err(format!("{class}: command must name a program")));
                }
                Engine::Openai(openai) => {
                    if let Some(problem) = openai.problem() {
                        return Err(err(format!("{class}: {problem}")));
                    }
                }
                Engine::Echo | Engine::Command { .. } => {}
            }
            if let Some(problem) = spec.celery.as_ref().and_then(|c| c.problem()) {
                return Err(err(format!("{class}: {problem}")));
            }
        }
        Ok(catalog)
    }

    /// Checks a task's payload against its class's engine, before any job starts: an
    /// `openai` class takes only an OpenAI-shaped request. Other engines take any payload.
    ///
    /// # Errors
    /// [`crate::message::Rejection::BadPayload`] naming the field; `UnknownExecutor` for a
    /// class this catalog does not have.
    pub fn check_payload(
        &self,
        class: &ExecutorClass,
        payload: &serde_json::Value,
    ) -> std::result::Result<(), crate::message::Rejection> {
        let spec = self
            .get(class)
            .ok_or_else(|| crate::message::Rejection::UnknownExecutor(class.to_string()))?;
        if let Engine::Openai(openai) = &spec.engine {
            crate::llm::LlmRequest::from_payload(payload, &openai.model)?;
        }
        Ok(())
    }

    pub fn get(&self, class: &ExecutorClass) -> Option<&ExecutorSpec> {
        self.executors.get(class)
    }

    pub fn classes(&self) -> Vec<ExecutorClass> {
        self.executors.keys().cloned().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ExecutorClass, &ExecutorSpec)> {
        self.executors.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_and_stay_within_bounds() {
        let p = RetryPolicy {
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            ..RetryPolicy::default()
        };
        let d2 = p.delay_before(2);
        let d5 = p.delay_before(5);
        assert!(
            d2 >= Duration::from_secs(1) && d2 <= Duration::from_secs(2),
            "{d2:?}"
        );
        assert!(d5 >= Duration::from_secs(8), "{d5:?}");
        assert!(p.delay_before(40) <= Duration::from_secs(30));
        assert!(p.is_retryable("oom", true));
        let kinds = RetryPolicy {
            retryable_kinds: vec!["oom".into()],
            ..RetryPolicy::default()
        };
        assert!(kinds.is_retryable("oom", false));
        assert!(!kinds.is_retryable("bad_output", true));
    }

    #[test]
    fn a_catalog_file_parses_and_is_checked() {
        let c = Catalog::parse(
            "executors:\n  sh:\n    engine: { kind: command, command: [sh, -c, cat] }\n    max_active_jobs: 2\n",
            "test",
        )
        .unwrap();
        let sh = ExecutorClass::parse("sh").unwrap();
        assert_eq!(c.get(&sh).unwrap().max_active_jobs, 2);
        assert!(Catalog::parse("executors: {}\n", "t").is_err());
        assert!(Catalog::parse("executors:\n  Bad: { engine: { kind: echo } }\n", "t").is_err());
        assert!(
            Catalog::parse(
                "executors:\n  x: { engine: { kind: command, command: [] } }\n",
                "t"
            )
            .is_err()
        );
        assert!(
            Catalog::parse(
                "executors:\n  x: { engine: { kind: echo }, max_active_jobs: 0 }\n",
                "t"
            )
            .is_err()
        );
    }

    #[test]
    fn an_openai_class_is_checked_and_fills_its_server_command() {
        let c = Catalog::parse(
            "executors:\n  chat:\n    engine: { kind: openai, model: tiny, startup_timeout: 30s }\n",
            "t",
        )
        .unwrap();
        let chat = ExecutorClass::parse("chat").unwrap();
        let Engine::Openai(engine) = &c.get(&chat).unwrap().engine else {
            panic!("not openai");
        };
        assert_eq!(engine.startup_timeout, Duration::from_secs(30));
        assert_eq!(engine.ready_path, "/v1/models");
        assert_eq!(
            engine.server_argv(8123).join(" "),
            "vllm serve tiny --host 127.0.0.1 --port 8123"
        );
        assert!(
            c.check_payload(&chat, &serde_json::json!({"prompt": "x"}))
                .is_ok()
        );
        let bad = c
            .check_payload(&chat, &serde_json::json!({"prompt": 1}))
            .unwrap_err();
        assert!(bad.to_string().contains("payload.prompt"), "{bad}");

        for (engine, expected) in [
            ("{ kind: openai, model: \"\" }", "engine.model"),
            (
                "{ kind: openai, model: m, server: [x, \"{port}\"], endpoint: \"http://a:1\" }",
                "both",
            ),
            ("{ kind: openai, model: m, server: [x] }", "{port}"),
            (
                "{ kind: openai, model: m, endpoint: \"https://a\" }",
                "http://host:port",
            ),
            (
                "{ kind: openai, model: m, ready_path: health }",
                "ready_path",
            ),
            (
                "{ kind: openai, model: m, startup_timeout: 0s }",
                "startup_timeout",
            ),
            ("{ kind: openai, model: m, modle: x }", "modle"),
        ] {
            let text = format!("executors:\n  c:\n    engine: {engine}\n");
            let e = Catalog::parse(&text, "t").unwrap_err().to_string();
            assert!(e.contains(expected), "{engine}: {e}");
        }
    }

    #[test]
    fn a_warm_executors_job_outlives_its_lifetime_by_a_quarter_or_ten_minutes() {
        let warm = |life: u64| WarmSpec {
            max_job_lifetime: Duration::from_secs(life),
            ..WarmSpec::default()
        };
        assert_eq!(
            warm(6 * 3600).job_deadline(),
            Duration::from_secs(7 * 3600 + 1800)
        );
        assert_eq!(warm(60).job_deadline(), Duration::from_secs(660));
    }
}
