//! `gantry-bench-kube`: how fast the `kubernetes` runtime turns published tasks into Jobs,
//! against the Kubernetes API double, beside two baselines measured in the same run.
//!
//! Build the binaries first, in release: `cargo build --release --bins`, then
//! `target/release/gantry-bench-kube --tasks 5000 --active 10000`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::Utc;
use clap::{Parser, ValueEnum};
use gantry_bench::placement::{Split, pin_current_thread};
use gantry_bench::{Cpu, Figures, lapin_round_trip, median};
use gantry_dispatcher::runtime::kubernetes::job;
use gantry_dispatcher::settings::KubernetesSection;
use gantry_kube_double::{DEFAULT_NODE, KubeDouble, Options, Script};
use gantry_shared::message::{ExecutorClass, JobName, Limits, Task, TaskSpec};
use gantry_tests::observability::Prometheus;
use gantry_tests::otlp::OtlpReceiver;
use gantry_tests::{Dispatcher, TestEnv, echo_spec, point_at_double};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use tokio::signal::unix::SignalKind;
use tokio::task::JoinSet;
use tokio_postgres::NoTls;

/// Measures the `kubernetes` runtime of gantry-dispatcher against the Kubernetes API double
/// (in this process, on 127.0.0.1, its pods running until deleted without a process), beside
/// two baselines measured in the same run, in rounds whose medians are reported:
///
/// - baseline 1: a bare lapin publish (confirmed) → consume → ack loop of as many messages
///   of the same size, through a quorum queue of the same broker;
/// - baseline 2: bare concurrent HTTP creates of the same Job and Secret bodies (built by the
///   dispatcher's own job builder) on a fresh double;
/// - gantry: a release `gantry-dispatcher --runtime kubernetes` (fresh database and prefix,
///   fresh double) and as many tasks published as the producer library does; latency is
///   publish → Job created in the double.
///
/// With `--placement split` (the default), the double runs on a CPU of its own and
/// everything else (this process's publishers and HTTP clients, the dispatcher, RabbitMQ
/// and Postgres) on the others, in the baselines and the gantry run alike, as an API server
/// runs on machines of its own; RabbitMQ's and Postgres's threads are moved for the run
/// and put back after it (moving them needs root). `--placement shared` leaves every
/// process on every CPU.
///
/// Then it prints the ratio of gantry's throughput to the smaller baseline's (target ≥ 0.7),
/// the API writes per task the double received (target ≤ 2), and, in a last phase with
/// `--active` tasks whose Jobs stay active, the dispatcher's peak RSS (target < 100 MB).
///
/// Needs RabbitMQ and Postgres (GANTRY_AMQP_URL, GANTRY_DATABASE_URL) and the release
/// binaries (`cargo build --release --bins`).
#[derive(Debug, Parser)]
#[command(verbatim_doc_comment)]
struct Args {
    /// Tasks per round (and messages, and Job creates, in the baselines).
    #[arg(long, default_value_t = 5000)]
    tasks: usize,
    /// Tasks of the last phase, whose Jobs all stay active while the dispatcher's peak RSS
    /// is read; 0 skips it.
    #[arg(long, default_value_t = 10_000)]
    active: usize,
    /// Concurrent publishers (of tasks, and of messages in baseline 1) and concurrent
    /// creators in baseline 2.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Rounds of baseline 1, baseline 2, gantry; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The dispatcher's `kubernetes.writes_per_second` (its burst: twice as many); its
    /// default when unset.
    #[arg(long)]
    writes_per_second: Option<u32>,
    /// The dispatcher's `max_waiting` (its prefetch); its default when unset.
    #[arg(long)]
    max_waiting: Option<u16>,
    /// Where the processes run: `split` gives the double a CPU of its own and everything
    /// else the others; `shared` leaves every process on every CPU.
    #[arg(long, value_enum, default_value_t = Placement::Split)]
    placement: Placement,
    /// Each round runs gantry twice, observed and not, and reports the throughput lost:
    /// observed, the dispatcher serves its metrics to a Prometheus scraping them every
    /// second and exports its spans to an OTLP receiver (oteltest's, from PyPI, in the venv
    /// of scripts/otel-receiver.sh); not observed, it serves no HTTP and exports nothing.
    /// With `split`, Prometheus and the receiver run on the double's CPU, as collectors run
    /// on machines of their own.
    #[arg(long)]
    observability: bool,
    /// Extra environment for the dispatcher, as NAME=VALUE (repeatable).
    #[arg(long = "dispatcher-env", value_parser = parse_var)]
    dispatcher_env: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Placement {
    Split,
    Shared,
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

/// The image of the bench class; the double's pods run no process, so it is never pulled.
const IMAGE: &str = "registry.example.com/executor-echo@sha256:1111111111111111111111111111111111111111111111111111111111111111";
/// The longest a phase may take.
const PHASE_LIMIT: Duration = Duration::from_secs(1200);

/// What one gantry phase measured.
struct Gantry {
    figures: Figures,
    writes_per_task: f64,
    cpu: Cpu,
    /// VmHWM and VmRSS of the dispatcher at the end, in bytes.
    rss: (u64, u64),
}

/// One round: the two baselines, gantry, and gantry's ratio to the smaller baseline.
struct Round {
    lapin: Figures,
    http: Figures,
    gantry: Gantry,
    ratio: f64,
    /// With `--observability`: the same run observed (`gantry` is then the run not
    /// observed).
    observed: Option<Gantry>,
}

/// How a gantry run's dispatcher shows itself.
#[derive(Clone, Copy)]
enum Observe<'a> {
    /// As the tests run it: HTTP on a free port (nobody scrapes it), no spans exported.
    AsTested,
    /// No HTTP endpoint, no spans exported.
    Off,
    /// Metrics scraped by Prometheus every second, spans exported to the receiver.
    On(&'a OtlpReceiver, Option<&'a Split>),
}

fn main() -> Result<()> {
    let args = Args::parse();
    let split = match args.placement {
        Placement::Split => {
            // Before any runtime starts: its threads, and the dispatcher, inherit the rest.
            let split = Arc::new(Split::new()?);
            let moved = split.move_service("beam.smp")? + split.move_service("postgres")?;
            println!(
                "placement: {} ({moved} threads of RabbitMQ and Postgres moved until the end)",
                split.describe(
                    "the double",
                    "this process's clients, the dispatcher, RabbitMQ and Postgres"
                )
            );
            Some(split)
        }
        Placement::Shared => {
            println!("placement: every process on every CPU");
            None
        }
    };
    // Two workers: the double (with `shared`) serves the dispatcher from here while the
    // bench waits.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let doubles = match &split {
        Some(split) => {
            let cpu = split.isolated_set()?;
            Doubles(Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("kube-double")
                    .on_thread_start(move || {
                        if let Err(e) = pin_current_thread(&cpu) {
                            eprintln!("the double's thread stays on every CPU: {e}");
                        }
                    })
                    .enable_all()
                    .build()?,
            ))
        }
        None => Doubles(None),
    };
    let outcome = runtime.block_on(async {
        if let Some(split) = split.clone() {
            // Interrupted or terminated: put RabbitMQ and Postgres back before leaving.
            let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
            tokio::spawn(async move {
                let code = tokio::select! {
                    _ = tokio::signal::ctrl_c() => 130,
                    _ = term.recv() => 143,
                };
                split.restore();
                std::process::exit(code);
            });
        }
        run(args, &doubles, split.as_deref()).await
    });
    if let Some(rt) = doubles.0 {
        rt.shutdown_background();
    }
    runtime.shutdown_background();
    drop(split);
    outcome
}

