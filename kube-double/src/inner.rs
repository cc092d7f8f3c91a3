//! What the server, the control loop and the [`KubeDouble`](crate::KubeDouble) handle
//! share: the store, the options, the queued scripts and faults, the request record, and
//! the pods whose processes run.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use serde_json::Value;
use tokio::sync::watch;

use crate::faults::{Fault, FaultSpec, RequestRecord};
use crate::options::Options;
use crate::script::Script;
use crate::store::Store;

/// A pod the kubelet started: where its log is, and its process group.
pub(crate) struct PodProcess {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) log: PathBuf,
    pub(crate) pgid: Option<i32>,
    /// Whether the process may still run (its group is killed when the double drops).
    pub(crate) running: bool,
    pub(crate) started: Instant,
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) options: Options,
    pub(crate) dir: tempfile::TempDir,
    faults: Mutex<Vec<(FaultSpec, u32)>>,
    requests: Mutex<Vec<RequestRecord>>,
    scripts: Mutex<VecDeque<Script>>,
    /// Scripts of the Jobs that carry a label: `(key, value, script)`.
    labelled_scripts: Mutex<Vec<(String, String, Script)>>,
    images: Mutex<HashMap<String, Vec<String>>>,
    pods: Mutex<HashMap<String, PodProcess>>,
    pub(crate) watch_ends: watch::Sender<u64>,
    pub(crate) shutdown: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    pub(crate) fn new(store: Store, options: Options, dir: tempfile::TempDir) -> Inner {
        Inner {
            store,
            options,
            dir,
            faults: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            scripts: Mutex::new(VecDeque::new()),
            labelled_scripts: Mutex::new(Vec::new()),
            images: Mutex::new(HashMap::new()),
            pods: Mutex::new(HashMap::new()),
            watch_ends: watch::channel(0).0,
            shutdown: watch::channel(false).0,
        }
    }

    pub(crate) fn lock_requests(&self) -> MutexGuard<'_, Vec<RequestRecord>> {
        lock(&self.requests)
    }

    pub(crate) fn lock_pods(&self) -> MutexGuard<'_, HashMap<String, PodProcess>> {
        lock(&self.pods)
    }

    pub(crate) fn lock_images(&self) -> MutexGuard<'_, HashMap<String, Vec<String>>> {
        lock(&self.images)
    }

    pub(crate) fn queue_script(&self, script: Script) {
        lock(&self.scripts).push_back(script);
    }

    pub(crate) fn next_script(&self) -> Option<Script> {
        lock(&self.scripts).pop_front()
    }

    pub(crate) fn add_labelled_script(&self, key: &str, value: &str, script: Script) {
        lock(&self.labelled_scripts).push((key.to_owned(), value.to_owned(), script));
    }

    /// The script of the first rule whose label `job` carries.
    pub(crate) fn labelled_script(&self, job: &Value) -> Option<Script> {
        let labels = &job["metadata"]["labels"];
        lock(&self.labelled_scripts)
            .iter()
            .find(|(k, v, _)| labels[k.as_str()].as_str() == Some(v.as_str()))
            .map(|(_, _, script)| script.clone())
    }

    pub(crate) fn add_fault(&self, spec: FaultSpec, n: u32) {
        lock(&self.faults).push((spec, n));
    }

    pub(crate) fn clear_faults(&self) {
        lock(&self.faults).clear();
    }

    /// Takes one use of the first fault matching a request.
    pub(crate) fn take_fault(&self, method: &str, path: &str) -> Option<Fault> {
        let mut faults = lock(&self.faults);
        let i = faults
            .iter()
            .position(|(spec, left)| *left > 0 && spec.matches(method, path))?;
        faults[i].1 -= 1;
        let fault = faults[i].0.fault.clone();
        if faults[i].1 == 0 {
            faults.remove(i);
        }
        Some(fault)
    }

    /// The log of the newest pod named `name` in `namespace`.
    pub(crate) fn log_of(&self, namespace: &str, name: &str) -> Option<String> {
        let path = self
            .lock_pods()
            .values()
            .filter(|p| p.namespace == namespace && p.name == name)
            .max_by_key(|p| p.started)
            .map(|p| p.log.clone())?;
        // A scripted pod has no log file: it never wrote a line.
        let bytes = std::fs::read(path).unwrap_or_default();
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }
}
