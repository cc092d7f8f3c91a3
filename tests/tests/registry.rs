//! The executor registry service (`gantry-registry`) against a real container registry
//! (Debian's `docker-registry`, the CNCF distribution registry) with images built here as
//! OCI layouts and pushed by `skopeo`; and a real dispatcher on the `kubernetes` runtime
//! (against the Kubernetes API double) running the digest the service serves.

use std::time::Duration;

use anyhow::Context;
use gantry_kube_double::KubeDouble;
use gantry_shared::message::{ExecutorClass, TaskName, TaskSpec};
use gantry_shared::store::TaskState;
use gantry_tests::container_registry::{ContainerRegistry, Layout, RegistryService};
use gantry_tests::{Dispatcher, TestEnv, eventually};
use serde_json::{Value, json};

const TASKS: &str = "dev.gantry.executor.tasks";
const OWNER: &str = "dev.gantry.executor.owner";

fn labelled(tasks: &str, marker: &str) -> anyhow::Result<Layout> {
    Layout::image(&[(TASKS, tasks), (OWNER, "team-echo")], marker)
}

/// A registry, and the service watching its namespace `team`, refreshed only when asked.
fn world() -> anyhow::Result<(ContainerRegistry, RegistryService)> {
    let registry = ContainerRegistry::start()?;
    let service = RegistryService::start(&format!("http://{}/team", registry.host()), "1h")?;
    service.wait_loaded()?;
    Ok((registry, service))
}

fn refresh(service: &RegistryService) -> anyhow::Result<Value> {
    let (status, summary) = service.call("POST", "/executors/refresh")?;
    anyhow::ensure!(status == 200, "refresh answered {status}: {summary}");
    Ok(summary)
}

#[test]
fn an_image_pushed_appears_after_a_refresh_pinned_to_its_digest() -> anyhow::Result<()> {
    let (registry, service) = world()?;
    let (status, _) = service.call("GET", "/executors/echo")?;
    assert_eq!(status, 404, "nothing pushed yet");

    let image = Layout::image(
        &[
            (TASKS, "k8s.echo, llm.chat"),
            (OWNER, "team-echo"),
            ("dev.gantry.executor.gpu", "1"),
            ("dev.gantry.executor.model", "tiny-model"),
        ],
        "one",
    )?;
    registry.push(&image, "team/executor-echo", "1.0.0")?;
    let (status, _) = service.call("GET", "/executors/echo")?;
    assert_eq!(status, 404, "not before a refresh");
    let summary = refresh(&service)?;
    assert_eq!(summary["added"], json!(["echo"]), "{summary}");

    let pinned = format!("{}/team/executor-echo@{}", registry.host(), image.digest);
    let (status, entry) = service.call("GET", "/executors/echo")?;
    assert_eq!(status, 200, "{entry}");
    assert_eq!(entry["image"], json!(pinned));
    assert_eq!(
        entry["capabilities"],
        json!({"tasks": ["k8s.echo", "llm.chat"], "gpus": 1, "model": "tiny-model"})
    );
    assert_eq!(entry["owner"], "team-echo");
    assert_eq!(entry["tag"], "1.0.0");
    assert!(entry["added_at"].is_string() && entry["validated_at"].is_string());

    let (status, listing) = service.call("GET", "/executors")?;
    assert_eq!(status, 200);
    assert_eq!(listing["executors"][0]["class"], "echo");
    assert_eq!(listing["executors"][0]["image"], json!(pinned));
    assert_eq!(listing["executors"][0]["digest"], json!(image.digest));
    assert_eq!(
        listing["executors"][0]["capabilities"],
        entry["capabilities"]
    );

    let audit = service.audit_lines()?;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["event"], "added");
    assert_eq!(audit[0]["class"], "echo");
    assert_eq!(audit[0]["image"], json!(pinned));
    assert_eq!(audit[0]["owner"], "team-echo");
    Ok(())
}

