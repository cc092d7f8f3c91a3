//! The dispatcher's HTTP endpoint: `/livez` and `/readyz` say what they checked, `/metrics`
//! names every metric, a real Prometheus scrapes it and reads the counters rise as tasks run,
//! and the endpoint lives and dies with the dispatcher.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use gantry_kube_double::{FaultSpec, KubeDouble};
use gantry_shared::message::{ExecutorClass, TaskName, TaskSpec};
use gantry_shared::store::TaskState;
use gantry_tests::observability::{Prometheus, get, http_addr_in};
use gantry_tests::{TestEnv, bin_path, echo_spec, eventually};
use serde_json::json;

/// Every metric the dispatcher serves, by the name its `# TYPE` line gives it.
const METRICS: [&str; 16] = [
    "gantry_deliveries_total",
    "gantry_tasks_total",
    "gantry_results_recorded_total",
    "gantry_dead_letters_total",
    "gantry_retries_total",
    "gantry_task_to_job_seconds",
    "gantry_job_to_running_seconds",
    "gantry_job_run_seconds",
    "gantry_capacity_in_use",
    "gantry_capacity_limit",
    "gantry_amqp_reconnects_total",
    "gantry_postgres_group_commits_total",
    "gantry_postgres_group_writes_total",
    "gantry_recorder_batch_size",
    "gantry_ready_check",
    "gantry_build_info",
];

/// The metrics of the `kubernetes` runtime's API calls.
const API_METRICS: [&str; 2] = [
    "gantry_kube_api_writes_total",
    "gantry_kube_api_errors_total",
];

/// `echo`, and `flaky`, which fails retryably (exit 75) on its first attempt and succeeds on
/// its second, a second after.
const CATALOG: &str = r#"
executors:
  echo:
    engine: { kind: echo }
    max_active_jobs: 8
  flaky:
    engine: { kind: command, command: ["sh", "-c", "input=$(cat); case \"$input\" in *'\"attempt\":2'*) echo '{\"ok\": true}';; *) echo 'GPU busy, try later' >&2; exit 75;; esac"] }
    max_active_jobs: 2
    retry: { max_attempts: 2, min_delay: 1s, max_delay: 1s }
"#;

fn flaky() -> TaskSpec {
    TaskSpec {
        executor: ExecutorClass::parse("flaky").expect("class"),
        name: TaskName::parse("metrics.flaky").expect("name"),
        payload: json!({}),
        ttl: Duration::from_secs(120),
        reply_to: None,
        idempotency_key: None,
        priority: None,
        resources: None,
    }
}

/// The `/metrics` text of the dispatcher at `addr` once it has every line of `lines`: the
/// counts of a task rise a moment after the task's state is in Postgres (its result is
/// counted once the commit returns, its run time once its job's end is seen).
async fn metrics_with(addr: std::net::SocketAddr, lines: &[&str]) -> anyhow::Result<String> {
    let has_all = |text: &str| lines.iter().all(|line| text.lines().any(|l| l == *line));
    let last = std::cell::RefCell::new(String::new());
    let found = eventually("the metrics", Duration::from_secs(30), || async {
        let (status, text) = get(addr, "/metrics").await?;
        anyhow::ensure!(status == 200, "{text}");
        last.replace(text.clone());
        Ok(has_all(&text).then_some(text))
    })
    .await;
    found.with_context(|| {
        let last = last.borrow();
        let missing: Vec<&&str> = lines
            .iter()
            .filter(|line| !last.lines().any(|l| l == **line))
            .collect();
        format!("missing {missing:?} in:\n{last}")
    })
}

