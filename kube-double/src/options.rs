//! The knobs a double starts with.

use std::time::Duration;

use crate::script::Script;

/// The namespace the client uses by default.
pub const NAMESPACE: &str = "gantry-test";

/// Knobs of a double.
#[derive(Debug, Clone)]
pub struct Options {
    /// The client's default namespace (created with `default` and `kube-system`).
    pub namespace: String,
    /// How long the Job controller waits before creating a Job's pod.
    pub pod_start_delay: Duration,
    /// The "moment" between the steps of a script.
    pub script_step: Duration,
    /// How many changes watches can replay; older ones get 410 Gone.
    pub history_limit: usize,
    /// How often a watch that allows bookmarks gets one.
    pub bookmark_interval: Duration,
    /// The script of every Job that names none and has none queued; `None`: its pods run
    /// their container.
    pub script: Option<Script>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            namespace: NAMESPACE.into(),
            pod_start_delay: Duration::ZERO,
            script_step: Duration::from_millis(30),
            history_limit: 10_000,
            bookmark_interval: Duration::from_secs(1),
            script: None,
        }
    }
}
