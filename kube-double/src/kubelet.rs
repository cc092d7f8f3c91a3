//! The scheduler and the kubelet. The scheduler binds each pod to the first node that is
//! Ready and schedulable, matches its `nodeSelector` and required node affinity, has every
//! `NoSchedule`/`NoExecute` taint tolerated, and has room for its requests; otherwise the
//! pod stays Pending with `PodScheduled=False, reason=Unschedulable`. The kubelet then
//! runs the pod's first container as a local process (see [`crate::process`]) or follows
//! its script, and reports the pod's status through the same phases a real kubelet does.

use std::collections::BTreeMap;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::api::{Propagation, delete_in};
use crate::control::{Cluster, Msg, PodRun, RunState};
use crate::inner::PodProcess;
use crate::kinds::Kind;
use crate::names::parse_quantity;
use crate::process::{self, Waiting};
use crate::script::{Script, script_of};
use crate::selector::{labels_of, string_map};
use crate::store::{Key, condition_json, now, str_at};

/// What a terminated container reports.
struct Terminated {
    exit_code: i32,
    reason: &'static str,
    message: String,
}

/// How long termination messages may be.
const MAX_TERMINATION_MESSAGE: usize = 4096;

impl Cluster {
    /// Schedules or starts a pod that needs it; with `retry`, also starts again a pod
    /// that waits for a Secret or ConfigMap.
    pub(crate) fn sync_pod(&mut self, key: &Key, retry: bool) {
        let Some(pod) = self.inner.store.read(|st| st.get(key).cloned()) else {
            return;
        };
        if matches!(str_at(&pod, "/status/phase"), "Succeeded" | "Failed") {
            return;
        }
        let uid = str_at(&pod, "/metadata/uid");
        if str_at(&pod, "/spec/nodeName").is_empty() {
            self.schedule(&pod);
        } else if self
            .runs
            .get(uid)
            .is_none_or(|r| retry && r.state == RunState::Waiting && r.script.is_none())
        {
            self.start_pod(&pod);
        }
    }

    /// Whether a started pod waits for something (a Secret or a ConfigMap).
    pub(crate) fn pods_wait(&self) -> bool {
        self.runs
            .values()
            .any(|r| r.state == RunState::Waiting && r.script.is_none())
    }

    /// Looks again at pods that wait for a node, a Secret or a ConfigMap.
    pub(crate) fn resync_pods(&mut self) {
        let keys: Vec<Key> = self.inner.store.read(|st| {
            st.list(Kind::Pod, None)
                .filter(|p| str_at(p, "/status/phase") == "Pending")
                .map(|p| Key::of(Kind::Pod, p))
                .collect()
        });
        for k in keys {
            self.sync_pod(&k, true);
        }
    }

    fn script_for(&self, pod: &Value) -> Option<Script> {
        self.pod_scripts
            .get(str_at(pod, "/metadata/uid"))
            .cloned()
            .or_else(|| script_of(pod))
            .filter(|s| *s != Script::Run)
    }

    fn schedule(&mut self, pod: &Value) {
        let key = Key::of(Kind::Pod, pod);
        let uid = str_at(pod, "/metadata/uid");
        // What other pods use matters only for what this one requests.
        let counts = !requests(pod).is_empty();
        let (nodes, used) = self.inner.store.read(|st| {
            let nodes: Vec<Value> = st.list(Kind::Node, None).cloned().collect();
            let mut used: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
            let pods = counts.then(|| st.list(Kind::Pod, None));
            for p in pods.into_iter().flatten() {
                let node = str_at(p, "/spec/nodeName");
                if node.is_empty()
                    || str_at(p, "/metadata/uid") == uid
                    || matches!(str_at(p, "/status/phase"), "Succeeded" | "Failed")
                {
                    continue;
                }
                add_requests(p, used.entry(node.to_owned()).or_default());
            }
            (nodes, used)
        });
        let n = nodes.len();
        let result = if self.script_for(pod) == Some(Script::PendingForever) {
            Err(format!(
                "0/{n} nodes are available: {n} node(s) didn't match Pod's node affinity/selector. preemption: 0/{n} nodes are available: {n} Preemption is not helpful for scheduling."
            ))
        } else {
            pick_node(pod, &nodes, &used)
        };
        self.write_pod(&key, |p| match result {
            Ok(node) => {
                p["spec"]["nodeName"] = json!(node);
                p["status"]["conditions"] = json!([condition_json("PodScheduled", "", "")]);
                strip_empty(&mut p["status"]["conditions"][0]);
            }
            Err(message) => {
                let already = p["status"]["conditions"][0]["message"] == json!(message);
                if !already {
                    let mut c = condition_json("PodScheduled", "Unschedulable", &message);
                    c["status"] = json!("False");
                    p["status"]["conditions"] = json!([c]);
                }
            }
        });
    }

