//! A task's life through dispatcher, executor and recorder, on the local runtime.

use std::time::Duration;

use gantry_producer::Producer;
use gantry_shared::message::ReportedBy;
use gantry_shared::message::{ExecutorClass, TaskId, TaskResult};
use gantry_shared::retry;
use gantry_shared::store::TaskState;
use gantry_tests::{TestEnv, eventually, task_spec as spec};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

async fn submit(
    p: &Producer,
    class: &str,
    payload: Value,
    ttl: Duration,
) -> anyhow::Result<TaskId> {
    Ok(p.submit(spec(class, payload, ttl)).await?)
}

#[tokio::test]
async fn a_submitted_task_succeeds_and_is_persisted_with_its_evidence() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let dispatcher = env.dispatcher_process()?;
    let producer = env.producer().await?;
    let payload = json!({"hello": "world"});
    let id = submit(&producer, "echo", payload.clone(), Duration::from_secs(60)).await?;
    let record = producer.wait(id, WAIT).await?;

    assert_eq!(record.state, TaskState::Succeeded);
    assert_eq!(record.attempt.get(), 1);
    let result: TaskResult = serde_json::from_value(record.result.clone().expect("result stored"))?;
    assert_eq!(result.output, Some(payload));
    assert_eq!(result.reported_by, ReportedBy::Executor);
    let job = record.job_name.clone().expect("job name recorded");
    assert!(
        job.starts_with("gantry-") && job.ends_with("-a1"),
        "job {job}"
    );
    assert!(record.dispatch_id.is_some(), "dispatch id recorded");
    assert_eq!(record.pod_name.as_deref(), Some(job.as_str()));
    assert!(record.node.is_some(), "node recorded");
    assert!(
        record.dispatched_at.is_some()
            && record.started_at.is_some()
            && record.finished_at.is_some()
    );
    let events: Vec<String> = producer
        .events(id)
        .await?
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(events, ["received", "dispatched", "running", "succeeded"]);

    assert!(
        dispatcher.terminate(Duration::from_secs(30))?.success(),
        "SIGTERM exits 0"
    );
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_failing_command_is_recorded_failed_with_its_stderr() -> anyhow::Result<()> {
    let catalog = r#"
executors:
  failing:
    engine: { kind: command, command: ["sh", "-c", "cat >/dev/null; echo 'model exploded: CUDA error 719' >&2; exit 3"] }
    max_active_jobs: 2
"#;
    let env = TestEnv::new(Some(catalog)).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let id = submit(&producer, "failing", json!({}), Duration::from_secs(60)).await?;
    let record = producer.wait(id, WAIT).await?;

    assert_eq!(record.state, TaskState::Failed);
    let error = record.error.clone().expect("error stored");
    assert_eq!(error["kind"], "command_failed");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("model exploded: CUDA error 719"),
        "stderr tail in {message:?}"
    );
    assert!(message.contains('3'), "exit code in {message:?}");
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_task_past_its_deadline_is_stopped_and_recorded_expired() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let id = submit(
        &producer,
        "echo",
        json!({"sleep_ms": 60_000}),
        Duration::from_secs(2),
    )
    .await?;
    let record = producer.wait(id, WAIT).await?;

    assert_eq!(record.state, TaskState::Expired);
    let error = record.error.clone().expect("error stored");
    assert_eq!(error["kind"], "deadline_exceeded");
    let finished = record.finished_at.expect("finished_at");
    assert!(
        finished - record.deadline < chrono::Duration::seconds(10),
        "stopped near its deadline"
    );
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_duplicate_result_message_changes_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let id = submit(&producer, "echo", json!({"n": 1}), Duration::from_secs(60)).await?;
    let before = producer.wait(id, WAIT).await?;
    let events_before = producer.events(id).await?;

    // The same result again, then a contradicting one for the same attempt.
    let result: TaskResult = serde_json::from_value(before.result.clone().expect("result"))?;
    let mut contradicting = result.clone();
    contradicting.status = gantry_shared::message::ResultStatus::Failed;
    contradicting.output = None;
    let publisher = env.publisher().await?;
    for r in [&result, &contradicting] {
        let (body, props) = r.to_amqp()?;
        publisher
            .publish(
                &env.topology().results_exchange(),
                "echo",
                &body,
                props,
                true,
                retry::for_at_most(Duration::from_secs(10)),
            )
            .await?;
    }
    // The recorder handles results in order: once the contradicting one is noted, the
    // duplicate before it has been handled too.
    let events_after = eventually("the late result to be noted", WAIT, || async {
        let events = producer.events(id).await?;
        Ok(events
            .iter()
            .any(|e| e.event == "late:failed")
            .then_some(events))
    })
    .await?;

    let after = producer.status(id).await?.expect("task");
    assert_eq!(after, before, "the task row is unchanged");
    assert_eq!(
        events_after.len(),
        events_before.len() + 1,
        "only the late result is noted"
    );
    publisher.close().await;
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_class_never_runs_more_than_max_active_jobs_at_once() -> anyhow::Result<()> {
    let env0 = tempfile::tempdir()?;
    let log = env0.path().join("runs.log");
    let catalog = format!(
        r#"
executors:
  narrow:
    engine: {{ kind: command, command: ["sh", "-c", "cat >/dev/null; echo \"start $(date +%s%N)\" >> {log}; sleep 0.4; echo \"end $(date +%s%N)\" >> {log}; echo '{{}}'"] }}
    max_active_jobs: 2
"#,
        log = log.display()
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(submit(&producer, "narrow", json!({}), Duration::from_secs(120)).await?);
    }
    let queue = env.topology().task_queue(&ExecutorClass::parse("narrow")?);
    let waiting = env.queue_depth(&queue).await?;
    for id in &ids {
        assert_eq!(producer.wait(*id, WAIT).await?.state, TaskState::Succeeded);
    }
    // Replay the start/end marks to find the most jobs that ever ran together.
    let text = std::fs::read_to_string(&log)?;
    let mut marks: Vec<(u128, i32)> = text
        .lines()
        .filter_map(|l| {
            let (kind, t) = l.split_once(' ')?;
            Some((t.parse().ok()?, if kind == "start" { 1 } else { -1 }))
        })
        .collect();
    marks.sort();
    let (mut now, mut peak) = (0, 0);
    for (_, d) in marks {
        now += d;
        peak = peak.max(now);
    }
    assert_eq!(text.lines().count(), 16, "every task ran exactly once");
    assert_eq!(
        peak, 2,
        "at most max_active_jobs at once, and the capacity was used"
    );
    assert!(
        waiting >= 4,
        "the rest waited in RabbitMQ ({waiting} ready right after submitting)"
    );
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn an_output_postgres_would_refuse_is_stored_cleaned_and_holds_up_nothing()
-> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    // jsonb refuses U+0000; one such output must not stop the recorder.
    let odd = submit(
        &producer,
        "echo",
        json!({"text": "nul\u{0}byte"}),
        Duration::from_secs(60),
    )
    .await?;
    let plain = submit(
        &producer,
        "echo",
        json!({"text": "plain"}),
        Duration::from_secs(60),
    )
    .await?;
    let odd = producer.wait(odd, WAIT).await?;
    assert_eq!(odd.state, TaskState::Succeeded);
    let output = odd.result.as_ref().map(|r| r["output"]["text"].clone());
    assert_eq!(output, Some(json!("nul\u{FFFD}byte")));
    assert_eq!(
        producer.wait(plain, WAIT).await?.state,
        TaskState::Succeeded
    );
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_task_that_expires_in_its_queue_ends_expired_and_wait_says_so() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let producer = env.producer().await?;
    let id = submit(&producer, "echo", json!({}), Duration::from_millis(300)).await?;
    let dead = env.topology().dead_queue();
    // No dispatcher yet: the task's TTL runs out in its queue.
    eventually(
        "the task to expire into the dead-letter queue",
        WAIT,
        || async { Ok((env.queue_depth(&dead).await? == 1).then_some(())) },
    )
    .await?;
    let _dispatcher = env.dispatcher().await?;
    let record = producer.wait(id, WAIT).await?;
    assert_eq!(record.state, TaskState::Expired);
    let reason = record.terminal_reason.unwrap_or_default();
    assert!(
        reason.starts_with("expired: the task's TTL ran out while it waited in"),
        "{reason}"
    );
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_task_held_too_long_for_capacity_goes_back_to_the_queue_instead_of_timing_out()
-> anyhow::Result<()> {
    let catalog = "executors:\n  echo:\n    engine: { kind: echo }\n    max_active_jobs: 1\n";
    let env = TestEnv::new(Some(catalog)).await?;
    let dispatcher = gantry_tests::Dispatcher::start(&env, &[("GANTRY_MAX_HOLD", "300ms")])?;
    let producer = env.producer().await?;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            submit(
                &producer,
                "echo",
                json!({"sleep_ms": 1500}),
                Duration::from_secs(120),
            )
            .await?,
        );
    }
    for id in &ids {
        let record = producer.wait(*id, WAIT).await?;
        assert_eq!(record.state, TaskState::Succeeded);
        assert_eq!(record.attempt.get(), 1, "requeueing is not a new attempt");
    }
    assert!(
        dispatcher
            .log_text()
            .contains("requeued at the end of the queue"),
        "tasks waiting for the one slot were put back"
    );
    let store = env.store().await?;
    assert!(
        store.dead_letters(10).await?.is_empty(),
        "requeueing never counts towards the poison limit"
    );
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_job_that_cannot_be_started_fails_its_attempt_as_dispatch_failed() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;

    let catalog = "executors:\n  echo:\n    engine: { kind: echo }\n    max_active_jobs: 2\n    retry: { max_attempts: 2, min_delay: 1s, max_delay: 1s }\n";
    let env = TestEnv::new(Some(catalog)).await?;
    // An executor program that exists but cannot be run.
    let bin = env.dir.path().join("gantry-executor");
    std::fs::write(&bin, "#!/bin/sh\nexit 0\n")?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o644))?;
    let bin = bin.display().to_string();
    let dispatcher = gantry_tests::Dispatcher::start(&env, &[("GANTRY_EXECUTOR_BIN", &bin)])?;
    let producer = env.producer().await?;
    let id = submit(&producer, "echo", json!({}), Duration::from_secs(60)).await?;
    let record = producer.wait(id, WAIT).await?;
    assert_eq!(record.state, TaskState::DeadLettered, "{:?}", record.error);
    assert_eq!(record.attempt.get(), 2, "dispatch_failed is retried");
    let error = record.error.clone().unwrap_or_default();
    assert_eq!(error["kind"], json!("dispatch_failed"));
    let result: TaskResult = serde_json::from_value(record.result.clone().expect("result"))?;
    assert_eq!(result.reported_by, ReportedBy::Dispatcher);
    assert!(
        result
            .error
            .as_ref()
            .is_some_and(|e| e.message.contains("Permission denied")),
        "{:?}",
        result.error
    );
    let log = dispatcher.log.clone();
    dispatcher.terminate(Duration::from_secs(30))?;
    let counters = gantry_tests::counters_in(&std::fs::read_to_string(log)?).expect("counters");
    assert_eq!(counters["failed"], 2, "{counters:?}");
    assert_eq!(counters["dispatched"], 0, "{counters:?}");
    producer.close().await;
    env.cleanup().await
}