#[test]
fn a_newer_tag_replaces_the_image_and_the_change_is_audited() -> anyhow::Result<()> {
    let (registry, service) = world()?;
    let (old, new) = (labelled("k8s.echo", "old")?, labelled("k8s.echo", "new")?);
    registry.push(&old, "team/executor-echo", "1.9.0")?;
    refresh(&service)?;
    registry.push(&new, "team/executor-echo", "1.10.0")?;
    // Neither a pre-release nor a tag that is no version is ever chosen.
    registry.push(
        &labelled("k8s.echo", "rc")?,
        "team/executor-echo",
        "2.0.0-rc.1",
    )?;
    registry.push(
        &labelled("k8s.echo", "latest")?,
        "team/executor-echo",
        "latest",
    )?;
    let summary = refresh(&service)?;
    assert_eq!(summary["changed"], json!(["echo"]), "{summary}");

    let (_, entry) = service.call("GET", "/executors/echo")?;
    assert_eq!(
        entry["image"],
        json!(format!(
            "{}/team/executor-echo@{}",
            registry.host(),
            new.digest
        )),
        "1.10.0 is newer than 1.9.0"
    );
    assert_eq!(entry["tag"], "1.10.0");
    let audit = service.audit_lines()?;
    let changed = audit
        .iter()
        .find(|l| l["event"] == "changed")
        .context("a changed line")?;
    assert_eq!(changed["tag"], "1.10.0");
    assert_eq!(changed["previous"]["tag"], "1.9.0");
    assert_eq!(
        changed["previous"]["digest"],
        json!(old.digest),
        "{changed}"
    );
    assert!(service.log_text().contains("executor image changed"));
    Ok(())
}

#[test]
fn unlabelled_images_and_other_namespaces_are_refused_with_their_reason() -> anyhow::Result<()> {
    let (registry, service) = world()?;
    let good = labelled("k8s.echo", "good")?;
    registry.push(&good, "team/executor-echo", "1.0.0")?;
    // A newer tag without labels: refused, and the class keeps the newest accepted image.
    let unlabelled = Layout::image(&[], "unlabelled")?;
    registry.push(&unlabelled, "team/executor-echo", "1.1.0")?;
    registry.push(&unlabelled, "team/executor-bare", "1.0.0")?;
    registry.push(
        &Layout::image(&[(TASKS, "k8s.echo")], "ownerless")?,
        "team/executor-solo",
        "1.0.0",
    )?;
    registry.push(&good, "elsewhere/executor-echo", "1.0.0")?;
    refresh(&service)?;

    let (_, entry) = service.call("GET", "/executors/echo")?;
    assert_eq!(entry["tag"], "1.0.0", "{entry}");
    let (status, bare) = service.call("GET", "/executors/bare")?;
    assert_eq!(status, 404);
    assert!(
        bare["refused"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no label dev.gantry.executor.tasks")),
        "{bare}"
    );
    let (status, solo) = service.call("GET", "/executors/solo")?;
    assert_eq!(status, 404);
    assert_eq!(solo["refused"][0]["kind"], "missing_label", "{solo}");
    assert!(
        solo["refused"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains(OWNER))
    );

    let (_, listing) = service.call("GET", "/executors")?;
    let refused = listing["refused"].as_array().context("refused")?;
    let of = |repo: &str| {
        refused
            .iter()
            .find(|r| r["repository"] == format!("{}/{repo}", registry.host()))
    };
    let newer = of("team/executor-echo").context("echo:1.1.0 refused")?;
    assert_eq!(
        (newer["tag"].as_str(), newer["kind"].as_str()),
        (Some("1.1.0"), Some("missing_label"))
    );
    assert_eq!(newer["digest"], json!(unlabelled.digest));
    let foreign = of("elsewhere/executor-echo").context("the other namespace refused")?;
    assert_eq!(foreign["kind"], "namespace_not_allowed");
    assert!(
        foreign["reason"]
            .as_str()
            .is_some_and(|r| r.contains("outside the allowlist")),
        "{foreign}"
    );

    let log = service.log_text();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("executor image refused"))
        .collect();
    assert_eq!(refusals.len(), 4, "each refusal logged once:\n{log}");
    assert!(
        refusals.iter().any(
            |l| l.contains("executor-bare") && l.contains("no label dev.gantry.executor.tasks")
        )
    );
    // Refusals are logged once per cache_ttl, not at every refresh.
    refresh(&service)?;
    assert_eq!(
        service.log_text().matches("executor image refused").count(),
        4
    );
    assert_eq!(
        service
            .audit_lines()?
            .iter()
            .filter(|l| l["event"] == "refused")
            .count(),
        4
    );
    Ok(())
}

