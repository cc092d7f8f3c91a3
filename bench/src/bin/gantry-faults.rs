//! `gantry-faults`: the fault suite. For each fault, a fresh world (database, prefix, a
//! Kubernetes API double running the real executor, a `gantry-dispatcher` on the
//! `kubernetes` runtime) runs a batch of tasks while the fault strikes, and one table says,
//! per fault: tasks submitted, terminal, lost (not terminal in time), and attempts that ran
//! more than once. "Ran" is counted from what the executions did: the class's command
//! records each run itself (see `gantry_tests::executions`), whatever the dispatcher's
//! bookkeeping says. Every row must show 0 lost and 0 run twice; the command exits 1
//! otherwise.
//!
//! The RabbitMQ and Postgres restarts stop every other user of those servers: run the suite
//! alone (`make faults`), or leave them out with `--no-restarts`. Build the binaries first:
//! `cargo build --workspace --bins`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use gantry_kube_double::{FaultSpec, KubeDouble, Script};
use gantry_shared::message::{ExecutorClass, TaskId, TaskName, TaskSpec};
use gantry_tests::duplicate::Duplicator;
use gantry_tests::executions::Executions;
use gantry_tests::{Dispatcher, TestEnv, counters_in, services};
use tokio_postgres::NoTls;

/// Runs each fault against a fresh world and prints one table.
#[derive(Debug, Parser)]
#[command(
    after_help = "Faults: none, dispatcher-kill, executor-kill, rabbitmq-restart, \
postgres-restart, api-5xx, api-429, api-slow, watch-410, eviction, oom, image-pull, deadline, \
duplicates, mixed.\n\nExample:\n  gantry-faults --tasks 20 --only eviction,duplicates"
)]
struct Args {
    /// Tasks per fault.
    #[arg(long, default_value_t = 20)]
    tasks: usize,
    /// How long each task's work takes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    work: Duration,
    /// Only these faults (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Leave out the RabbitMQ and Postgres restarts.
    #[arg(long)]
    no_restarts: bool,
    /// How long a fault's tasks may take to end before the rest count as lost.
    #[arg(long, default_value = "4m", value_parser = humantime::parse_duration)]
    patience: Duration,
}

/// One fault of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    DispatcherKill,
    ExecutorKill,
    RabbitmqRestart,
    PostgresRestart,
    Api5xx,
    Api429,
    ApiSlow,
    Watch410,
    Eviction,
    Oom,
    ImagePull,
    Deadline,
    Duplicates,
    Mixed,
}

const FAULTS: [Fault; 15] = [
    Fault::None,
    Fault::DispatcherKill,
    Fault::ExecutorKill,
    Fault::RabbitmqRestart,
    Fault::PostgresRestart,
    Fault::Api5xx,
    Fault::Api429,
    Fault::ApiSlow,
    Fault::Watch410,
    Fault::Eviction,
    Fault::Oom,
    Fault::ImagePull,
    Fault::Deadline,
    Fault::Duplicates,
    Fault::Mixed,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::DispatcherKill => "dispatcher-kill",
            Fault::ExecutorKill => "executor-kill",
            Fault::RabbitmqRestart => "rabbitmq-restart",
            Fault::PostgresRestart => "postgres-restart",
            Fault::Api5xx => "api-5xx",
            Fault::Api429 => "api-429",
            Fault::ApiSlow => "api-slow",
            Fault::Watch410 => "watch-410",
            Fault::Eviction => "eviction",
            Fault::Oom => "oom",
            Fault::ImagePull => "image-pull",
            Fault::Deadline => "deadline",
            Fault::Duplicates => "duplicates",
            Fault::Mixed => "mixed",
        }
    }

    /// What the fault does, for the table.
    fn what(self) -> &'static str {
        match self {
            Fault::None => "no fault",
            Fault::DispatcherKill => "dispatcher SIGKILL mid-run, restarted",
            Fault::ExecutorKill => "SIGKILL of a quarter of the running executors",
            Fault::RabbitmqRestart => "RabbitMQ restarted mid-run",
            Fault::PostgresRestart => "Postgres restarted mid-run",
            Fault::Api5xx => "500 on half the Job and a quarter of the Secret creates",
            Fault::Api429 => "429 (Retry-After 1s) on half the Job creates",
            Fault::ApiSlow => "every Job create answered 2s late",
            Fault::Watch410 => "watch history compacted, watches ended (410 Gone)",
            Fault::Eviction => "a quarter of the first pods evicted",
            Fault::Oom => "a quarter of the pods OOMKilled",
            Fault::ImagePull => "a quarter of the pods never pull their image",
            Fault::Deadline => "a quarter of the tasks outlive their deadline",
            Fault::Duplicates => "every task message delivered again after its Job is gone",
            Fault::Mixed => {
                "of every six first pods: one OOMKilled, one never pulls, one evicted; 3 s of work"
            }
        }
    }

    fn restarts(self) -> bool {
        matches!(self, Fault::RabbitmqRestart | Fault::PostgresRestart)
    }
}