    fn start_pod(&mut self, pod: &Value) {
        let key = Key::of(Kind::Pod, pod);
        let uid = str_at(pod, "/metadata/uid").to_owned();
        let script = self.script_for(pod);
        let ip = match self.runs.get(&uid) {
            Some(run) => run.ip.clone(),
            None => {
                self.next_ip += 1;
                format!("10.244.{}.{}", self.next_ip / 250, self.next_ip % 250 + 2)
            }
        };
        let dir = self.inner.dir.path().join("pods").join(format!(
            "{}_{}_{}",
            key.namespace,
            key.name,
            &uid[..8.min(uid.len())]
        ));
        let log = dir.join("log");
        if !self.runs.contains_key(&uid) {
            // Only a pod that runs a process needs a directory (its volumes, its log and
            // its termination message); a scripted pod's log is empty without one. Making
            // one per pod cost the double more than anything else it does for a pod.
            if script.is_none() {
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::File::create(&log);
            }
            self.inner.lock_pods().insert(
                uid.clone(),
                PodProcess {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    log: log.clone(),
                    pgid: None,
                    running: false,
                    started: std::time::Instant::now(),
                },
            );
            if let Some(d) = pod["spec"]["activeDeadlineSeconds"].as_u64() {
                self.later(
                    Duration::from_secs(d),
                    Msg::PodDeadline {
                        pod_uid: uid.clone(),
                    },
                );
            }
        }
        let started_at = match pod["status"]["startTime"].as_str() {
            Some(t) => t.to_owned(),
            None => now(),
        };
        let mut run = PodRun {
            key: key.clone(),
            state: RunState::Waiting,
            pgid: None,
            started_at: started_at.clone(),
            termination_log: dir.join("termination-log"),
            fallback_to_logs: false,
            log: log.clone(),
            script: script.clone(),
            ip: ip.clone(),
        };
        let step = self.inner.options.script_step;
        let containers = container_names(pod);
        let image = str_at(pod, "/spec/containers/0/image").to_owned();
        let pull_failure = Waiting {
            reason: "ErrImagePull",
            message: format!(
                "failed to pull and unpack image \"{image}\": failed to resolve reference \"{image}\": not found"
            ),
        };
        let outcome = match &script {
            Some(Script::ImagePull) => Err(pull_failure),
            Some(_) => Ok(None),
            None => {
                let images = self.inner.lock_images().clone();
                match process::prepare(&self.inner.store, pod, &dir, &ip, &images) {
                    Ok(prepared) => {
                        run.termination_log = prepared.termination_log.clone();
                        run.fallback_to_logs = prepared.fallback_to_logs;
                        Ok(Some(prepared))
                    }
                    Err(w) if w.reason == "ErrImagePull" => Err(Waiting {
                        reason: pull_failure.reason,
                        message: format!(
                            "{} (the double: the container has no command and no entrypoint is set for its image)",
                            pull_failure.message
                        ),
                    }),
                    Err(w) => Err(w),
                }
            }
        };
        let node_ip = "10.0.0.1";
        let base = |p: &mut Value| {
            p["status"]["hostIP"] = json!(node_ip);
            p["status"]["hostIPs"] = json!([{"ip": node_ip}]);
            p["status"]["startTime"] = json!(started_at);
        };
        let retrying = self.runs.contains_key(&uid);
        match outcome {
            Err(waiting)
                if retrying
                    && pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
                        == json!(waiting.message) => {}
            Err(waiting) => {
                let pull = waiting.reason == "ErrImagePull";
                self.write_pod(&key, |p| {
                    base(p);
                    p["status"]["phase"] = json!("Pending");
                    p["status"]["conditions"] =
                        conditions(false, "ContainersNotReady", &containers);
                    p["status"]["containerStatuses"] = container_statuses(
                        pod,
                        json!({"waiting": {"reason": waiting.reason, "message": waiting.message}}),
                        false,
                    );
                });
                if pull {
                    run.script = Some(Script::ImagePull);
                    self.later(
                        step,
                        Msg::Step {
                            pod_uid: uid.clone(),
                            step: 1,
                        },
                    );
                }
                self.runs.insert(uid, run);
            }
            Ok(prepared) => {
                self.write_pod(&key, |p| {
                    base(p);
                    p["status"]["phase"] = json!("Pending");
                    p["status"]["conditions"] =
                        conditions(false, "ContainersNotReady", &containers);
                    p["status"]["containerStatuses"] = container_statuses(
                        pod,
                        json!({"waiting": {"reason": "ContainerCreating"}}),
                        false,
                    );
                });
                if let Some(prepared) = prepared {
                    match process::spawn(&prepared, &log, uid.clone(), self.tx.clone()) {
                        Ok(pgid) => {
                            run.pgid = Some(pgid);
                            if let Some(p) = self.inner.lock_pods().get_mut(&uid) {
                                p.pgid = Some(pgid);
                                p.running = true;
                            }
                        }
                        Err(e) => {
                            run.state = RunState::Running;
                            self.runs.insert(uid.clone(), run);
                            self.finish(&uid, Terminated {
                                exit_code: 128,
                                reason: "StartError",
                                message: format!("failed to create containerd task: failed to create shim task: OCI runtime create failed: exec: {e}"),
                            }, None);
                            return;
                        }
                    }
                } else if script != Some(Script::RunForever) {
                    self.later(
                        step,
                        Msg::Step {
                            pod_uid: uid.clone(),
                            step: 1,
                        },
                    );
                }
                run.state = RunState::Running;
                let running_since = run.started_at.clone();
                self.runs.insert(uid, run);
                self.write_pod(&key, |p| {
                    p["status"]["phase"] = json!("Running");
                    p["status"]["podIP"] = json!(ip);
                    p["status"]["podIPs"] = json!([{"ip": ip}]);
                    p["status"]["conditions"] = conditions(true, "", &containers);
                    p["status"]["containerStatuses"] = container_statuses(
                        pod,
                        json!({"running": {"startedAt": running_since}}),
                        true,
                    );
                });
            }
        }
    }

