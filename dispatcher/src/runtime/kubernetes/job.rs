//! The Job and Secret of one task attempt, built without contacting anything (so
//! `gantry-dispatcher render-job` prints exactly what the runtime would create).
//!
//! - Name: [`JobName::for_task`], deterministic from `(task_id, attempt)`; the Secret has the
//!   same name.
//! - `backoffLimit: 0` (retries happen at the queue), `restartPolicy: Never`,
//!   `activeDeadlineSeconds` = the time left until the task's deadline,
//!   `ttlSecondsAfterFinished` from the settings.
//! - The image, GPU limits, node selector and tolerations from the executor catalog (the
//!   image as resolved and checked by [`crate::images`]).
//! - Labels: managed-by, task id, executor class, attempt; annotations: correlation id,
//!   traceparent, task name.
//! - The payload is the task envelope in the Secret, mounted read-only as `task.json`; the
//!   AMQP URL comes from a Secret reference, never inline.
//! - No service-account token; non-root, read-only root filesystem (an `emptyDir` at `/tmp`),
//!   no privilege escalation, all capabilities dropped, seccomp `RuntimeDefault`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use gantry_shared::catalog::ExecutorSpec;
use gantry_shared::message::{JobName, Task};
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, Secret,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::settings::KubernetesSection;

/// Label and annotation keys Gantry puts on its objects.
pub mod keys {
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const TASK_ID: &str = "gantry.dev/task-id";
    pub const EXECUTOR: &str = "gantry.dev/executor";
    pub const ATTEMPT: &str = "gantry.dev/attempt";
    pub const CORRELATION_ID: &str = "gantry.dev/correlation-id";
    pub const TRACEPARENT: &str = "gantry.dev/traceparent";
    pub const TASK_NAME: &str = "gantry.dev/task";
    pub const DISPATCH_ID: &str = "gantry.dev/dispatch-id";
}

/// The Secret key holding the task envelope.
pub const TASK_FILE: &str = "task.json";
const GPU: &str = "nvidia.com/gpu";
const CONTAINER: &str = "executor";

/// Why a Job cannot be built for a task.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("executor class {0} has no image in the catalog; add `image:` (digest-pinned) to it")]
    NoImage(String),
    #[error("the task's deadline {0} has passed; it is not dispatched")]
    DeadlinePassed(DateTime<Utc>),
    #[error("the task asks for {asked} GPUs; executor class {class} allows at most {allowed}")]
    TooManyGpus {
        class: String,
        asked: u32,
        allowed: u32,
    },
    #[error("cannot encode the task: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Where the Job goes and where its executor reports.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub namespace: &'a str,
    /// The topology prefix the executor publishes under.
    pub prefix: &'a str,
}

/// The Job and its payload Secret for one attempt of `task`, as of `now`.
///
/// The image is `spec.image` as it stands: resolving and checking it (digest, allowed
/// registries) is [`crate::images`]'s business, before this.
///
/// # Errors
/// The class has no image, the deadline has passed, or the task asks for more GPUs than
/// its class allows.
pub fn build(
    task: &Task,
    spec: &ExecutorSpec,
    settings: &KubernetesSection,
    target: &Target<'_>,
    dispatch_id: &str,
    now: DateTime<Utc>,
) -> Result<(Job, Secret), BuildError> {
    let namespace = target.namespace;
    let image = spec
        .image
        .clone()
        .ok_or_else(|| BuildError::NoImage(task.executor.to_string()))?;
    let left = (task.deadline - now).num_milliseconds();
    if left <= 0 {
        return Err(BuildError::DeadlinePassed(task.deadline));
    }
    admit(task, spec)?;
    let active_deadline = (left + 999) / 1000;
    let name = JobName::for_task(task.id, task.attempt).to_string();
    let labels = labels(task);
    let mut annotations = BTreeMap::from([
        (keys::CORRELATION_ID.to_owned(), task.id.to_string()),
        (keys::TASK_NAME.to_owned(), task.name.to_string()),
        (keys::DISPATCH_ID.to_owned(), dispatch_id.to_owned()),
    ]);
    if let Some(tp) = &task.traceparent {
        annotations.insert(keys::TRACEPARENT.to_owned(), tp.clone());
    }
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels.clone()),
        annotations: Some(annotations),
        ..ObjectMeta::default()
    };

    let secret = Secret {
        metadata: ObjectMeta {
            annotations: None,
            ..meta.clone()
        },
        type_: Some("Opaque".into()),
        immutable: Some(true),
        data: Some(BTreeMap::from([(
            TASK_FILE.to_owned(),
            ByteString(serde_json::to_vec(&task.envelope())?),
        )])),
        ..Secret::default()
    };

    let job = Job {
        metadata: meta,
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(active_deadline),
            ttl_seconds_after_finished: Some(
                i32::try_from(settings.ttl_after_finished.as_secs()).unwrap_or(i32::MAX),
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(
                    task,
                    spec,
                    settings,
                    &name,
                    &image,
                    dispatch_id,
                    target.prefix,
                )),
            },
            ..JobSpec::default()
        }),
        status: None,
    };
    Ok((job, secret))
}