/// One row of the table.
struct Row {
    fault: Fault,
    submitted: usize,
    terminal: usize,
    run_twice: usize,
    states: BTreeMap<String, usize>,
    /// The last dispatcher's counters.
    counters: BTreeMap<String, u64>,
    /// No Job, pod or task Secret left in the cluster at the end.
    cleaned_up: bool,
    counters_add_up: bool,
    seconds: f64,
}

/// How long no task message may arrive before a run counts as settled: more than the
/// seconds after which RabbitMQ's delay queues deliver a retry a second time.
const QUIET: Duration = Duration::from_secs(8);

const IMAGE: &str = "registry.example.com/executor-faults@sha256:2222222222222222222222222222222222222222222222222222222222222222";

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let faults: Vec<Fault> = FAULTS
        .into_iter()
        .filter(|f| args.only.is_empty() || args.only.iter().any(|o| o == f.name()))
        .filter(|f| !(args.no_restarts && f.restarts()))
        .collect();
    if faults.is_empty() {
        bail!("no fault selected; see --help for their names");
    }
    println!(
        "gantry-faults: {} tasks of {} each per fault, kubernetes runtime on the API double",
        args.tasks,
        humantime::format_duration(args.work)
    );
    let mut rows = Vec::new();
    for fault in faults {
        print!("  {:<17} ", fault.name());
        let row = run(fault, &args)
            .await
            .with_context(|| format!("fault {}", fault.name()))?;
        println!(
            "{} of {} terminal, {} run twice, {:.0} s",
            row.terminal, row.submitted, row.run_twice, row.seconds
        );
        rows.push(row);
    }
    print_table(&rows);
    let bad = rows
        .iter()
        .filter(|r| {
            r.terminal < r.submitted || r.run_twice > 0 || !r.counters_add_up || !r.cleaned_up
        })
        .count();
    if bad > 0 {
        bail!(
            "{bad} fault(s) lost a task, ran an attempt twice, miscounted deliveries or left objects behind"
        );
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "\n| fault | what | submitted | terminal | lost | run twice | outcomes | deliveries: dispatched / skipped / other | add up | cleaned up |"
    );
    println!("|---|---|---:|---:|---:|---:|---|---|---|---|");
    for r in rows {
        let outcomes: Vec<String> = r.states.iter().map(|(s, n)| format!("{s} {n}")).collect();
        let get = |k: &str| r.counters.get(k).copied().unwrap_or(0);
        let deliveries = get("deliveries");
        let (dispatched, skipped) = (get("dispatched"), get("skipped"));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {deliveries}: {dispatched} / {skipped} / {} | {} | {} |",
            r.fault.name(),
            r.fault.what(),
            r.submitted,
            r.terminal,
            r.submitted - r.terminal,
            r.run_twice,
            outcomes.join(", "),
            deliveries.saturating_sub(dispatched + skipped),
            if r.counters_add_up { "yes" } else { "NO" },
            if r.cleaned_up { "yes" } else { "NO" }
        );
    }
}

/// A fresh world for one fault.
struct World {
    double: KubeDouble,
    env: TestEnv,
    executions: Executions,
    vars: Vec<(String, String)>,
}