/// Where the doubles run: on a runtime of their own (pinned to the isolated CPU), or on
/// the bench's.
struct Doubles(Option<tokio::runtime::Runtime>);

impl Doubles {
    /// A double whose pods run until deleted, with room for `pods` of them on its node.
    async fn start(&self, pods: usize) -> Result<KubeDouble> {
        let options = Options {
            script: Some(Script::RunForever),
            // The API server's watch cache grows to 102,400 changes (to keep about 75 s of
            // history); the double's default, 10,000, is 1,500 tasks of this benchmark, so
            // a dispatcher a few seconds behind would be sent to list everything again.
            history_limit: 102_400,
            ..Options::default()
        };
        let double = match &self.0 {
            Some(rt) => rt.spawn(KubeDouble::start_with(options)).await?,
            None => KubeDouble::start_with(options).await,
        };
        double.set_node_allocatable(DEFAULT_NODE, "pods", &(pods + 10).to_string());
        Ok(double)
    }
}

async fn run(args: Args, doubles: &Doubles, split: Option<&Split>) -> Result<()> {
    println!(
        "gantry-bench-kube: {} tasks per round, {} concurrent, {} rounds, then {} active Jobs; dispatcher writes_per_second {}, max_waiting {}",
        args.tasks,
        args.concurrency,
        args.rounds,
        args.active,
        args.writes_per_second
            .map_or("default".into(), |n| n.to_string()),
        args.max_waiting.map_or("default".into(), |n| n.to_string()),
    );
    let body_len = sample_task(0)?.to_amqp(Utc::now())?.0.len();
    let receiver = match args.observability {
        true => Some(OtlpReceiver::start().await.context("the OTLP receiver")?),
        false => None,
    };
    if let (Some(receiver), Some(split)) = (&receiver, split)
        && let Some(pid) = receiver.pid()
    {
        split.isolate_process(pid)?;
    }
    let mut rounds = Vec::new();
    for round in 1..=args.rounds.max(1) {
        let lapin = lapin_round_trip(args.concurrency, args.tasks, body_len)
            .await
            .context("baseline 1")?;
        let http = http_creates(doubles, args.tasks, args.concurrency)
            .await
            .context("baseline 2")?;
        let (gantry, observed) = match &receiver {
            None => (
                gantry(&args, doubles, args.tasks, Observe::AsTested)
                    .await
                    .context("gantry")?,
                None,
            ),
            Some(receiver) => {
                let (off, on) = observed_and_not(&args, doubles, receiver, split, round).await?;
                (off, Some(on))
            }
        };
        let ratio = gantry.figures.per_second / lapin.per_second.min(http.per_second);
        println!(
            "round {round}: lapin {:.0} msg/s, HTTP {:.0} tasks/s, gantry {:.0} tasks/s, ratio {ratio:.2}, {:.2} writes/task",
            lapin.per_second, http.per_second, gantry.figures.per_second, gantry.writes_per_task
        );
        if let Some(on) = &observed {
            println!(
                "round {round}: observed {:.0} tasks/s, not observed {:.0} tasks/s: {:.1} % lost",
                on.figures.per_second,
                gantry.figures.per_second,
                lost(&gantry, on)
            );
        }
        rounds.push(Round {
            lapin,
            http,
            gantry,
            ratio,
            observed,
        });
    }
    let pick =
        |f: &dyn Fn(&Round) -> Figures| Figures::median(&rounds.iter().map(f).collect::<Vec<_>>());
    let lapin = pick(&|r| r.lapin);
    let http = pick(&|r| r.http);
    let gantry_figures = pick(&|r| r.gantry.figures);
    let of = |f: &dyn Fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    let ratio = of(&|r| r.ratio);
    let writes = of(&|r| r.gantry.writes_per_task);
    let cpu = Cpu::median(&rounds.iter().map(|r| r.gantry.cpu).collect::<Vec<_>>());

    println!(
        "\nmedians of {} rounds ({} at once, {} concurrent, {body_len}-byte task bodies):",
        rounds.len(),
        args.tasks,
        args.concurrency
    );
    lapin.print("baseline 1: lapin publish→consume→ack (quorum)");
    http.print("baseline 2: HTTP create Job + Secret (double)");
    gantry_figures.print("gantry: publish→Job created (kubernetes runtime)");
    println!("ratio gantry / smaller baseline: {ratio:.2} (target ≥ 0.7)");
    if args.observability {
        let observed: Vec<&Gantry> = rounds.iter().filter_map(|r| r.observed.as_ref()).collect();
        let on = Figures::median(&observed.iter().map(|g| g.figures).collect::<Vec<_>>());
        on.print("gantry observed: metrics scraped every second, spans exported");
        let losses: Vec<f64> = rounds
            .iter()
            .filter_map(|r| Some(lost(&r.gantry, r.observed.as_ref()?)))
            .collect();
        let each: Vec<String> = losses.iter().map(|l| format!("{l:.1}")).collect();
        println!(
            "throughput lost observed: {:.1} % (median of the rounds' {} %) (target < 5 %)",
            median(&losses),
            each.join(", ")
        );
        if let Some(receiver) = &receiver {
            // The Jobs never end here: a task's one span is its dispatch.
            let spans = receiver.spans();
            let dispatches = spans.iter().filter(|s| s.name == "gantry.dispatch").count();
            println!(
                "spans the receiver got: {dispatches} gantry.dispatch for {} tasks observed ({} spans in all)",
                observed.len() * args.tasks,
                spans.len()
            );
        }
        let seen = Cpu::median(&observed.iter().map(|g| g.cpu).collect::<Vec<_>>());
        println!(
            "CPU per task observed (µs): dispatcher {:.0}, this process (double, producer) {:.0}, RabbitMQ {:.0}, Postgres {:.0}, other (Prometheus, the receiver) {:.0}",
            seen.watched, seen.this, seen.rabbitmq, seen.postgres, seen.other
        );
        // What a busy neighbour on the machine moves least: the dispatcher's own CPU.
        println!(
            "dispatcher CPU per task: {:.0} µs observed, {:.0} µs not: {:+.1} %",
            seen.watched,
            cpu.watched,
            100.0 * (seen.watched / cpu.watched - 1.0)
        );
    }
    println!("API writes per task: {writes:.2} (target ≤ 2)");
    println!(
        "CPU per task (µs): dispatcher {:.0}, this process (double, producer) {:.0}, RabbitMQ {:.0}, Postgres {:.0}, other {:.0}",
        cpu.watched, cpu.this, cpu.rabbitmq, cpu.postgres, cpu.other
    );
    if args.active > 0 {
        let held = gantry(&args, doubles, args.active, Observe::AsTested)
            .await
            .context("active phase")?;
        held.figures
            .print(&format!("gantry: {} tasks, Jobs kept active", args.active));
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        println!(
            "dispatcher peak RSS with {} active Jobs in its cache: {:.1} MiB (VmHWM; VmRSS now {:.1} MiB) (target < 100 MB)",
            args.active,
            mb(held.rss.0),
            mb(held.rss.1)
        );
    }
    Ok(())
}