/// The `# TYPE` lines' names of a `/metrics` text.
fn names(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

#[tokio::test]
async fn livez_and_readyz_name_what_they_checked_and_metrics_names_every_metric()
-> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let dispatcher = env.dispatcher_process()?;
    let addr = dispatcher.http_addr()?;

    let (status, live) = get(addr, "/livez").await?;
    assert_eq!(status, 200, "{live}");
    assert!(live.starts_with("live\n"), "{live}");
    for running in [
        "loop record/results: running",
        "loop dispatch/consumers: running",
        "loop heartbeat: running",
    ] {
        assert!(live.contains(running), "{live}");
    }
    let (status, ready) = get(addr, "/readyz").await?;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(
        ready, "ready\nbroker: ok\npostgres: ok\ncatalog: ok\nroles: ok\n",
        "each check by name; no API server on the local runtime"
    );

    let producer = env.producer().await?;
    let id = producer
        .submit(echo_spec("metrics.echo", json!({}))?)
        .await?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(record.state, TaskState::Succeeded);
    env.publish_raw("echo", b"{not json").await?;

    let text = metrics_with(
        addr,
        &[
            "gantry_job_run_seconds_count{class=\"echo\",end=\"reported\"} 1",
            "gantry_dead_letters_total{reason=\"invalid\"} 1",
            "gantry_tasks_total{class=\"echo\",state=\"dispatched\"} 1",
        "gantry_tasks_total{class=\"echo\",state=\"running\"} 1",
        "gantry_tasks_total{class=\"echo\",state=\"succeeded\"} 1",
        "gantry_results_recorded_total{class=\"echo\",status=\"succeeded\"} 1",
        "gantry_deliveries_total{class=\"echo\",outcome=\"dispatched\",reason=\"\"} 1",
        "gantry_deliveries_total{class=\"echo\",outcome=\"dead_lettered\",reason=\"not_json\"} 1",
        "gantry_task_to_job_seconds_count{class=\"echo\"} 1",
        "gantry_capacity_in_use{class=\"echo\"} 0",
        "gantry_capacity_limit{class=\"echo\"} 8",
            "gantry_ready_check{check=\"postgres\"} 1",
        ],
    )
    .await?;
    let served = names(&text);
    for name in METRICS {
        assert!(served.contains(&name), "{name} in:\n{text}");
    }
    assert!(
        !served.iter().any(|n| API_METRICS.contains(n)),
        "no API calls on the local runtime"
    );
    let (status, _) = get(addr, "/nothing-here").await?;
    assert_eq!(status, 404);
    producer.close().await;
    drop(dispatcher);
    env.cleanup().await
}

#[tokio::test]
async fn prometheus_scrapes_the_dispatcher_and_reads_its_counters_rise_as_tasks_run()
-> anyhow::Result<()> {
    let env = TestEnv::new(Some(CATALOG)).await?;
    let dispatcher = env.dispatcher_process()?;
    let prometheus = Prometheus::scraping(&[dispatcher.http_addr()?]).await?;

    // Scraped, before any task: the classes' capacity is there, no result yet.
    eventually("a first scrape", Duration::from_secs(30), || async {
        let up = prometheus.value("up{job=\"gantry-dispatcher\"}").await?;
        let limit = prometheus
            .value("gantry_capacity_limit{class=\"echo\"}")
            .await?;
        Ok((up == Some(1.0) && limit == Some(8.0)).then_some(()))
    })
    .await
    .with_context(|| prometheus.log_text())?;
    assert_eq!(
        prometheus.value("gantry_results_recorded_total").await?,
        None
    );

    let producer = env.producer().await?;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            producer
                .submit(echo_spec("metrics.echo", json!({"i": i}))?)
                .await?,
        );
    }
    ids.push(producer.submit(flaky()).await?);
    env.publish_raw("echo", b"{not json").await?;

    let expected = [
        (
            "sum(gantry_tasks_total{class=\"echo\",state=\"succeeded\"})",
            3.0,
        ),
        (
            "sum(gantry_results_recorded_total{status=\"succeeded\"})",
            4.0,
        ),
        (
            "sum(gantry_tasks_total{class=\"flaky\",state=\"retrying\"})",
            1.0,
        ),
        ("sum(gantry_retries_total{class=\"flaky\"})", 1.0),
        ("sum(gantry_dead_letters_total{reason=\"invalid\"})", 1.0),
        ("sum(gantry_rejected_total{reason=\"not_json\"})", 1.0),
        ("sum(gantry_task_to_job_seconds_count)", 5.0),
        ("sum(gantry_job_run_seconds_count)", 5.0),
        ("sum(gantry_deliveries_total{outcome=\"dispatched\"})", 5.0),
    ];
    let read = eventually(
        "Prometheus to read the counters of every task",
        Duration::from_secs(60),
        || async {
            let mut now = Vec::new();
            for (query, want) in expected {
                let value = prometheus.value(query).await?;
                if value != Some(want) {
                    return Ok(None);
                }
                now.push((query, want));
            }
            Ok(Some(now))
        },
    )
    .await;
    if read.is_err() {
        let mut seen = String::new();
        for (query, _) in expected {
            seen.push_str(&format!("{query} = {:?}\n", prometheus.value(query).await?));
        }
        read.with_context(|| seen)?;
    }
    for id in ids {
        let record = producer.wait(id, Duration::from_secs(30)).await?;
        assert_eq!(record.state, TaskState::Succeeded);
    }
    let commits = prometheus
        .value("sum(gantry_postgres_group_commits_total{writer=\"results\"})")
        .await?;
    assert!(commits.is_some_and(|c| c >= 1.0), "{commits:?}");
    let batches = prometheus
        .value("sum(gantry_recorder_batch_size_sum{writer=\"results\"})")
        .await?;
    assert!(
        batches.is_some_and(|b| b >= 5.0),
        "five results at least, in batches of any size: {batches:?}"
    );
    dashboard_queries_run_on(&prometheus, &names_served(dispatcher.http_addr()?).await?).await?;
    producer.close().await;
    drop(dispatcher);
    env.cleanup().await
}

