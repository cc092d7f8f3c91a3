//! The Kubernetes runtime's API writes, through the real `kube::Client` against the API
//! double: one Job per attempt whatever happens, its Secret owned by it, throttled writes.

use std::time::{Duration, Instant};

use chrono::Utc;
use gantry_dispatcher::runtime::kubernetes::client::{Created, JobClient};
use gantry_dispatcher::runtime::kubernetes::job;
use gantry_dispatcher::settings::KubernetesSection;
use gantry_kube_double::{FaultSpec, KubeDouble};
use gantry_shared::catalog::Catalog;
use gantry_shared::message::{ExecutorClass, Limits, Task, TaskName, TaskSpec};
use gantry_shared::store::TaskState;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use serde_json::json;

const CATALOG: &str = "executors:\n  echo:\n    engine: { kind: echo }\n    image: registry.example.com/executor-echo@sha256:1111111111111111111111111111111111111111111111111111111111111111\n";

fn objects(namespace: &str) -> (Task, Job, Secret) {
    let catalog = Catalog::parse(CATALOG, "test").expect("catalog");
    let task = Task::new(
        TaskSpec {
            executor: ExecutorClass::parse("echo").expect("class"),
            name: TaskName::parse("k8s.echo").expect("name"),
            payload: json!({"hello": "world"}),
            ttl: Duration::from_secs(300),
            reply_to: None,
            idempotency_key: None,
            priority: None,
            resources: None,
        },
        &Limits::default(),
    )
    .expect("task");
    let spec = catalog.get(&task.executor).expect("class in catalog");
    let target = job::Target {
        namespace,
        prefix: "gantry",
        otlp_endpoint: None,
    };
    let (job, secret) = job::build(
        &task,
        spec,
        &KubernetesSection::default(),
        &target,
        "d-1",
        Utc::now(),
    )
    .expect("job builds");
    (task, job, secret)
}

fn job_creates(double: &KubeDouble) -> usize {
    double
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/jobs"))
        .count()
}

#[tokio::test]
async fn a_redelivered_task_finds_its_job_and_never_creates_a_second_one() -> anyhow::Result<()> {
    let double = KubeDouble::start().await;
    let client = JobClient::new(double.client(), Some(double.namespace()), 100.0, 10);
    let (_, job, secret) = objects(double.namespace());

    let first = client.create(&job, secret.clone()).await?;
    assert!(matches!(first, Created::New(_)));
    let again = client.create(&job, secret).await?;
    assert!(matches!(again, Created::Existing(_)));
    assert_eq!(again.metadata().uid, first.metadata().uid);
    assert_eq!(double.jobs_created(), 1);

    let name = job.metadata.name.clone().expect("name");
    let stored = double.get_secret(&name).expect("the Secret exists");
    let owner = &stored.metadata.owner_references.expect("owned")[0];
    assert_eq!(owner.kind, "Job");
    assert_eq!(Some(owner.uid.clone()), first.metadata().uid);
    Ok(())
}

#[tokio::test]
async fn a_task_costs_two_api_writes() -> anyhow::Result<()> {
    let double = KubeDouble::start().await;
    let client = JobClient::new(double.client(), Some(double.namespace()), 100.0, 10);
    let (_, job, secret) = objects(double.namespace());
    client.create(&job, secret).await?;
    let writes = double.requests().iter().filter(|r| r.is_write()).count();
    assert_eq!(writes, 2, "{:#?}", double.requests());
    Ok(())
}

#[tokio::test]
async fn a_500_on_create_is_retried_and_yields_one_job() -> anyhow::Result<()> {
    let double = KubeDouble::start().await;
    double.fail_next(1, FaultSpec::internal_error("POST", "/jobs"));
    let client = JobClient::new(double.client(), Some(double.namespace()), 100.0, 10);
    let (_, job, secret) = objects(double.namespace());
    let created = client.create(&job, secret).await?;
    assert!(matches!(created, Created::New(_)));
    assert_eq!(double.jobs_created(), 1);
    let statuses: Vec<Option<u16>> = double
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/jobs"))
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [Some(500), Some(201)]);
    Ok(())
}

#[tokio::test]
async fn a_429_is_waited_out_as_retry_after_asks() -> anyhow::Result<()> {
    let double = KubeDouble::start().await;
    double.fail_next(1, FaultSpec::too_many_requests("POST", "/jobs", 1));
    let client = JobClient::new(double.client(), Some(double.namespace()), 100.0, 10);
    let (_, job, secret) = objects(double.namespace());
    let start = Instant::now();
    client.create(&job, secret).await?;
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "the retry waited for Retry-After"
    );
    assert_eq!(double.jobs_created(), 1);
    assert_eq!(job_creates(&double), 2);
    Ok(())
}

#[tokio::test]
async fn an_invalid_job_is_refused_at_once_without_retries() -> anyhow::Result<()> {
    let double = KubeDouble::start().await;
    let client = JobClient::new(double.client(), Some(double.namespace()), 100.0, 10);
    let (_, mut job, secret) = objects(double.namespace());
    job.metadata.name = Some("Not_A_Name".into());
    let refused = client.create(&job, secret).await;
    assert!(refused.is_err());
    assert_eq!(job_creates(&double), 1, "a 422 is final");
    Ok(())
}