    /// A pod's process ended.
    pub(crate) fn process_exited(&mut self, pod_uid: &str, code: i32) {
        if self
            .runs
            .get(pod_uid)
            .is_none_or(|r| r.state != RunState::Running)
        {
            return;
        }
        // Whatever the process left behind dies with the container.
        self.kill(pod_uid);
        let Some(run) = self.runs.get(pod_uid) else {
            return;
        };
        let mut message = read_limited(&run.termination_log);
        if message.is_empty() && code != 0 && run.fallback_to_logs {
            message = tail(&read_all(&run.log), 80, 2048);
        }
        let reason = if code == 0 { "Completed" } else { "Error" };
        self.finish(
            pod_uid,
            Terminated {
                exit_code: code,
                reason,
                message,
            },
            None,
        );
    }

    /// The next step of a scripted pod.
    pub(crate) fn script_step(&mut self, pod_uid: &str, step: u32) {
        let Some(run) = self.runs.get(pod_uid) else {
            return;
        };
        let Some(script) = run.script.clone() else {
            return;
        };
        let key = run.key.clone();
        let node = self
            .inner
            .store
            .read(|st| st.get(&key).map(|p| str_at(p, "/spec/nodeName").to_owned()))
            .unwrap_or_default();
        let t = |exit_code, reason| Terminated {
            exit_code,
            reason,
            message: String::new(),
        };
        match (script, step) {
            (Script::Succeed, _) => self.finish(pod_uid, t(0, "Completed"), None),
            (Script::Fail(code), _) => self.finish(pod_uid, t(code, "Error"), None),
            (Script::Oom, _) => self.finish(pod_uid, t(137, "OOMKilled"), None),
            (Script::Evict, _) => {
                let message = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 10Mi. Container main was using 2Gi, request is 0, has larger consumption of memory. ";
                let mut disruption =
                    condition_json("DisruptionTarget", "TerminationByKubelet", message);
                disruption["lastProbeTime"] = Value::Null;
                self.finish(
                    pod_uid,
                    t(137, "Error"),
                    Some(("Evicted", message.to_owned(), disruption)),
                );
            }
            (Script::NodeLost, 1) => {
                let message = format!(
                    "Node {node} which was running pod {} is unresponsive",
                    key.name
                );
                let mut disruption = condition_json(
                    "DisruptionTarget",
                    "DeletionByTaintManager",
                    "Taint manager: deleting due to NoExecute taint",
                );
                disruption["lastProbeTime"] = Value::Null;
                let term = Terminated {
                    exit_code: 137,
                    reason: "ContainerStatusUnknown",
                    message: "The container could not be located when the pod was deleted.  The container used to be Running".into(),
                };
                self.finish(pod_uid, term, Some(("NodeLost", message, disruption)));
                self.later(
                    self.inner.options.script_step,
                    Msg::Step {
                        pod_uid: pod_uid.to_owned(),
                        step: 2,
                    },
                );
            }
            (Script::NodeLost, _) => {
                self.inner
                    .store
                    .write(|st| delete_in(st, &key, Propagation::Background));
            }
            (Script::ImagePull, _) => {
                let image = self
                    .inner
                    .store
                    .read(|st| {
                        st.get(&key)
                            .map(|p| str_at(p, "/spec/containers/0/image").to_owned())
                    })
                    .unwrap_or_default();
                self.write_pod(&key, |p| {
                    if let Some(list) = p["status"]["containerStatuses"].as_array_mut() {
                        for cs in list {
                            cs["state"] = json!({"waiting": {"reason": "ImagePullBackOff", "message": format!("Back-off pulling image \"{image}\"")}});
                        }
                    }
                });
            }
            (Script::PendingForever | Script::RunForever | Script::Run, _) => {}
        }
    }

