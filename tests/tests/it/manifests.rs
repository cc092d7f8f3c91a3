//! `gantry-dispatcher render-job` prints Jobs and Secrets the official Kubernetes schemas
//! accept, checked with `kubernetes-validate --strict` for 1.28 and a current version.

use std::process::Command;

use chrono::Utc;
use gantry_tests::bin_path;
use serde_json::json;

const CATALOG: &str = r#"
executors:
  echo:
    engine: { kind: echo }
    image: registry.example.com/executor-echo@sha256:1111111111111111111111111111111111111111111111111111111111111111
  vllm:
    engine: { kind: command, command: ["python3", "-m", "gantry_vllm", "--max-tokens", "512"] }
    image: registry.example.com/executor-vllm@sha256:2222222222222222222222222222222222222222222222222222222222222222
    resources: { gpu_count: 4, gpu_type: NVIDIA-H100-80GB-HBM3 }
    node_selector: { gantry.dev/pool: gpu }
    tolerations: [{ key: dedicated, operator: Equal, value: gpu, effect: NoSchedule }, { key: spot, operator: Exists }]
    limits: { cpu: "16", memory: 128Gi }
  chat:
    engine: { kind: openai, model: tiny }
    image: registry.example.com/executor-vllm@sha256:2222222222222222222222222222222222222222222222222222222222222222
    resources: { gpu_count: 1, gpu_type: NVIDIA-L4 }
    tolerations: [{ key: dedicated, operator: Equal, value: gpu, effect: NoSchedule }]
    max_active_jobs: 2
    warm: { max_concurrency: 8, max_tasks_per_job: 1000, idle_timeout: 2m, max_job_lifetime: 6h }
"#;

/// `kubernetes-validate` from PyPI (scripts/test.sh installs it), or GANTRY_KUBERNETES_VALIDATE.
fn validator() -> String {
    std::env::var("GANTRY_KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into())
}

#[test]
fn rendered_jobs_pass_the_official_schemas_for_kubernetes_1_28_and_current() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(&catalog, CATALOG)?;
    let now = Utc::now();
    let tasks = [
        json!({"executor": "echo", "task": "demo.echo", "payload": {"hello": "world"}}),
        json!({"executor": "vllm", "task": "llm.chat", "payload": {"messages": [{"role": "user", "content": "hi"}]}, "resources": {"gpu_count": 2}}),
        json!({"executor": "vllm", "task": "llm.chat", "payload": null, "attempt": 7, "priority": 9, "idempotency_key": "k-1"}),
        json!({"executor": "echo", "task": "myapp.tasks.summarize:v2", "payload": {"blob": "x".repeat(200_000)}}),
    ];
    for (i, extra) in tasks.iter().enumerate() {
        let mut task = json!({
            "task_id": uuid::Uuid::new_v4(),
            "deadline": (now + chrono::Duration::minutes(30 + i as i64)).to_rfc3339(),
            "submitted_at": now.to_rfc3339(),
            "attempt": 1,
        });
        for (k, v) in extra.as_object().expect("object") {
            task[k] = v.clone();
        }
        let task_file = dir.path().join(format!("task-{i}.json"));
        std::fs::write(&task_file, task.to_string())?;
        // Every other one with the executors' CA mounted from a ConfigMap.
        let ca = (i % 2 == 1).then_some("gantry-ca");
        let out = render(&task_file, &catalog, ca)?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.contains("/etc/gantry/ca/ca.crt") && text.contains("name: gantry-ca"),
            ca.is_some(),
            "{text}"
        );
        let yaml = dir.path().join(format!("job-{i}.yaml"));
        std::fs::write(&yaml, &out.stdout)?;
        validate(&yaml, 2, "the Job and the Secret")?;
    }
    Ok(())
}

