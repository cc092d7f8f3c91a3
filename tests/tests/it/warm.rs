//! Warm executors on the `local` runtime: one executor process serves many tasks of its
//! class, and every task keeps its own record, evidence, deadline, cancel and retries.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use gantry_dispatcher::settings::HttpAddr;
use gantry_shared::message::TaskId;
use gantry_shared::store::{TaskRecord, TaskState};
use gantry_tests::by_hand::{gantry, stderr, stdout};
use gantry_tests::executions::Executions;
use gantry_tests::observability::get;
use gantry_tests::warm::Places;
use gantry_tests::{TestEnv, eventually, task_spec as spec};
use serde_json::json;

/// A warm class `class` of engine `engine`: at most `jobs` executors of `slots` tasks each,
/// idle after `idle`.
fn warm_class(class: &str, engine: &str, jobs: u32, slots: u16, idle: &str) -> String {
    format!(
        "  {class}:\n    engine: {engine}\n    max_active_jobs: {jobs}\n    warm: {{ max_concurrency: {slots}, max_tasks_per_job: 1000, idle_timeout: {idle}, max_job_lifetime: 1h }}\n    retry: {{ max_attempts: 3, min_delay: 1s, max_delay: 1s }}\n"
    )
}

/// The warm executors' job directories in the state directory.
fn warm_dirs(state: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(state.join("jobs"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("warm.json").exists())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until every warm executor has ended and its end was dealt with.
async fn all_warm_handled(state: &Path, within: Duration) -> anyhow::Result<()> {
    eventually(
        "every warm executor to end and be handled",
        within,
        || async {
            let dirs = warm_dirs(state);
            Ok(dirs
                .iter()
                .all(|d| d.join("handled").exists())
                .then_some(()))
        },
    )
    .await
}

/// The most warm executors that lived at once, from when each wrote `started` to when it
/// wrote `exit.json`.
fn most_alive_at_once(state: &Path) -> anyhow::Result<usize> {
    let mut edges = Vec::new();
    for dir in warm_dirs(state) {
        let born = std::fs::metadata(dir.join("started"))?.modified()?;
        let died = std::fs::metadata(dir.join("exit.json"))?.modified()?;
        edges.push((born, 1i32));
        edges.push((died, -1i32));
    }
    // An end before a start at the same instant: the two did not overlap.
    edges.sort();
    let (mut alive, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        alive += step;
        most = most.max(alive);
    }
    Ok(usize::try_from(most)?)
}

/// Submits 8 recorded tasks of 3 s to class `rec` and waits until 4 of them run on its warm
/// executor; their ids and the executor's pid.
async fn eight_with_four_in_hand(
    producer: &gantry_producer::Producer,
    executions: &Executions,
    state: &Path,
) -> anyhow::Result<(Vec<TaskId>, i32)> {
    let mut ids = Vec::new();
    for _ in 0..8 {
        let payload = executions.payload(3_000);
        ids.push(
            producer
                .submit(spec("rec", payload, Duration::from_secs(300)))
                .await?,
        );
    }
    let pid = eventually("four tasks in hand", Duration::from_secs(30), || async {
        let running = executions.counts()?.len();
        let dir = warm_dirs(state).into_iter().next();
        Ok((running >= 4)
            .then(|| dir.and_then(|d| std::fs::read_to_string(d.join("pid")).ok()))
            .flatten()
            .and_then(|p| p.trim().parse().ok()))
    })
    .await?;
    Ok((ids, pid))
}

/// Waits until every task of `ids` is terminal; their records, in the order of `ids`. One
/// query per look, however many tasks: a wait each would hold a connection each.
async fn wait_all(
    env: &TestEnv,
    producer: &gantry_producer::Producer,
    ids: &[TaskId],
    within: Duration,
) -> anyhow::Result<Vec<TaskRecord>> {
    let sql = env.sql().await?;
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
    eventually("every task to end", within, || async {
        let row = sql
            .query_one(
                "SELECT count(*) FROM tasks WHERE task_id = ANY($1)
                   AND state IN ('succeeded', 'failed', 'expired', 'cancelled', 'dead_lettered')",
                &[&uuids],
            )
            .await?;
        Ok((row.get::<_, i64>(0) as usize == ids.len()).then_some(()))
    })
    .await?;
    let mut records = Vec::with_capacity(ids.len());
    for id in ids {
        records.push(
            producer
                .status(*id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("task {id} has no record"))?,
        );
    }
    Ok(records)
}

/// `gantry_capacity_in_use` of the class `echo` on the dispatcher serving `/metrics` at
/// `addr`.
async fn capacity_in_use(addr: std::net::SocketAddr) -> anyhow::Result<f64> {
    let (_, text) = get(addr, "/metrics").await?;
    let line = "gantry_capacity_in_use{class=\"echo\"} ";
    text.lines()
        .find_map(|l| l.strip_prefix(line))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {line}in:\n{text}"))
}

#[tokio::test]
async fn a_warm_class_runs_many_tasks_on_few_executors_each_with_its_own_evidence()
-> anyhow::Result<()> {
    let catalog = format!(
        "executors:\n{}",
        warm_class("echo", "{ kind: echo }", 2, 4, "3s")
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let dispatcher = env
        .dispatcher_with(|d| d.http_addr = HttpAddr(Some(addr)))
        .await?;
    let producer = env.producer().await?;
    let mut ids = Vec::new();
    for n in 0..1000 {
        let payload = json!({"n": n, "sleep_ms": 10});
        ids.push(
            producer
                .submit(spec("echo", payload, Duration::from_secs(300)))
                .await?,
        );
    }
    let records = wait_all(&env, &producer, &ids, Duration::from_secs(120)).await?;
    // Each warm executor is a unit of the class's capacity in use while it lives.
    let in_use = capacity_in_use(addr).await?;
    assert!((1.0..=2.0).contains(&in_use), "{in_use} executors in use");
    let mut places = Places::default();
    let mut per_job: BTreeMap<String, usize> = BTreeMap::new();
    for (n, record) in records.iter().enumerate() {
        assert_eq!(record.state, TaskState::Succeeded, "{record:?}");
        let output = record.result.as_ref().map(|r| r["output"]["n"].clone());
        assert_eq!(output, Some(json!(n)), "each task has its own result");
        let job = places.take(record, "echo");
        assert!(record.dispatch_id.is_some() && record.node.is_some());
        *per_job.entry(job).or_default() += 1;
    }
    let dispatch_ids: BTreeSet<_> = records.iter().map(|r| r.dispatch_id.clone()).collect();
    assert_eq!(dispatch_ids.len(), records.len(), "a dispatch id per task");
    let state = env.dir.path().join("state");
    assert!(
        per_job.values().sum::<usize>() > per_job.len(),
        "{per_job:?}"
    );

    // `gantry status` shows that it ran warm.
    let out = gantry(&env, &["status", &ids[0].to_string()]).await?;
    assert!(
        stdout(&out).contains("of its warm executor"),
        "{}",
        stdout(&out) + &stderr(&out)
    );

    // Idle for idle_timeout: each executor drains, ends and has its queues removed.
    all_warm_handled(&state, Duration::from_secs(60)).await?;
    let alive = most_alive_at_once(&state)?;
    assert!(
        (1..=2).contains(&alive),
        "no more executors at once than max_active_jobs: {alive} ({per_job:?})"
    );
    eventually(
        "no warm executor in use",
        Duration::from_secs(30),
        || async { Ok((capacity_in_use(addr).await? == 0.0).then_some(())) },
    )
    .await?;
    let channel = env.channel().await?;
    for job in per_job.keys() {
        let queue = env.topology().warm_queue(job);
        let gone = gantry_shared::amqp::peek_queue(&channel, &queue, Duration::from_secs(5)).await;
        assert!(gone.is_err(), "{queue} was removed with its executor");
    }
    dispatcher.stop().await?;
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_warm_task_keeps_its_own_deadline_and_cancel() -> anyhow::Result<()> {
    let catalog = format!(
        "executors:\n{}",
        warm_class("echo", "{ kind: echo }", 1, 4, "2s")
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let long = json!({"sleep_ms": 120_000});
    let late = producer
        .submit(spec("echo", long.clone(), Duration::from_secs(3)))
        .await?;
    let doomed = producer
        .submit(spec("echo", long, Duration::from_secs(300)))
        .await?;
    eventually(
        "the task to be cancelled to run",
        Duration::from_secs(30),
        || async {
            Ok(producer
                .status(doomed)
                .await?
                .filter(|r| r.state == TaskState::Running)
                .map(|_| ()))
        },
    )
    .await?;
    let out = gantry(&env, &["cancel", &doomed.to_string()]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let expired = producer.wait(late, Duration::from_secs(30)).await?;
    assert_eq!(expired.state, TaskState::Expired, "{expired:?}");
    let cancelled = producer.wait(doomed, Duration::from_secs(30)).await?;
    assert_eq!(cancelled.state, TaskState::Cancelled);

    // Neither ended the executor: the next task runs on the same one, as its third.
    let next = producer
        .submit(spec(
            "echo",
            json!({"after": true}),
            Duration::from_secs(60),
        ))
        .await?;
    let next = producer.wait(next, Duration::from_secs(30)).await?;
    assert_eq!(next.state, TaskState::Succeeded, "{next:?}");
    assert_eq!(next.job_name, expired.job_name);
    assert_eq!(next.warm_seq, Some(3));
    // The cancelled task's request was aborted: the executor idles out at once after.
    all_warm_handled(&env.dir.path().join("state"), Duration::from_secs(60)).await?;
    dispatcher.stop().await?;
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_killed_warm_executor_fails_its_tasks_in_hand_which_retry_and_none_runs_twice()
-> anyhow::Result<()> {
    let catalog = format!(
        "executors:\n{}",
        warm_class("rec", &Executions::engine(), 1, 4, "2s")
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let executions = Executions::new(&env.dir.path().join("executions"))?;
    let dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let state = env.dir.path().join("state");
    let (ids, pid) = eight_with_four_in_hand(&producer, &executions, &state).await?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;

    let records = wait_all(&env, &producer, &ids, Duration::from_secs(120)).await?;
    let retried = records.iter().filter(|r| r.attempt.get() > 1).count();
    assert!(
        records.iter().all(|r| r.state == TaskState::Succeeded),
        "{records:?}"
    );
    assert!(retried >= 1, "the tasks in hand at the kill were retried");
    assert_eq!(executions.run_twice()?, vec![], "no attempt ran twice");
    let events = producer.events(ids[0]).await?;
    let first: Vec<_> = events.iter().filter(|e| e.attempt.get() == 1).collect();
    assert!(!first.is_empty());
    assert!(warm_dirs(&state).len() >= 2, "a new executor took over");
    all_warm_handled(&state, Duration::from_secs(60)).await?;
    dispatcher.stop().await?;
    producer.close().await;
    env.cleanup().await
}

/// Runs 8 recorded tasks of 3 s on one warm executor of 4 slots under a dispatcher process,
/// SIGKILLs the dispatcher (and the executor too when `executor_too`) with 4 in hand,
/// starts a new dispatcher, and checks that every task ends and no attempt ran twice.
async fn dispatcher_killed_mid_run(executor_too: bool) -> anyhow::Result<()> {
    let catalog = format!(
        "executors:\n{}",
        warm_class("rec", &Executions::engine(), 1, 4, "2s")
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let executions = Executions::new(&env.dir.path().join("executions"))?;
    let dispatcher = env.dispatcher_process()?;
    let producer = env.producer().await?;
    let state = env.dir.path().join("state");
    let (ids, pid) = eight_with_four_in_hand(&producer, &executions, &state).await?;
    dispatcher.kill_hard()?;
    if executor_too {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
    }
    let restarted = env.dispatcher_process()?;
    let records = wait_all(&env, &producer, &ids, Duration::from_secs(120)).await?;
    assert!(
        records.iter().all(|r| r.state == TaskState::Succeeded),
        "{records:?}\n{}",
        restarted.log_text()
    );
    assert_eq!(executions.run_twice()?, vec![], "no attempt ran twice");
    all_warm_handled(&state, Duration::from_secs(90)).await?;
    restarted.terminate(Duration::from_secs(30))?;
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_killed_dispatcher_leaves_its_warm_executor_to_finish_and_loses_nothing()
-> anyhow::Result<()> {
    dispatcher_killed_mid_run(false).await
}

#[tokio::test]
async fn a_killed_dispatcher_and_executor_lose_nothing_and_run_nothing_twice() -> anyhow::Result<()>
{
    dispatcher_killed_mid_run(true).await
}

#[tokio::test]
async fn a_warm_openai_class_starts_its_model_server_once_for_many_requests() -> anyhow::Result<()>
{
    let server = serde_json::to_string(&gantry_tests::llm::server_argv()?)?;
    let engine = format!(
        "{{ kind: openai, model: tiny, server: {server}, startup_timeout: 90s, stop_grace: 5s }}"
    );
    let catalog = format!("executors:\n{}", warm_class("chat", &engine, 1, 2, "2s"));
    let env = TestEnv::new(Some(&catalog)).await?;
    let dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let mut ids = Vec::new();
    for n in 0..6 {
        let payload = json!({"prompt": format!("count {n}"), "max_tokens": 4});
        ids.push(
            producer
                .submit(spec("chat", payload, Duration::from_secs(180)))
                .await?,
        );
    }
    let records = wait_all(&env, &producer, &ids, Duration::from_secs(180)).await?;
    let mut server_starts = BTreeSet::new();
    for record in &records {
        assert_eq!(record.state, TaskState::Succeeded, "{record:?}");
        let output = &record.result.as_ref().expect("a result")["output"];
        assert_eq!(output["usage"]["completion_tokens"], json!(4), "{output}");
        server_starts.insert(output["timings"]["server_start_ms"].to_string());
    }
    assert_eq!(
        server_starts.len(),
        1,
        "one server start, reported by every answer: {server_starts:?}"
    );
    let jobs: BTreeSet<_> = records.iter().map(|r| r.job_name.clone()).collect();
    assert_eq!(jobs.len(), 1, "one warm executor: {jobs:?}");
    all_warm_handled(&env.dir.path().join("state"), Duration::from_secs(60)).await?;
    dispatcher.stop().await?;
    producer.close().await;
    env.cleanup().await
}
