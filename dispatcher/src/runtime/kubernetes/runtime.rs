//! The `kubernetes` runtime: creates each attempt's Job, and each warm executor's, through
//! [`JobClient`] and follows Jobs and Pods through one watch each (by the `managed-by:
//! gantry` label) into a cache, instead of polling per task. A Job that ends without a
//! result from its executor is mapped to the failure a result must carry (for a warm
//! executor's Job, of each task it still held):
//!
//! | what the cluster says | status | error kind | retryable |
//! |---|---|---|---|
//! | Job `Failed`, reason `DeadlineExceeded` | expired | `deadline_exceeded` | no |
//! | container terminated `OOMKilled` | failed | `oom` | no |
//! | `ErrImagePull` / `ImagePullBackOff` past `image_pull_limit` (Job deleted) | failed | `image_pull` | no |
//! | Pending and unschedulable past `unschedulable_limit` (Job deleted) | failed | `unschedulable` | yes |
//! | pod `Evicted`, `DisruptionTarget`, `NodeLost` | failed | `evicted` / `node_lost` | yes |
//! | any other failed container | failed | `executor_crashed` | yes |
//!
//! A Job that is `Complete` had an executor that exited 0, which it does only once its result
//! is published.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use gantry_shared::catalog::{ExecutorSpec, WarmSpec};
use gantry_shared::config::Config;
use gantry_shared::message::{Attempt, ErrorKind, Evidence, ExecutorClass, JobName, Task, TaskId};
use kube::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use super::cache::{JobCache, PodView, to_chrono};
use super::client::{Created, JobClient};
use super::job::{self, keys};
use crate::images::Resolver;
use crate::metrics::ApiCalls;
use crate::runtime::{End, Job, JobEnd, Runtime};
use crate::settings::KubernetesSection;
use crate::{Error, Result};

/// One Job as the runtime follows it: a task attempt's, or a warm executor's (then
/// `task_id` is nil and `attempt` is 1, as on the local runtime: its tasks are the
/// dispatcher's to know).
#[derive(Debug, Clone)]
pub(crate) struct KubeJob {
    pub(crate) name: JobName,
    pub(crate) task_id: TaskId,
    pub(crate) attempt: Attempt,
    pub(crate) executor: String,
    pub(crate) created_at: DateTime<Utc>,
}

/// How long after its creation a Job may be missing from the cache before it is taken as
/// deleted from outside (a new Job reaches the cache within the watch's latency).
const VANISHED: chrono::Duration = chrono::Duration::seconds(30);
/// How long a failed Job's end waits for its pod's last status (see [`KubeRuntime::wait`]).
const POD_SETTLE: Duration = Duration::from_secs(5);
/// The longest a follower sleeps without a change: a guard against a missed wake.
const SAFETY_WAKE: Duration = Duration::from_secs(60);

/// The runtime: an API client and the watch caches.
pub(crate) struct KubeRuntime {
    client: JobClient,
    namespace: String,
    prefix: String,
    /// Where its executors export their spans.
    otlp_endpoint: Option<String>,
    settings: KubernetesSection,
    cache: Arc<JobCache>,
    images: Resolver,
    /// `k8s-<namespace>`: the prefix of this runtime's dispatch ids.
    instance: String,
}