/// Whether the class can run the task at all: it asks for no more GPUs than the class
/// allows. Checked before anything is recorded for the attempt.
///
/// # Errors
/// [`BuildError::TooManyGpus`].
pub fn admit(task: &Task, spec: &ExecutorSpec) -> Result<(), BuildError> {
    let allowed = spec
        .resources
        .as_ref()
        .and_then(|r| r.gpu_count)
        .unwrap_or(0);
    match task.resources.as_ref().and_then(|r| r.gpu_count) {
        Some(asked) if asked > allowed => Err(BuildError::TooManyGpus {
            class: task.executor.to_string(),
            asked,
            allowed,
        }),
        _ => Ok(()),
    }
}

/// The labels of every object of a task attempt; the watcher selects on `MANAGED_BY`.
pub fn labels(task: &Task) -> BTreeMap<String, String> {
    BTreeMap::from([
        (keys::MANAGED_BY.to_owned(), "gantry".to_owned()),
        (keys::TASK_ID.to_owned(), task.id.to_string()),
        (keys::EXECUTOR.to_owned(), task.executor.to_string()),
        (keys::ATTEMPT.to_owned(), task.attempt.to_string()),
    ])
}

fn pod_spec(
    task: &Task,
    spec: &ExecutorSpec,
    settings: &KubernetesSection,
    name: &str,
    image: &str,
    dispatch_id: &str,
    prefix: &str,
) -> PodSpec {
    let gpus = task
        .resources
        .as_ref()
        .and_then(|r| r.gpu_count)
        .or_else(|| spec.resources.as_ref().and_then(|r| r.gpu_count))
        .unwrap_or(0);
    let mut limits = BTreeMap::new();
    if gpus > 0 {
        limits.insert(GPU.to_owned(), Quantity(gpus.to_string()));
    }
    if let Some(l) = &spec.limits {
        if let Some(cpu) = &l.cpu {
            limits.insert("cpu".to_owned(), Quantity(cpu.clone()));
        }
        if let Some(memory) = &l.memory {
            limits.insert("memory".to_owned(), Quantity(memory.clone()));
        }
    }
    let mut tolerations: Vec<Toleration> = spec
        .tolerations
        .iter()
        .map(|t| Toleration {
            key: t.key.clone(),
            operator: t.operator.clone(),
            value: t.value.clone(),
            effect: t.effect.clone(),
            toleration_seconds: t.toleration_seconds,
        })
        .collect();
    if gpus > 0 && !tolerations.iter().any(|t| t.key.as_deref() == Some(GPU)) {
        tolerations.push(Toleration {
            key: Some(GPU.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        });
    }
    let mut node_selector = spec.node_selector.clone();
    if let Some(gpu_type) = task
        .resources
        .as_ref()
        .and_then(|r| r.gpu_type.clone())
        .or_else(|| spec.resources.as_ref().and_then(|r| r.gpu_type.clone()))
    {
        node_selector
            .entry("nvidia.com/gpu.product".into())
            .or_insert(gpu_type);
    }
    let mount = settings.task_mount_path.trim_end_matches('/');
    PodSpec {
        restart_policy: Some("Never".into()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        node_selector: (!node_selector.is_empty()).then_some(node_selector),
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(settings.run_as_user),
            run_as_group: Some(settings.run_as_user),
            fs_group: Some(settings.run_as_user),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![Container {
            name: CONTAINER.into(),
            image: Some(image.to_owned()),
            image_pull_policy: Some("IfNotPresent".into()),
            env: Some(env(task, spec, settings, name, mount, dispatch_id, prefix)),
            resources: (!limits.is_empty()).then(|| ResourceRequirements {
                requests: Some(limits.clone()),
                limits: Some(limits),
                ..ResourceRequirements::default()
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                privileged: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    add: None,
                }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "task".into(),
                    mount_path: mount.to_owned(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: "tmp".into(),
                    mount_path: "/tmp".into(),
                    ..VolumeMount::default()
                },
            ]),
            termination_message_path: Some("/dev/termination-log".into()),
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            ..Container::default()
        }],
        volumes: Some(vec![
            Volume {
                name: "task".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(name.to_owned()),
                    default_mode: Some(0o440),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "tmp".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    }
}

fn env(
    task: &Task,
    spec: &ExecutorSpec,
    settings: &KubernetesSection,
    name: &str,
    mount: &str,
    dispatch_id: &str,
    prefix: &str,
) -> Vec<EnvVar> {
    let value = |k: &str, v: String| EnvVar {
        name: k.into(),
        value: Some(v),
        value_from: None,
    };
    let field = |k: &str, path: &str| EnvVar {
        name: k.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    };
    let mut env = vec![
        value("GANTRY_TASK_FILE", format!("{mount}/{TASK_FILE}")),
        EnvVar {
            name: "GANTRY_AMQP_URL".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: settings.amqp_secret_name.clone(),
                    key: settings.amqp_secret_key.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
        },
        value("GANTRY_PREFIX", prefix.to_owned()),
        value("GANTRY_JOB_NAME", name.to_owned()),
        value("GANTRY_DISPATCH_ID", dispatch_id.to_owned()),
        field("GANTRY_POD_NAME", "metadata.name"),
        field("GANTRY_NODE_NAME", "spec.nodeName"),
        value("GANTRY_TERMINATION_LOG", "/dev/termination-log".into()),
    ];
    env.extend(
        spec.engine
            .executor_env()
            .into_iter()
            .map(|(name, v)| value(name, v)),
    );
    if let Some(tp) = &task.traceparent {
        env.push(value("GANTRY_TRACEPARENT", tp.clone()));
    }
    if let Some(reply_to) = &task.reply_to {
        env.push(value("GANTRY_REPLY_TO", reply_to.clone()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::catalog::Catalog;
    use gantry_shared::message::{ExecutorClass, Limits, Resources, TaskName, TaskSpec};
    use serde_json::json;
    use std::time::Duration;

    fn catalog() -> Catalog {
        Catalog::parse(
            "executors:\n  vllm:\n    engine: { kind: echo }\n    image: reg.example/executor-vllm@sha256:abc\n    resources: { gpu_count: 2, gpu_type: NVIDIA-L4 }\n",
            "test",
        )
        .unwrap()
    }

    fn task(gpus: Option<u32>) -> Task {
        Task::new(
            TaskSpec {
                executor: ExecutorClass::parse("vllm").unwrap(),
                name: TaskName::parse("llm.chat").unwrap(),
                payload: json!({"prompt": "hi"}),
                ttl: Duration::from_secs(90),
                reply_to: None,
                idempotency_key: None,
                priority: None,
                resources: gpus.map(|n| Resources {
                    gpu_count: Some(n),
                    gpu_type: None,
                }),
            },
            &Limits::default(),
        )
        .unwrap()
    }

    fn build_for(task: &Task) -> Result<(Job, Secret), BuildError> {
        let catalog = catalog();
        let spec = catalog.get(&task.executor).unwrap();
        let target = Target {
            namespace: "ml",
            prefix: "gantry",
        };
        build(
            task,
            spec,
            &KubernetesSection::default(),
            &target,
            "d-1",
            Utc::now(),
        )
    }

    #[test]
    fn a_job_carries_its_correlation_id_dispatch_id_and_time_to_live() {
        let mut task = task(None);
        task.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let catalog = catalog();
        let settings = KubernetesSection {
            ttl_after_finished: Duration::from_secs(15),
            ..KubernetesSection::default()
        };
        let target = Target {
            namespace: "ml",
            prefix: "gantry",
        };
        let spec = catalog.get(&task.executor).unwrap();
        let (job, secret) =
            build(&task, spec, &settings, &target, "k8s-ml.d1", Utc::now()).unwrap();
        let annotations = job.metadata.annotations.clone().unwrap();
        assert_eq!(annotations[keys::CORRELATION_ID], task.id.to_string());
        assert_eq!(annotations[keys::DISPATCH_ID], "k8s-ml.d1");
        assert_eq!(annotations[keys::TASK_NAME], "llm.chat");
        assert_eq!(
            annotations[keys::TRACEPARENT],
            task.traceparent.clone().unwrap()
        );
        assert_eq!(job.spec.unwrap().ttl_seconds_after_finished, Some(15));
        assert_eq!(
            secret.metadata.annotations, None,
            "the Secret carries no annotations"
        );
    }

    #[test]
    fn a_job_is_named_labelled_and_bounded_by_its_task() {
        let task = task(None);
        let (job, secret) = build_for(&task).unwrap();
        let name = JobName::for_task(task.id, gantry_shared::message::Attempt::FIRST).to_string();
        assert_eq!(job.metadata.name.as_deref(), Some(name.as_str()));
        assert_eq!(secret.metadata.name, job.metadata.name);
        let labels = job.metadata.labels.clone().unwrap();
        assert_eq!(labels[keys::MANAGED_BY], "gantry");
        assert_eq!(labels[keys::TASK_ID], task.id.to_string());
        assert_eq!(labels[keys::ATTEMPT], "1");
        let spec = job.spec.unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        let deadline = spec.active_deadline_seconds.unwrap();
        assert!((89..=90).contains(&deadline), "{deadline}");
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        let container = &pod.containers[0];
        let limits = container.resources.clone().unwrap().limits.unwrap();
        assert_eq!(
            limits[GPU],
            Quantity("2".into()),
            "the class's GPUs by default"
        );
        let sc = container.security_context.clone().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let amqp = container
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "GANTRY_AMQP_URL")
            .unwrap();
        assert!(amqp.value.is_none(), "the AMQP URL is never inline");
        let stored: serde_json::Value =
            serde_json::from_slice(&secret.data.unwrap()[TASK_FILE].0).unwrap();
        assert_eq!(stored["task_id"], json!(task.id));
    }

    #[test]
    fn a_task_cannot_ask_for_more_gpus_than_its_class_allows() {
        assert!(build_for(&task(Some(1))).is_ok());
        assert!(matches!(
            build_for(&task(Some(3))),
            Err(BuildError::TooManyGpus {
                asked: 3,
                allowed: 2,
                ..
            })
        ));
    }
}
