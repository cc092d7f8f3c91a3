//! The Jobs the runtime creates, built without contacting anything (so
//! `gantry-dispatcher render-job` prints exactly what the runtime would create): the Job
//! and Secret of one task attempt ([`build`]), and the Job of a warm executor
//! ([`build_warm`]). Both run the same pod ([`pod_spec`]) with the same shared environment.
//!
//! A task attempt's Job:
//!
//! - Name: [`JobName::for_task`], deterministic from `(task_id, attempt)`; the Secret has the
//!   same name.
//! - `activeDeadlineSeconds` = the time left until the task's deadline.
//! - Labels: managed-by, task id, executor class, attempt; annotations: correlation id,
//!   traceparent, task name.
//! - The payload is the task envelope in the Secret, mounted read-only as `task.json`.
//!
//! A warm executor's Job:
//!
//! - Name: the [`JobName::for_warm`] the dispatcher chose (`gantry-w-<class>-<10 hex>`).
//! - `activeDeadlineSeconds` = [`WarmSpec::job_deadline`], as the local runtime's.
//! - Labels: managed-by, executor class, `gantry.dev/warm: "true"`; no task, no attempt.
//! - No Secret and no task volume: its tasks come over its own queue
//!   (`GANTRY_WARM_QUEUE`), its settings in `GANTRY_WARM`.
//!
//! Both: `backoffLimit: 0` (retries happen at the queue), `restartPolicy: Never`,
//! `ttlSecondsAfterFinished` from the settings; the image (as resolved and checked by
//! [`crate::images`]), GPU limits, node selector and tolerations from the executor catalog;
//! the AMQP URL from a Secret reference, never inline; no service-account token; non-root,
//! read-only root filesystem (an `emptyDir` at `/tmp`), no privilege escalation, all
//! capabilities dropped, seccomp `RuntimeDefault`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use gantry_shared::catalog::{ExecutorSpec, WarmSpec};
use gantry_shared::message::{ExecutorClass, JobName, Task};
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SeccompProfile, Secret, SecretKeySelector, SecretVolumeSource,
    SecurityContext, Toleration, Volume, VolumeMount,
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
    /// `"true"` on a warm executor's Job and pod.
    pub const WARM: &str = "gantry.dev/warm";
    pub const CORRELATION_ID: &str = "gantry.dev/correlation-id";
    pub const TRACEPARENT: &str = "gantry.dev/traceparent";
    pub const TASK_NAME: &str = "gantry.dev/task";
    pub const DISPATCH_ID: &str = "gantry.dev/dispatch-id";
}

/// Where the executor CA ConfigMap (`executor_ca_configmap`) is mounted, and its key.
const CA_MOUNT: &str = "/etc/gantry/ca";
const CA_KEY: &str = "ca.crt";

/// The Secret key holding the task envelope.
pub const TASK_FILE: &str = "task.json";
const GPU: &str = "nvidia.com/gpu";
const GPU_PRODUCT: &str = "nvidia.com/gpu.product";
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
    #[error(
        "the task asks for GPU type {asked}, and executor class {class} is warm: its executors run on {has}; drop `resources.gpu_type` from the task, or send it to a class of that type"
    )]
    WarmGpuType {
        class: String,
        asked: String,
        has: String,
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
    /// Where the executor exports its spans (`otlp_endpoint`), when the dispatcher does.
    pub otlp_endpoint: Option<&'a str>,
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
    let image = spec
        .image
        .clone()
        .ok_or_else(|| BuildError::NoImage(task.executor.to_string()))?;
    let left = (task.deadline - now).num_milliseconds();
    if left <= 0 {
        return Err(BuildError::DeadlinePassed(task.deadline));
    }
    admit(task, spec)?;
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
        namespace: Some(target.namespace.to_owned()),
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

    let mount = settings.task_mount_path.trim_end_matches('/');
    let mut own_env = vec![
        value("GANTRY_TASK_FILE", format!("{mount}/{TASK_FILE}")),
        value("GANTRY_DISPATCH_ID", dispatch_id.to_owned()),
    ];
    if let Some(tp) = &task.traceparent {
        own_env.push(value("GANTRY_TRACEPARENT", tp.clone()));
    }
    if let Some(reply_to) = &task.reply_to {
        own_env.push(value("GANTRY_REPLY_TO", reply_to.clone()));
    }
    let asked = task.resources.as_ref();
    let pod = Pod {
        name: &name,
        image: &image,
        prefix: target.prefix,
        otlp_endpoint: target.otlp_endpoint,
        gpus: asked
            .and_then(|r| r.gpu_count)
            .unwrap_or_else(|| class_gpus(spec)),
        gpu_type: asked
            .and_then(|r| r.gpu_type.clone())
            .or_else(|| class_gpu_type(spec)),
        env: own_env,
        task_mount: Some(mount),
    };
    let active_deadline = (left + 999) / 1000;
    let job = job(
        meta,
        labels,
        active_deadline,
        pod_spec(spec, settings, pod),
        settings,
    );
    Ok((job, secret))
}