impl KubeRuntime {
    /// Starts the watches through `client` and waits for their first listing, and the image
    /// resolver; its API calls are counted in `api`.
    ///
    /// # Errors
    /// The API server cannot be listed, or the image settings cannot be served.
    pub(crate) async fn open(
        client: Client,
        settings: &KubernetesSection,
        common: &Config,
        shutdown: CancellationToken,
        api: ApiCalls,
    ) -> Result<KubeRuntime> {
        let images = Resolver::open(settings, &client, shutdown.clone()).await?;
        let namespace = settings
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let selector = format!("{}=gantry", keys::MANAGED_BY);
        let cache = JobCache::start(&client, &namespace, &selector, &shutdown);
        if tokio::time::timeout(Duration::from_secs(60), cache.wait_until_listed())
            .await
            .is_err()
        {
            return Err(Error::Job {
                job: "watch".into(),
                message: format!(
                    "cannot list Jobs and Pods in namespace {namespace} within a minute; check the API server and RBAC (list/watch jobs and pods)"
                ),
            });
        }
        info!(%namespace, jobs = cache.jobs().len(), "kubernetes runtime watching");
        Ok(KubeRuntime {
            client: JobClient::new(
                client,
                Some(&namespace),
                settings.writes_per_second,
                settings.write_burst,
            )
            .with_metrics(api),
            instance: format!("k8s-{namespace}"),
            namespace,
            prefix: common.prefix.clone(),
            otlp_endpoint: common.otlp_endpoint.clone(),
            settings: settings.clone(),
            cache,
            images,
        })
    }

    /// The namespace of its Jobs.
    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Deletes a Job (and with it its pod and Secret).
    pub(crate) async fn delete(&self, name: &JobName) -> Result<()> {
        self.client
            .delete(name.as_str())
            .await
            .map_err(|e| Error::Job {
                job: name.to_string(),
                message: gantry_shared::telemetry::chain(&e),
            })
    }

    /// Sleeps until the Job or its pod changes, or until the next limit that can pass
    /// without a change (the image pull and unschedulable limits, the time a Job may be
    /// missing from the cache) has passed. A wake per change, not a poll: with thousands of
    /// Jobs running, a poll each second would cost thousands of wakes a second.
    async fn until_change_or_limit(&self, job: &KubeJob, changed: &mut watch::Receiver<u64>) {
        let age = (Utc::now() - job.created_at).to_std().unwrap_or_default();
        let limits = [
            self.settings.image_pull_limit,
            self.settings.unschedulable_limit,
            VANISHED.to_std().unwrap_or_default(),
        ];
        // Just past the limit, so the check after the wake finds it passed.
        let next = limits
            .into_iter()
            .filter(|limit| *limit >= age)
            .map(|limit| limit - age + Duration::from_millis(50))
            .min()
            .unwrap_or(SAFETY_WAKE)
            .min(SAFETY_WAKE);
        let _ = tokio::time::timeout(next, changed.changed()).await;
    }

    fn pod_of(&self, name: &JobName) -> Option<Arc<PodView>> {
        self.cache.pod_of(name.as_str())
    }

    /// A pending job past one of its limits.
    fn stuck(&self, job: &KubeJob, pod: Option<&PodView>) -> Option<(End, String)> {
        let pod = pod?;
        if pod.phase.as_deref() != Some("Pending") {
            return None;
        }
        let age = (Utc::now() - job.created_at).to_std().unwrap_or_default();
        let waiting = pod.waiting.clone();
        if matches!(
            waiting.as_deref(),
            Some("ErrImagePull" | "ImagePullBackOff" | "InvalidImageName")
        ) && age > self.settings.image_pull_limit
        {
            return Some((
                End::Failure {
                    kind: ErrorKind::ImagePull,
                    retryable: false,
                    reason: "ImagePullBackOff",
                },
                format!(
                    "the image could not be pulled for {} ({})",
                    humantime::format_duration(self.settings.image_pull_limit),
                    waiting.unwrap_or_default()
                ),
            ));
        }
        if pod.unschedulable && age > self.settings.unschedulable_limit {
            return Some((
                End::Failure {
                    kind: ErrorKind::Unschedulable,
                    retryable: true,
                    reason: "Unschedulable",
                },
                format!(
                    "no node could take the pod for {}",
                    humantime::format_duration(self.settings.unschedulable_limit)
                ),
            ));
        }
        None
    }
}

impl Runtime for KubeRuntime {
    type Job = KubeJob;

    fn instance(&self) -> &str {
        &self.instance
    }

    /// The spec of the task's class with its resolved, checked image.
    async fn resolve_image(&self, task: &Task, spec: &ExecutorSpec) -> Result<ExecutorSpec> {
        self.images.resolve(task, spec).await
    }