/// The names of the metrics a dispatcher at `addr` serves now.
async fn names_served(addr: std::net::SocketAddr) -> anyhow::Result<Vec<String>> {
    let (_, text) = get(addr, "/metrics").await?;
    Ok(names(&text).into_iter().map(str::to_owned).collect())
}

/// Every query of deploy/grafana-dashboard.json, its variables set to "all", is one that
/// `prometheus` accepts, and names only metrics that are `served` (or the kubernetes
/// runtime's API metrics, or Prometheus's `up`).
async fn dashboard_queries_run_on(
    prometheus: &Prometheus,
    served: &[String],
) -> anyhow::Result<()> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push(expr.to_owned());
            }
        }
    }
    assert!(exprs.len() >= 10, "the dashboard has its panels: {exprs:?}");
    for expr in &exprs {
        let query = expr
            .replace("$__rate_interval", "1m")
            .replace("$class", ".*")
            .replace("$instance", ".*")
            .replace("$job", ".*");
        prometheus
            .query(&query)
            .await
            .with_context(|| format!("the dashboard's query {expr}"))?;
        for word in query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !word.starts_with("gantry_") {
                continue;
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(word);
            assert!(
                served.iter().any(|n| n == family) || API_METRICS.contains(&family),
                "the dashboard's {word} is not served: {served:?}"
            );
        }
    }
    Ok(())
}

// The API double serves from this process, while the dispatcher's start blocks a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_kubernetes_runtime_readyz_checks_the_api_server_and_api_writes_are_counted_by_code()
-> anyhow::Result<()> {
    const IMAGE: &str = "registry.example.com/executor-echo@sha256:1111111111111111111111111111111111111111111111111111111111111111";
    let double = KubeDouble::start().await;
    let executor = bin_path("gantry-executor").display().to_string();
    double.set_image_entrypoint(IMAGE, vec![executor]);
    let catalog = format!(
        "executors:\n  echo:\n    engine: {{ kind: echo }}\n    image: {IMAGE}\n    max_active_jobs: 4\n"
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let kubeconfig = gantry_tests::point_at_double(&double, &env)?;
    let kubeconfig = kubeconfig.display().to_string();
    let dispatcher = gantry_tests::Dispatcher::start(
        &env,
        &[
            ("GANTRY_RUNTIME", "kubernetes"),
            ("KUBECONFIG", kubeconfig.as_str()),
        ],
    )?;
    let addr = dispatcher.http_addr()?;
    let (status, ready) = get(addr, "/readyz").await?;
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains("\nkubernetes_api: ok\n"), "{ready}");

    // The first create of the Job fails with a 500; the client tries again.
    double.fail_next(1, FaultSpec::internal_error("POST", "/jobs"));
    let producer = env.producer().await?;
    let id = producer
        .submit(echo_spec("metrics.kube", json!({}))?)
        .await?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(record.state, TaskState::Succeeded, "{:?}", record.error);

    let text = metrics_with(
        addr,
        &[
            "gantry_job_run_seconds_count{class=\"echo\",end=\"reported\"} 1",
            "gantry_results_recorded_total{class=\"echo\",status=\"succeeded\"} 1",
            "gantry_kube_api_writes_total{verb=\"create\",resource=\"jobs\"} 2",
            "gantry_kube_api_writes_total{verb=\"create\",resource=\"secrets\"} 1",
            "gantry_kube_api_errors_total{verb=\"create\",resource=\"jobs\",code=\"500\"} 1",
            "gantry_job_to_running_seconds_count{class=\"echo\"} 1",
            "gantry_tasks_total{class=\"echo\",state=\"running\"} 1",
            "gantry_ready_check{check=\"kubernetes_api\"} 1",
        ],
    )
    .await?;
    let served = names(&text);
    for name in METRICS.iter().chain(&API_METRICS) {
        assert!(served.contains(name), "{name} in:\n{text}");
    }
    producer.close().await;
    drop(dispatcher);
    env.cleanup().await
}

