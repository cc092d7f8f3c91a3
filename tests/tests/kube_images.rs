//! Executor images on the `kubernetes` runtime, end to end: a real `gantry-dispatcher`
//! against the Kubernetes API double, RabbitMQ and Postgres. The catalog comes from a
//! ConfigMap reloaded without restart; development mode reads the nodes' images; the
//! executor registry service is a small HTTP server in the test.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use gantry_kube_double::KubeDouble;
use gantry_producer::Producer;
use gantry_shared::message::{ExecutorClass, TaskId, TaskName, TaskSpec};
use gantry_shared::store::TaskState;
use gantry_tests::{Dispatcher, TestEnv, eventually};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const REGISTRY: &str = "registry.example.com/team/executor-echo";

fn digest(n: char) -> String {
    format!("sha256:{}", n.to_string().repeat(64))
}

fn pinned(n: char) -> String {
    format!("{REGISTRY}@{}", digest(n))
}

fn echo_catalog(image: Option<&str>) -> String {
    let image = image.map_or(String::new(), |i| format!("    image: {i}\n"));
    format!("executors:\n  echo:\n    engine: {{ kind: echo }}\n{image}")
}

/// A dispatcher on the `kubernetes` runtime against a fresh double.
struct Cluster {
    double: KubeDouble,
    env: TestEnv,
    dispatcher: Option<Dispatcher>,
}

impl Cluster {
    /// The double, the AMQP Secret and a kubeconfig; the dispatcher is started by
    /// [`Cluster::start`], so a test can prepare the cluster first. `catalog` declares the
    /// queues (and is the file catalog unless the dispatcher is given a ConfigMap).
    async fn new(catalog: &str, images: &[&str]) -> anyhow::Result<Cluster> {
        let double = KubeDouble::start().await;
        let executor = gantry_tests::bin_path("gantry-executor")
            .display()
            .to_string();
        for image in images {
            double.set_image_entrypoint(image, vec![executor.clone()]);
        }
        let env = TestEnv::new(Some(catalog)).await?;
        gantry_tests::point_at_double(&double, &env)?;
        Ok(Cluster {
            double,
            env,
            dispatcher: None,
        })
    }

    /// A cluster whose dispatcher reads its catalog from the ConfigMap `gantry-catalog`,
    /// created with `catalog`.
    async fn with_catalog_configmap(catalog: &str, images: &[&str]) -> anyhow::Result<Cluster> {
        let mut c = Cluster::new(catalog, images).await?;
        c.create_catalog_configmap(catalog).await?;
        c.start(&[
            ("GANTRY_CATALOG", ""),
            ("GANTRY_CATALOG_CONFIGMAP", "gantry-catalog"),
        ])?;
        Ok(c)
    }

    fn start(&mut self, vars: &[(&str, &str)]) -> anyhow::Result<()> {
        let kubeconfig = self.env.dir.path().join("kubeconfig").display().to_string();
        let mut all = vec![
            ("GANTRY_RUNTIME", "kubernetes"),
            ("KUBECONFIG", kubeconfig.as_str()),
        ];
        all.extend_from_slice(vars);
        self.dispatcher = Some(Dispatcher::start(&self.env, &all)?);
        Ok(())
    }

    fn log(&self) -> String {
        self.dispatcher
            .as_ref()
            .map(Dispatcher::log_text)
            .unwrap_or_default()
    }

    /// Waits until the dispatcher's log has `needle` at least `n` times.
    async fn logged(&self, needle: &str, n: usize) -> anyhow::Result<()> {
        eventually(
            &format!("{n} × {needle:?} in the dispatcher's log"),
            Duration::from_secs(30),
            || async { Ok((self.log().matches(needle).count() >= n).then_some(())) },
        )
        .await
        .with_context(|| self.log())
    }

    fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.double.client(), self.double.namespace())
    }

    async fn create_catalog_configmap(&self, catalog: &str) -> anyhow::Result<()> {
        let map = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some("gantry-catalog".into()),
                ..Default::default()
            },
            data: Some([("catalog.yaml".to_owned(), catalog.to_owned())].into()),
            ..Default::default()
        };
        self.configmaps()
            .create(&PostParams::default(), &map)
            .await?;
        Ok(())
    }

    async fn edit_catalog_configmap(&self, catalog: &str) -> anyhow::Result<()> {
        let patch = json!({"data": {"catalog.yaml": catalog}});
        self.configmaps()
            .patch(
                "gantry-catalog",
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        Ok(())
    }

    /// The image of the Job of a task's first attempt.
    fn job_image(&self, id: TaskId) -> Option<String> {
        let job = self
            .double
            .job(&format!("gantry-{}-a1", id.as_uuid().simple()))?;
        job.spec?.template.spec?.containers.first()?.image.clone()
    }

    async fn cleanup(self, extra_queues: &[&str]) -> anyhow::Result<()> {
        for queue in extra_queues {
            delete_queue(queue).await?;
        }
        self.env.cleanup().await
    }
}

async fn submit(producer: &Producer, class: &str) -> anyhow::Result<TaskId> {
    Ok(producer
        .submit(TaskSpec {
            executor: ExecutorClass::parse(class)?,
            name: TaskName::parse("k8s.echo")?,
            payload: json!({"hello": "images"}),
            ttl: Duration::from_secs(300),
            reply_to: None,
            idempotency_key: None,
            priority: None,
            resources: None,
        })
        .await?)
}

/// Submits a task of `class` and waits for it to end in `state`.
async fn run(
    c: &Cluster,
    producer: &Producer,
    class: &str,
    state: TaskState,
) -> anyhow::Result<TaskId> {
    let id = submit(producer, class).await?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(record.state, state, "{:?}\n{}", record.error, c.log());
    Ok(id)
}

async fn delete_queue(queue: &str) -> anyhow::Result<()> {
    let conn = gantry_shared::amqp::connect(
        &gantry_tests::amqp_url().into(),
        "gantry-tests",
        Duration::from_secs(10),
    )
    .await?;
    let channel = conn.create_channel().await?;
    channel
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await?;
    let _ = conn.close(200, "ok".into()).await;
    Ok(())
}

/// The dead-letter reason recorded for a task.
async fn dead_letter_reason(env: &TestEnv, id: TaskId) -> anyhow::Result<String> {
    let store = env.store().await?;
    eventually(
        "the dead letter to be recorded",
        Duration::from_secs(30),
        || async {
            let rows = store.dead_letters(10).await?;
            Ok(rows
                .into_iter()
                .find(|(_, task, _, _)| *task == Some(id.as_uuid()))
                .map(|(_, _, _, reason)| reason))
        },
    )
    .await
}