    fn admit(&self, task: &Task, spec: &ExecutorSpec) -> Result<()> {
        job::admit(task, spec).map_err(|e| Error::Unrunnable {
            task: task.id.to_string(),
            reason: e.to_string(),
        })
    }

    /// Creates the warm executor's Job (`spec` has its resolved image: the hand-off that
    /// starts it resolved it for its task). No Secret: its tasks come over `queue`.
    #[instrument(skip_all, fields(job_name = %name))]
    async fn start_warm(
        &self,
        name: &JobName,
        class: &ExecutorClass,
        spec: &ExecutorSpec,
        warm: &WarmSpec,
        queue: &str,
    ) -> Result<KubeJob> {
        let target = job::Target {
            namespace: &self.namespace,
            prefix: &self.prefix,
            otlp_endpoint: self.otlp_endpoint.as_deref(),
        };
        let job_err = |message: String| Error::Job {
            job: name.to_string(),
            message,
        };
        let job = job::build_warm(name, class, spec, warm, &self.settings, &target, queue)
            .map_err(|e| job_err(e.to_string()))?;
        let created = self
            .client
            .create_job(&job)
            .await
            .map_err(|e| job_err(gantry_shared::telemetry::chain(&e)))?;
        Ok(KubeJob {
            name: name.clone(),
            task_id: TaskId::from(uuid::Uuid::nil()),
            attempt: Attempt::FIRST,
            executor: class.to_string(),
            created_at: created_at(&created),
        })
    }

    /// Creates the attempt's Job (or finds it); whether it existed.
    async fn start(
        &self,
        task: &Task,
        spec: &ExecutorSpec,
        dispatch_id: &str,
    ) -> Result<(KubeJob, bool)> {
        let target = job::Target {
            namespace: &self.namespace,
            prefix: &self.prefix,
            otlp_endpoint: self.otlp_endpoint.as_deref(),
        };
        let (job, secret) =
            job::build(task, spec, &self.settings, &target, dispatch_id, Utc::now()).map_err(
                |e| match e {
                    job::BuildError::TooManyGpus { .. } => Error::Unrunnable {
                        task: task.id.to_string(),
                        reason: e.to_string(),
                    },
                    e => Error::Job {
                        job: task.id.to_string(),
                        message: e.to_string(),
                    },
                },
            )?;
        let created = self
            .client
            .create(&job, secret)
            .await
            .map_err(|e| Error::Job {
                job: task.id.to_string(),
                message: gantry_shared::telemetry::chain(&e),
            })?;
        let existed = matches!(created, Created::Existing(_));
        let created_at = created_at(&created);
        Ok((
            KubeJob {
                name: JobName::for_task(task.id, task.attempt),
                task_id: task.id,
                attempt: task.attempt,
                executor: task.executor.to_string(),
                created_at,
            },
            existed,
        ))
    }

    /// Completes the creation of the attempt's Job when it exists but may lack its Secret
    /// (a dispatcher stopped between the two writes): while the Job has not finished and
    /// its pod has not started, the Secret is created unless it exists. The Job itself is
    /// never created here.
    async fn complete(&self, task: &Task, spec: &ExecutorSpec) -> Result<()> {
        let name = JobName::for_task(task.id, task.attempt);
        let Some(existing) = self.cache.job(name.as_str()) else {
            return Ok(());
        };
        let started = self
            .pod_of(&name)
            .is_some_and(|p| p.phase.as_deref() != Some("Pending"));
        if existing.finished.is_some() || started {
            return Ok(());
        }
        let target = job::Target {
            namespace: &self.namespace,
            prefix: &self.prefix,
            otlp_endpoint: self.otlp_endpoint.as_deref(),
        };
        let (_, secret) =
            job::build(task, spec, &self.settings, &target, "", Utc::now()).map_err(|e| {
                Error::Job {
                    job: name.to_string(),
                    message: e.to_string(),
                }
            })?;
        self.client
            .complete(name.as_str(), secret)
            .await
            .map_err(|e| Error::Job {
                job: name.to_string(),
                message: gantry_shared::telemetry::chain(&e),
            })
    }

