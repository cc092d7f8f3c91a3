//! Scripted outcomes: what a Job's pods do instead of running their command, and how a
//! Job or a bare Pod names one.

use serde_json::Value;

/// The label or annotation on a Job (or a bare Pod) that names its [`Script`].
pub const SCRIPT_KEY: &str = "double.gantry.dev/script";

/// A scripted outcome for a Job's pods instead of running their command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// Runs nothing and succeeds (exit 0).
    Succeed,
    /// Runs nothing and fails with this exit code.
    Fail(i32),
    /// The container is OOMKilled (exit 137) after a moment.
    Oom,
    /// The image never pulls: `ErrImagePull`, then `ImagePullBackOff`; the pod stays Pending.
    ImagePull,
    /// No node ever fits: Pending with `PodScheduled=False, reason=Unschedulable`.
    PendingForever,
    /// The kubelet evicts the pod: Failed, reason `Evicted`, a `DisruptionTarget` condition.
    Evict,
    /// The node is lost: the pod Failed with reason `NodeLost`, then deleted.
    NodeLost,
    /// Runs nothing and stays Running until the pod is deleted or its deadline passes (a
    /// long job, without a process per pod).
    RunForever,
    /// No script: the pod runs its container (a place in
    /// [`KubeDouble::script_next`](crate::KubeDouble::script_next)'s queue for a Job that
    /// runs normally).
    Run,
}

impl std::str::FromStr for Script {
    type Err = String;

    /// `succeed`, `fail` (exit 1), `fail-3` or `fail(3)`, `oom`, `image-pull`,
    /// `pending-forever`, `evict`, `node-lost`, `run-forever`, `run`.
    fn from_str(s: &str) -> Result<Script, String> {
        Ok(match s {
            "succeed" => Script::Succeed,
            "fail" => Script::Fail(1),
            "oom" => Script::Oom,
            "image-pull" => Script::ImagePull,
            "pending-forever" => Script::PendingForever,
            "evict" => Script::Evict,
            "node-lost" => Script::NodeLost,
            "run-forever" => Script::RunForever,
            "run" => Script::Run,
            other => {
                let code = other
                    .strip_prefix("fail-")
                    .or_else(|| {
                        other
                            .strip_prefix("fail(")
                            .and_then(|c| c.strip_suffix(')'))
                    })
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| format!("unknown script {other:?}"))?;
                Script::Fail(code)
            }
        })
    }
}

impl std::fmt::Display for Script {
    /// The name as a label value can carry it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Script::Succeed => f.write_str("succeed"),
            Script::Fail(code) => write!(f, "fail-{code}"),
            Script::Oom => f.write_str("oom"),
            Script::ImagePull => f.write_str("image-pull"),
            Script::PendingForever => f.write_str("pending-forever"),
            Script::Evict => f.write_str("evict"),
            Script::NodeLost => f.write_str("node-lost"),
            Script::RunForever => f.write_str("run-forever"),
            Script::Run => f.write_str("run"),
        }
    }
}

/// The script named on an object by the `double.gantry.dev/script` label or annotation.
pub(crate) fn script_of(object: &Value) -> Option<Script> {
    ["labels", "annotations"].iter().find_map(|m| {
        object["metadata"][m][SCRIPT_KEY]
            .as_str()
            .and_then(|s| s.parse().ok())
    })
}