// The double serves from this process while the test blocks on the dispatcher's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_change_of_a_class_image_is_used_by_the_next_job_without_restart()
-> anyhow::Result<()> {
    let (a, b) = (pinned('a'), pinned('b'));
    let c = Cluster::with_catalog_configmap(&echo_catalog(Some(&a)), &[&a, &b]).await?;
    let producer = c.env.producer().await?;
    let first = run(&c, &producer, "echo", TaskState::Succeeded).await?;
    assert_eq!(c.job_image(first), Some(a));

    c.edit_catalog_configmap(&echo_catalog(Some(&b))).await?;
    c.logged("executor catalog reloaded", 1).await?;
    let second = run(&c, &producer, "echo", TaskState::Succeeded).await?;
    assert_eq!(c.job_image(second), Some(b));
    assert!(c.log().contains("changed=[\"echo\"]"), "{}", c.log());
    producer.close().await;
    c.cleanup(&[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_configmap_version_is_refused_and_the_previous_catalog_keeps_working()
-> anyhow::Result<()> {
    let a = pinned('a');
    let c = Cluster::with_catalog_configmap(&echo_catalog(Some(&a)), &[&a]).await?;

    // A misspelled key on line 4.
    let typo = format!("executors:\n  echo:\n    engine: {{ kind: echo }}\n    imgae: {a}\n");
    c.edit_catalog_configmap(&typo).await?;
    c.logged("executor catalog refused", 1).await?;
    // An image pinned by tag only, outside development mode.
    c.edit_catalog_configmap(&echo_catalog(Some(&format!("{REGISTRY}:1.4.2"))))
        .await?;
    c.logged("executor catalog refused", 2).await?;

    let log = c.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("executor catalog refused"))
        .collect();
    assert!(
        refusals[0].contains("gantry-catalog")
            && refusals[0].contains("key catalog.yaml")
            && refusals[0].contains("unknown field `imgae`")
            && refusals[0].contains("line 4"),
        "{}",
        refusals[0]
    );
    assert!(
        refusals[1].contains("executor class echo")
            && refusals[1].contains("not pinned to a digest")
            && refusals[1].contains(&format!("{REGISTRY}@sha256:<digest>")),
        "{}",
        refusals[1]
    );
    assert!(!log.contains("executor catalog reloaded"), "{log}");

    let producer = c.env.producer().await?;
    let id = run(&c, &producer, "echo", TaskState::Succeeded).await?;
    assert_eq!(c.job_image(id), Some(a), "the previous catalog is in force");
    producer.close().await;
    c.cleanup(&[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_added_to_the_configmap_is_dispatched_and_a_removed_one_waits_in_its_queue()
-> anyhow::Result<()> {
    let a = pinned('a');
    let c = Cluster::with_catalog_configmap(&echo_catalog(Some(&a)), &[&a]).await?;
    let embed_queue = format!("{}.tasks.embed", c.env.prefix);
    let with_embed = format!(
        "{}  embed:\n    engine: {{ kind: echo }}\n    image: {a}\n",
        echo_catalog(Some(&a))
    );
    c.edit_catalog_configmap(&with_embed).await?;
    c.logged("task queues of the new executor classes declared", 1)
        .await?;
    let producer = c.env.producer().await?;
    run(&c, &producer, "embed", TaskState::Succeeded).await?;

    c.edit_catalog_configmap(&echo_catalog(Some(&a))).await?;
    c.logged("executor class left the catalog", 1).await?;
    let waiting = submit(&producer, "embed").await?;
    eventually(
        "the task to wait in its queue, unconsumed",
        Duration::from_secs(30),
        || async {
            let (ready, consumers) = gantry_tests::queue_state(&embed_queue).await?;
            Ok((ready == 1 && consumers == 0).then_some(()))
        },
    )
    .await?;
    assert_eq!(c.job_image(waiting), None, "no Job for the removed class");
    // The other class is still dispatched.
    run(&c, &producer, "echo", TaskState::Succeeded).await?;
    producer.close().await;
    c.cleanup(&[&embed_queue]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_runs_the_newest_executor_image_the_nodes_report() -> anyhow::Result<()> {
    let (old, new, newer) = (pinned('1'), pinned('2'), pinned('3'));
    let mut c = Cluster::new(&echo_catalog(None), &[&old, &new, &newer]).await?;
    let (old_tag, new_tag) = (format!("{REGISTRY}:1.9.3"), format!("{REGISTRY}:1.10.0"));
    let latest = format!("{REGISTRY}:latest");
    c.double
        .set_node_images("node-1", &[&[&old, &old_tag], &[&latest]]);
    c.double.add_node("node-2", &[], Vec::new());
    c.double.set_node_images(
        "node-2",
        &[
            &[&new, &new_tag],
            &["registry.example.com/team/executor-echo-tools:9.9.9"],
        ],
    );
    c.start(&[("GANTRY_DEV_MODE", "true")])?;
    let producer = c.env.producer().await?;
    let id = run(&c, &producer, "echo", TaskState::Succeeded).await?;
    assert_eq!(
        c.job_image(id),
        Some(new.clone()),
        "1.10.0 is newer than 1.9.3"
    );

    // A newer image loaded onto a node is seen through the node watch.
    let newer_tag = format!("{REGISTRY}:2.0.0");
    c.double
        .set_node_images("node-1", &[&[&newer, &newer_tag], &[&old, &old_tag]]);
    eventually(
        "a task to run the newer image",
        Duration::from_secs(60),
        || async {
            let id = run(&c, &producer, "echo", TaskState::Succeeded).await?;
            Ok((c.job_image(id) == Some(newer.clone())).then_some(()))
        },
    )
    .await?;
    producer.close().await;
    c.cleanup(&[]).await
}

/// The executor registry service: `GET /executors/{class}` and `GET /executors`, or 503
/// for everything while it is down.
struct Registry {
    url: String,
    down: Arc<AtomicBool>,
    /// Requests for one class (not the listing).
    lookups: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Registry {
    async fn start(entries: &[(&str, Value)], down: bool) -> anyhow::Result<Registry> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let entries = Arc::new(Mutex::new(
            entries
                .iter()
                .map(|(c, v)| ((*c).to_owned(), v.clone()))
                .collect::<HashMap<_, _>>(),
        ));
        let down = Arc::new(AtomicBool::new(down));
        let lookups = Arc::new(AtomicUsize::new(0));
        let (e, d, l) = (entries.clone(), down.clone(), lookups.clone());
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (e, d, l) = (e.clone(), d.clone(), l.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let answer = answer(&e, &d, &l, req.uri().path());
                        async move { Ok::<_, Infallible>(answer) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Registry {
            url,
            down,
            lookups,
            server,
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn answer(
    entries: &Mutex<HashMap<String, Value>>,
    down: &AtomicBool,
    lookups: &AtomicUsize,
    path: &str,
) -> Response<Full<Bytes>> {
    let json = |status: StatusCode, body: Value| {
        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        r
    };
    let entries = entries.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(class) = path.strip_prefix("/executors/") {
        lookups.fetch_add(1, Ordering::SeqCst);
        if down.load(Ordering::SeqCst) {
            return json(StatusCode::SERVICE_UNAVAILABLE, json!({"error": "down"}));
        }
        return match entries.get(class) {
            Some(entry) => json(StatusCode::OK, entry.clone()),
            None => json(StatusCode::NOT_FOUND, json!({"error": "unknown class"})),
        };
    }
    if down.load(Ordering::SeqCst) || path != "/executors" {
        return json(StatusCode::SERVICE_UNAVAILABLE, json!({"error": "down"}));
    }
    let listed: Vec<Value> = entries
        .iter()
        .map(|(class, e)| {
            let mut e = e.clone();
            e["class"] = json!(class);
            e
        })
        .collect();
    json(StatusCode::OK, json!({ "executors": listed }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_service_answer_is_used_over_the_catalog_image() -> anyhow::Result<()> {
    let (catalog_image, registry_image) = (pinned('a'), pinned('c'));
    let registry = Registry::start(
        &[(
            "echo",
            json!({"image": registry_image, "capabilities": {"tasks": ["k8s.echo"]}}),
        )],
        false,
    )
    .await?;
    let mut c = Cluster::new(
        &echo_catalog(Some(&catalog_image)),
        &[&catalog_image, &registry_image],
    )
    .await?;
    c.start(&[("GANTRY_EXECUTOR_REGISTRY", &registry.url)])?;
    let producer = c.env.producer().await?;
    for _ in 0..2 {
        let id = run(&c, &producer, "echo", TaskState::Succeeded).await?;
        assert_eq!(c.job_image(id), Some(registry_image.clone()));
    }
    assert_eq!(
        registry.lookups.load(Ordering::SeqCst),
        0,
        "the listing read at start answered; the cache served both tasks"
    );
    producer.close().await;
    c.cleanup(&[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waits_while_the_registry_is_down_and_runs_once_it_answers() -> anyhow::Result<()> {
    let image = pinned('c');
    let registry = Registry::start(&[("echo", json!({"image": image}))], true).await?;
    let mut c = Cluster::new(&echo_catalog(None), &[&image]).await?;
    c.start(&[("GANTRY_EXECUTOR_REGISTRY", &registry.url)])?;
    let producer = c.env.producer().await?;
    let id = submit(&producer, "echo").await?;
    // One lookup is 4 tries; past them the task goes back to its queue and comes again.
    c.logged("requeued at the end of the queue", 1).await?;
    eventually(
        "the task to come back for its image",
        Duration::from_secs(30),
        || async { Ok((registry.lookups.load(Ordering::SeqCst) > 4).then_some(())) },
    )
    .await?;
    let record = producer.status(id).await?.context("the task is known")?;
    assert_eq!(
        record.state,
        TaskState::Received,
        "it waits, neither failed nor dead-lettered"
    );
    assert!(
        c.log()
            .contains("did not answer for class echo (answered 503"),
        "{}",
        c.log()
    );

    registry.down.store(false, Ordering::SeqCst);
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(
        record.state,
        TaskState::Succeeded,
        "{:?}\n{}",
        record.error,
        c.log()
    );
    assert_eq!(
        record.attempt.get(),
        1,
        "waiting for the image spent no attempt"
    );
    assert_eq!(c.job_image(id), Some(image));
    assert!(c.env.store().await?.dead_letters(10).await?.is_empty());
    producer.close().await;
    c.cleanup(&[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_unknown_to_the_registry_and_without_a_catalog_image_is_dead_lettered_with_a_readable_reason()
-> anyhow::Result<()> {
    let registry = Registry::start(&[], false).await?;
    let mut c = Cluster::new(&echo_catalog(None), &[]).await?;
    c.start(&[("GANTRY_EXECUTOR_REGISTRY", &registry.url)])?;
    let producer = c.env.producer().await?;
    let id = run(&c, &producer, "echo", TaskState::DeadLettered).await?;
    let reason = dead_letter_reason(&c.env, id).await?;
    assert!(
        reason.starts_with("image: executor class echo has no image")
            && reason.contains(&format!(
                "the executor registry {} does not know it (404)",
                registry.url
            ))
            && reason.contains("the catalog gives it no `image:`")
            && reason.contains("development mode (node images) is off")
            && reason.contains("register it in the executor registry or add `image:`"),
        "{reason}"
    );
    assert_eq!(c.double.jobs_created(), 0);
    producer.close().await;
    c.cleanup(&[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_outside_the_allowed_registries_is_dead_lettered_with_a_clear_reason()
-> anyhow::Result<()> {
    let foreign = format!("evil.example.org/executor-echo@{}", digest('e'));
    let registry = Registry::start(&[("echo", json!({"image": foreign}))], false).await?;
    let mut c = Cluster::new(&echo_catalog(None), &[&foreign]).await?;
    c.start(&[
        ("GANTRY_EXECUTOR_REGISTRY", &registry.url),
        ("GANTRY_ALLOWED_REGISTRIES", "registry.example.com"),
    ])?;
    let producer = c.env.producer().await?;
    let id = run(&c, &producer, "echo", TaskState::DeadLettered).await?;
    let reason = dead_letter_reason(&c.env, id).await?;
    assert_eq!(
        reason,
        format!(
            "image: executor class echo: image {foreign} is not from an allowed registry (registry.example.com); pin it to one of them or add its registry to dispatcher.kubernetes.allowed_registries"
        )
    );
    assert_eq!(c.double.jobs_created(), 0, "nothing was created");
    producer.close().await;
    c.cleanup(&[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_the_registry_image_does_not_handle_is_dead_lettered_with_the_tasks_it_does()
-> anyhow::Result<()> {
    let image = pinned('c');
    let entry = json!({"image": image, "capabilities": {"tasks": ["llm.chat", "llm.complete"]}});
    let registry = Registry::start(&[("echo", entry)], false).await?;
    let mut c = Cluster::new(&echo_catalog(None), &[&image]).await?;
    c.start(&[("GANTRY_EXECUTOR_REGISTRY", &registry.url)])?;
    let producer = c.env.producer().await?;
    let id = run(&c, &producer, "echo", TaskState::DeadLettered).await?;
    let reason = dead_letter_reason(&c.env, id).await?;
    assert!(
        reason.contains("does not handle task k8s.echo")
            && reason.contains("the executor registry lists llm.chat, llm.complete"),
        "{reason}"
    );
    assert_eq!(c.double.jobs_created(), 0);
    producer.close().await;
    c.cleanup(&[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_file_is_reloaded_on_sighup() -> anyhow::Result<()> {
    let (a, b) = (pinned('a'), pinned('b'));
    let mut c = Cluster::new(&echo_catalog(Some(&a)), &[&a, &b]).await?;
    c.start(&[])?;
    std::fs::write(&c.env.catalog_path, echo_catalog(Some(&b)))?;
    let pid = c.dispatcher.as_ref().context("started")?.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    c.logged("executor catalog reloaded", 1).await?;
    let producer = c.env.producer().await?;
    let id = run(&c, &producer, "echo", TaskState::Succeeded).await?;
    assert_eq!(c.job_image(id), Some(b));
    producer.close().await;
    c.cleanup(&[]).await
}
