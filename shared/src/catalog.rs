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
            if spec.retry.max_attempts == 0 {
                return Err(err(format!(
                    "{class}: retry.max_attempts must be at least 1"
                )));
            }
            if let Engine::Command { command } = &spec.engine
                && command.first().is_none_or(|c| c.is_empty())
            {
                return Err(err(format!("{class}: command must name a program")));
            }
        }
        Ok(catalog)
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
}