impl World {
    async fn new(extra: &[(&str, &str)]) -> Result<World> {
        let double = KubeDouble::start().await;
        let executor = gantry_tests::bin_path("gantry-executor");
        double.set_image_entrypoint(IMAGE, vec![executor.display().to_string()]);
        let catalog = format!(
            "executors:\n  echo:\n    engine: {}\n    image: {IMAGE}\n    max_active_jobs: 8\n    retry: {{ max_attempts: 3, min_delay: 1s, max_delay: 1s }}\n",
            Executions::engine()
        );
        let env = TestEnv::new(Some(&catalog)).await?;
        let executions = Executions::new(&env.dir.path().join("executions"))?;
        let kubeconfig = gantry_tests::point_at_double(&double, &env)?;
        // Finished Jobs go soon, so late deliveries find them gone.
        let config = env.dir.path().join("config.yaml");
        std::fs::write(
            &config,
            "dispatcher:\n  kubernetes:\n    ttl_after_finished: 2s\n",
        )?;
        let mut vars = vec![
            ("GANTRY_RUNTIME".to_owned(), "kubernetes".to_owned()),
            ("KUBECONFIG".to_owned(), kubeconfig.display().to_string()),
            ("GANTRY_CONFIG".to_owned(), config.display().to_string()),
        ];
        vars.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        Ok(World {
            double,
            env,
            executions,
            vars,
        })
    }

    fn dispatcher(&self) -> Result<Dispatcher> {
        let vars: Vec<(&str, &str)> = self
            .vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Dispatcher::start(&self.env, &vars)
    }

    /// The state of each task that Postgres knows.
    async fn states(&self, ids: &[TaskId]) -> Result<Vec<String>> {
        let (client, conn) = tokio_postgres::connect(&self.env.database_url, NoTls).await?;
        let driver = tokio::spawn(conn);
        let uuids: Vec<uuid::Uuid> = ids.iter().map(TaskId::as_uuid).collect();
        let rows = client
            .query("SELECT state FROM tasks WHERE task_id = ANY($1)", &[&uuids])
            .await;
        driver.abort();
        Ok(rows?.iter().map(|r| r.get(0)).collect())
    }
}

const TERMINAL: [&str; 5] = [
    "succeeded",
    "failed",
    "expired",
    "cancelled",
    "dead_lettered",
];

