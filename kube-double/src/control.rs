//! What the control loop keeps between events, and the messages it sends itself. The
//! loop's two halves are methods of [`Cluster`] in files of their own: the Job controller
//! (module `cluster`) keeps a [`JobTrack`] per Job, the kubelet (module `kubelet`) a
//! [`PodRun`] per pod it started. Their state lives here, so that neither half imports
//! the other.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::inner::Inner;
use crate::script::Script;
use crate::store::Key;

/// What the loop is asked to do besides reacting to store changes.
#[derive(Debug)]
pub(crate) enum Msg {
    CreatePod {
        job_uid: String,
    },
    Deadline {
        job_uid: String,
    },
    Ttl {
        job_uid: String,
    },
    /// A pod's process ended with this exit code.
    Exited {
        pod_uid: String,
        code: i32,
    },
    /// The next step of a scripted pod.
    Step {
        pod_uid: String,
        step: u32,
    },
    /// The pod's own `activeDeadlineSeconds` passed.
    PodDeadline {
        pod_uid: String,
    },
}

/// The Job controller's track of one Job.
#[derive(Default)]
pub(crate) struct JobTrack {
    /// How each of its pods ended (true: succeeded), by pod uid.
    pub(crate) outcomes: HashMap<String, bool>,
    pub(crate) creating: bool,
    pub(crate) started: Option<Instant>,
    pub(crate) deadline_armed: bool,
    pub(crate) ttl_armed: bool,
}

/// Where a pod the kubelet started stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunState {
    Waiting,
    Running,
    Done,
}

/// The kubelet's record of a pod it started.
pub(crate) struct PodRun {
    pub(crate) key: Key,
    pub(crate) state: RunState,
    pub(crate) pgid: Option<i32>,
    pub(crate) started_at: String,
    pub(crate) termination_log: PathBuf,
    pub(crate) fallback_to_logs: bool,
    pub(crate) log: PathBuf,
    pub(crate) script: Option<Script>,
    pub(crate) ip: String,
}

/// The control loop: the Job controller and the kubelet, with what they keep.
pub(crate) struct Cluster {
    pub(crate) inner: Arc<Inner>,
    pub(crate) tx: UnboundedSender<Msg>,
    pub(crate) jobs: HashMap<String, JobTrack>,
    pub(crate) runs: HashMap<String, PodRun>,
    pub(crate) job_scripts: HashMap<String, Script>,
    pub(crate) pod_scripts: HashMap<String, Script>,
    pub(crate) next_ip: u32,
}

impl Cluster {
    pub(crate) fn new(inner: Arc<Inner>, tx: UnboundedSender<Msg>) -> Cluster {
        Cluster {
            inner,
            tx,
            jobs: HashMap::new(),
            runs: HashMap::new(),
            job_scripts: HashMap::new(),
            pod_scripts: HashMap::new(),
            next_ip: 10,
        }
    }

    /// Sends `msg` back to the loop after `delay`.
    pub(crate) fn later(&self, delay: Duration, msg: Msg) {
        let tx = self.tx.clone();
        if delay.is_zero() {
            let _ = tx.send(msg);
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(msg);
        });
    }
}