#[tokio::test]
async fn deleting_a_job_takes_its_pod_and_secret_with_it() -> anyhow::Result<()> {
    let double = KubeDouble::start().await;
    let client = JobClient::new(double.client(), Some(double.namespace()), 100.0, 10);
    let (_, job, secret) = objects(double.namespace());
    let name = job.metadata.name.clone().expect("name");
    client.create(&job, secret).await?;
    double
        .wait_for("the job's pod", Duration::from_secs(5), |d| {
            (!d.pods_of_job(&name).is_empty()).then_some(())
        })
        .await?;
    client.delete(&name).await?;
    double
        .wait_for("the pod and Secret to go", Duration::from_secs(5), |d| {
            (d.pods_of_job(&name).is_empty() && d.get_secret(&name).is_none()).then_some(())
        })
        .await?;
    client.delete(&name).await?;
    Ok(())
}

#[tokio::test]
async fn writes_are_throttled_by_the_token_bucket() -> anyhow::Result<()> {
    let double = KubeDouble::start().await;
    // 10 writes per second, no burst: 5 tasks (10 writes) need at least 0.9 s.
    let client = JobClient::new(double.client(), Some(double.namespace()), 10.0, 1);
    let start = Instant::now();
    for _ in 0..5 {
        let (_, job, secret) = objects(double.namespace());
        client.create(&job, secret).await?;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(double.jobs_created(), 5);
    Ok(())
}

/// A dispatcher with `--runtime kubernetes`, pointed at the double by a kubeconfig, and the
/// double running the real executor as the image's entrypoint.
struct Cluster {
    double: KubeDouble,
    env: gantry_tests::TestEnv,
    dispatcher: gantry_tests::Dispatcher,
}

const IMAGE: &str = "registry.example.com/executor-echo@sha256:1111111111111111111111111111111111111111111111111111111111111111";

async fn cluster(extra_catalog: &str) -> anyhow::Result<Cluster> {
    cluster_with(extra_catalog, 4, &[]).await
}

async fn cluster_with(
    extra_catalog: &str,
    max_active: u32,
    env_extra: &[(&str, &str)],
) -> anyhow::Result<Cluster> {
    cluster_of("{ kind: echo }", extra_catalog, max_active, env_extra).await
}

/// [`cluster_with`] whose class `echo` runs `engine`.
async fn cluster_of(
    engine: &str,
    extra_catalog: &str,
    max_active: u32,
    env_extra: &[(&str, &str)],
) -> anyhow::Result<Cluster> {
    let double = KubeDouble::start().await;
    double.set_image_entrypoint(
        IMAGE,
        vec![
            gantry_tests::bin_path("gantry-executor")
                .display()
                .to_string(),
        ],
    );
    let catalog = format!(
        "executors:\n  echo:\n    engine: {engine}\n    image: {IMAGE}\n    max_active_jobs: {max_active}\n{extra_catalog}"
    );
    let env = gantry_tests::TestEnv::new(Some(&catalog)).await?;
    let kubeconfig = gantry_tests::point_at_double(&double, &env)?;
    let kubeconfig = kubeconfig.display().to_string();
    let mut vars = vec![
        ("GANTRY_RUNTIME", "kubernetes"),
        ("KUBECONFIG", kubeconfig.as_str()),
    ];
    vars.extend_from_slice(env_extra);
    let dispatcher = gantry_tests::Dispatcher::start(&env, &vars)?;
    Ok(Cluster {
        double,
        env,
        dispatcher,
    })
}

async fn submit(
    env: &gantry_tests::TestEnv,
    payload: serde_json::Value,
    ttl: Duration,
) -> anyhow::Result<(gantry_producer::Producer, gantry_shared::message::TaskId)> {
    submit_asking(env, payload, ttl, None).await
}

async fn submit_asking(
    env: &gantry_tests::TestEnv,
    payload: serde_json::Value,
    ttl: Duration,
    resources: Option<gantry_shared::message::Resources>,
) -> anyhow::Result<(gantry_producer::Producer, gantry_shared::message::TaskId)> {
    let producer = env.producer().await?;
    let id = producer
        .submit(TaskSpec {
            executor: ExecutorClass::parse("echo")?,
            name: TaskName::parse("k8s.echo")?,
            payload,
            ttl,
            reply_to: None,
            idempotency_key: None,
            priority: None,
            resources,
        })
        .await?;
    Ok((producer, id))
}

// The double serves from this process while the test blocks on the dispatcher's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_as_a_job_and_succeeds_with_job_pod_and_node_recorded() -> anyhow::Result<()> {
    let c = cluster("").await?;
    let (producer, id) = submit(&c.env, json!({"hello": "k8s"}), Duration::from_secs(120)).await?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(
        record.state,
        TaskState::Succeeded,
        "{:?}\n{}",
        record.error,
        c.dispatcher.log_text()
    );
    let result: gantry_shared::message::TaskResult =
        serde_json::from_value(record.result.clone().expect("result"))?;
    assert_eq!(result.output, Some(json!({"hello": "k8s"})));
    let job = format!("gantry-{}-a1", id.as_uuid().simple());
    assert_eq!(record.job_name.as_deref(), Some(job.as_str()));
    let pod = record.pod_name.clone().expect("pod recorded");
    assert!(pod.starts_with(&job), "pod {pod} of job {job}");
    assert_eq!(record.node.as_deref(), Some("node-1"));
    let events = events_of(&producer, id).await?;
    assert_eq!(events, ["received", "dispatched", "running", "succeeded"]);
    assert_eq!(c.double.jobs_created(), 1);
    producer.close().await;
    c.env.cleanup().await
}

