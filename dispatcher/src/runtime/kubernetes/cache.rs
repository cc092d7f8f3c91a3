//! The runtime's watch cache: Gantry's Jobs and their Pods (one watch each, by the
//! `managed-by` label), held by Job name as small views of the fields the runtime reads
//! ([`JobView`], [`PodView`]; a `Pod` struct alone is over 2 KiB before any of its data),
//! so that ten thousand active Jobs cost little memory, finding a Job's pod costs one
//! lookup, and a change wakes only the waiters of the Job it concerns.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use gantry_shared::message::{Attempt, TaskId};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The labels naming a pod's Job (the second one since Kubernetes 1.27).
const JOB_NAME_LABELS: [&str; 2] = ["job-name", "batch.kubernetes.io/job-name"];

use super::job::keys;

/// What the runtime reads of a Job.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct JobView {
    pub(crate) task_id: Option<TaskId>,
    pub(crate) attempt: Option<Attempt>,
    pub(crate) executor: String,
    /// A warm executor's Job (label `gantry.dev/warm`): no task, no attempt.
    pub(crate) warm: bool,
    pub(crate) created: Option<DateTime<Utc>>,
    /// Why it finished: `Complete`, or the reason of its `Failed` condition.
    pub(crate) finished: Option<String>,
}

impl JobView {
    fn of(job: &Job) -> JobView {
        let label = |k: &str| job.metadata.labels.as_ref()?.get(k);
        let finished = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|conditions| {
                conditions
                    .iter()
                    .find_map(|c| match (c.type_.as_str(), c.status.as_str()) {
                        ("Complete", "True") => Some("Complete".to_owned()),
                        ("Failed", "True") => {
                            Some(c.reason.clone().unwrap_or_else(|| "Failed".into()))
                        }
                        _ => None,
                    })
            });
        JobView {
            task_id: label(keys::TASK_ID).and_then(|t| t.parse().ok()),
            attempt: label(keys::ATTEMPT)
                .and_then(|a| a.parse().ok())
                .and_then(Attempt::new),
            executor: label(keys::EXECUTOR).cloned().unwrap_or_default(),
            warm: label(keys::WARM).is_some_and(|w| w == "true"),
            created: job.metadata.creation_timestamp.as_ref().map(to_chrono),
            finished,
        }
    }
}

/// What the runtime reads of a Pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PodView {
    pub(crate) name: String,
    pub(crate) node: Option<String>,
    pub(crate) phase: Option<String>,
    /// The pod's own reason (`Evicted`, `NodeLost`) and message.
    pub(crate) reason: Option<String>,
    pub(crate) message: Option<String>,
    pub(crate) created: Option<DateTime<Utc>>,
    pub(crate) started: Option<DateTime<Utc>>,
    /// The first waiting reason among its containers (`ErrImagePull`, …).
    pub(crate) waiting: Option<String>,
    /// How its first container ended, if it did.
    pub(crate) terminated: Option<Terminated>,
    /// A `DisruptionTarget` condition is true (evicted, preempted, its node drained).
    pub(crate) disrupted: bool,
    /// `PodScheduled` is false with reason `Unschedulable`.
    pub(crate) unschedulable: bool,
}

/// How a container ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Terminated {
    pub(crate) reason: Option<String>,
    pub(crate) exit_code: i32,
    pub(crate) message: Option<String>,
}

impl PodView {
    /// Whether the pod has said how it ended: a final phase, or a terminated container.
    pub(crate) fn ended(&self) -> bool {
        self.terminated.is_some() || matches!(self.phase.as_deref(), Some("Failed" | "Succeeded"))
    }