/// The Job of a warm executor of `class` named `name`, serving the tasks handed to it on
/// `queue` under `warm`'s settings. It has no Secret: nothing of a task is in it.
///
/// # Errors
/// The class has no image.
pub fn build_warm(
    name: &JobName,
    class: &ExecutorClass,
    spec: &ExecutorSpec,
    warm: &WarmSpec,
    settings: &KubernetesSection,
    target: &Target<'_>,
    queue: &str,
) -> Result<Job, BuildError> {
    let image = spec
        .image
        .clone()
        .ok_or_else(|| BuildError::NoImage(class.to_string()))?;
    let labels = warm_labels(class);
    let meta = ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(target.namespace.to_owned()),
        labels: Some(labels.clone()),
        ..ObjectMeta::default()
    };
    let (key, settings_json) = warm.executor_env();
    let pod = Pod {
        name: name.as_str(),
        image: &image,
        prefix: target.prefix,
        otlp_endpoint: target.otlp_endpoint,
        gpus: class_gpus(spec),
        gpu_type: class_gpu_type(spec),
        env: vec![
            value("GANTRY_WARM_QUEUE", queue.to_owned()),
            value(key, settings_json),
        ],
        task_mount: None,
    };
    let active_deadline = i64::try_from(warm.job_deadline().as_secs()).unwrap_or(i64::MAX);
    Ok(job(
        meta,
        labels,
        active_deadline,
        pod_spec(spec, settings, pod),
        settings,
    ))
}

