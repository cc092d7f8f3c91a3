//! The cluster's control loop and the Job controller. One task reacts, in order, to every
//! change in the store and to the timers and process exits it asked for; the Job
//! controller creates each Job's pod, counts how its pods ended, enforces
//! `activeDeadlineSeconds` and `ttlSecondsAfterFinished`, and writes the Job's status and
//! conditions as the real controller does (`SuccessCriteriaMet` then `Complete`,
//! `FailureTarget` then `Failed`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::api::{Propagation, create_in, delete_in};
use crate::control::{Cluster, Msg};
use crate::inner::Inner;
use crate::kinds::Kind;
use crate::script::{Script, script_of};
use crate::store::{Event, EventType, Key, condition, condition_json, job_finished, now, str_at};

/// Runs the controllers until the double is dropped.
pub(crate) async fn run(
    inner: Arc<Inner>,
    mut events: UnboundedReceiver<Arc<Event>>,
    tx: UnboundedSender<Msg>,
    mut msgs: UnboundedReceiver<Msg>,
) {
    let mut c = Cluster::new(inner, tx);
    loop {
        tokio::select! {
            Some(e) = events.recv() => c.on_event(&e),
            Some(m) = msgs.recv() => c.on_msg(m),
            else => break,
        }
    }
}

impl Cluster {
    fn on_event(&mut self, e: &Event) {
        if e.ty != EventType::Deleted {
            self.collect_if_owners_are_gone(&e.key, &e.object);
        }
        match (e.key.kind, e.ty) {
            (Kind::Job, EventType::Added) => {
                let uid = str_at(&e.object, "/metadata/uid").to_owned();
                let script = script_of(&e.object)
                    .or_else(|| self.inner.labelled_script(&e.object))
                    .or_else(|| self.inner.next_script())
                    .or_else(|| self.inner.options.script.clone());
                if let Some(s) = script.filter(|s| *s != Script::Run) {
                    self.job_scripts.insert(uid, s);
                }
                self.reconcile_job(&e.key);
            }
            (Kind::Job, EventType::Modified) => self.reconcile_job(&e.key),
            (Kind::Job, EventType::Deleted) => {
                let uid = str_at(&e.object, "/metadata/uid");
                self.jobs.remove(uid);
                self.job_scripts.remove(uid);
            }
            (Kind::Pod, EventType::Deleted) => {
                let uid = str_at(&e.object, "/metadata/uid").to_owned();
                self.pod_gone(&uid);
                if let Some(job) = controller_job(&self.inner, &e.object) {
                    let phase = str_at(&e.object, "/status/phase");
                    let track = self.jobs.entry(job.1.clone()).or_default();
                    track.outcomes.entry(uid).or_insert(phase == "Succeeded");
                    self.reconcile_job(&job.0);
                }
            }
            (Kind::Pod, _) => {
                self.sync_pod(&e.key, false);
                if let Some((job_key, _)) = controller_job(&self.inner, &e.object) {
                    self.reconcile_job(&job_key);
                }
            }
            (Kind::Node, _) => self.resync_pods(),
            // Only a started pod can wait for a Secret or a ConfigMap.
            (Kind::Secret | Kind::ConfigMap, _) if self.pods_wait() => self.resync_pods(),
            _ => {}
        }
    }

