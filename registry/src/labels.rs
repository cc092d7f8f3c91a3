//! The image labels that make an image an executor, and the capabilities read from them.
//!
//! | label | required | value |
//! |---|---|---|
//! | `dev.gantry.executor.tasks` | yes | the task names it handles, comma-separated: `llm.chat,llm.complete` |
//! | `dev.gantry.executor.owner` | yes | who answers for it: a team or an address |
//! | `dev.gantry.executor.gpu` | no | GPUs one task needs, a whole number (absent: 0) |
//! | `dev.gantry.executor.model` | no | the model it serves: `Qwen/Qwen2.5-7B-Instruct` |
//! | `dev.gantry.executor.class` | no | the class it is built for; must be the repository's |

use std::collections::BTreeMap;

use gantry_shared::message::TaskName;
use serde::{Deserialize, Serialize};

use crate::refusal::Reason;

pub const TASKS: &str = "dev.gantry.executor.tasks";
pub const OWNER: &str = "dev.gantry.executor.owner";
pub const GPU: &str = "dev.gantry.executor.gpu";
pub const MODEL: &str = "dev.gantry.executor.model";
pub const CLASS: &str = "dev.gantry.executor.class";

/// Longest label value kept (an owner or a model name).
const MAX_VALUE: usize = 256;

/// What an executor image can do, as the dispatcher reads it (`tasks` is enforced there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The task names the image handles.
    pub tasks: Vec<String>,
    /// GPUs one task needs.
    pub gpus: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// What the labels of an image of `class` say: its capabilities and its owner.
///
/// # Errors
/// The [`Reason`] it is refused: a required label missing, or a value that cannot be read.
pub(crate) fn read(
    class: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(Capabilities, String), Reason> {
    let value = |key: &'static str| labels.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());
    let bad = |label: &'static str, value: &str, expected: String| Reason::BadLabel {
        label,
        value: value.to_owned(),
        expected,
    };
    if let Some(other) = value(CLASS)
        && other != class
    {
        return Err(Reason::OtherClass {
            label: other.to_owned(),
        });
    }
    let tasks_text = value(TASKS).ok_or(Reason::MissingLabel(TASKS))?;
    let mut tasks = Vec::new();
    for task in tasks_text.split(',').map(str::trim) {
        let name = TaskName::parse(task).map_err(|e| {
            bad(
                TASKS,
                tasks_text,
                format!("{e} (the value is task names separated by commas)"),
            )
        })?;
        if !tasks.contains(&name.to_string()) {
            tasks.push(name.to_string());
        }
    }
    let owner = value(OWNER).ok_or(Reason::MissingLabel(OWNER))?;
    if owner.len() > MAX_VALUE {
        return Err(bad(OWNER, owner, format!("longer than {MAX_VALUE} bytes")));
    }
    let gpus = match value(GPU) {
        None => 0,
        Some(v) => v
            .parse::<u32>()
            .map_err(|_| bad(GPU, v, "not a whole number of GPUs (0 for none)".into()))?,
    };
    let model = match value(MODEL) {
        Some(m) if m.len() > MAX_VALUE => {
            return Err(bad(MODEL, m, format!("longer than {MAX_VALUE} bytes")));
        }
        m => m.map(str::to_owned),
    };
    Ok((Capabilities { tasks, gpus, model }, owner.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn tasks_owner_gpu_and_model_are_read() {
        let (caps, owner) = read(
            "vllm",
            &labels(&[
                (TASKS, "llm.chat, llm.complete,llm.chat"),
                (OWNER, "team-ml"),
                (GPU, "2"),
                (MODEL, "Qwen/Qwen2.5-7B-Instruct"),
                (CLASS, "vllm"),
            ]),
        )
        .unwrap();
        assert_eq!(caps.tasks, ["llm.chat", "llm.complete"]);
        assert_eq!(caps.gpus, 2);
        assert_eq!(caps.model.as_deref(), Some("Qwen/Qwen2.5-7B-Instruct"));
        assert_eq!(owner, "team-ml");
        let (bare, _) = read("echo", &labels(&[(TASKS, "k8s.echo"), (OWNER, "x")])).unwrap();
        assert_eq!((bare.gpus, bare.model), (0, None));
    }

    #[test]
    fn images_without_the_required_labels_or_with_unreadable_ones_are_refused() {
        assert_eq!(
            read("echo", &labels(&[(OWNER, "x")])).unwrap_err(),
            Reason::MissingLabel(TASKS)
        );
        assert_eq!(
            read("echo", &labels(&[(TASKS, "a"), (OWNER, " ")])).unwrap_err(),
            Reason::MissingLabel(OWNER)
        );
        let gpu = read("echo", &labels(&[(TASKS, "a"), (OWNER, "x"), (GPU, "one")]))
            .unwrap_err()
            .to_string();
        assert!(gpu.contains("dev.gantry.executor.gpu=\"one\""), "{gpu}");
        let tasks = read("echo", &labels(&[(TASKS, "a,,b"), (OWNER, "x")]))
            .unwrap_err()
            .to_string();
        assert!(tasks.contains("separated by commas"), "{tasks}");
        assert_eq!(
            read(
                "echo",
                &labels(&[(TASKS, "a"), (OWNER, "x"), (CLASS, "vllm")])
            )
            .unwrap_err(),
            Reason::OtherClass {
                label: "vllm".into()
            }
        );
    }
}