/// Whether the class can run the task at all: it asks for no more GPUs than the class
/// allows, and, for a warm class (whose executors have the class's GPUs, whatever the
/// task), no other GPU type. Checked before anything is recorded for the attempt.
///
/// # Errors
/// [`BuildError::TooManyGpus`], [`BuildError::WarmGpuType`].
pub fn admit(task: &Task, spec: &ExecutorSpec) -> Result<(), BuildError> {
    let allowed = class_gpus(spec);
    let asked = task.resources.as_ref();
    match asked.and_then(|r| r.gpu_count) {
        Some(asked) if asked > allowed => {
            return Err(BuildError::TooManyGpus {
                class: task.executor.to_string(),
                asked,
                allowed,
            });
        }
        _ => {}
    }
    let has = class_gpu_type(spec);
    match asked.and_then(|r| r.gpu_type.as_ref()) {
        Some(asked) if spec.warm.is_some() && has.as_ref() != Some(asked) => {
            Err(BuildError::WarmGpuType {
                class: task.executor.to_string(),
                asked: asked.clone(),
                has: has.unwrap_or_else(|| "any node (the class names no GPU type)".into()),
            })
        }
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

/// The labels of a warm executor's Job and pod.
pub fn warm_labels(class: &ExecutorClass) -> BTreeMap<String, String> {
    BTreeMap::from([
        (keys::MANAGED_BY.to_owned(), "gantry".to_owned()),
        (keys::EXECUTOR.to_owned(), class.to_string()),
        (keys::WARM.to_owned(), "true".to_owned()),
    ])
}

fn class_gpus(spec: &ExecutorSpec) -> u32 {
    spec.resources
        .as_ref()
        .and_then(|r| r.gpu_count)
        .unwrap_or(0)
}

fn class_gpu_type(spec: &ExecutorSpec) -> Option<String> {
    spec.resources.as_ref().and_then(|r| r.gpu_type.clone())
}

/// A Job of `pod`, ending at `active_deadline` seconds, never retried in place.
fn job(
    meta: ObjectMeta,
    labels: BTreeMap<String, String>,
    active_deadline: i64,
    pod: PodSpec,
    settings: &KubernetesSection,
) -> Job {
    Job {
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
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// What one Job's pod has of its own; the rest comes from its class and the settings.
struct Pod<'a> {
    /// The Job's name (the executor's `GANTRY_JOB_NAME`, the task Secret's name).
    name: &'a str,
    image: &'a str,
    prefix: &'a str,
    otlp_endpoint: Option<&'a str>,
    gpus: u32,
    gpu_type: Option<String>,
    /// The Job's own environment, after the shared one.
    env: Vec<EnvVar>,
    /// Where the task Secret is mounted, for a task's Job.
    task_mount: Option<&'a str>,
}

fn pod_spec(spec: &ExecutorSpec, settings: &KubernetesSection, pod: Pod<'_>) -> PodSpec {
    let mut limits = BTreeMap::new();
    if pod.gpus > 0 {
        limits.insert(GPU.to_owned(), Quantity(pod.gpus.to_string()));
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
    if pod.gpus > 0 && !tolerations.iter().any(|t| t.key.as_deref() == Some(GPU)) {
        tolerations.push(Toleration {
            key: Some(GPU.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        });
    }
    let mut node_selector = spec.node_selector.clone();
    if let Some(gpu_type) = pod.gpu_type {
        node_selector.entry(GPU_PRODUCT.into()).or_insert(gpu_type);
    }
    let mut env = shared_env(spec, settings, pod.name, pod.prefix);
    if let Some(endpoint) = pod.otlp_endpoint {
        env.push(value("GANTRY_OTLP_ENDPOINT", endpoint.to_owned()));
    }
    env.extend(pod.env);
    let mut mounts = Vec::new();
    let mut volumes = Vec::new();
    if let Some(mount) = pod.task_mount {
        mounts.push(VolumeMount {
            name: "task".into(),
            mount_path: mount.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "task".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(pod.name.to_owned()),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    if let Some(configmap) = &settings.executor_ca_configmap {
        env.push(value("GANTRY_TLS_CA_FILE", format!("{CA_MOUNT}/{CA_KEY}")));
        mounts.push(VolumeMount {
            name: "ca".into(),
            mount_path: CA_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "ca".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: configmap.clone(),
                items: Some(vec![KeyToPath {
                    key: CA_KEY.into(),
                    path: CA_KEY.into(),
                    mode: None,
                }]),
                default_mode: Some(0o444),
                optional: Some(false),
            }),
            ..Volume::default()
        });
    }
    mounts.push(VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    });
    volumes.push(Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });
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
            image: Some(pod.image.to_owned()),
            image_pull_policy: Some("IfNotPresent".into()),
            env: Some(env),
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
            volume_mounts: Some(mounts),
            termination_message_path: Some("/dev/termination-log".into()),
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            ..Container::default()
        }],
        volumes: Some(volumes),
        ..PodSpec::default()
    }
}

/// The environment every executor of the class gets, in a task's Job or a warm one: where
/// it reports, its evidence, its engine.
fn shared_env(
    spec: &ExecutorSpec,
    settings: &KubernetesSection,
    name: &str,
    prefix: &str,
) -> Vec<EnvVar> {
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
    env
}

fn value(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    }
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
            otlp_endpoint: None,
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
            otlp_endpoint: None,
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

    fn warm_catalog() -> Catalog {
        Catalog::parse(
            "executors:\n  vllm:\n    engine: { kind: echo }\n    image: reg.example/executor-vllm@sha256:abc\n    resources: { gpu_count: 2, gpu_type: NVIDIA-L4 }\n    warm: { max_concurrency: 8, max_job_lifetime: 2h }\n",
            "test",
        )
        .unwrap()
    }

    fn env_of(job: &Job) -> Vec<EnvVar> {
        job.spec.clone().unwrap().template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap()
    }

    #[test]
    fn a_warm_executors_job_carries_no_task_and_lives_as_long_as_its_class_allows() {
        let catalog = warm_catalog();
        let class = ExecutorClass::parse("vllm").unwrap();
        let spec = catalog.get(&class).unwrap();
        let warm = spec.warm.unwrap();
        let name = JobName::for_warm(&class);
        let target = Target {
            namespace: "ml",
            prefix: "gantry",
            otlp_endpoint: None,
        };
        let settings = KubernetesSection::default();
        let job = build_warm(
            &name,
            &class,
            spec,
            &warm,
            &settings,
            &target,
            "gantry.warm.q",
        )
        .unwrap();
        assert_eq!(job.metadata.name.as_deref(), Some(name.as_str()));
        let labels = job.metadata.labels.clone().unwrap();
        assert_eq!(labels[keys::MANAGED_BY], "gantry");
        assert_eq!(labels[keys::EXECUTOR], "vllm");
        assert_eq!(labels[keys::WARM], "true");
        assert!(!labels.contains_key(keys::TASK_ID) && !labels.contains_key(keys::ATTEMPT));
        let job_spec = job.spec.clone().unwrap();
        assert_eq!(
            job_spec.active_deadline_seconds,
            Some(i64::try_from(warm.job_deadline().as_secs()).unwrap())
        );
        assert_eq!(job_spec.backoff_limit, Some(0));
        let pod = job_spec.template.spec.unwrap();
        let volumes: Vec<_> = pod
            .volumes
            .clone()
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(volumes, ["tmp"], "no task Secret is mounted");
        let names: Vec<String> = env_of(&job).into_iter().map(|e| e.name).collect();
        for present in [
            "GANTRY_AMQP_URL",
            "GANTRY_PREFIX",
            "GANTRY_JOB_NAME",
            "GANTRY_POD_NAME",
            "GANTRY_NODE_NAME",
            "GANTRY_ENGINE",
            "GANTRY_WARM_QUEUE",
            "GANTRY_WARM",
        ] {
            assert!(names.iter().any(|n| n == present), "{present} in {names:?}");
        }
        for absent in [
            "GANTRY_TASK_FILE",
            "GANTRY_DISPATCH_ID",
            "GANTRY_REPLY_TO",
            "GANTRY_TRACEPARENT",
        ] {
            assert!(!names.iter().any(|n| n == absent), "{absent} in {names:?}");
        }
        let container = &pod.containers[0];
        let limits = container.resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits[GPU], Quantity("2".into()), "the class's GPUs");
        assert_eq!(pod.node_selector.unwrap()[GPU_PRODUCT], "NVIDIA-L4");

        // The same hardening as a task's Job: one pod builder makes both.
        let mut task = task(None);
        task.executor = class;
        let (one, _) = build(&task, spec, &settings, &target, "d-1", Utc::now()).unwrap();
        let one = one.spec.unwrap().template.spec.unwrap();
        assert_eq!(one.security_context, pod.security_context);
        assert_eq!(
            one.containers[0].security_context,
            container.security_context
        );
        let one_env = one.containers[0].env.clone().unwrap();
        for var in env_of(&job) {
            if !matches!(
                var.name.as_str(),
                "GANTRY_JOB_NAME" | "GANTRY_WARM_QUEUE" | "GANTRY_WARM"
            ) {
                assert!(one_env.contains(&var), "{var:?} is shared");
            }
        }
    }

    #[test]
    fn a_warm_class_refuses_a_task_asking_for_another_gpu_type() {
        let catalog = warm_catalog();
        let spec = catalog.get(&ExecutorClass::parse("vllm").unwrap()).unwrap();
        let mut t = task(Some(1));
        assert!(admit(&t, spec).is_ok(), "fewer GPUs of the class's type");
        t.resources = Some(Resources {
            gpu_count: None,
            gpu_type: Some("NVIDIA-H100".into()),
        });
        let refused = admit(&t, spec).unwrap_err().to_string();
        assert!(refused.contains("NVIDIA-L4"), "{refused}");
        // A class of one Job per task takes it: the Job asks for the type.
        let one_per_task = ExecutorSpec {
            warm: None,
            ..spec.clone()
        };
        assert!(admit(&t, &one_per_task).is_ok());
    }

    #[test]
    fn executors_trust_the_ca_of_the_configmap_named_in_both_kinds_of_job() {
        let settings = KubernetesSection {
            executor_ca_configmap: Some("gantry-ca".into()),
            ..KubernetesSection::default()
        };
        let target = Target {
            namespace: "ml",
            prefix: "gantry",
            otlp_endpoint: None,
        };
        let catalog = catalog();
        let t = task(None);
        let spec = catalog.get(&t.executor).unwrap();
        let (one, _) = build(&t, spec, &settings, &target, "d-1", Utc::now()).unwrap();
        let warm_catalog = warm_catalog();
        let class = ExecutorClass::parse("vllm").unwrap();
        let warm_spec = warm_catalog.get(&class).unwrap();
        let warm = build_warm(
            &JobName::for_warm(&class),
            &class,
            warm_spec,
            &warm_spec.warm.unwrap(),
            &settings,
            &target,
            "gantry.warm.q",
        )
        .unwrap();
        for job in [one, warm] {
            let pod = job.spec.clone().unwrap().template.spec.unwrap();
            let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == "ca");
            let source = volume.and_then(|v| v.config_map).expect("a ca volume");
            assert_eq!(source.name, "gantry-ca");
            assert_eq!(source.optional, Some(false));
            let items: Vec<_> = source
                .items
                .unwrap()
                .into_iter()
                .map(|i| (i.key, i.path))
                .collect();
            assert_eq!(items, [("ca.crt".to_owned(), "ca.crt".to_owned())]);
            let mount = pod.containers[0].volume_mounts.clone().unwrap();
            let mount = mount.iter().find(|m| m.name == "ca").expect("a ca mount");
            assert_eq!(
                (mount.mount_path.as_str(), mount.read_only),
                ("/etc/gantry/ca", Some(true))
            );
            let ca = env_of(&job)
                .into_iter()
                .find(|e| e.name == "GANTRY_TLS_CA_FILE")
                .and_then(|e| e.value);
            assert_eq!(ca.as_deref(), Some("/etc/gantry/ca/ca.crt"));
        }
        // Without the setting, no CA is mounted and the URL's own trust holds.
        let (plain, _) = build_for(&t).unwrap();
        assert!(
            env_of(&plain)
                .iter()
                .all(|e| e.name != "GANTRY_TLS_CA_FILE")
        );
    }
}