fn sample_task(i: usize) -> Result<Task> {
    Ok(Task::new(spec(i)?, &Limits::default())?)
}

fn spec(i: usize) -> Result<TaskSpec> {
    echo_spec("bench.kube", json!({"i": i, "prompt": "x".repeat(200)}))
}

fn catalog(max_active: usize) -> String {
    format!(
        "executors:\n  echo:\n    engine: {{ kind: echo }}\n    image: {IMAGE}\n    max_active_jobs: {max_active}\n"
    )
}

/// Baseline 2: `n` Jobs and their Secrets, as the dispatcher builds them, created over
/// plain HTTP by `concurrency` creators (Job, then its Secret owned by it: what the runtime
/// writes), without a token bucket or retries. Latency is the Job's POST → the Job created
/// in the double; throughput runs from the first POST to the last Secret created.
async fn http_creates(doubles: &Doubles, n: usize, concurrency: usize) -> Result<Figures> {
    let double = doubles.start(n).await?;
    let client = double.client();
    let jobs: Api<Job> = Api::namespaced(client.clone(), double.namespace());
    let secrets: Api<Secret> = Api::namespaced(client, double.namespace());
    let catalog = gantry_shared::catalog::Catalog::parse(&catalog(n), "bench")?;
    let class = ExecutorClass::parse("echo")?;
    let class_spec = catalog.get(&class).context("the bench class")?;
    let settings = KubernetesSection::default();
    let target = job::Target {
        namespace: double.namespace(),
        prefix: "bench",
        otlp_endpoint: None,
    };
    let mut bodies = Vec::with_capacity(n);
    for i in 0..n {
        let task = sample_task(i)?;
        let dispatch_id = format!("k8s-bench.{}", uuid::Uuid::new_v4().simple());
        bodies.push(job::build(
            &task,
            class_spec,
            &settings,
            &target,
            &dispatch_id,
            Utc::now(),
        )?);
    }
    let start = Instant::now();
    let mut running = JoinSet::new();
    let mut latencies = Vec::with_capacity(n);
    for (job, mut secret) in bodies {
        while running.len() >= concurrency {
            if let Some(r) = running.join_next().await {
                latencies.push(r??);
            }
        }
        let (jobs, secrets) = (jobs.clone(), secrets.clone());
        running.spawn(async move {
            let post = PostParams::default();
            let sent = Instant::now();
            let created = jobs.create(&post, &job).await?;
            secret.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "batch/v1".into(),
                kind: "Job".into(),
                name: created.metadata.name.clone().unwrap_or_default(),
                uid: created.metadata.uid.clone().unwrap_or_default(),
                controller: Some(false),
                block_owner_deletion: Some(false),
            }]);
            secrets.create(&post, &secret).await?;
            anyhow::Ok((created.metadata.name.unwrap_or_default(), sent))
        });
    }
    while let Some(r) = running.join_next().await {
        latencies.push(r??);
    }
    let elapsed = start.elapsed();
    let latencies = latencies
        .into_iter()
        .map(|(name, sent)| {
            let created = double
                .job_created_at(&name)
                .context("a Job the double never made")?;
            Ok(created.saturating_duration_since(sent))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Figures::of(n, elapsed, latencies))
}

