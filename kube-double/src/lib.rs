//! A Kubernetes API double for testing the `kubernetes` runtime through the real
//! `kube::Client`: an HTTP/1.1 server on 127.0.0.1 that answers like the API server where
//! the runtime depends on it, with a Job controller, a scheduler and a kubelet that runs
//! each pod's first container as a local process.
//!
//! # Faithful
//!
//! - The URL space, verbs and bodies: `batch/v1` Jobs; `v1` Pods, Secrets, ConfigMaps,
//!   Namespaces and Nodes; create, get, list (label and field selectors, `limit`/`continue`),
//!   replace, merge patch, delete, deletecollection, `status` subresources, pod `log`,
//!   metadata-only (`PartialObjectMetadata`) reads, `dryRun=All`.
//! - Errors are `v1` `Status` bodies with the API server's codes, reasons and messages:
//!   404 NotFound, 409 AlreadyExists / Conflict, 422 Invalid with one cause per problem,
//!   400 BadRequest for bodies that do not decode (wrong `apiVersion`/`kind`, wrong types,
//!   quantities that do not parse), 415 for unsupported patch types.
//! - Decoding goes through the typed schema: unknown fields are dropped with a `Warning`
//!   header (400 with `fieldValidation=Strict`).
//! - Defaulting (Job `backoffLimit: 6`, `restartPolicy: Always` (which a Job then refuses),
//!   `terminationMessagePath`, Secret `type: Opaque`, `stringData` folded into `data`, ...)
//!   and the Job's generated selector and pod template labels (`controller-uid`,
//!   `job-name`, `batch.kubernetes.io/...`), so a Job name over 63 characters is refused
//!   through its `job-name` label, as by the API server.
//! - One global resourceVersion; no-op updates write nothing; stale updates are 409.
//! - Deleting a Job without a propagation policy orphans its pods, with the API server's
//!   warning; Background and Foreground delete dependents by `ownerReferences`, and an
//!   object whose owners are all gone (or never existed) is collected.
//! - Watches replay remembered changes from a resourceVersion, turn selector transitions
//!   into ADDED/DELETED, send bookmarks when allowed, support `sendInitialEvents`, and
//!   answer a forgotten resourceVersion with an `ERROR` event carrying 410 Expired.
//! - Job conditions as Kubernetes 1.33 writes them: `SuccessCriteriaMet` then `Complete`,
//!   `FailureTarget` then `Failed` (reasons `BackoffLimitExceeded`, `DeadlineExceeded`).
//!   Pods: Pending (unscheduled) → bound → ContainerCreating → Running → Succeeded/Failed
//!   with the container's `terminated` state and termination message.
//!
//! # Simplified, knowingly
//!
//! - Deletion is immediate: no grace period, no finalizers, no `deletionTimestamp`; a pod's
//!   process group gets SIGKILL. Foreground deletion deletes dependents first, then the
//!   owner, at once.
//! - Past a Job's `activeDeadlineSeconds` its pod is first marked Failed with reason
//!   `DeadlineExceeded`, then deleted (a real cluster only deletes it).
//! - Strategic merge patches are merge patches (lists are replaced, not merged by key);
//!   JSON patch and server-side apply are refused with 415.
//! - Lists read the current state whatever `resourceVersion` they ask for.
//! - A Job runs one pod at a time (`parallelism` is ignored) and replaces a failed pod at
//!   once, without the controller's back-off, while `backoffLimit` allows.
//! - The `node-lost` script fails and deletes the pod but leaves its node Ready.
//! - Only the first container of a pod runs; `restartPolicy: OnFailure` restarts nothing;
//!   memory limits are not enforced (use the `oom` script); image names are not checked
//!   unless the container has no `command` (then the image's entrypoint must be set).
//! - The scheduler knows `nodeSelector`, required node affinity, taints and tolerations,
//!   and requests against node allocatable; not pod affinity, topology spread or
//!   priorities.
//! - The process runs on this host, so paths inside the container are rewritten to host
//!   paths wherever they appear in arguments, environment values and `workingDir` (module
//!   `process`): a path written only in the program's code or config files is not.
//!
//! # Layout
//!
//! - [`KubeDouble`]: the server, its observation helpers and its knobs; `options`
//!   ([`Options`]), `script` ([`Script`]) and `faults` ([`FaultSpec`], [`RequestRecord`]).
//!   `error`: what its helpers report ([`Error`]).
//! - `inner`: what the server, the control loop and the handle share.
//! - `store`: objects, resourceVersions and watch history. `api`: the verbs.
//! - `kinds`, `defaults`, `validate`, `names`, `selector`, `status`: the API server's rules.
//! - `server`: HTTP, faults, watches.
//! - `cluster`: the control loop and the Job controller. `kubelet`: the scheduler and pod
//!   lifecycle. `control`: what those two keep between events. `process`: running a
//!   container as a process.