/// What `gantry-dispatcher render-job` prints for the task in `task_file`, in namespace
/// `ml-jobs`, with the executors' CA from the ConfigMap `ca` when given.
fn render(
    task_file: &std::path::Path,
    catalog: &std::path::Path,
    ca: Option<&str>,
) -> anyhow::Result<std::process::Output> {
    let mut command = Command::new(bin_path("gantry-dispatcher"));
    command
        .args(["render-job", "--namespace", "ml-jobs", "--task"])
        .arg(task_file)
        .arg("--catalog")
        .arg(catalog)
        .env_remove("GANTRY_CONFIG")
        .env_remove("GANTRY_EXECUTOR_CA_CONFIGMAP");
    if let Some(ca) = ca {
        command.env("GANTRY_EXECUTOR_CA_CONFIGMAP", ca);
    }
    let out = command.output()?;
    assert!(
        out.status.success(),
        "render-job failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// Checks the documents of `yaml` with `kubernetes-validate --strict` against 1.28 and a
/// current version; `documents` of them, `what` in words.
fn validate(yaml: &std::path::Path, documents: usize, what: &str) -> anyhow::Result<()> {
    for version in ["1.28.0", "1.37.0"] {
        let check = Command::new(validator())
            .args(["--strict", "--no-warn", "-k", version])
            .arg(yaml)
            .output()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot run {} ({e}); run scripts/test.sh, which installs it",
                    validator()
                )
            })?;
        let report = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success(),
            "{} against {version}:\n{report}{}",
            yaml.display(),
            String::from_utf8_lossy(&check.stderr)
        );
        assert_eq!(
            report.matches("passed").count(),
            documents,
            "{what} checked: {report}"
        );
    }
    Ok(())
}

#[test]
fn a_warm_executors_rendered_job_passes_the_official_schemas_and_carries_no_task()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(&catalog, CATALOG)?;
    let now = Utc::now();
    let task = json!({
        "task_id": uuid::Uuid::new_v4(),
        "executor": "chat",
        "task": "llm.chat",
        "payload": {"messages": [{"role": "user", "content": "a secret of the task"}]},
        "deadline": (now + chrono::Duration::minutes(30)).to_rfc3339(),
        "submitted_at": now.to_rfc3339(),
        "attempt": 1,
        "reply_to": "replies",
    });
    let task_file = dir.path().join("task.json");
    std::fs::write(&task_file, task.to_string())?;
    let out = render(&task_file, &catalog, Some("gantry-ca"))?;
    let text = String::from_utf8(out.stdout.clone())?;
    assert!(!text.contains("---"), "one document, no Secret: {text}");
    assert!(!text.contains("a secret of the task"), "{text}");
    for expected in [
        "name: gantry-w-chat-",
        "gantry.dev/warm: 'true'",
        "GANTRY_WARM_QUEUE",
        "value: gantry.warm.gantry-w-chat-",
        "activeDeadlineSeconds: 27000",
    ] {
        assert!(text.contains(expected), "{expected} in {text}");
    }
    for absent in [
        "GANTRY_TASK_FILE",
        "GANTRY_REPLY_TO",
        "gantry.dev/task-id",
        "secretName",
    ] {
        assert!(!text.contains(absent), "{absent} in {text}");
    }
    let yaml = dir.path().join("warm-job.yaml");
    std::fs::write(&yaml, &out.stdout)?;
    validate(&yaml, 1, "the warm executor's Job")
}

#[test]
fn render_job_refuses_a_class_without_an_image_and_says_what_to_do() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let task = dir.path().join("task.json");
    let now = Utc::now();
    std::fs::write(
        &task,
        json!({"task_id": uuid::Uuid::new_v4(), "task": "demo.echo", "executor": "echo", "payload": {},
               "deadline": (now + chrono::Duration::minutes(5)).to_rfc3339(), "submitted_at": now.to_rfc3339()})
        .to_string(),
    )?;
    let out = Command::new(bin_path("gantry-dispatcher"))
        .args(["render-job", "--task"])
        .arg(&task)
        .env_remove("GANTRY_CONFIG")
        .env_remove("GANTRY_CATALOG")
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no image in the catalog"), "{err}");
    Ok(())
}