/// The round's two gantry runs, not observed and observed, taking turns at going first
/// (so that a machine getting slower or faster over the run favours neither).
async fn observed_and_not(
    args: &Args,
    doubles: &Doubles,
    receiver: &OtlpReceiver,
    split: Option<&Split>,
    round: usize,
) -> Result<(Gantry, Gantry)> {
    let on = Observe::On(receiver, split);
    let n = args.tasks;
    if round % 2 == 1 {
        let off = gantry(args, doubles, n, Observe::Off)
            .await
            .context("gantry")?;
        let on = gantry(args, doubles, n, on)
            .await
            .context("gantry observed")?;
        Ok((off, on))
    } else {
        let on = gantry(args, doubles, n, on)
            .await
            .context("gantry observed")?;
        let off = gantry(args, doubles, n, Observe::Off)
            .await
            .context("gantry")?;
        Ok((off, on))
    }
}

/// The throughput the observed run lost to the one not observed, in percent.
fn lost(off: &Gantry, on: &Gantry) -> f64 {
    100.0 * (1.0 - on.figures.per_second / off.figures.per_second)
}

/// Publishes `n` tasks to a fresh dispatcher on a fresh double and waits for their Jobs,
/// then for the dispatcher to record every task running (so its caches hold them all).
async fn gantry(args: &Args, doubles: &Doubles, n: usize, observe: Observe<'_>) -> Result<Gantry> {
    let double = doubles.start(n).await?;
    let env = TestEnv::new(Some(&catalog(n))).await?;
    let outcome = gantry_in(args, n, &double, &env, observe).await;
    env.cleanup().await?;
    outcome
}