#[tokio::test]
async fn readyz_says_not_ready_while_postgres_cannot_be_reached_and_livez_stays_live()
-> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let log = env.dir.path().join("dispatcher.log");
    let out = std::fs::File::create(&log)?;
    let config = env.config();
    // Nothing listens on port 1: Postgres is retried for two minutes at start.
    let mut child = Command::new(bin_path("gantry-dispatcher"))
        .env_remove("GANTRY_CONFIG")
        .env("GANTRY_RUNTIME", "local")
        .env(
            "GANTRY_AMQP_URL",
            secrecy::ExposeSecret::expose_secret(&config.amqp_url),
        )
        .env(
            "GANTRY_DATABASE_URL",
            "postgres://gantry:gantry@127.0.0.1:1/gantry",
        )
        .env("GANTRY_PREFIX", &env.prefix)
        .env("GANTRY_STATE_DIR", env.dir.path().join("state"))
        .env("GANTRY_CATALOG", &env.catalog_path)
        .env("GANTRY_HTTP_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let addr = eventually(
        "the dispatcher to serve HTTP",
        Duration::from_secs(30),
        || async { Ok(http_addr_in(&text())) },
    )
    .await?;
    let ready = eventually(
        "the broker to be reached",
        Duration::from_secs(30),
        || async {
            let (status, body) = get(addr, "/readyz").await?;
            Ok(body.contains("broker: ok").then_some((status, body)))
        },
    )
    .await;
    let (live, live_body) = get(addr, "/livez").await?;
    let _ = child.kill();
    let _ = child.wait();
    let (status, body) = ready.with_context(text)?;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready\n"), "{body}");
    assert!(body.contains("\npostgres: not connected yet\n"), "{body}");
    assert!(body.contains("\ncatalog: ok\n"), "{body}");
    assert!(body.contains("\nroles: starting\n"), "{body}");
    assert_eq!(
        live, 200,
        "a dispatcher still starting is live: {live_body}"
    );
    env.cleanup().await
}

#[tokio::test]
async fn sigterm_stops_the_endpoint_with_the_dispatcher_which_exits_0() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let dispatcher = env.dispatcher_process()?;
    let addr = dispatcher.http_addr()?;
    assert_eq!(get(addr, "/livez").await?.0, 200);
    let status = dispatcher.terminate(Duration::from_secs(30))?;
    assert!(status.success(), "{status}");
    assert!(
        get(addr, "/livez").await.is_err(),
        "nothing answers on {addr} once the dispatcher has exited"
    );
    env.cleanup().await
}

#[test]
fn the_deployment_probes_and_exposes_the_port_the_dispatcher_listens_on() -> anyhow::Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/deployment.yaml");
    let deployment: serde_json::Value = gantry_shared::config::read_file(Some(&path))?;
    let pod = &deployment["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let env = container["env"].as_array().context("env")?;
    let addr = env
        .iter()
        .find(|e| e["name"] == "GANTRY_HTTP_ADDR")
        .and_then(|e| e["value"].as_str())
        .context("GANTRY_HTTP_ADDR is set")?;
    let addr: gantry_dispatcher::HttpAddr = addr.parse().map_err(anyhow::Error::msg)?;
    let addr = addr.0.context("HTTP is on")?;
    assert!(addr.ip().is_unspecified(), "every interface: {addr}");
    let port = &container["ports"][0];
    assert_eq!(port["name"], "http");
    assert_eq!(port["containerPort"], addr.port());
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "http");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "http");
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], addr.port().to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    Ok(())
}

#[test]
fn an_http_address_taken_or_malformed_stops_the_dispatcher_at_start_with_what_to_do()
-> anyhow::Result<()> {
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let run = |value: &str| -> anyhow::Result<(Option<i32>, String)> {
        let out = Command::new(bin_path("gantry-dispatcher"))
            .env_remove("GANTRY_CONFIG")
            .env("GANTRY_HTTP_ADDR", value)
            .output()?;
        Ok((out.status.code(), String::from_utf8(out.stderr)?))
    };
    let (code, stderr) = run(&addr)?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot serve HTTP on {addr} (http_addr, GANTRY_HTTP_ADDR): Address already in use"
        )),
        "{stderr}"
    );
    let (code, stderr) = run("localhost:8380")?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(r#"invalid configuration in GANTRY_HTTP_ADDR: "localhost:8380": not an IP address and port such as 127.0.0.1:8380"#),
        "{stderr}"
    );
    Ok(())
}