    /// The evidence of a job so far: its pod and node once scheduled.
    fn evidence(&self, name: &JobName) -> Evidence {
        let pod = self.pod_of(name);
        Evidence {
            job_name: Some(name.to_string()),
            pod_name: pod.as_ref().map(|p| p.name.clone()),
            node: pod.as_ref().and_then(|p| p.node.clone()),
            ..Evidence::default()
        }
    }

    /// A pod runs when the cluster says so: see [`Runtime::running`].
    fn runs_at_start(&self) -> bool {
        false
    }

    /// Waits until the job's pod runs; its evidence and start time. `None` if the job ended
    /// (or vanished) first.
    async fn running(&self, job: &KubeJob) -> Option<(Evidence, Option<DateTime<Utc>>)> {
        let mut changed = self.cache.subscribe(job.name.as_str());
        loop {
            if let Some(pod) = self.pod_of(&job.name) {
                if matches!(
                    pod.phase.as_deref(),
                    Some("Running" | "Succeeded" | "Failed")
                ) {
                    return Some((self.evidence(&job.name), pod.started));
                }
                // A pod stuck pending never runs: `wait` ends it.
                if self.stuck(job, Some(&pod)).is_some() {
                    return None;
                }
            }
            match self.cache.job(job.name.as_str()) {
                Some(j) if j.finished.is_some() => return None,
                None if Utc::now() - job.created_at > VANISHED => return None,
                _ => {}
            }
            self.until_change_or_limit(job, &mut changed).await;
        }
    }

    /// Waits for the job to end and says how. Jobs stuck pulling their image or waiting for
    /// a node past their limits are deleted and end as failures.
    async fn wait(&self, job: KubeJob) -> JobEnd {
        let job = &job;
        let mut changed = self.cache.subscribe(job.name.as_str());
        // When the Job was first seen failed while its pod had not yet said how it ended.
        let mut failed_seen: Option<std::time::Instant> = None;
        loop {
            let evidence = self.evidence(&job.name);
            let end = |end: End, exit: String| JobEnd {
                task_id: job.task_id,
                attempt: job.attempt,
                job_name: job.name.clone(),
                end,
                exit,
                log_tail: String::new(),
                evidence: evidence.clone(),
            };
            let pod = self.pod_of(&job.name);
            match self.cache.job(job.name.as_str()) {
                Some(k8s_job) => {
                    if let Some(reason) = k8s_job.finished.as_deref() {
                        // Jobs and Pods come through separate watches, so a Job can be seen
                        // failed before its pod's last status (OOMKilled, evicted) arrives:
                        // give the pod a moment to say how it ended.
                        let pod_told = pod.as_deref().is_none_or(PodView::ended);
                        let since = *failed_seen.get_or_insert_with(std::time::Instant::now);
                        if pod_told
                            || matches!(reason, "Complete" | "DeadlineExceeded")
                            || since.elapsed() >= POD_SETTLE
                        {
                            let (end_kind, exit) = classify(reason, pod.as_deref());
                            return end(end_kind, exit);
                        }
                        let _ = tokio::time::timeout(
                            POD_SETTLE.saturating_sub(since.elapsed()),
                            changed.changed(),
                        )
                        .await;
                        continue;
                    }
                    if let Some((end_kind, exit)) = self.stuck(job, pod.as_deref()) {
                        warn!(job = %job.name, %exit, "job is stuck; deleting it");
                        // Boxed: a wait lives as long as its Job, a delete is rare.
                        if let Err(e) = Box::pin(self.delete(&job.name)).await {
                            warn!(job = %job.name, error = %e, "cannot delete the stuck job");
                        }
                        return end(end_kind, exit);
                    }
                }
                None if Utc::now() - job.created_at > VANISHED => {
                    return end(
                        End::Crashed,
                        "the Job disappeared before it finished (deleted from outside?)".into(),
                    );
                }
                None => {}
            }
            self.until_change_or_limit(job, &mut changed).await;
        }
    }