mod api;
mod cluster;
mod control;
mod defaults;
mod error;
mod faults;
mod inner;
mod kinds;
mod kubelet;
mod names;
mod options;
mod process;
mod script;
mod selector;
mod server;
mod status;
mod store;
mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use error::{Error, Result};
pub use faults::{Fault, FaultSpec, RequestRecord};
pub use kinds::Kind;
pub use options::{NAMESPACE, Options};
pub use script::{SCRIPT_KEY, Script};
pub use validate::{MAX_ANNOTATIONS_BYTES, MAX_SECRET_BYTES};

use api::create_in;
use inner::Inner;
use store::{Key, Store, condition, now};

/// The node that exists from the start.
pub const DEFAULT_NODE: &str = "node-1";
/// A Kubernetes API double serving on 127.0.0.1; shut down (and its processes killed)
/// when dropped.
pub struct KubeDouble {
    inner: Arc<Inner>,
    url: String,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeDouble {
    /// Starts a double with the default [`Options`].
    ///
    /// # Panics
    ///
    /// If it cannot bind a port on 127.0.0.1 or make its temporary directory.
    pub async fn start() -> KubeDouble {
        KubeDouble::start_with(Options::default()).await
    }

    /// Starts a double: namespaces `default`, `kube-system` and `options.namespace`, and
    /// the node [`DEFAULT_NODE`].
    ///
    /// # Panics
    ///
    /// If it cannot bind a port on 127.0.0.1 or make its temporary directory.
    pub async fn start_with(options: Options) -> KubeDouble {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the double binds a port on 127.0.0.1");
        let port = listener
            .local_addr()
            .expect("a bound listener has an address")
            .port();
        let (store, events) = Store::new(options.history_limit);
        let (tx, msgs) = mpsc::unbounded_channel();
        let dir = tempfile::Builder::new()
            .prefix("kube-double-")
            .tempdir()
            .expect("the double makes a temporary directory");
        let inner = Arc::new(Inner::new(store, options, dir));
        let double = KubeDouble {
            url: format!("http://127.0.0.1:{port}"),
            tasks: vec![
                tokio::spawn(server::serve(listener, inner.clone())),
                tokio::spawn(cluster::run(inner.clone(), events, tx, msgs)),
            ],
            inner,
        };
        let mut namespaces = vec!["default".to_owned(), "kube-system".to_owned()];
        if !namespaces.contains(&double.inner.options.namespace) {
            namespaces.push(double.inner.options.namespace.clone());
        }
        for ns in namespaces {
            let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            double.create(Kind::Namespace, "", object);
        }
        double.add_node(DEFAULT_NODE, &[], Vec::new());
        double
    }

    fn create(&self, kind: Kind, namespace: &str, object: Value) -> Value {
        let object = kind
            .normalize(&object)
            .expect("the double's own objects decode");
        self.inner
            .store
            .write(|st| create_in(st, kind, namespace, object, false))
            .unwrap_or_else(|e| {
                panic!(
                    "the double could not create its {}: {}",
                    kind.name(),
                    e.message
                )
            })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The client's default namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.options.namespace
    }

    /// A client configuration for the double (plain HTTP, no credentials), to adjust
    /// before building a client (e.g. `default_retry = false`).
    pub fn config(&self) -> kube::Config {
        let mut config = kube::Config::new(self.url.parse().expect("the double's URL parses"));
        config.default_namespace = self.namespace().to_owned();
        config
    }

    /// A kubeconfig for the double (plain HTTP, no credentials, its namespace as the
    /// context's), as YAML: what a dispatcher process is pointed at with `KUBECONFIG`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: double, cluster: {{server: \"{}\"}}}}]\nusers: [{{name: test, user: {{}}}}]\ncontexts: [{{name: double, context: {{cluster: double, user: test, namespace: {}}}}}]\ncurrent-context: double\n",
            self.url,
            self.namespace()
        )
    }

    /// Creates a Secret holding one key (written as `stringData`) in the default namespace.
    pub fn create_secret(&self, name: &str, key: &str, value: &str) {
        let secret = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "stringData": {key: value},
        });
        self.create(Kind::Secret, &self.inner.options.namespace, secret);
    }

    /// A client for the double. Note that `kube` retries 429, 503 and 504 by itself.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("a client for a plain HTTP URL builds")
    }

    /// Adds a Ready node with these labels (besides the `kubernetes.io/hostname`, `os`
    /// and `arch` ones) and these images in its `status.images`; allocatable: 8 CPUs,
    /// 32Gi memory, 110 pods, no extended resources (see [`Self::set_node_allocatable`]).
    pub fn add_node(&self, name: &str, labels: &[(&str, &str)], images: Vec<String>) {
        let mut l = json!({"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"});
        for (k, v) in labels {
            l[*k] = json!(v);
        }
        let t = now();
        let resources =
            json!({"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"});
        let images: Vec<Value> = images
            .into_iter()
            .map(|i| json!({"names": [i], "sizeBytes": 1_000_000_000}))
            .collect();
        let node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": l},
            "spec": {},
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status", "lastHeartbeatTime": t, "lastTransitionTime": t}],
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "Hostname", "address": name}],
                "images": images,
                "nodeInfo": {
                    "architecture": "amd64", "bootID": "", "containerRuntimeVersion": "containerd://1.7.27",
                    "kernelVersion": "6.1.0", "kubeProxyVersion": "", "kubeletVersion": "v1.33.0",
                    "machineID": "", "operatingSystem": "linux", "osImage": "Debian GNU/Linux 12 (bookworm)",
                    "systemUUID": "",
                },
            },
        });
        self.create(Kind::Node, "", node);
    }

    fn edit_node(&self, name: &str, f: impl FnOnce(&mut Value)) {
        let key = Key::new(Kind::Node, "", name);
        self.inner.store.write(|st| {
            let mut node = st
                .get(&key)
                .cloned()
                .unwrap_or_else(|| panic!("no node {name}"));
            f(&mut node);
            st.replace(key, node);
        });
    }

    /// Replaces a node's `status.images`: one entry per image, each with all its names, as
    /// the kubelet reports them (the digest name first, then the tags:
    /// `["reg.example/executor-echo@sha256:…", "reg.example/executor-echo:1.4.2"]`).
    pub fn set_node_images(&self, node: &str, images: &[&[&str]]) {
        let images: Vec<Value> = images
            .iter()
            .map(|names| json!({"names": names, "sizeBytes": 1_000_000_000}))
            .collect();
        self.edit_node(node, |n| n["status"]["images"] = Value::Array(images));
    }

    /// Sets a node's capacity and allocatable amount of a resource (`nvidia.com/gpu`, `"2"`).
    pub fn set_node_allocatable(&self, node: &str, resource: &str, quantity: &str) {
        self.edit_node(node, |n| {
            n["status"]["capacity"][resource] = json!(quantity);
            n["status"]["allocatable"][resource] = json!(quantity);
        });
    }

    /// Adds a taint (`effect`: `NoSchedule`, `PreferNoSchedule` or `NoExecute`).
    pub fn taint_node(&self, node: &str, key: &str, value: &str, effect: &str) {
        self.edit_node(node, |n| {
            let mut taints = n["spec"]["taints"].as_array().cloned().unwrap_or_default();
            taints.push(json!({"key": key, "value": value, "effect": effect}));
            n["spec"]["taints"] = Value::Array(taints);
        });
    }

    /// Sets a node's Ready condition; pods are not scheduled onto a node that is not Ready.
    pub fn set_node_ready(&self, node: &str, ready: bool) {
        self.edit_node(node, |n| {
            n["status"]["conditions"][0]["status"] = json!(if ready { "True" } else { "False" });
            n["status"]["conditions"][0]["reason"] = json!(if ready {
                "KubeletReady"
            } else {
                "NodeStatusUnknown"
            });
        });
    }

    /// The argv an image runs when a container gives no `command` (its ENTRYPOINT);
    /// the container's `args` follow it. Without one, such a container fails to pull.
    pub fn set_image_entrypoint(&self, image: &str, argv: Vec<String>) {
        self.inner.lock_images().insert(image.to_owned(), argv);
    }

    /// The next Job created follows `script` (unless it names its own).
    pub fn script_next(&self, script: Script) {
        self.inner.queue_script(script);
    }

    /// Every Job created from now on with the label `key=value` follows `script` (unless it
    /// names its own); the first matching rule wins, before [`KubeDouble::script_next`].
    pub fn script_jobs_labelled(&self, key: &str, value: &str, script: Script) {
        self.inner.add_labelled_script(key, value, script);
    }

    /// The next `n` requests matching `spec` get its fault.
    pub fn fail_next(&self, n: u32, spec: FaultSpec) {
        self.inner.add_fault(spec, n);
    }

    /// Forgets every fault not yet used.
    pub fn clear_faults(&self) {
        self.inner.clear_faults();
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.inner.lock_requests().clone()
    }

    /// Forgets the change history: a watch from any resourceVersion before now gets 410.
    pub fn compact(&self) {
        self.inner.store.write(store::State::compact);
    }

    /// Ends every open watch stream (as the API server does at `timeoutSeconds`).
    pub fn end_watches(&self) {
        self.inner.watch_ends.send_modify(|n| *n += 1);
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.store.read(store::State::rv)
    }

    fn typed<T: serde::de::DeserializeOwned>(&self, kind: Kind, namespace: Option<&str>) -> Vec<T> {
        let values: Vec<Value> = self
            .inner
            .store
            .read(|st| st.list(kind, namespace).cloned().collect());
        values
            .into_iter()
            .map(|v| serde_json::from_value(v).expect("stored objects decode"))
            .collect()
    }

    fn one<T: serde::de::DeserializeOwned>(&self, kind: Kind, name: &str) -> Option<T> {
        let v = self
            .inner
            .store
            .read(|st| st.get(&Key::new(kind, self.namespace(), name)).cloned())?;
        Some(serde_json::from_value(v).expect("stored objects decode"))
    }

    /// The Jobs in the default namespace.
    pub fn jobs(&self) -> Vec<Job> {
        self.typed(Kind::Job, Some(self.namespace()))
    }

    /// The pods in the default namespace.
    pub fn pods(&self) -> Vec<Pod> {
        self.typed(Kind::Pod, Some(self.namespace()))
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.typed(Kind::Node, None)
    }

    pub fn job(&self, name: &str) -> Option<Job> {
        self.one(Kind::Job, name)
    }

    pub fn pod(&self, name: &str) -> Option<Pod> {
        self.one(Kind::Pod, name)
    }

    /// A Secret in the default namespace.
    pub fn get_secret(&self, name: &str) -> Option<Secret> {
        self.one(Kind::Secret, name)
    }

    /// The pods a Job created that still exist.
    pub fn pods_of_job(&self, job: &str) -> Vec<Pod> {
        self.pods()
            .into_iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("job-name"))
                    .is_some_and(|j| j == job)
            })
            .collect()
    }

    /// The captured stdout and stderr of the newest pod with this name (also after the
    /// pod is deleted).
    pub fn pod_log(&self, name: &str) -> Option<String> {
        self.inner.log_of(self.namespace(), name)
    }

    /// Whether any process of the pod's process group is still alive (zombies excluded).
    pub fn pod_processes_alive(&self, name: &str) -> bool {
        let ns = self.namespace().to_owned();
        let pgids: Vec<i32> = self
            .inner
            .lock_pods()
            .values()
            .filter(|p| p.namespace == ns && p.name == name)
            .filter_map(|p| p.pgid)
            .collect();
        pgids.into_iter().any(group_alive)
    }

    /// The pods whose process still runs.
    pub fn pods_running_a_process(&self) -> Vec<String> {
        let ns = self.namespace().to_owned();
        let pods = self.inner.lock_pods();
        let mut names: Vec<String> = pods
            .values()
            .filter(|p| p.namespace == ns && p.running && p.pgid.is_some_and(group_alive))
            .map(|p| p.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Kills the process group of the pod `name` with SIGKILL, as an out-of-memory killer
    /// or a crash would end its container; the kubelet then reports how it ended.
    pub fn kill_pod_process(&self, name: &str) {
        let ns = self.namespace().to_owned();
        for pgid in self
            .inner
            .lock_pods()
            .values()
            .filter(|p| p.namespace == ns && p.name == name)
            .filter_map(|p| p.pgid)
        {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }

    /// The names of the Secrets in the default namespace.
    pub fn secrets(&self) -> Vec<String> {
        self.typed::<Secret>(Kind::Secret, Some(self.namespace()))
            .into_iter()
            .filter_map(|s| s.metadata.name)
            .collect()
    }

    /// How many Jobs were ever created.
    pub fn jobs_created(&self) -> u64 {
        self.inner.store.read(|st| st.jobs_created)
    }

    /// When the Job `name` of the default namespace was created (the first time), as
    /// this process's clock saw it: for measuring how long the client took to create it.
    pub fn job_created_at(&self, name: &str) -> Option<Instant> {
        let key = Key::new(Kind::Job, self.namespace(), name);
        self.inner
            .store
            .read(|st| st.job_created_at.get(&key).copied())
    }

    /// The most Jobs that existed unfinished at the same time.
    pub fn peak_active_jobs(&self) -> usize {
        self.inner.store.read(|st| st.peak_active_jobs)
    }

    /// Re-checks `probe` after every change in the double (and every 20 ms, for processes)
    /// until it yields a value.
    ///
    /// # Errors
    ///
    /// When `timeout` passes first.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut(&KubeDouble) -> Option<T>,
    ) -> Result<T> {
        let start = Instant::now();
        let mut changed = self.inner.store.subscribe();
        loop {
            changed.borrow_and_update();
            if let Some(v) = probe(self) {
                return Ok(v);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: what.to_owned(),
                    timeout,
                });
            }
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(20)), changed.changed()).await;
        }
    }

    /// Waits until the Job has the condition `ty` (`Complete`, `Failed`, ...) with status
    /// "True", and returns it.
    ///
    /// # Errors
    ///
    /// When `timeout` passes first.
    pub async fn wait_for_job_condition(
        &self,
        name: &str,
        ty: &str,
        timeout: Duration,
    ) -> Result<Job> {
        let key = Key::new(Kind::Job, self.namespace(), name);
        let what = format!("Job {name} to have condition {ty}");
        let value = self
            .wait_for(&what, timeout, |d| {
                d.inner
                    .store
                    .read(|st| st.get(&key).filter(|j| condition(j, ty).is_some()).cloned())
            })
            .await?;
        serde_json::from_value(value).map_err(|source| Error::Decode {
            kind: "Job",
            source,
        })
    }

    /// Waits until a pod of the Job is in `phase`, and returns it.
    ///
    /// # Errors
    ///
    /// When `timeout` passes first.
    pub async fn wait_for_pod_phase(
        &self,
        job: &str,
        phase: &str,
        timeout: Duration,
    ) -> Result<Pod> {
        let what = format!("a pod of Job {job} to be {phase}");
        self.wait_for(&what, timeout, |d| {
            d.pods_of_job(job)
                .into_iter()
                .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase))
        })
        .await
    }
}

/// Whether a process group has a live (non-zombie) member, from /proc.
fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        let Some((_, after)) = stat.rsplit_once(')') else {
            return false;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        fields.first().is_some_and(|s| *s != "Z" && *s != "X")
            && fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid)
    })
}

impl Drop for KubeDouble {
    fn drop(&mut self) {
        self.inner.shutdown.send_replace(true);
        for task in &self.tasks {
            task.abort();
        }
        for p in self.inner.lock_pods().values() {
            if let Some(pgid) = p.pgid
                && p.running
            {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        }
    }
}
