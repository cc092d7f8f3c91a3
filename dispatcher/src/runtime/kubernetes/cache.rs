//! The runtime's watch cache: Gantry's Jobs and their Pods (one watch each, by the
//! `managed-by` label), held by Job name and pruned to the fields the runtime reads, so
//! that ten thousand active Jobs cost little memory, finding a Job's pod costs one lookup,
//! and a change wakes only the waiters of the Job it concerns.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::{Job, JobStatus};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The labels naming a pod's Job (the second one since Kubernetes 1.27).
const JOB_NAME_LABELS: [&str; 2] = ["job-name", "batch.kubernetes.io/job-name"];

#[derive(Default)]
struct State {
    jobs: HashMap<String, Arc<Job>>,
    /// Pods by Job name, then by pod name.
    pods: HashMap<String, HashMap<String, Arc<Pod>>>,
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
            move |e| c.on_job(e),
        );
        let c = cache.clone();
        spawn_watch(
            Api::<Pod>::namespaced(client.clone(), namespace),
            selector,
            shutdown.clone(),
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
    pub(crate) fn job(&self, name: &str) -> Option<Arc<Job>> {
        self.read().jobs.get(name).cloned()
    }

    /// Every Job.
    pub(crate) fn jobs(&self) -> Vec<Arc<Job>> {
        self.read().jobs.values().cloned().collect()
    }

    /// The newest pod of the Job named `job`.
    pub(crate) fn pod_of(&self, job: &str) -> Option<Arc<Pod>> {
        self.read()
            .pods
            .get(job)?
            .values()
            .max_by_key(|p| p.metadata.creation_timestamp.clone())
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

    fn on_job(&self, event: Update<Job>) {
        let mut state = self.write();
        match event {
            Update::Apply(job) => {
                let job = prune_job(job);
                let name = job.metadata.name.clone().unwrap_or_default();
                state.jobs.insert(name.clone(), Arc::new(job));
                state.notify(&name);
            }
            Update::Delete(job) => {
                let name = job.metadata.name.unwrap_or_default();
                state.jobs.remove(&name);
                state.notify(&name);
            }
            Update::Listed(jobs) => {
                state.jobs = jobs
                    .into_iter()
                    .map(|j| {
                        let j = prune_job(j);
                        (j.metadata.name.clone().unwrap_or_default(), Arc::new(j))
                    })
                    .collect();
                state.notify_all();
                drop(state);
                self.listed.send_modify(|l| l.0 = true);
            }
        }
    }

    fn on_pod(&self, event: Update<Pod>) {
        let mut state = self.write();
        match event {
            Update::Apply(pod) => {
                let Some(job) = job_name_of(&pod) else {
                    return;
                };
                let pod = prune_pod(pod);
                let name = pod.metadata.name.clone().unwrap_or_default();
                state
                    .pods
                    .entry(job.clone())
                    .or_default()
                    .insert(name, Arc::new(pod));
                state.notify(&job);
            }
            Update::Delete(pod) => {
                let Some(job) = job_name_of(&pod) else {
                    return;
                };
                let name = pod.metadata.name.unwrap_or_default();
                if let Some(pods) = state.pods.get_mut(&job) {
                    pods.remove(&name);
                    if pods.is_empty() {
                        state.pods.remove(&job);
                    }
                }
                state.notify(&job);
            }
            Update::Listed(pods) => {
                let mut by_job: HashMap<String, HashMap<String, Arc<Pod>>> = HashMap::new();
                for pod in pods {
                    let Some(job) = job_name_of(&pod) else {
                        continue;
                    };
                    let pod = prune_pod(pod);
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    by_job.entry(job).or_default().insert(name, Arc::new(pod));
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

fn spawn_watch<K>(
    api: Api<K>,
    selector: &str,
    shutdown: CancellationToken,
    on_update: impl Fn(Update<K>) + Send + 'static,
) where
    K: kube::Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + 'static,
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
                Some(Ok(watcher::Event::Apply(o))) => on_update(Update::Apply(o)),
                Some(Ok(watcher::Event::Delete(o))) => on_update(Update::Delete(o)),
                Some(Ok(watcher::Event::Init)) => listing.clear(),
                Some(Ok(watcher::Event::InitApply(o))) => listing.push(o),
                Some(Ok(watcher::Event::InitDone)) => {
                    on_update(Update::Listed(std::mem::take(&mut listing)));
                }
                Some(Err(e)) => warn!(error = %e, "watch failed; it restarts with backoff"),
                None => return,
            }
        }
    });
}

fn job_name_of(pod: &Pod) -> Option<String> {
    let labels = pod.metadata.labels.as_ref()?;
    JOB_NAME_LABELS.iter().find_map(|k| labels.get(*k).cloned())
}

/// What the runtime reads of an object's metadata: name, namespace, uid, labels, creation.
fn prune_meta(meta: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        labels: meta.labels,
        creation_timestamp: meta.creation_timestamp,
        ..ObjectMeta::default()
    }
}

/// What the runtime reads of a Job: its metadata and conditions (not its pod template).
fn prune_job(job: Job) -> Job {
    Job {
        metadata: prune_meta(job.metadata),
        spec: None,
        status: job.status.map(|s| JobStatus {
            conditions: s.conditions,
            ..JobStatus::default()
        }),
    }
}

/// What the runtime reads of a Pod: its node, phase, reason, conditions, containers'
/// states and start time.
fn prune_pod(pod: Pod) -> Pod {
    Pod {
        metadata: prune_meta(pod.metadata),
        spec: pod.spec.map(|s| PodSpec {
            node_name: s.node_name,
            ..PodSpec::default()
        }),
        status: pod.status.map(|s| PodStatus {
            phase: s.phase,
            reason: s.reason,
            message: s.message,
            conditions: s.conditions,
            container_statuses: s.container_statuses,
            start_time: s.start_time,
            ..PodStatus::default()
        }),
    }
}