#[test]
fn with_the_registry_down_the_last_catalog_is_served_and_health_says_so() -> anyhow::Result<()> {
    let (mut registry, service) = world()?;
    let image = labelled("k8s.echo", "kept")?;
    registry.push(&image, "team/executor-echo", "1.0.0")?;
    refresh(&service)?;
    let (_, before) = service.call("GET", "/executors/echo")?;

    registry.stop()?;
    let (status, summary) = service.call("POST", "/executors/refresh")?;
    assert_eq!(status, 502, "{summary}");
    assert_eq!(summary["classes"], 1);
    let (status, entry) = service.call("GET", "/executors/echo")?;
    assert_eq!(status, 200);
    assert_eq!(entry, before, "the last catalog, as it was");
    let (status, health) = service.call("GET", "/health")?;
    assert_eq!(status, 200, "still serving");
    assert_eq!(health["status"], "degraded", "{health}");
    let message = health["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("serving the last catalog (1 classes")
            && message.contains(&registry.host())
            && health["failing_since"].is_string(),
        "{health}"
    );
    assert!(
        service
            .log_text()
            .contains("registry not read; its classes keep their last image")
    );

    registry.restart()?;
    refresh(&service)?;
    let (_, health) = service.call("GET", "/health")?;
    assert_eq!(health["status"], "ok", "{health}");
    assert!(
        service
            .audit_lines()?
            .iter()
            .all(|l| l["event"] != "removed")
    );
    Ok(())
}

/// The service has not read its registries yet: `/health` says starting, and a class is
/// answered 503 (wait), not 404 (none).
fn assert_starting(service: &RegistryService) -> anyhow::Result<()> {
    let (status, health) = service.call("GET", "/health")?;
    assert_eq!(
        (status, health["status"].as_str()),
        (503, Some("starting")),
        "{health}"
    );
    let (status, answer) = service.call("GET", "/executors/echo")?;
    assert_eq!(
        status, 503,
        "no guessed 404 before the catalog is loaded: {answer}"
    );
    Ok(())
}

#[test]
fn until_a_registry_answers_once_the_service_says_it_is_starting() -> anyhow::Result<()> {
    let mut registry = ContainerRegistry::start()?;
    registry.stop()?;
    let service = RegistryService::start(&format!("http://{}/team", registry.host()), "1h")?;
    assert_starting(&service)?;
    // The image's health check says the same: unhealthy while starting…
    let (code, _, stderr) = service.probe()?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("/health answered 503"), "{stderr}");
    // While not loaded it retries on its own, well before its period.
    registry.restart()?;
    service.wait_loaded()?;
    // …and healthy once it serves a catalog.
    let (code, stdout, stderr) = service.probe()?;
    assert_eq!(code, Some(0), "{stderr}");
    let health: Value = serde_json::from_str(&stdout)?;
    assert_eq!(health["status"], "ok", "{health}");
    Ok(())
}

/// For registries that do not list their repositories (no `/v2/_catalog`): the classes
/// named in the settings are read by name, and nothing else is seen.
#[test]
fn named_classes_are_read_by_name_without_listing_the_registry() -> anyhow::Result<()> {
    let registry = ContainerRegistry::start()?;
    let echo = labelled("k8s.echo", "named")?;
    registry.push(&echo, "team/executor-echo", "1.0.0")?;
    let other = labelled("k8s.other", "unnamed")?;
    registry.push(&other, "team/executor-other", "1.0.0")?;
    let service = RegistryService::start_with(
        &format!("http://{}/team", registry.host()),
        "1h",
        &[("GANTRY_REGISTRY_CLASSES", "echo,vllm")],
    )?;
    service.wait_loaded()?;

    let (status, listing) = service.call("GET", "/executors")?;
    assert_eq!(status, 200, "{listing}");
    let classes: Vec<&str> = listing["executors"]
        .as_array()
        .context("executors")?
        .iter()
        .filter_map(|e| e["class"].as_str())
        .collect();
    assert_eq!(
        classes,
        ["echo"],
        "only the named classes, not `other`, which only a listing would show: {listing}"
    );
    assert_eq!(
        listing["executors"][0]["image"],
        json!(format!(
            "{}/team/executor-echo@{}",
            registry.host(),
            echo.digest
        ))
    );
    assert_eq!(
        listing["refused"],
        json!([]),
        "a named class this source does not have is no refusal: {listing}"
    );
    let (_, health) = service.call("GET", "/health")?;
    assert_eq!(health["status"], "ok", "{health}");

    // A named class pushed later appears after a refresh, as a listed one would.
    let vllm = labelled("llm.chat", "named-later")?;
    registry.push(&vllm, "team/executor-vllm", "2.0.0")?;
    let summary = refresh(&service)?;
    assert_eq!(summary["added"], json!(["vllm"]), "{summary}");

    // A registry that does not answer is no empty catalog: the service stays starting.
    let mut down = ContainerRegistry::start()?;
    down.stop()?;
    let waiting = RegistryService::start_with(
        &format!("http://{}/team", down.host()),
        "1h",
        &[("GANTRY_REGISTRY_CLASSES", "echo")],
    )?;
    waiting.wait_for_log("registry not read")?;
    assert_starting(&waiting)?;
    Ok(())
}

