//! Retries with backoff through the delay queues, and `max_attempts` dead letters.

use std::time::Duration;

use gantry_shared::message::{ExecutorClass, TaskName, TaskSpec};
use gantry_shared::store::TaskState;
use gantry_tests::{TestEnv, eventually};
use serde_json::json;

/// A command that fails with the retryable exit code 75 until the attempt it succeeds on.
fn catalog(succeed_on: &str, max_attempts: u32) -> String {
    format!(
        r#"
executors:
  flaky:
    engine: {{ kind: command, command: ["sh", "-c", "input=$(cat); case \"$input\" in *'\"attempt\":{succeed_on}'*) echo '{{\"ok\": true}}';; *) echo 'GPU busy, try later' >&2; exit 75;; esac"] }}
    max_active_jobs: 4
    retry: {{ max_attempts: {max_attempts}, min_delay: 1s, max_delay: 1s }}
"#
    )
}

fn spec() -> TaskSpec {
    TaskSpec {
        executor: ExecutorClass::parse("flaky").expect("class"),
        name: TaskName::parse("retry.flaky").expect("name"),
        payload: json!({}),
        ttl: Duration::from_secs(120),
        reply_to: None,
        idempotency_key: None,
        priority: None,
        resources: None,
    }
}

#[tokio::test]
async fn a_retryable_failure_succeeds_on_its_third_attempt_with_three_attempts_recorded()
-> anyhow::Result<()> {
    let env = TestEnv::new(Some(&catalog("3", 3))).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let id = producer.submit(spec()).await?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;

    assert_eq!(record.state, TaskState::Succeeded, "{:?}", record.error);
    assert_eq!(record.attempt.get(), 3);
    assert_eq!(
        record.job_name.as_deref(),
        Some(format!("gantry-{}-a3", id.as_uuid().simple()).as_str())
    );
    let events: Vec<(u32, String)> = producer
        .events(id)
        .await?
        .into_iter()
        .map(|e| (e.attempt.get(), e.event))
        .collect();
    let expected: Vec<(u32, String)> = [
        (1, "received"),
        (1, "dispatched"),
        (1, "running"),
        (1, "retrying"),
        (2, "received"),
        (2, "dispatched"),
        (2, "running"),
        (2, "retrying"),
        (3, "received"),
        (3, "dispatched"),
        (3, "running"),
        (3, "succeeded"),
    ]
    .into_iter()
    .map(|(a, e)| (a, e.to_owned()))
    .collect();
    assert_eq!(events, expected);
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_task_whose_attempts_are_spent_is_dead_lettered_with_reason_max_attempts()
-> anyhow::Result<()> {
    let env = TestEnv::new(Some(&catalog("never", 2))).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let id = producer.submit(spec()).await?;
    let record = producer.wait(id, Duration::from_secs(60)).await?;

    assert_eq!(record.state, TaskState::DeadLettered);
    assert_eq!(record.attempt.get(), 2);
    assert_eq!(
        record.error.as_ref().map(|e| e["kind"].clone()),
        Some(json!("command_failed"))
    );
    let store = env.store().await?;
    let letters = eventually(
        "the dead letter to be recorded",
        Duration::from_secs(30),
        || async {
            let rows = store.dead_letters(10).await?;
            Ok((!rows.is_empty()).then_some(rows))
        },
    )
    .await?;
    assert_eq!(letters.len(), 1);
    let (_, task_id, kind, reason) = &letters[0];
    assert_eq!(*task_id, Some(id.as_uuid()));
    assert_eq!(kind, "max_attempts");
    assert!(
        reason.starts_with("max_attempts: failed 2 of 2 attempts; last error command_failed"),
        "{reason}"
    );
    assert!(reason.contains("GPU busy"), "{reason}");
    assert_eq!(env.queue_depth(&env.topology().dead_queue()).await?, 1);
    producer.close().await;
    env.cleanup().await
}