    /// Deletes the Job of a cancelled task (and with it its pod and Secret).
    async fn cancel(&self, name: &JobName) -> Result<()> {
        self.delete(name).await
    }

    /// Jobs in the cache, task Jobs and warm executors' alike, with whether they still
    /// run: for adoption at start.
    fn scan(&self) -> Result<Vec<(KubeJob, bool)>> {
        Ok(self
            .cache
            .jobs()
            .into_iter()
            .filter_map(|(name, job)| {
                let (name, task_id, attempt) = if job.warm {
                    let name = JobName::recorded(&name);
                    name.is_warm()
                        .then(|| (name, TaskId::from(uuid::Uuid::nil()), Attempt::FIRST))?
                } else {
                    let (task_id, attempt) = (job.task_id?, job.attempt?);
                    (JobName::for_task(task_id, attempt), task_id, attempt)
                };
                Some((
                    KubeJob {
                        name,
                        task_id,
                        attempt,
                        executor: job.executor.clone(),
                        created_at: job.created.unwrap_or_else(Utc::now),
                    },
                    job.finished.is_none(),
                ))
            })
            .collect())
    }

    /// Whether the cache knows the Job.
    fn knows(&self, name: &JobName) -> bool {
        self.cache.job(name.as_str()).is_some()
    }
}

impl Job for KubeJob {
    fn name(&self) -> &JobName {
        &self.name
    }

    fn task_id(&self) -> TaskId {
        self.task_id
    }

    fn attempt(&self) -> Attempt {
        self.attempt
    }

    fn executor(&self) -> &str {
        &self.executor
    }

    fn created_at(&self) -> Option<DateTime<Utc>> {
        Some(self.created_at)
    }
}

/// When the API server says it created the Job.
fn created_at(created: &Created) -> DateTime<Utc> {
    created
        .metadata()
        .creation_timestamp
        .as_ref()
        .map_or_else(Utc::now, to_chrono)
}

/// The end of a finished Job, from its reason and its pod.
fn classify(reason: &str, pod: Option<&PodView>) -> (End, String) {
    if reason == "Complete" {
        return (End::Published, "completed".into());
    }
    if reason == "DeadlineExceeded" {
        return (End::Deadline, "activeDeadlineSeconds passed".into());
    }
    let pod_reason = pod.and_then(|p| p.reason.clone()).unwrap_or_default();
    let disrupted = pod.is_some_and(|p| p.disrupted);
    let terminated = pod.and_then(|p| p.terminated.as_ref());
    if terminated.and_then(|t| t.reason.as_deref()) == Some("OOMKilled") {
        return (
            End::Failure {
                kind: ErrorKind::Oom,
                retryable: false,
                reason: "OOMKilled",
            },
            "the container ran out of memory (OOMKilled)".into(),
        );
    }
    if pod_reason == "Evicted" || disrupted {
        return (
            End::Failure {
                kind: ErrorKind::Evicted,
                retryable: true,
                reason: "Evicted",
            },
            format!(
                "the pod was evicted ({})",
                pod.and_then(|p| p.message.clone()).unwrap_or(pod_reason)
            ),
        );
    }
    if pod_reason == "NodeLost" {
        return (
            End::Failure {
                kind: ErrorKind::NodeLost,
                retryable: true,
                reason: "NodeLost",
            },
            "the pod's node was lost".into(),
        );
    }
    let exit = match terminated {
        Some(t) => {
            let mut s = format!("exit code {}", t.exit_code);
            if let Some(m) = t.message.as_deref().filter(|m| !m.is_empty()) {
                s.push_str(": ");
                s.push_str(m.trim());
            }
            s
        }
        None => format!("the Job failed ({reason})"),
    };
    (End::Crashed, exit)
}