    /// The pod's own `activeDeadlineSeconds` passed.
    pub(crate) fn pod_deadline(&mut self, pod_uid: &str) {
        self.kill(pod_uid);
        self.finish(
            pod_uid,
            Terminated {
                exit_code: 137,
                reason: "Error",
                message: String::new(),
            },
            Some((
                "DeadlineExceeded",
                "Pod was active on the node longer than the specified deadline".into(),
                Value::Null,
            )),
        );
    }

    /// The Job controller ends an active pod: past the Job's deadline it is failed with
    /// `DeadlineExceeded` first; either way it is then deleted.
    pub(crate) fn terminate_pod(&mut self, pod_uid: &str, deadline: bool) {
        self.kill(pod_uid);
        let key = match self.runs.get(pod_uid) {
            Some(run) => Some(run.key.clone()),
            None => self
                .inner
                .store
                .read(|st| st.by_uid(pod_uid).map(|(k, _)| k.clone())),
        };
        let Some(key) = key else { return };
        if deadline {
            if self.runs.contains_key(pod_uid) {
                self.finish(
                    pod_uid,
                    Terminated {
                        exit_code: 137,
                        reason: "Error",
                        message: String::new(),
                    },
                    Some((
                        "DeadlineExceeded",
                        "Pod was active on the node longer than the specified deadline".into(),
                        Value::Null,
                    )),
                );
            } else {
                self.write_pod(&key, |p| {
                    p["status"]["phase"] = json!("Failed");
                    p["status"]["reason"] = json!("DeadlineExceeded");
                    p["status"]["message"] =
                        json!("Pod was active on the node longer than the specified deadline");
                });
            }
        }
        self.inner
            .store
            .write(|st| delete_in(st, &key, Propagation::Background));
    }

    /// A pod was deleted: its process dies with it.
    pub(crate) fn pod_gone(&mut self, pod_uid: &str) {
        self.kill(pod_uid);
        self.runs.remove(pod_uid);
        self.pod_scripts.remove(pod_uid);
    }