// The double serves from this process while the test blocks on the dispatcher's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_deadline_ends_expired() -> anyhow::Result<()> {
    let c = cluster("").await?;
    let (producer, id) =
        submit(&c.env, json!({"sleep_ms": 60_000}), Duration::from_secs(2)).await?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(record.state, TaskState::Expired);
    assert_eq!(
        record.error.as_ref().map(|e| e["kind"].clone()),
        Some(json!("deadline_exceeded"))
    );
    producer.close().await;
    c.env.cleanup().await
}

// The double serves from this process while the test blocks on the dispatcher's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_killed_job_fails_with_kind_oom() -> anyhow::Result<()> {
    let c = cluster("").await?;
    c.double.script_next(gantry_kube_double::Script::Oom);
    let (producer, id) = submit(&c.env, json!({}), Duration::from_secs(120)).await?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(
        record.state,
        TaskState::Failed,
        "{:?}\n{}",
        record.error,
        c.dispatcher.log_text()
    );
    assert_eq!(
        record.error.as_ref().map(|e| e["kind"].clone()),
        Some(json!("oom"))
    );
    assert_eq!(record.terminal_reason.as_deref(), Some("OOMKilled"));
    producer.close().await;
    c.env.cleanup().await
}

// The double serves from this process while the test blocks on the dispatcher's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_job_is_retried_and_succeeds_on_its_second_attempt() -> anyhow::Result<()> {
    let c = cluster("").await?;
    c.double.script_next(gantry_kube_double::Script::Evict);
    let (producer, id) = submit(&c.env, json!({"n": 1}), Duration::from_secs(120)).await?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(record.state, TaskState::Succeeded, "{:?}", record.error);
    assert_eq!(record.attempt.get(), 2, "eviction is retryable");
    let events: Vec<(u32, String)> = producer
        .events(id)
        .await?
        .into_iter()
        .map(|e| (e.attempt.get(), e.event))
        .collect();
    assert!(events.contains(&(1, "retrying".into())), "{events:?}");
    producer.close().await;
    c.env.cleanup().await
}

// The double serves from this process while the test blocks on the dispatcher's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_asking_more_gpus_than_its_class_allows_is_dead_lettered_without_a_job()
-> anyhow::Result<()> {
    let c = cluster("").await?;
    let gpus = gantry_shared::message::Resources {
        gpu_count: Some(2),
        gpu_type: None,
    };
    let (producer, id) =
        submit_asking(&c.env, json!({}), Duration::from_secs(120), Some(gpus)).await?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(
        record.state,
        TaskState::DeadLettered,
        "{:?}\n{}",
        record.error,
        c.dispatcher.log_text()
    );
    let reason = record.terminal_reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("invalid: ") && reason.contains("asks for 2 GPUs"),
        "{reason}"
    );
    assert_eq!(record.attempt.get(), 1, "never retried");
    assert_eq!(
        c.double.jobs_created(),
        0,
        "no Job for a task that cannot run"
    );
    producer.close().await;
    c.env.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_cannot_pull_its_image_is_deleted_and_fails_with_kind_image_pull()
