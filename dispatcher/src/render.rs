//! `render-job`: the Job and Secret a task would get, as YAML, without contacting anything;
//! for a task of a warm class, the Job of a warm executor that would serve it (it has no
//! Secret).

use chrono::{DateTime, Utc};
use gantry_shared::catalog::ExecutorSpec;
use gantry_shared::message::{JobName, Task, TaskEnvelope};
use gantry_shared::topology::Topology;

use crate::images::{self, ImagePolicy};
use crate::runtime::kubernetes::job;
use crate::settings::Settings;
use crate::{Error, Result};

/// Renders the Job and Secret of `envelope` (a task message body) as two YAML documents;
/// for a warm class, the one Job of a new warm executor of the class (named afresh each
/// time, as the dispatcher names each executor it starts).
///
/// Only the catalog file is read: the executor registry and the nodes' images (development
/// mode) need the cluster, so a class must name its image in the file.
///
/// # Errors
/// The task is invalid, the catalog comes from a ConfigMap, the class is not in the catalog,
/// has no image, or its image is refused (not pinned, registry not allowed).
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
    let catalog = settings.catalog.as_ref().ok_or_else(|| {
        invalid(format!(
            "render-job reads only a catalog file, and the catalog comes from the ConfigMap {}; pass --catalog FILE (kubectl get configmap NAME -o jsonpath='{{.data.catalog\\.yaml}}' > catalog.yaml)",
            settings.dispatcher.catalog_configmap.as_deref().unwrap_or_default()
        ))
    })?;
    let spec = catalog.get(&task.executor).ok_or_else(|| {
        invalid(format!(
            "executor class {} is not in the catalog",
            task.executor
        ))
    })?;
    let kube = &settings.dispatcher.kubernetes;
    let image = images::catalog_image(&task.executor, spec, &ImagePolicy::of(kube))
        .map_err(|e| invalid(e.to_string()))?;
    let spec = &ExecutorSpec {
        image: Some(image),
        ..spec.clone()
    };
    let target = job::Target {
        namespace,
        prefix: &settings.common.prefix,
        otlp_endpoint: settings.common.otlp_endpoint.as_deref(),
    };
    if let Some(warm) = &spec.warm {
        job::admit(&task, spec).map_err(|e| invalid(e.to_string()))?;
        let name = JobName::for_warm(&task.executor);
        let topology =
            Topology::new(&settings.common.prefix).map_err(|e| invalid(e.to_string()))?;
        let queue = topology.warm_queue(name.as_str());
        let job = job::build_warm(&name, &task.executor, spec, warm, kube, &target, &queue)
            .map_err(|e| invalid(e.to_string()))?;
        return serde_norway::to_string(&job).map_err(|e| invalid(e.to_string()));
    }
    let (job, secret) = job::build(&task, spec, kube, &target, "render-job", now)
        .map_err(|e| invalid(e.to_string()))?;
    let job = serde_norway::to_string(&job).map_err(|e| invalid(e.to_string()))?;
    let secret = serde_norway::to_string(&secret).map_err(|e| invalid(e.to_string()))?;
    Ok(format!("{job}---\n{secret}"))
}