    fn kill(&mut self, pod_uid: &str) {
        if let Some(run) = self.runs.get_mut(pod_uid)
            && let Some(pgid) = run.pgid.take()
        {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        if let Some(p) = self.inner.lock_pods().get_mut(pod_uid) {
            p.running = false;
        }
    }

    /// Ends a pod: its container terminated, the pod Succeeded (exit 0, no pod-level
    /// reason) or Failed.
    fn finish(
        &mut self,
        pod_uid: &str,
        term: Terminated,
        pod_reason: Option<(&str, String, Value)>,
    ) {
        let Some(run) = self.runs.get_mut(pod_uid) else {
            return;
        };
        if run.state == RunState::Done {
            return;
        }
        let was_running = run.state == RunState::Running;
        run.state = RunState::Done;
        run.pgid = None;
        let key = run.key.clone();
        let started_at = run.started_at.clone();
        let succeeded = term.exit_code == 0 && pod_reason.is_none();
        self.write_pod(&key, |p| {
            let names = container_names(p);
            p["status"]["phase"] = json!(if succeeded { "Succeeded" } else { "Failed" });
            let mut conds = conditions(false, "PodCompleted", &names);
            if let Some((reason, message, disruption)) = &pod_reason {
                p["status"]["reason"] = json!(reason);
                p["status"]["message"] = json!(message);
                if !disruption.is_null()
                    && let Some(list) = conds.as_array_mut()
                {
                    list.insert(0, disruption.clone());
                }
            }
            p["status"]["conditions"] = conds;
            if was_running {
                let mut terminated = json!({
                    "exitCode": term.exit_code,
                    "reason": term.reason,
                    "startedAt": started_at,
                    "finishedAt": now(),
                    "containerID": format!("containerd://{}", pod_uid.replace('-', "")),
                });
                if !term.message.is_empty() {
                    terminated["message"] = json!(term.message);
                }
                let pod_copy = p.clone();
                p["status"]["containerStatuses"] =
                    container_statuses(&pod_copy, json!({"terminated": terminated}), false);
            }
        });
    }

    /// Applies `f` to a stored pod and writes it if it changed.
    fn write_pod(&self, key: &Key, f: impl FnOnce(&mut Value)) {
        self.inner.store.write(|st| {
            let Some(mut pod) = st.get(key).cloned() else {
                return;
            };
            let before = pod.clone();
            if !pod["status"].is_object() {
                pod["status"] = json!({});
            }
            f(&mut pod);
            if pod != before {
                st.replace(key.clone(), pod);
            }
        });
    }
}

fn strip_empty(c: &mut Value) {
    if let Some(m) = c.as_object_mut() {
        m.retain(|_, v| v.as_str() != Some(""));
        m.insert("lastProbeTime".into(), Value::Null);
    }
}

fn container_names(pod: &Value) -> Vec<String> {
    pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| str_at(c, "/name").to_owned())
        .collect()
}

/// The pod conditions after scheduling.
fn conditions(ready: bool, not_ready_reason: &str, containers: &[String]) -> Value {
    let t = now();
    let cond = |ty: &str, ok: bool| {
        let mut c = json!({"type": ty, "status": if ok { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": t});
        if !ok && matches!(ty, "Ready" | "ContainersReady") {
            c["reason"] = json!(not_ready_reason);
            if not_ready_reason == "ContainersNotReady" {
                c["message"] = json!(format!(
                    "containers with unready status: [{}]",
                    containers.join(" ")
                ));
            }
        }
        c
    };
    json!([
        cond(
            "PodReadyToStartContainers",
            ready || not_ready_reason == "ContainersNotReady"
        ),
        cond("Initialized", true),
        cond("Ready", ready),
        cond("ContainersReady", ready),
        cond("PodScheduled", true),
    ])
}

/// One status per container, all in `state`.
fn container_statuses(pod: &Value, state: Value, ready: bool) -> Value {
    let running_or_done = state.get("waiting").is_none();
    let list: Vec<Value> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let image = str_at(c, "/image");
            let mut s = json!({
                "name": str_at(c, "/name"),
                "image": image,
                "imageID": "",
                "ready": ready,
                "started": state.get("running").is_some(),
                "restartCount": 0,
                "state": state,
                "lastState": {},
            });
            if running_or_done {
                s["imageID"] = json!(format!("{image}@sha256:{}", "0".repeat(64)));
                s["containerID"] = json!(format!(
                    "containerd://{}",
                    str_at(pod, "/metadata/uid").replace('-', "")
                ));
            }
            s
        })
        .collect();
    Value::Array(list)
}

/// A pod's resource requests (containers summed).
fn requests(pod: &Value) -> BTreeMap<String, f64> {
    let mut total = BTreeMap::new();
    add_requests(pod, &mut total);
    total
}

/// Adds a pod's requests to `total`.
fn add_requests(pod: &Value, total: &mut BTreeMap<String, f64>) {
    for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
        let from = if c["resources"]["requests"].is_object() {
            "requests"
        } else {
            "limits"
        };
        for (r, q) in c["resources"][from].as_object().into_iter().flatten() {
            if let Some(q) = q.as_str().and_then(parse_quantity) {
                *total.entry(r.clone()).or_default() += q;
            }
        }
    }
}

