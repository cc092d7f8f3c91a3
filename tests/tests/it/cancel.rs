//! `gantry cancel`: a queued task is skipped, a running one has its job stopped.

use std::time::Duration;

use gantry_shared::message::{ExecutorClass, TaskId, TaskName, TaskSpec};
use gantry_shared::store::TaskState;
use gantry_tests::by_hand::{gantry, stderr, stdout};
use gantry_tests::{TestEnv, eventually};
use serde_json::json;

fn spec(payload: serde_json::Value) -> TaskSpec {
    TaskSpec {
        executor: ExecutorClass::parse("echo").expect("class"),
        name: TaskName::parse("cancel.me").expect("name"),
        payload,
        ttl: Duration::from_secs(300),
        reply_to: None,
        idempotency_key: None,
        priority: None,
        resources: None,
    }
}

/// `gantry cancel` of `id`: its exit code, and what it printed on stdout and stderr.
async fn gantry_cancel(env: &TestEnv, id: TaskId) -> anyhow::Result<(Option<i32>, String)> {
    let id = id.to_string();
    let out = gantry(env, &["cancel", &id, "--reason", "test says so"]).await?;
    Ok((out.status.code(), stdout(&out) + &stderr(&out)))
}

#[tokio::test]
async fn a_running_task_is_cancelled_and_its_process_stopped() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let id = producer.submit(spec(json!({"sleep_ms": 60_000}))).await?;
    eventually("the task to run", Duration::from_secs(30), || async {
        Ok(producer
            .status(id)
            .await?
            .filter(|r| r.state == TaskState::Running)
            .map(|_| ()))
    })
    .await?;
    let job_dir = env
        .dir
        .path()
        .join("state/jobs")
        .join(format!("gantry-{}-a1", id.as_uuid().simple()));
    let executor: i32 = eventually("the executor's pid", Duration::from_secs(10), || async {
        Ok(std::fs::read_to_string(job_dir.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok()))
    })
    .await?;

    let (code, output) = gantry_cancel(&env, id).await?;
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("it was running"), "{output}");
    let record = producer.wait(id, Duration::from_secs(10)).await?;
    assert_eq!(record.state, TaskState::Cancelled);
    assert_eq!(
        record.error.as_ref().map(|e| e["message"].clone()),
        Some(json!("test says so"))
    );
    gantry_tests::process_gone(
        "the executor to be stopped",
        executor,
        Duration::from_secs(20),
    )
    .await?;
    let (code, output) = gantry_cancel(&env, id).await?;
    assert_eq!(code, Some(1), "a second cancel finds it ended: {output}");
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_task_cancelled_while_queued_is_skipped_by_the_dispatcher() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let producer = env.producer().await?;
    let cancelled = producer.submit(spec(json!({"n": 1}))).await?;
    let (code, output) = gantry_cancel(&env, cancelled).await?;
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("not yet received"), "{output}");

    let _dispatcher = env.dispatcher().await?;
    let after = producer.submit(spec(json!({"n": 2}))).await?;
    assert_eq!(
        producer.wait(after, Duration::from_secs(60)).await?.state,
        TaskState::Succeeded
    );
    let record = producer.status(cancelled).await?.expect("recorded");
    assert_eq!(record.state, TaskState::Cancelled);
    assert_eq!(
        record.task, "cancel.me",
        "the placeholder is filled in when the task arrives"
    );
    let job_dir = env
        .dir
        .path()
        .join("state/jobs")
        .join(format!("gantry-{}-a1", cancelled.as_uuid().simple()));
    assert!(!job_dir.exists(), "no job ran for the cancelled task");
    assert_eq!(
        env.queue_depth(&env.topology().task_queue(&ExecutorClass::parse("echo")?))
            .await?,
        0
    );
    producer.close().await;
    env.cleanup().await
}