    fn of(pod: &Pod) -> PodView {
        let status = pod.status.as_ref();
        let containers = status
            .and_then(|s| s.container_statuses.as_deref())
            .unwrap_or_default();
        let conditions = status
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default();
        PodView {
            name: pod.metadata.name.clone().unwrap_or_default(),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            phase: status.and_then(|s| s.phase.clone()),
            reason: status.and_then(|s| s.reason.clone()),
            message: status.and_then(|s| s.message.clone()),
            created: pod.metadata.creation_timestamp.as_ref().map(to_chrono),
            started: status.and_then(|s| s.start_time.as_ref()).map(to_chrono),
            waiting: containers
                .iter()
                .find_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone()),
            terminated: containers
                .first()
                .and_then(|c| c.state.as_ref()?.terminated.as_ref())
                .map(|t| Terminated {
                    reason: t.reason.clone(),
                    exit_code: t.exit_code,
                    message: t.message.clone(),
                }),
            disrupted: conditions
                .iter()
                .any(|c| c.type_ == "DisruptionTarget" && c.status == "True"),
            unschedulable: conditions.iter().any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            }),
        }
    }
}

/// A Kubernetes timestamp as chrono's.
pub(crate) fn to_chrono(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> DateTime<Utc> {
    let nanos = u32::try_from(t.0.subsec_nanosecond()).unwrap_or(0);
    DateTime::from_timestamp(t.0.as_second(), nanos).unwrap_or_else(Utc::now)
}

#[derive(Default)]
struct State {
    jobs: HashMap<String, Arc<JobView>>,
    /// Pods by Job name, then by pod name.
    pods: HashMap<String, HashMap<String, Arc<PodView>>>,
    /// Who waits for changes of a Job, by Job name.
    waiters: HashMap<String, watch::Sender<u64>>,
}

impl State {
    fn notify(&mut self, job: &str) {
        if let Some(tx) = self.waiters.get(job) {
            if tx.receiver_count() == 0 {
                self.waiters.remove(job);
            } else {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    fn notify_all(&mut self) {
        self.waiters.retain(|_, tx| tx.receiver_count() > 0);
        for tx in self.waiters.values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// Jobs and Pods in one namespace, kept current by two watches until shutdown.
pub(crate) struct JobCache {
    state: RwLock<State>,
    /// Whether the Jobs, and the Pods, have been listed once.
    listed: watch::Sender<(bool, bool)>,
}

impl JobCache {
    /// Starts watching the Jobs and Pods matching `selector` in `namespace`.
    pub(crate) fn start(
        client: &Client,
        namespace: &str,
        selector: &str,
        shutdown: &CancellationToken,
    ) -> Arc<JobCache> {
        let cache = Arc::new(JobCache {
            state: RwLock::new(State::default()),
            listed: watch::channel((false, false)).0,
        });
        let c = cache.clone();
        spawn_watch(
            Api::<Job>::namespaced(client.clone(), namespace),
            selector,
            shutdown.clone(),
            |job: Job| {
                (
                    job.metadata.name.clone().unwrap_or_default(),
                    JobView::of(&job),
                )
            },
            move |e| c.on_job(e),
        );
        let c = cache.clone();
        spawn_watch(
            Api::<Pod>::namespaced(client.clone(), namespace),
            selector,
            shutdown.clone(),
            |pod: Pod| Some((job_name_of(&pod)?, PodView::of(&pod))),
            move |e| c.on_pod(e),
        );
        cache
    }

    /// Waits until both watches have listed their objects once.
    pub(crate) async fn wait_until_listed(&self) {
        let mut listed = self.listed.subscribe();
        let _ = listed.wait_for(|(jobs, pods)| *jobs && *pods).await;
    }

    /// The Job named `name`.
    pub(crate) fn job(&self, name: &str) -> Option<Arc<JobView>> {
        self.read().jobs.get(name).cloned()
    }

    /// Every Job, with its name.
    pub(crate) fn jobs(&self) -> Vec<(String, Arc<JobView>)> {
        self.read()
            .jobs
            .iter()
            .map(|(name, job)| (name.clone(), job.clone()))
            .collect()
    }

    /// The newest pod of the Job named `job`.
    pub(crate) fn pod_of(&self, job: &str) -> Option<Arc<PodView>> {
        self.read()
            .pods
            .get(job)?
            .values()
            .max_by_key(|p| p.created)
            .cloned()
    }

    /// A receiver that changes whenever the Job named `job` or one of its pods does (and
    /// after a watch lists everything again).
    pub(crate) fn subscribe(&self, job: &str) -> watch::Receiver<u64> {
        let mut state = self.write();
        if let Some(tx) = state.waiters.get(job) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(0);
        state.waiters.insert(job.to_owned(), tx);
        rx
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn on_job(&self, event: Update<(String, JobView)>) {
        let mut state = self.write();
        match event {
            Update::Apply((name, job)) => {
                state.jobs.insert(name.clone(), Arc::new(job));
                state.notify(&name);
            }
            Update::Delete((name, _)) => {
                state.jobs.remove(&name);
                state.notify(&name);
            }
            Update::Listed(jobs) => {
                state.jobs = jobs
                    .into_iter()
                    .map(|(name, job)| (name, Arc::new(job)))
                    .collect();
                state.notify_all();
                drop(state);
                self.listed.send_modify(|l| l.0 = true);
            }
        }
    }

    fn on_pod(&self, event: Update<Option<(String, PodView)>>) {
        let mut state = self.write();
        match event {
            Update::Apply(pod) => {
                let Some((job, pod)) = pod else {
                    return;
                };
                state
                    .pods
                    .entry(job.clone())
                    .or_default()
                    .insert(pod.name.clone(), Arc::new(pod));
                state.notify(&job);
            }
            Update::Delete(pod) => {
                let Some((job, pod)) = pod else {
                    return;
                };
                if let Some(pods) = state.pods.get_mut(&job) {
                    pods.remove(&pod.name);
                    if pods.is_empty() {
                        state.pods.remove(&job);
                    }
                }
                state.notify(&job);
            }
            Update::Listed(pods) => {
                let mut by_job: HashMap<String, HashMap<String, Arc<PodView>>> = HashMap::new();
                for (job, pod) in pods.into_iter().flatten() {
                    by_job
                        .entry(job)
                        .or_default()
                        .insert(pod.name.clone(), Arc::new(pod));
                }
                state.pods = by_job;
                state.notify_all();
                drop(state);
                self.listed.send_modify(|l| l.1 = true);
            }
        }
    }
}

/// A change the watch saw: one object, or a complete listing (at start and after a watch
/// had to list again).
enum Update<K> {
    Apply(K),
    Delete(K),
    Listed(Vec<K>),
}

/// Watches the objects `api` lists with `selector`, handing `on_update` the `view` of each
/// (made as each arrives, so a listing never holds whole objects).
fn spawn_watch<K, V>(
    api: Api<K>,
    selector: &str,
    shutdown: CancellationToken,
    view: impl Fn(K) -> V + Send + 'static,
    on_update: impl Fn(Update<V>) + Send + 'static,
) where
    K: kube::Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + 'static,
    V: Send + 'static,
{
    let stream = watcher(api, watcher::Config::default().labels(selector)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut listing = Vec::new();
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = stream.next() => event,
            };
            match event {
                Some(Ok(watcher::Event::Apply(o))) => on_update(Update::Apply(view(o))),
                Some(Ok(watcher::Event::Delete(o))) => on_update(Update::Delete(view(o))),
                Some(Ok(watcher::Event::Init)) => listing.clear(),
                Some(Ok(watcher::Event::InitApply(o))) => listing.push(view(o)),
                Some(Ok(watcher::Event::InitDone)) => {
                    on_update(Update::Listed(std::mem::take(&mut listing)));
                }
                Some(Err(e)) => {
                    warn!(kind = %K::kind(&()), error = %e, "watch failed; it lists again and restarts with backoff");
                }
                None => return,
            }
        }
    });
}

fn job_name_of(pod: &Pod) -> Option<String> {
    let labels = pod.metadata.labels.as_ref()?;
    JOB_NAME_LABELS.iter().find_map(|k| labels.get(*k).cloned())
}