    /// The garbage collector: an object all of whose owners are gone (or never existed)
    /// is deleted.
    fn collect_if_owners_are_gone(&self, key: &Key, object: &Value) {
        let owners: Vec<&str> = object["metadata"]["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| str_at(r, "/uid"))
            .collect();
        if owners.is_empty() {
            return;
        }
        self.inner.store.write(|st| {
            let same = st
                .get(key)
                .is_some_and(|o| o["metadata"]["uid"] == object["metadata"]["uid"]);
            if same && owners.iter().all(|u| st.by_uid(u).is_none()) {
                delete_in(st, key, Propagation::Background);
            }
        });
    }

    fn on_msg(&mut self, m: Msg) {
        match m {
            Msg::CreatePod { job_uid } => {
                if let Some(t) = self.jobs.get_mut(&job_uid) {
                    t.creating = false;
                }
                if let Some(key) = self.key_of_uid(&job_uid) {
                    self.reconcile_job_creating(&key, true);
                }
            }
            Msg::Deadline { job_uid } => {
                if let Some(key) = self.key_of_uid(&job_uid) {
                    self.reconcile_job(&key);
                }
            }
            Msg::Ttl { job_uid } => {
                if let Some(key) = self.key_of_uid(&job_uid) {
                    self.inner
                        .store
                        .write(|st| delete_in(st, &key, Propagation::Background));
                }
            }
            Msg::Exited { pod_uid, code } => self.process_exited(&pod_uid, code),
            Msg::Step { pod_uid, step } => self.script_step(&pod_uid, step),
            Msg::PodDeadline { pod_uid } => self.pod_deadline(&pod_uid),
        }
    }

    fn key_of_uid(&self, uid: &str) -> Option<Key> {
        self.inner
            .store
            .read(|st| st.by_uid(uid).map(|(k, _)| k.clone()))
    }

    /// The script a Job's pods follow, if any.
    pub(crate) fn job_script(&self, job_uid: &str) -> Option<Script> {
        self.job_scripts.get(job_uid).cloned()
    }

    fn reconcile_job(&mut self, key: &Key) {
        self.reconcile_job_creating(key, false);
    }

    fn reconcile_job_creating(&mut self, key: &Key, create_now: bool) {
        let Some(job) = self.inner.store.read(|st| st.get(key).cloned()) else {
            return;
        };
        let uid = str_at(&job, "/metadata/uid").to_owned();
        let pods: Vec<Value> = self.inner.store.read(|st| {
            st.owned_by(&uid)
                .filter(|(k, p)| {
                    k.kind == Kind::Pod
                        && k.namespace == key.namespace
                        && controller_uid(p) == Some(uid.as_str())
                })
                .map(|(_, p)| p.clone())
                .collect()
        });
        let track = self.jobs.entry(uid.clone()).or_default();
        for p in &pods {
            match str_at(p, "/status/phase") {
                "Succeeded" => {
                    track
                        .outcomes
                        .insert(str_at(p, "/metadata/uid").to_owned(), true);
                }
                "Failed" => {
                    track
                        .outcomes
                        .insert(str_at(p, "/metadata/uid").to_owned(), false);
                }
                _ => {}
            }
        }
        let active: Vec<&Value> = pods
            .iter()
            .filter(|p| !track.outcomes.contains_key(str_at(p, "/metadata/uid")))
            .collect();
        let succeeded = track.outcomes.values().filter(|s| **s).count() as i64;
        let failed = track.outcomes.values().filter(|s| !**s).count() as i64;
        let ready = active
            .iter()
            .filter(|p| condition(p, "Ready").is_some())
            .count() as i64;
        let active_uids: Vec<String> = active
            .iter()
            .map(|p| str_at(p, "/metadata/uid").to_owned())
            .collect();
        let completions = job["spec"]["completions"].as_i64().unwrap_or(1);
        let backoff_limit = job["spec"]["backoffLimit"].as_i64().unwrap_or(6);
        let deadline = job["spec"]["activeDeadlineSeconds"].as_u64();
        let ttl = job["spec"]["ttlSecondsAfterFinished"].as_u64();
        let counts = json!({
            "active": active_uids.len(),
            "ready": ready,
            "succeeded": succeeded,
            "failed": failed,
            "terminating": 0,
            "uncountedTerminatedPods": {},
        });

        if job_finished(&job) {
            if let Some(ttl) = ttl
                && !track.ttl_armed
            {
                track.ttl_armed = true;
                self.later(Duration::from_secs(ttl), Msg::Ttl { job_uid: uid });
            }
            return;
        }
        if job["spec"]["suspend"] == Value::Bool(true) {
            return;
        }
        let success_target = condition(&job, "SuccessCriteriaMet").is_some();
        let failure_target = condition(&job, "FailureTarget").cloned();
        let elapsed_out = match (deadline, track.started) {
            (Some(d), Some(s)) => s.elapsed() >= Duration::from_secs(d),
            _ => false,
        };

        if success_target || failure_target.is_some() {
            if let Some(target) = &failure_target {
                let deadline = str_at(target, "/reason") == "DeadlineExceeded";
                for pod_uid in &active_uids {
                    self.terminate_pod(pod_uid, deadline);
                }
            }
            if !active_uids.is_empty() {
                return;
            }
            let final_condition = if success_target {
                condition_json(
                    "Complete",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                )
            } else {
                let t = failure_target.unwrap_or_default();
                condition_json("Failed", str_at(&t, "/reason"), str_at(&t, "/message"))
            };
            self.write_job_status(key, |status| {
                merge(status, &counts);
                if success_target {
                    status["completionTime"] = json!(now());
                }
                push_condition(status, final_condition);
            });
            return;
        }

        let target = if succeeded >= completions {
            Some(condition_json(
                "SuccessCriteriaMet",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            ))
        } else if elapsed_out {
            Some(condition_json(
                "FailureTarget",
                "DeadlineExceeded",
                "Job was active longer than specified deadline",
            ))
        } else if failed > backoff_limit {
            Some(condition_json(
                "FailureTarget",
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit",
            ))
        } else {
            None
        };
        if let Some(target) = target {
            self.write_job_status(key, |status| {
                merge(status, &counts);
                push_condition(status, target);
            });
            return;
        }

        let track = self.jobs.entry(uid.clone()).or_default();
        if active_uids.is_empty() && !track.creating {
            let delay = self.inner.options.pod_start_delay;
            if delay.is_zero() || create_now {
                track.started.get_or_insert_with(Instant::now);
                if let Some(d) = deadline
                    && !track.deadline_armed
                {
                    track.deadline_armed = true;
                    self.later(
                        Duration::from_secs(d),
                        Msg::Deadline {
                            job_uid: uid.clone(),
                        },
                    );
                }
                self.create_job_pod(&job);
            } else {
                track.creating = true;
                self.later(
                    delay,
                    Msg::CreatePod {
                        job_uid: uid.clone(),
                    },
                );
            }
            return;
        }
        let started = self.jobs.get(&uid).and_then(|t| t.started).is_some();
        self.write_job_status(key, |status| {
            merge(status, &counts);
            if started && status["startTime"].is_null() {
                status["startTime"] = json!(now());
            }
        });
    }

    fn create_job_pod(&mut self, job: &Value) {
        let name = str_at(job, "/metadata/name");
        let ns = str_at(job, "/metadata/namespace");
        let uid = str_at(job, "/metadata/uid");
        let template = &job["spec"]["template"];
        let mut metadata = template["metadata"].clone();
        if !metadata.is_object() {
            metadata = json!({});
        }
        metadata["generateName"] = json!(format!("{name}-"));
        metadata["ownerReferences"] = json!([{
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": name,
            "uid": uid,
            "controller": true,
            "blockOwnerDeletion": true,
        }]);
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": template["spec"].clone(),
        });
        let script = self.job_script(uid);
        let created = self
            .inner
            .store
            .write(|st| create_in(st, Kind::Pod, ns, pod, false));
        match created {
            Ok(pod) => {
                // Known before the loop sees the pod's ADDED event.
                if let Some(s) = script {
                    self.pod_scripts
                        .insert(str_at(&pod, "/metadata/uid").to_owned(), s);
                }
            }
            Err(e) => eprintln!(
                "kube double: the Job controller could not create a pod for {name}: {}",
                e.message
            ),
        }
    }

    /// Applies `f` to a Job's status and writes it if it changed.
    fn write_job_status(&self, key: &Key, f: impl FnOnce(&mut Value)) {
        self.inner.store.write(|st| {
            let Some(mut job) = st.get(key).cloned() else {
                return;
            };
            let before = job["status"].clone();
            if !job["status"].is_object() {
                job["status"] = json!({});
            }
            f(&mut job["status"]);
            if job["status"] != before {
                st.replace(key.clone(), job);
            }
        });
    }
}

/// The Job that controls a pod, with its uid.
fn controller_job(inner: &Inner, pod: &Value) -> Option<(Key, String)> {
    let uid = controller_uid(pod)?;
    let ns = str_at(pod, "/metadata/namespace");
    let name = pod["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| str_at(r, "/uid") == uid)
        .map(|r| str_at(r, "/name"))?;
    let key = Key::new(Kind::Job, ns, name);
    let exists = inner.store.read(|st| {
        st.get(&key)
            .is_some_and(|j| str_at(j, "/metadata/uid") == uid)
    });
    exists.then(|| (key, uid.to_owned()))
}

/// The uid of the Job controlling a pod.
fn controller_uid(pod: &Value) -> Option<&str> {
    pod["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["controller"] == Value::Bool(true) && str_at(r, "/kind") == "Job")
        .map(|r| str_at(r, "/uid"))
}

fn push_condition(status: &mut Value, c: Value) {
    if !status["conditions"].is_array() {
        status["conditions"] = json!([]);
    }
    if let Some(list) = status["conditions"].as_array_mut() {
        list.push(c);
    }
}

fn merge(status: &mut Value, fields: &Value) {
    for (k, v) in fields.as_object().into_iter().flatten() {
        status[k.as_str()] = v.clone();
    }
}