-> anyhow::Result<()> {
    let c = cluster_with("", 4, &[("GANTRY_IMAGE_PULL_LIMIT", "1s")]).await?;
    c.double.script_next(gantry_kube_double::Script::ImagePull);
    let (producer, id) = submit(&c.env, json!({}), Duration::from_secs(120)).await?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(record.state, TaskState::Failed, "{:?}", record.error);
    assert_eq!(
        record.error.as_ref().map(|e| e["kind"].clone()),
        Some(json!("image_pull"))
    );
    let job = format!("gantry-{}-a1", id.as_uuid().simple());
    c.double
        .wait_for(
            "the stuck Job to be deleted",
            Duration::from_secs(10),
            |d| d.job(&job).is_none().then_some(()),
        )
        .await?;
    producer.close().await;
    c.env.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_no_node_can_take_fails_as_unschedulable_and_is_retried() -> anyhow::Result<()> {
    let c = cluster_with(
        "    retry: { max_attempts: 2, min_delay: 1s, max_delay: 1s }\n",
        4,
        &[("GANTRY_UNSCHEDULABLE_LIMIT", "1s")],
    )
    .await?;
    c.double
        .script_next(gantry_kube_double::Script::PendingForever);
    let (producer, id) = submit(&c.env, json!({}), Duration::from_secs(120)).await?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    // The first attempt found no node; the retry ran.
    assert_eq!(record.state, TaskState::Succeeded, "{:?}", record.error);
    assert_eq!(record.attempt.get(), 2);
    first_attempt_retried_after(&producer, id, "unschedulable").await?;
    producer.close().await;
    c.env.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_max_active_jobs_run_at_once_while_30_tasks_wait() -> anyhow::Result<()> {
    let c = cluster_with("", 3, &[]).await?;
    let producer = c.env.producer().await?;
    let mut ids = Vec::new();
    for i in 0..30 {
        let (_, id) = (
            (),
            producer
                .submit(TaskSpec {
                    executor: ExecutorClass::parse("echo")?,
                    name: TaskName::parse("k8s.echo")?,
                    payload: json!({"i": i, "sleep_ms": 100}),
                    ttl: Duration::from_secs(300),
                    reply_to: None,
                    idempotency_key: None,
                    priority: None,
                    resources: None,
                })
                .await?,
        );
        ids.push(id);
    }
    for id in &ids {
        assert_eq!(
            producer.wait(*id, Duration::from_secs(120)).await?.state,
            TaskState::Succeeded
        );
    }
    assert_eq!(c.double.jobs_created(), 30);
    assert!(
        c.double.peak_active_jobs() <= 3,
        "peak {}",
        c.double.peak_active_jobs()
    );
    assert_eq!(c.double.peak_active_jobs(), 3, "the capacity was used");
    producer.close().await;
    c.env.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_killed_with_20_jobs_running_is_restarted_without_duplicates()
-> anyhow::Result<()> {
    let c = cluster_with("", 20, &[]).await?;
    let producer = c.env.producer().await?;
    let mut ids = Vec::new();
    for i in 0..20 {
        let id = producer
            .submit(TaskSpec {
                executor: ExecutorClass::parse("echo")?,
                name: TaskName::parse("k8s.echo")?,
                payload: json!({"i": i, "sleep_ms": 1500}),
                ttl: Duration::from_secs(300),
                reply_to: None,
                idempotency_key: None,
                priority: None,
                resources: None,
            })
            .await?;
        ids.push(id);
    }
    c.double
        .wait_for("20 Jobs", Duration::from_secs(60), |d| {
            (d.jobs_created() >= 20).then_some(())
        })
        .await?;
    let (double, env, restarted) = kill_and_restart(c)?;
    for id in &ids {
        let record = producer.wait(*id, Duration::from_secs(120)).await?;
        assert_eq!(record.state, TaskState::Succeeded, "{:?}", record.error);
        assert_eq!(record.attempt.get(), 1);
    }
    assert_eq!(double.jobs_created(), 20, "no Job was created twice");
    assert!(
        restarted
            .log_text()
            .contains("reconciling a job found at start")
    );
    producer.close().await;
    env.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_task_has_its_job_deleted() -> anyhow::Result<()> {
    let c = cluster("").await?;
    let (producer, id) = submit(
        &c.env,
        json!({"sleep_ms": 60_000}),
        Duration::from_secs(120),
    )
    .await?;
    eventually_running(&producer, id).await?;
    let store = c.env.store().await?;
    store.cancel(id, "not needed any more").await?;
    let job = format!("gantry-{}-a1", id.as_uuid().simple());
    c.double
        .wait_for("the Job to be deleted", Duration::from_secs(20), |d| {
            d.job(&job).is_none().then_some(())
        })
        .await?;
    assert_eq!(
        producer.status(id).await?.expect("task").state,
        TaskState::Cancelled
    );
    producer.close().await;
    c.env.cleanup().await
}

/// Waits until a create on `path` (`/jobs`, `/secrets`) has been dropped, kills the
/// dispatcher (SIGKILL) and lifts the faults.
async fn kill_once_a_create_is_dropped(
    c: Cluster,
    path: &str,
) -> anyhow::Result<(KubeDouble, gantry_tests::TestEnv)> {
    c.double
        .wait_for("a create, dropped", Duration::from_secs(30), |d| {
            d.requests()
                .iter()
                .any(|r| r.method == "POST" && r.path.ends_with(path))
                .then_some(())
        })
        .await?;
    c.dispatcher.kill_hard()?;
    c.double.clear_faults();
    Ok((c.double, c.env))
}

/// Kills the cluster's dispatcher (SIGKILL) and starts another on the same double and
/// environment.
fn kill_and_restart(
    c: Cluster,
) -> anyhow::Result<(KubeDouble, gantry_tests::TestEnv, gantry_tests::Dispatcher)> {
    c.dispatcher.kill_hard()?;
    let restarted = restart_on_double(&c.env)?;
    Ok((c.double, c.env, restarted))
}

/// A dispatcher on the double again, after the test's was killed.
fn restart_on_double(env: &gantry_tests::TestEnv) -> anyhow::Result<gantry_tests::Dispatcher> {
    let kubeconfig = env.dir.path().join("kubeconfig").display().to_string();
    gantry_tests::Dispatcher::start(
        env,
        &[
            ("GANTRY_RUNTIME", "kubernetes"),
            ("KUBECONFIG", kubeconfig.as_str()),
        ],
    )
}

async fn eventually_running(
    producer: &gantry_producer::Producer,
    id: gantry_shared::message::TaskId,
) -> anyhow::Result<()> {
    gantry_tests::eventually("the task to run", Duration::from_secs(30), || async {
        Ok(producer
            .status(id)
            .await?
            .filter(|r| r.state == TaskState::Running)
            .map(|_| ()))
    })
    .await
}

/// An attempt ran twice on a real API server: evicted first attempts were retried, and a
/// second delivery of an attempt that came after its task had ended and its Job had been
/// deleted by the TTL controller made the Job again. RabbitMQ delivers at least once, so
/// here every task message (first attempts and retries) is delivered a second time, after
/// every task has ended and every Job is gone. The executions themselves leave the evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_copies_of_evicted_and_retried_attempts_never_run_an_attempt_twice()
-> anyhow::Result<()> {
    use gantry_kube_double::Script;
    use gantry_tests::duplicate::Duplicator;
    use gantry_tests::executions::Executions;

    const TASKS: usize = 8;
    let double = KubeDouble::start().await;
    let executor = gantry_tests::bin_path("gantry-executor");
    double.set_image_entrypoint(IMAGE, vec![executor.display().to_string()]);
    double.script_jobs_labelled("gantry.dev/attempt", "1", Script::Evict);
    let catalog = format!(
        "executors:\n  echo:\n    engine: {}\n    image: {IMAGE}\n    max_active_jobs: 4\n    retry: {{ max_attempts: 2, min_delay: 1s, max_delay: 1s }}\n",
        Executions::engine()
    );
    let env = gantry_tests::TestEnv::new(Some(&catalog)).await?;
    let executions = Executions::new(&env.dir.path().join("executions"))?;
    let config = env.dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "dispatcher:\n  kubernetes:\n    ttl_after_finished: 2s\n",
    )?;
    let duplicator = Duplicator::start(&env).await?;
    let kubeconfig = gantry_tests::point_at_double(&double, &env)?;
    let (kubeconfig, config) = (
        kubeconfig.display().to_string(),
        config.display().to_string(),
    );
    let dispatcher = gantry_tests::Dispatcher::start(
        &env,
        &[
            ("GANTRY_RUNTIME", "kubernetes"),
            ("KUBECONFIG", kubeconfig.as_str()),
            ("GANTRY_CONFIG", config.as_str()),
        ],
    )?;

    let producer = env.producer().await?;
    let mut ids = Vec::new();
    for _ in 0..TASKS {
        let (_, id) = submit(&env, executions.payload(1500), Duration::from_secs(300)).await?;
        ids.push(id);
    }
    for id in &ids {
        let record = producer.wait(*id, Duration::from_secs(120)).await?;
        assert_eq!(record.state, TaskState::Succeeded, "{:?}", record.error);
        assert_eq!(
            record.attempt.get(),
            2,
            "the first attempt was evicted and retried"
        );
    }
    duplicator
        .wait_for(2 * TASKS, Duration::from_secs(30))
        .await?;
    double
        .wait_for(
            "every Job to be deleted by its TTL",
            Duration::from_secs(60),
            |d| d.jobs().is_empty().then_some(()),
        )
        .await?;
    // Every first attempt and every retry, and any copy the broker made itself (its
    // delay queues dead-letter at least once).
    let released = duplicator.release().await?;
    assert!(released >= 2 * TASKS, "{released} copies");

    // Every delivery is handled: each copy is skipped, or an attempt ran again.
    gantry_tests::eventually(
        "every copy to be skipped",
        Duration::from_secs(60),
        || async {
            let twice = executions.run_twice()?;
            anyhow::ensure!(twice.is_empty(), "attempts that ran twice: {twice:?}");
            let skipped = dispatcher
                .log_text()
                .matches("skipping the delivery")
                .count();
            Ok((skipped + 2 * TASKS >= duplicator.seen() + released).then_some(()))
        },
    )
    .await?;
    let counts = executions.counts()?;
    assert_eq!(counts.len(), TASKS, "each second attempt ran: {counts:?}");
    assert!(
        counts
            .iter()
            .all(|((_, attempt), n)| *attempt == 2 && *n == 1)
    );
    assert_eq!(
        double.jobs_created(),
        2 * TASKS as u64,
        "one Job per attempt"
    );
    let log = dispatcher.log.clone();
    let status = dispatcher.terminate(Duration::from_secs(30))?;
    assert!(status.success());
    let c = gantry_tests::counters_in(&std::fs::read_to_string(log)?).expect("counters");
    let deliveries = (duplicator.seen() + released) as u64;
    assert_eq!(c["deliveries"], deliveries, "{c:?}");
    assert_eq!(c["dispatched"], 2 * TASKS as u64, "{c:?}");
    assert_eq!(c["skipped"], deliveries - 2 * TASKS as u64, "{c:?}");
    let sum: u64 = [
        "dispatched",
        "adopted",
        "skipped",
        "requeued",
        "dead_lettered",
        "failed",
    ]
    .iter()
    .map(|k| c[*k])
    .sum();
    assert_eq!(sum, c["deliveries"]);
    duplicator.close().await;
    producer.close().await;
    env.cleanup().await
}

/// A dispatcher killed between an attempt's two writes (the Job, then its Secret) leaves a
/// Job that cannot start. The redelivered task finds its attempt claimed: it never creates
/// the Job again, but it creates the missing Secret, and the task runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_killed_between_a_job_and_its_secret_leaves_it_completed_by_the_redelivery()
-> anyhow::Result<()> {
    let c = cluster("").await?;
    // Every Secret create fails (the connection drops) until the dispatcher is killed.
    c.double
        .fail_next(1000, FaultSpec::drop_connection("POST", "/secrets"));
    let (producer, id) = submit(&c.env, json!({"n": 1}), Duration::from_secs(300)).await?;
    let job = format!("gantry-{}-a1", id.as_uuid().simple());
    let (double, env) = kill_once_a_create_is_dropped(c, "/secrets").await?;
    assert!(double.job(&job).is_some(), "the Job was made");
    assert!(double.get_secret(&job).is_none(), "its Secret was not");
    let restarted = restart_on_double(&env)?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(
        record.state,
        TaskState::Succeeded,
        "{:?}\n{}",
        record.error,
        restarted.log_text()
    );
    assert_eq!(record.attempt.get(), 1);
    assert_eq!(double.jobs_created(), 1, "the Job was never created again");
    producer.close().await;
    env.cleanup().await
}

/// A dispatcher killed after it claimed an attempt and before its Job was created: the
/// restarted dispatcher fails that attempt as lost and retries it as the next one; the
/// redelivered message never creates the first attempt's Job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_claimed_by_a_killed_dispatcher_without_its_job_is_failed_as_lost_and_retried()
-> anyhow::Result<()> {
    let c = cluster("").await?;
    c.double
        .fail_next(1000, FaultSpec::drop_connection("POST", "/jobs"));
    let (producer, id) = submit(&c.env, json!({"n": 1}), Duration::from_secs(300)).await?;
    let (double, env) = kill_once_a_create_is_dropped(c, "/jobs").await?;
    assert_eq!(double.jobs_created(), 0);
    let restarted = restart_on_double(&env)?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(
        record.state,
        TaskState::Succeeded,
        "{:?}\n{}",
        record.error,
        restarted.log_text()
    );
    assert_eq!(
        record.attempt.get(),
        2,
        "the claimed attempt was failed, not run"
    );
    let lost = producer
        .events(id)
        .await?
        .into_iter()
        .find(|e| e.attempt.get() == 1 && e.event == "retrying")
        .expect("the first attempt was retried");
    let kind = lost.detail.unwrap_or_default()["error"]["kind"].clone();
    assert_eq!(kind, json!("job_lost"));
    assert_eq!(double.jobs_created(), 1, "only the second attempt's Job");
    assert!(
        double
            .job(&format!("gantry-{}-a1", id.as_uuid().simple()))
            .is_none()
    );
    producer.close().await;
    env.cleanup().await
}

/// A chat task of class `chat`, asking for 16 tokens.
fn chat_spec() -> anyhow::Result<TaskSpec> {
    Ok(TaskSpec {
        executor: ExecutorClass::parse("chat")?,
        name: TaskName::parse("llm.chat")?,
        payload: json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}),
        ttl: Duration::from_secs(300),
        reply_to: None,
        idempotency_key: None,
        priority: None,
        resources: None,
    })
}

/// Waits for chat task `id`, checks that the model answered it with 16 tokens; its record.
async fn chatted(
    c: &Cluster,
    producer: &gantry_producer::Producer,
    id: gantry_shared::message::TaskId,
) -> anyhow::Result<gantry_shared::store::TaskRecord> {
    let record = producer.wait(id, Duration::from_secs(180)).await?;
    assert_eq!(
        record.state,
        TaskState::Succeeded,
        "{:?}\n{}",
        record.error,
        c.dispatcher.log_text()
    );
    let output = &record.result.as_ref().expect("result")["output"];
    assert_eq!(output["usage"]["completion_tokens"], 16, "{output}");
    assert!(output["message"]["content"].as_str().is_some(), "{output}");
    Ok(record)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_openai_class_answers_every_request_from_one_job_and_its_model_server()
-> anyhow::Result<()> {
    let server = serde_json::to_string(&gantry_tests::llm::server_argv()?)?;
    let c = cluster(&format!(
        "  chat:\n    engine: {{ kind: openai, model: tiny, server: {server}, startup_timeout: 90s }}\n    image: {IMAGE}\n    max_active_jobs: 1\n    warm: {{ max_concurrency: 2, idle_timeout: 5s }}\n"
    ))
    .await?;
    let producer = c.env.producer().await?;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(producer.submit(chat_spec()?).await?);
    }
    let mut places = gantry_tests::warm::Places::default();
    let mut pods = std::collections::BTreeSet::new();
    for id in ids {
        let record = chatted(&c, &producer, id).await?;
        places.take(&record, "chat");
        pods.insert(record.pod_name.clone().expect("the pod recorded"));
    }
    assert_eq!(pods.len(), 1, "one warm pod answered all four: {pods:?}");
    assert_eq!(c.double.jobs_created(), 1);
    let pod = pods.first().expect("a pod");
    let log = c.double.pod_log(pod).unwrap_or_default();
    assert_eq!(
        log.matches("model server started").count(),
        1,
        "its model server started once: {log}"
    );
    producer.close().await;
    c.env.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_class_runs_its_model_server_inside_the_job() -> anyhow::Result<()> {
    let server = serde_json::to_string(&gantry_tests::llm::server_argv()?)?;
    let c = cluster(&format!(
        "  chat:\n    engine: {{ kind: openai, model: tiny, server: {server}, startup_timeout: 90s }}\n    image: {IMAGE}\n"
    ))
    .await?;
    let producer = c.env.producer().await?;
    let id = producer.submit(chat_spec()?).await?;
    chatted(&c, &producer, id).await?;
    // The Job told its executor which engine to run, as the catalog says.
    let job = c
        .double
        .job(&format!("gantry-{}-a1", id.as_uuid().simple()))
        .expect("the job");
    let env = job
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers[0].env.clone().unwrap_or_default())
        .unwrap_or_default();
    let var = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(var("GANTRY_ENGINE").as_deref(), Some("openai"));
    let openai: serde_json::Value =
        serde_json::from_str(&var("GANTRY_OPENAI").expect("GANTRY_OPENAI"))?;
    assert_eq!(openai["model"], "tiny");
    producer.close().await;
    c.env.cleanup().await
}

/// The `warm:` line of class `echo` (and its retries): `slots` tasks per executor, idle
/// after `idle`.
fn warm_echo(slots: u16, idle: &str) -> String {
    format!(
        "    warm: {{ max_concurrency: {slots}, max_tasks_per_job: 1000, idle_timeout: {idle}, max_job_lifetime: 1h }}\n    retry: {{ max_attempts: 3, min_delay: 1s, max_delay: 1s }}\n"
    )
}

/// Checks that the first attempt of task `id` was retried after a failure of `kind`; the
/// events of that attempt.
async fn first_attempt_retried_after(
    producer: &gantry_producer::Producer,
    id: gantry_shared::message::TaskId,
    kind: &str,
) -> anyhow::Result<Vec<String>> {
    let events = producer.events(id).await?;
    let retry = events
        .iter()
        .find(|e| e.attempt.get() == 1 && e.event == "retrying")
        .expect("its first attempt was retried");
    let detail = retry.detail.clone().unwrap_or_default();
    assert_eq!(detail["error"]["kind"], json!(kind), "{detail}");
    Ok(events
        .into_iter()
        .filter(|e| e.attempt.get() == 1)
        .map(|e| e.event)
        .collect())
}

/// The events of task `id`, in order.
async fn events_of(
    producer: &gantry_producer::Producer,
    id: gantry_shared::message::TaskId,
) -> anyhow::Result<Vec<String>> {
    Ok(producer
        .events(id)
        .await?
        .into_iter()
        .map(|e| e.event)
        .collect())
}

/// Whether every one of `jobs` has completed.
fn all_complete(jobs: &[Job]) -> bool {
    jobs.iter().all(|j| {
        j.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Complete" && c.status == "True")
            })
    })
}