async fn run(fault: Fault, args: &Args) -> Result<Row> {
    let started = Instant::now();
    let quarter = (args.tasks / 4).max(1);
    let extra: &[(&str, &str)] = match fault {
        Fault::ImagePull | Fault::Mixed => &[("GANTRY_IMAGE_PULL_LIMIT", "2s")],
        _ => &[],
    };
    let world = World::new(extra).await?;
    let double = &world.double;
    let post_jobs =
        |n: usize, fault| double.fail_next(n as u32, FaultSpec::new("POST", "/jobs", fault));
    match fault {
        Fault::Api5xx => {
            post_jobs(args.tasks / 2, gantry_kube_double::Fault::InternalError);
            double.fail_next(
                quarter as u32,
                FaultSpec::internal_error("POST", "/secrets"),
            );
        }
        Fault::Api429 => post_jobs(
            args.tasks / 2,
            gantry_kube_double::Fault::TooManyRequests {
                retry_after_secs: 1,
            },
        ),
        Fault::ApiSlow => post_jobs(
            args.tasks,
            gantry_kube_double::Fault::Latency(Duration::from_secs(2)),
        ),
        Fault::Eviction | Fault::Oom | Fault::ImagePull => {
            let script = match fault {
                Fault::Eviction => Script::Evict,
                Fault::Oom => Script::Oom,
                _ => Script::ImagePull,
            };
            for _ in 0..quarter {
                double.script_next(script.clone());
            }
        }
        Fault::Mixed => {
            // First attempts take the scripts in turn; retries always run.
            for attempt in 2..=3 {
                double.script_jobs_labelled(
                    "gantry.dev/attempt",
                    &attempt.to_string(),
                    Script::Run,
                );
            }
            let turn = [
                Script::Oom,
                Script::ImagePull,
                Script::Evict,
                Script::Run,
                Script::Run,
                Script::Run,
            ];
            for i in 0..args.tasks {
                double.script_next(turn[i % turn.len()].clone());
            }
        }
        _ => {}
    }
    // Sees (and copies) every task message routed to the class, retries and the broker's
    // own second deliveries included; the copies are sent only for `duplicates`.
    let duplicator = Duplicator::start(&world.env).await?;
    let mut dispatcher = world.dispatcher()?;
    let producer = world.env.producer().await?;
    let mut ids = Vec::with_capacity(args.tasks);
    for i in 0..args.tasks {
        let outlives = fault == Fault::Deadline && i < quarter;
        let (work, ttl) = if outlives {
            (Duration::from_secs(30), Duration::from_secs(4))
        } else if fault == Fault::Mixed {
            (Duration::from_secs(3), Duration::from_secs(600))
        } else {
            (args.work, Duration::from_secs(600))
        };
        let spec = TaskSpec {
            executor: ExecutorClass::parse("echo")?,
            name: TaskName::parse("faults.work")?,
            payload: world.executions.payload(work.as_millis() as u64),
            ttl,
            reply_to: None,
            idempotency_key: None,
            priority: None,
            resources: None,
        };
        ids.push(producer.submit(spec).await?);
    }

    // The fault that strikes mid-run, once a part of the tasks has Jobs.
    let some_jobs = |n: usize| {
        double.wait_for("Jobs to be created", Duration::from_secs(120), move |d| {
            (d.jobs_created() as usize >= n).then_some(())
        })
    };
    match fault {
        Fault::DispatcherKill => {
            some_jobs(args.tasks / 2).await?;
            dispatcher.kill_hard()?;
            dispatcher = world.dispatcher()?;
        }
        Fault::ExecutorKill => {
            let mut killed = std::collections::BTreeSet::new();
            while killed.len() < quarter {
                let pod = double
                    .wait_for("a running executor", Duration::from_secs(120), |d| {
                        d.pods_running_a_process()
                            .into_iter()
                            .find(|p| !killed.contains(p))
                    })
                    .await?;
                double.kill_pod_process(&pod);
                killed.insert(pod);
            }
        }
        Fault::RabbitmqRestart => {
            some_jobs(args.tasks / 3).await?;
            tokio::task::spawn_blocking(services::restart_rabbitmq).await??;
        }
        Fault::PostgresRestart => {
            some_jobs(args.tasks / 3).await?;
            tokio::task::spawn_blocking(services::restart_postgres).await??;
        }
        Fault::Watch410 => {
            some_jobs(args.tasks / 3).await?;
            double.compact();
            double.end_watches();
        }
        _ => {}
    }

    // Every task terminal, or the patience is spent.
    let until = Instant::now() + args.patience;
    let mut states = world.states(&ids).await?;
    while states
        .iter()
        .filter(|s| TERMINAL.contains(&s.as_str()))
        .count()
        < ids.len()
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        states = world.states(&ids).await.unwrap_or(states);
    }

    // Late deliveries matter most once the attempts' Jobs are gone: wait for the TTL
    // controller, then for the broker to go quiet (its delay queues deliver some retries a
    // second time, seconds later).
    double
        .wait_for(
            "every Job to be deleted by its TTL",
            Duration::from_secs(120),
            |d| d.jobs().is_empty().then_some(()),
        )
        .await?;
    if fault == Fault::Duplicates {
        let released = duplicator.release().await?;
        let handled = Instant::now() + Duration::from_secs(120);
        while dispatcher
            .log_text()
            .matches("skipping the delivery")
            .count()
            < released
            && world.executions.run_twice()?.is_empty()
            && Instant::now() < handled
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let queue = world
        .env
        .topology()
        .task_queue(&ExecutorClass::parse("echo")?);
    let (mut seen, mut since) = (duplicator.seen(), Instant::now());
    while since.elapsed() < QUIET || world.env.queue_depth(&queue).await? > 0 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if duplicator.seen() != seen {
            (seen, since) = (duplicator.seen(), Instant::now());
        }
    }
    duplicator.close().await;
    let cleaned_up = double.jobs().is_empty()
        && double.pods().is_empty()
        && double.secrets().iter().all(|s| s == "gantry-amqp");

    let run_twice = world.executions.run_twice()?.len();
    let log = dispatcher.log.clone();
    dispatcher.terminate(Duration::from_secs(60))?;
    let counters = counters_in(&std::fs::read_to_string(log)?).unwrap_or_default();
    let sum: u64 = [
        "dispatched",
        "adopted",
        "skipped",
        "requeued",
        "dead_lettered",
        "failed",
    ]
    .iter()
    .filter_map(|k| counters.get(*k))
    .sum();
    let counters_add_up = counters.get("deliveries").is_some_and(|d| *d == sum);
    let mut histogram = BTreeMap::new();
    for s in &states {
        *histogram.entry(s.clone()).or_default() += 1;
    }
    let terminal = states
        .iter()
        .filter(|s| TERMINAL.contains(&s.as_str()))
        .count();
    producer.close().await;
    world.env.cleanup().await?;
    Ok(Row {
        fault,
        submitted: ids.len(),
        terminal,
        run_twice,
        states: histogram,
        counters,
        cleaned_up,
        counters_add_up,
        seconds: started.elapsed().as_secs_f64(),
    })
}
