//! `render-job`: the Job and Secret a task would get, as YAML, without contacting anything.

use chrono::{DateTime, Utc};
use gantry_shared::message::{Task, TaskEnvelope};

use crate::runtime::kubernetes::job;
use crate::settings::Settings;
use crate::{Error, Result};

/// Renders the Job and Secret of `envelope` (a task message body) as two YAML documents.
///
/// # Errors
/// The task is invalid, its class is not in the catalog or has no image.
pub fn render_job(
    settings: &Settings,
    envelope: TaskEnvelope,
    namespace: &str,
    now: DateTime<Utc>,
) -> Result<String> {
    let id = envelope.task_id.to_string();
    let invalid = |message: String| Error::Job {
        job: id.clone(),
        message,
    };
    let task = Task::from_envelope(envelope, &settings.common.limits, now)
        .map_err(|r| invalid(r.to_string()))?;
    let spec = settings.catalog.get(&task.executor).ok_or_else(|| {
        invalid(format!(
            "executor class {} is not in the catalog",
            task.executor
        ))
    })?;
    let kube = &settings.dispatcher.kubernetes;
    let target = job::Target {
        namespace,
        prefix: &settings.common.prefix,
    };
    let (job, secret) = job::build(&task, spec, kube, &target, "render-job", now)
        .map_err(|e| invalid(e.to_string()))?;
    let job = serde_norway::to_string(&job).map_err(|e| invalid(e.to_string()))?;
    let secret = serde_norway::to_string(&secret).map_err(|e| invalid(e.to_string()))?;
    Ok(format!("{job}---\n{secret}"))
}