/// Submits a task of class `echo` with `payload`, to live 5 minutes.
async fn submit_echo(
    producer: &gantry_producer::Producer,
    payload: serde_json::Value,
) -> anyhow::Result<gantry_shared::message::TaskId> {
    Ok(producer
        .submit(gantry_tests::task_spec(
            "echo",
            payload,
            Duration::from_secs(300),
        ))
        .await?)
}

/// Waits for task `id` to end, and checks that it succeeded (showing `dispatcher`'s log if not).
async fn succeeded(
    dispatcher: &gantry_tests::Dispatcher,
    producer: &gantry_producer::Producer,
    id: gantry_shared::message::TaskId,
) -> anyhow::Result<gantry_shared::store::TaskRecord> {
    let record = producer.wait(id, Duration::from_secs(120)).await?;
    assert_eq!(
        record.state,
        TaskState::Succeeded,
        "{record:?}\n{}",
        dispatcher.log_text()
    );
    Ok(record)
}

/// The warm executors' Jobs in the double.
fn warm_jobs(double: &KubeDouble) -> Vec<Job> {
    double
        .jobs()
        .into_iter()
        .filter(|j| {
            j.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("gantry.dev/warm"))
                .is_some_and(|w| w == "true")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_class_runs_60_tasks_on_at_most_two_warm_jobs_each_task_with_its_own_evidence()
-> anyhow::Result<()> {
    use std::collections::BTreeSet;

    let c = cluster_with(&warm_echo(8, "5s"), 2, &[]).await?;
    let producer = c.env.producer().await?;
    let mut ids = Vec::new();
    for n in 0..60 {
        ids.push(submit_echo(&producer, json!({"n": n, "sleep_ms": 50})).await?);
    }
    let mut places = gantry_tests::warm::Places::default();
    let mut dispatch_ids = BTreeSet::new();
    for (n, id) in ids.iter().enumerate() {
        let record = succeeded(&c.dispatcher, &producer, *id).await?;
        let output = record.result.as_ref().map(|r| r["output"]["n"].clone());
        assert_eq!(output, Some(json!(n)), "each task has its own result");
        let job = places.take(&record, "echo");
        let pod = record.pod_name.clone().expect("the pod recorded");
        assert!(pod.starts_with(&job), "pod {pod} of job {job}");
        assert_eq!(record.node.as_deref(), Some("node-1"));
        dispatch_ids.insert(record.dispatch_id.clone().expect("a dispatch id"));
        let events = events_of(&producer, *id).await?;
        assert_eq!(
            events,
            ["received", "dispatched", "running", "succeeded"],
            "recorded running once its executor's pod ran"
        );
    }
    assert_eq!(dispatch_ids.len(), ids.len(), "a dispatch id per task");
    assert!(
        c.double.jobs_created() <= 2,
        "no more warm Jobs than max_active_jobs: {}",
        c.double.jobs_created()
    );
    assert_eq!(warm_jobs(&c.double).len() as u64, c.double.jobs_created());
    assert_eq!(
        c.double.secrets(),
        ["gantry-amqp"],
        "a warm Job has no Secret: its tasks come over its queue"
    );

    // Idle for idle_timeout: each executor drains, its Job completes, its queues go.
    c.double
        .wait_for("every warm Job to complete", Duration::from_secs(60), |d| {
            all_complete(&warm_jobs(d)).then_some(())
        })
        .await?;
    let channel = c.env.channel().await?;
    for job in warm_jobs(&c.double)
        .into_iter()
        .filter_map(|j| j.metadata.name)
    {
        let queue = c.env.topology().warm_queue(&job);
        gantry_tests::eventually(
            "the executor's queue to be removed",
            Duration::from_secs(30),
            || async {
                let gone =
                    gantry_shared::amqp::peek_queue(&channel, &queue, Duration::from_secs(5)).await;
                Ok(gone.is_err().then_some(()))
            },
        )
        .await?;
    }
    producer.close().await;
    c.env.cleanup().await
}

/// A cluster whose class `echo` records its executions on one warm Job of four slots, with
/// eight tasks of `sleep_ms` submitted and four of them running: the cluster, the records,
/// the producer, the tasks, and the warm pod.
async fn four_in_hand_on_a_warm_pod(
    sleep_ms: u64,
) -> anyhow::Result<(
    Cluster,
    gantry_tests::executions::Executions,
    gantry_producer::Producer,
    Vec<gantry_shared::message::TaskId>,
    String,
)> {
    use gantry_tests::executions::Executions;

    let c = cluster_of(&Executions::engine(), &warm_echo(4, "3s"), 1, &[]).await?;
    let executions = Executions::new(&c.env.dir.path().join("executions"))?;
    let producer = c.env.producer().await?;
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(submit_echo(&producer, executions.payload(sleep_ms)).await?);
    }
    let pod = gantry_tests::eventually("four tasks in hand", Duration::from_secs(60), || async {
        let running = executions.counts()?.len();
        let pod = c
            .double
            .pods_running_a_process()
            .into_iter()
            .find(|p| p.starts_with("gantry-w-echo-"));
        Ok(pod.filter(|_| running >= 4))
    })
    .await?;
    Ok((c, executions, producer, ids, pod))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_warm_pod_fails_its_tasks_in_hand_which_retry_and_none_runs_twice()
-> anyhow::Result<()> {
    let (c, executions, producer, ids, pod) = four_in_hand_on_a_warm_pod(3_000).await?;
    c.double.kill_pod_process(&pod);

    let mut retried = 0;
    for id in &ids {
        let record = succeeded(&c.dispatcher, &producer, *id).await?;
        if record.attempt.get() > 1 {
            retried += 1;
            first_attempt_retried_after(&producer, *id, "executor_crashed").await?;
        }
    }
    assert!(retried >= 1, "the tasks in hand at the kill were retried");
    assert_eq!(executions.run_twice()?, vec![], "no attempt ran twice");
    assert!(
        warm_jobs(&c.double).len() >= 2,
        "a new warm Job took over: {}",
        c.double.jobs_created()
    );
    producer.close().await;
    c.env.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_killed_with_a_warm_job_running_loses_nothing_and_runs_nothing_twice()
-> anyhow::Result<()> {
    // Long enough that the restarted dispatcher reconciles while they run.
    let (c, executions, producer, ids, _) = four_in_hand_on_a_warm_pod(10_000).await?;
    let (double, env, restarted) = kill_and_restart(c)?;
    for id in &ids {
        let record = succeeded(&restarted, &producer, *id).await?;
        let events = events_of(&producer, *id).await?;
        assert!(
            record.attempt.get() == 1 && !events.iter().any(|e| e == "retrying"),
            "the adopted warm Job was known: nothing in hand on it was failed as lost: {events:?}"
        );
    }
    assert_eq!(executions.run_twice()?, vec![], "no attempt ran twice");
    assert!(
        restarted
            .log_text()
            .contains("adopting a warm executor found at start"),
        "{}",
        restarted.log_text()
    );
    // The adopted executor drained; the tasks it was not handed went to a new one.
    double
        .wait_for("every warm Job to complete", Duration::from_secs(60), |d| {
            all_complete(&warm_jobs(d)).then_some(())
        })
        .await?;
    assert!(warm_jobs(&double).len() >= 2, "{}", double.jobs_created());
    producer.close().await;
    env.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_handed_to_a_warm_job_no_node_can_take_fail_as_unschedulable_and_are_retried()
-> anyhow::Result<()> {
    let c = cluster_with(
        &warm_echo(4, "3s"),
        1,
        &[("GANTRY_UNSCHEDULABLE_LIMIT", "1s")],
    )
    .await?;
    c.double
        .script_next(gantry_kube_double::Script::PendingForever);
    let producer = c.env.producer().await?;
    let mut ids = Vec::new();
    for n in 0..2 {
        ids.push(submit_echo(&producer, json!({"n": n})).await?);
    }
    for id in &ids {
        let record = succeeded(&c.dispatcher, &producer, *id).await?;
        assert_eq!(record.attempt.get(), 2, "the first warm Job never ran");
        let first = first_attempt_retried_after(&producer, *id, "unschedulable").await?;
        assert!(
            !first.iter().any(|e| e == "running"),
            "never running on a pod that never ran: {first:?}"
        );
    }
    assert_eq!(
        c.double.jobs_created(),
        2,
        "the stuck warm Job, then one that ran"
    );
    producer.close().await;
    c.env.cleanup().await
}