#[test]
fn a_multi_platform_index_is_pinned_by_its_digest_with_the_amd64_labels() -> anyhow::Result<()> {
    let (registry, service) = world()?;
    let arm: &[(&str, &str)] = &[(TASKS, "arm.only"), (OWNER, "team-arm")];
    let amd: &[(&str, &str)] = &[
        (TASKS, "k8s.echo"),
        (OWNER, "team-amd"),
        ("dev.gantry.executor.model", "m"),
    ];
    let index = Layout::index(&[("arm64", arm), ("amd64", amd)], "multi")?;
    registry.push(&index, "team/executor-echo", "3.0.0")?;
    refresh(&service)?;
    let (status, entry) = service.call("GET", "/executors/echo")?;
    assert_eq!(status, 200, "{entry}");
    assert_eq!(
        entry["image"],
        json!(format!(
            "{}/team/executor-echo@{}",
            registry.host(),
            index.digest
        )),
        "the index's digest: each node pulls its own platform"
    );
    assert_eq!(entry["platform"], "linux/amd64");
    assert_eq!(entry["capabilities"]["tasks"], json!(["k8s.echo"]));
    assert_eq!(entry["owner"], "team-amd");
    Ok(())
}

#[test]
fn it_refreshes_on_its_period_and_exits_0_on_sigterm() -> anyhow::Result<()> {
    let registry = ContainerRegistry::start()?;
    let service = RegistryService::start(&format!("http://{}/team", registry.host()), "300ms")?;
    service.wait_loaded()?;
    registry.push(
        &labelled("k8s.echo", "periodic")?,
        "team/executor-echo",
        "1.0.0",
    )?;
    let start = std::time::Instant::now();
    while service.call("GET", "/executors/echo")?.0 != 200 {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "never refreshed:\n{}",
            service.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, text) = service.terminate()?;
    assert!(status.success(), "{status}\n{text}");
    assert!(text.contains("gantry-registry stopped"), "{text}");
    Ok(())
}

/// The whole way: an image pushed to a real registry, the service serving its digest, and a
/// real dispatcher whose Job runs it.
// The double serves from this process while the test blocks on the dispatcher's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_runs_the_digest_the_registry_service_serves() -> anyhow::Result<()> {
    // `executor-echo` at the registry's root, watched by a source without a namespace.
    let registry = ContainerRegistry::start()?;
    let service = RegistryService::start(&format!("http://{}", registry.host()), "1h")?;
    service.wait_loaded()?;
    let image = labelled("k8s.echo", "dispatched")?;
    registry.push(&image, "executor-echo", "1.0.0")?;
    refresh(&service)?;
    let pinned = format!("{}/executor-echo@{}", registry.host(), image.digest);
    let (status, listing) = service.call("GET", "/executors")?;
    assert_eq!(status, 200, "{listing}");
    assert_eq!(
        (
            &listing["executors"][0]["image"],
            &listing["executors"][0]["digest"],
            &listing["executors"][0]["capabilities"]["tasks"],
        ),
        (&json!(pinned), &json!(image.digest), &json!(["k8s.echo"])),
        "{listing}"
    );

    let double = KubeDouble::start().await;
    let executor = gantry_tests::bin_path("gantry-executor")
        .display()
        .to_string();
    double.set_image_entrypoint(&pinned, vec![executor]);
    // The catalog gives the class no image: only the service can.
    let env = TestEnv::new(Some("executors:\n  echo:\n    engine: { kind: echo }\n")).await?;
    let kubeconfig = gantry_tests::point_at_double(&double, &env)?;
    let kubeconfig = kubeconfig.display().to_string();
    let dispatcher = Dispatcher::start(
        &env,
        &[
            ("GANTRY_RUNTIME", "kubernetes"),
            ("KUBECONFIG", &kubeconfig),
            ("GANTRY_EXECUTOR_REGISTRY", &service.url),
            ("GANTRY_ALLOWED_REGISTRIES", &registry.host()),
        ],
    )?;
    let producer = env.producer().await?;
    let id = producer
        .submit(TaskSpec {
            executor: ExecutorClass::parse("echo")?,
            name: TaskName::parse("k8s.echo")?,
            payload: json!({"hello": "registry"}),
            ttl: Duration::from_secs(300),
            reply_to: None,
            idempotency_key: None,
            priority: None,
            resources: None,
        })
        .await?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(
        record.state,
        TaskState::Succeeded,
        "{:?}\n{}",
        record.error,
        dispatcher.log_text()
    );
    let job = eventually("the task's Job", Duration::from_secs(10), || async {
        Ok(double.job(&format!("gantry-{}-a1", id.as_uuid().simple())))
    })
    .await?;
    let ran = job
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.first().and_then(|c| c.image.clone()));
    assert_eq!(
        ran,
        Some(pinned),
        "the Job runs the digest the service serves"
    );
    producer.close().await;
    drop(dispatcher);
    env.cleanup().await
}