async fn gantry_in(
    args: &Args,
    n: usize,
    double: &KubeDouble,
    env: &TestEnv,
    observe: Observe<'_>,
) -> Result<Gantry> {
    let kubeconfig = point_at_double(double, env)?;
    let kubeconfig = kubeconfig.display().to_string();
    let config = env.dir.path().join("dispatcher.yaml");
    std::fs::write(&config, dispatcher_config(args))?;
    let config = config.display().to_string();
    let mut vars = vec![
        ("GANTRY_RUNTIME", "kubernetes"),
        ("KUBECONFIG", kubeconfig.as_str()),
        ("GANTRY_CONFIG", config.as_str()),
    ];
    match observe {
        Observe::AsTested => {}
        Observe::Off => vars.push(("GANTRY_HTTP_ADDR", "off")),
        Observe::On(receiver, _) => vars.push(("GANTRY_OTLP_ENDPOINT", receiver.endpoint())),
    }
    vars.extend(
        args.dispatcher_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let dispatcher = tokio::task::block_in_place(|| Dispatcher::start(env, &vars))?;
    let _prometheus = match observe {
        Observe::On(_, split) => {
            let prometheus = Prometheus::scraping(&[dispatcher.http_addr()?]).await?;
            if let Some(split) = split {
                split.isolate_process(prometheus.pid())?;
            }
            Some(prometheus)
        }
        _ => None,
    };
    let producer = Arc::new(env.producer().await?);
    let writes_before = double.requests().len();
    let cpu = Cpu::watching(Some(dispatcher.pid()));

    let start = Instant::now();
    let mut sends = JoinSet::new();
    let mut published: HashMap<String, Instant> = HashMap::with_capacity(n);
    for i in 0..n {
        while sends.len() >= args.concurrency {
            if let Some(r) = sends.join_next().await {
                let (name, at) = r??;
                published.insert(name, at);
            }
        }
        let producer = producer.clone();
        sends.spawn(async move {
            let task = producer.new_task(spec(i)?)?;
            let name = JobName::for_task(task.id, task.attempt).to_string();
            let at = Instant::now();
            producer.submit_task(&task).await?;
            anyhow::Ok((name, at))
        });
    }
    while let Some(r) = sends.join_next().await {
        let (name, at) = r??;
        published.insert(name, at);
    }
    double
        .wait_for("every Job", PHASE_LIMIT, |d| {
            (d.jobs_created() as usize >= n).then_some(())
        })
        .await
        .with_context(|| format!("see {}", dispatcher.log.display()))?;
    let mut last = start;
    let mut latencies = Vec::with_capacity(n);
    for (name, at) in &published {
        let created = double
            .job_created_at(name)
            .with_context(|| format!("no Job {name}"))?;
        last = last.max(created);
        latencies.push(created.saturating_duration_since(*at));
    }
    let figures = Figures::of(n, last - start, latencies);
    let cpu = Cpu::watching(Some(dispatcher.pid())).per_message(cpu, n);

    all_running(&env.database_url, n, &dispatcher.log).await?;
    // Every task is running: its writes are all done.
    let writes = double.requests()[writes_before..]
        .iter()
        .filter(|r| r.is_write())
        .count();
    let rss = peak_rss(dispatcher.pid())?;
    let status = tokio::task::block_in_place(|| dispatcher.terminate(Duration::from_secs(60)))?;
    ensure!(status.success(), "the dispatcher exited with {status}");
    if let Ok(p) = Arc::try_unwrap(producer) {
        p.close().await;
    }
    Ok(Gantry {
        figures,
        writes_per_task: writes as f64 / n as f64,
        cpu,
        rss,
    })
}

/// The `dispatcher:` section the flags ask for.
fn dispatcher_config(args: &Args) -> String {
    let mut yaml = "dispatcher:\n".to_owned();
    if let Some(n) = args.max_waiting {
        yaml.push_str(&format!("  max_waiting: {n}\n"));
    }
    if let Some(n) = args.writes_per_second {
        yaml.push_str(&format!(
            "  kubernetes:\n    writes_per_second: {n}\n    write_burst: {}\n",
            n.saturating_mul(2)
        ));
    }
    yaml
}

/// Waits until Postgres has all `n` tasks `running` (the dispatcher saw every pod run).
async fn all_running(database_url: &str, n: usize, log: &Path) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(database_url, NoTls).await?;
    tokio::spawn(conn);
    let start = Instant::now();
    loop {
        let rows = client
            .query("SELECT state, count(*) FROM tasks GROUP BY state", &[])
            .await?;
        let states: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if states.get("running").copied().unwrap_or(0) as usize >= n {
            return Ok(());
        }
        if states
            .keys()
            .any(|s| !matches!(s.as_str(), "received" | "dispatched" | "running"))
        {
            bail!("tasks ended: {states:?}; see {}", log.display());
        }
        if start.elapsed() > PHASE_LIMIT {
            bail!("tasks not all running: {states:?}; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// VmHWM and VmRSS of a process, in bytes.
fn peak_rss(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |field: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
        let value = line
            .split_whitespace()
            .nth(1)
            .context("an empty field")?
            .parse::<u64>()?;
        Ok(value * 1024)
    };
    Ok((kb("VmHWM:")?, kb("VmRSS:")?))
}
