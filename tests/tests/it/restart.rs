//! A dispatcher killed with SIGKILL loses nothing and runs nothing twice once restarted.

use std::collections::HashMap;
use std::time::Duration;

use gantry_shared::message::{ExecutorClass, TaskName, TaskSpec};
use gantry_shared::store::TaskState;
use gantry_tests::{Dispatcher, TestEnv, eventually};
use serde_json::json;

#[tokio::test]
async fn a_dispatcher_killed_with_50_tasks_in_flight_loses_none_and_runs_none_twice()
-> anyhow::Result<()> {
    let runs_dir = tempfile::tempdir()?;
    let runs = runs_dir.path().join("runs.log");
    let catalog = format!(
        r#"
executors:
  work:
    engine: {{ kind: command, command: ["sh", "-c", "input=$(cat); echo \"$input\" >> {runs}; sleep 1; echo '{{\"done\": true}}'"] }}
    max_active_jobs: 10
"#,
        runs = runs.display()
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let dispatcher = env.dispatcher_process()?;
    let producer = env.producer().await?;
    let mut ids = Vec::new();
    for i in 0..50 {
        let spec = TaskSpec {
            executor: ExecutorClass::parse("work")?,
            name: TaskName::parse("restart.work")?,
            payload: json!({"i": i}),
            ttl: Duration::from_secs(300),
            reply_to: None,
            idempotency_key: None,
            priority: None,
            resources: None,
        };
        ids.push(producer.submit(spec).await?);
    }
    // Kill it once jobs are running and others are still queued or being handed off.
    eventually("ten jobs running", Duration::from_secs(60), || async {
        let mut running = 0;
        for id in &ids {
            if let Some(r) = producer.status(*id).await?
                && r.state == TaskState::Running
            {
                running += 1;
            }
        }
        Ok((running >= 10).then_some(()))
    })
    .await?;
    dispatcher.kill_hard()?;

    let restarted = Dispatcher::start(&env, &[])?;
    for id in &ids {
        let record = producer.wait(*id, Duration::from_secs(120)).await?;
        assert_eq!(
            record.state,
            TaskState::Succeeded,
            "task {id}: {:?}",
            record.error
        );
    }
    let text = std::fs::read_to_string(&runs)?;
    let mut per_task: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        *per_task
            .entry(v["task_id"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_task.len(), 50, "every task ran");
    assert!(
        per_task.values().all(|n| *n == 1),
        "no task ran twice: {per_task:?}"
    );
    assert!(
        restarted.log_text().contains("reconciling a job"),
        "the restart adopted running jobs"
    );
    assert!(restarted.terminate(Duration::from_secs(30))?.success());
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_program_whose_executor_dies_is_stopped_with_it() -> anyhow::Result<()> {
    let pids_dir = tempfile::tempdir()?;
    let pids = pids_dir.path().join("program.pid");
    let catalog = format!(
        r#"
executors:
  long:
    engine: {{ kind: command, command: ["sh", "-c", "cat >/dev/null; echo $$ > {pids}; exec sleep 60"] }}
    max_active_jobs: 1
    retry: {{ max_attempts: 1 }}
"#,
        pids = pids.display()
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let spec = TaskSpec {
        executor: ExecutorClass::parse("long")?,
        name: TaskName::parse("restart.long")?,
        payload: json!({}),
        ttl: Duration::from_secs(120),
        reply_to: None,
        idempotency_key: None,
        priority: None,
        resources: None,
    };
    let id = producer.submit(spec).await?;
    let program: i32 = eventually("the program to start", Duration::from_secs(30), || async {
        Ok(std::fs::read_to_string(&pids)
            .ok()
            .and_then(|s| s.trim().parse().ok()))
    })
    .await?;
    let job_dir = env
        .dir
        .path()
        .join("state/jobs")
        .join(format!("gantry-{}-a1", id.as_uuid().simple()));
    let executor: i32 = std::fs::read_to_string(job_dir.join("pid"))?
        .trim()
        .parse()?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(executor),
        nix::sys::signal::Signal::SIGKILL,
    )?;

    // A crash is retryable; with one attempt allowed, the task is dead-lettered.
    let record = producer.wait(id, Duration::from_secs(60)).await?;
    assert_eq!(record.state, TaskState::DeadLettered);
    assert_eq!(
        record.error.as_ref().map(|e| e["kind"].clone()),
        Some(json!("executor_crashed"))
    );
    gantry_tests::process_gone(
        "the orphaned program to be gone",
        program,
        Duration::from_secs(10),
    )
    .await?;
    producer.close().await;
    env.cleanup().await
}

/// A dispatcher that stopped after it claimed an attempt and made its job directory, but
/// before the executor started, leaves a directory with no executor. At the next start the
/// attempt is failed as lost and retried as the next one; the claimed attempt never runs.
#[tokio::test]
async fn a_job_directory_whose_executor_never_started_is_failed_as_lost_at_start()
-> anyhow::Result<()> {
    use gantry_shared::message::{Attempt, Evidence, JobName, Limits, Task};
    use gantry_shared::store::{Change, TaskState};

    let env = TestEnv::new(None).await?;
    // A first start makes the state directory and its instance id; then it is gone.
    env.dispatcher().await?.stop().await?;
    let state = env.dir.path().join("state");
    let instance = std::fs::read_to_string(state.join("instance-id"))?;
    let task = Task::new(
        TaskSpec {
            executor: ExecutorClass::parse("echo")?,
            name: TaskName::parse("restart.claimed")?,
            payload: json!({"claimed": true}),
            ttl: Duration::from_secs(300),
            reply_to: None,
            idempotency_key: None,
            priority: None,
            resources: None,
        },
        &Limits::default(),
    )?;
    // What the stopped dispatcher left: the claim in Postgres, the directory on disk.
    let store = env.store().await?;
    store.record_received(&task).await?;
    let name = JobName::for_task(task.id, Attempt::FIRST);
    let claim = Change {
        evidence: Evidence {
            dispatch_id: Some(format!("{}.lost", instance.trim())),
            job_name: Some(name.to_string()),
            ..Evidence::default()
        },
        ..Change::default()
    };
    store
        .transition(task.id, Attempt::FIRST, TaskState::Dispatched, &claim)
        .await?;
    let dir = state.join("jobs").join(name.as_str());
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("task.json"), serde_json::to_vec(&task.envelope())?)?;

    let dispatcher = env.dispatcher_process()?;
    let producer = env.producer().await?;
    let record = producer.wait(task.id, Duration::from_secs(60)).await?;
    assert_eq!(
        record.state,
        TaskState::Succeeded,
        "{:?}\n{}",
        record.error,
        dispatcher.log_text()
    );
    assert_eq!(
        record.attempt.get(),
        2,
        "the claimed attempt was failed, not run"
    );
    let events = producer.events(task.id).await?;
    let lost = events
        .iter()
        .find(|e| e.attempt.get() == 1 && e.event == "retrying")
        .expect("the first attempt was retried");
    assert_eq!(
        lost.detail.clone().unwrap_or_default()["error"]["kind"],
        json!("job_lost")
    );
    assert!(
        !dir.join("started").exists(),
        "the first attempt's executor never ran"
    );
    assert!(dir.join("handled").exists(), "its directory is handled");
    producer.close().await;
    env.cleanup().await
}