/// The first node that fits, or the scheduler's message about why none does.
fn pick_node(
    pod: &Value,
    nodes: &[Value],
    used: &BTreeMap<String, BTreeMap<String, f64>>,
) -> Result<String, String> {
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let wanted = requests(pod);
    let selector = string_map(pod.pointer("/spec/nodeSelector"));
    'nodes: for node in nodes {
        let name = str_at(node, "/metadata/name");
        let labels = labels_of(node);
        let mut reject = |why: String| {
            *reasons.entry(why).or_default() += 1;
        };
        let ready = node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if !ready {
            reject("node(s) had untolerated taint {node.kubernetes.io/not-ready: }".into());
            continue;
        }
        if node["spec"]["unschedulable"] == Value::Bool(true) {
            reject("node(s) were unschedulable".into());
            continue;
        }
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            || !affinity_matches(pod, &labels)
        {
            reject("node(s) didn't match Pod's node affinity/selector".into());
            continue;
        }
        for taint in node["spec"]["taints"].as_array().into_iter().flatten() {
            let effect = str_at(taint, "/effect");
            if (effect == "NoSchedule" || effect == "NoExecute") && !tolerated(pod, taint) {
                reject(format!(
                    "node(s) had untolerated taint {{{}: {}}}",
                    str_at(taint, "/key"),
                    str_at(taint, "/value")
                ));
                continue 'nodes;
            }
        }
        let free = &node["status"]["allocatable"];
        let mut short = false;
        for (r, q) in &wanted {
            let have = free[r].as_str().and_then(parse_quantity).unwrap_or(0.0);
            let taken = used
                .get(name)
                .and_then(|u| u.get(r))
                .copied()
                .unwrap_or(0.0);
            if *q > 0.0 && taken + q > have + 1e-9 {
                reject(format!("Insufficient {r}"));
                short = true;
            }
        }
        if short {
            continue;
        }
        return Ok(name.to_owned());
    }
    let n = nodes.len();
    let list: Vec<String> = reasons
        .iter()
        .map(|(why, count)| format!("{count} {why}"))
        .collect();
    let detail = if list.is_empty() {
        String::new()
    } else {
        format!(": {}", list.join(", "))
    };
    Err(format!(
        "0/{n} nodes are available{detail}. preemption: 0/{n} nodes are available: {n} Preemption is not helpful for scheduling."
    ))
}

fn tolerated(pod: &Value, taint: &Value) -> bool {
    pod["spec"]["tolerations"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| {
            let key_ok = match str_at(t, "/key") {
                "" => str_at(t, "/operator") == "Exists",
                k => k == str_at(taint, "/key"),
            };
            let value_ok = str_at(t, "/operator") == "Exists"
                || str_at(t, "/value") == str_at(taint, "/value");
            let effect_ok = matches!(str_at(t, "/effect"), "")
                || str_at(t, "/effect") == str_at(taint, "/effect");
            key_ok && value_ok && effect_ok
        })
}

/// `requiredDuringSchedulingIgnoredDuringExecution` node affinity (terms ORed, expressions ANDed).
fn affinity_matches(pod: &Value, labels: &BTreeMap<String, String>) -> bool {
    let Some(terms) = pod
        .pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
        .and_then(Value::as_array)
    else {
        return true;
    };
    terms.iter().any(|term| {
        term["matchExpressions"].as_array().into_iter().flatten().all(|e| {
            let actual = labels.get(str_at(e, "/key"));
            let values: Vec<&str> = e["values"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            let number = |s: &str| s.parse::<i64>().ok();
            match str_at(e, "/operator") {
                "In" => actual.is_some_and(|a| values.contains(&a.as_str())),
                "NotIn" => actual.is_none_or(|a| !values.contains(&a.as_str())),
                "Exists" => actual.is_some(),
                "DoesNotExist" => actual.is_none(),
                "Gt" => matches!((actual.and_then(|a| number(a)), values.first().and_then(|v| number(v))), (Some(a), Some(v)) if a > v),
                "Lt" => matches!((actual.and_then(|a| number(a)), values.first().and_then(|v| number(v))), (Some(a), Some(v)) if a < v),
                _ => false,
            }
        })
    })
}

/// A file's first bytes, as the kubelet reads a termination message.
fn read_limited(path: &std::path::Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_TERMINATION_MESSAGE)]).into_owned()
}

fn read_all(path: &std::path::Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// The last `lines` lines, at most `bytes` bytes (FallbackToLogsOnError).
fn tail(text: &str, lines: usize, bytes: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let joined = all[all.len().saturating_sub(lines)..].join("\n");
    let start = joined.len().saturating_sub(bytes);
    let start = (start..=joined.len())
        .find(|i| joined.is_char_boundary(*i))
        .unwrap_or(joined.len());
    joined[start..].to_owned()
}
