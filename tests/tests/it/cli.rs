//! The `gantry` binary, run as a user would, with the test standing in for the dispatcher.

use gantry_shared::message::ResultStatus;
use gantry_tests::TestEnv;
use gantry_tests::by_hand::{dispatch_one, gantry, stderr, stdout};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::{Value, json};

/// The payload the CLI tests submit.
fn hello() -> Value {
    json!({"hello": "world"})
}

#[tokio::test]
async fn submit_wait_json_prints_the_succeeded_result_and_exits_zero() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let payload = hello().to_string();
    let args = [
        "submit",
        "--executor",
        "echo",
        "--task",
        "demo.echo",
        "--payload",
        &payload,
        "--wait",
        "--json",
    ];
    let (output, task) = tokio::join!(
        gantry(&env, &args),
        dispatch_one(&env, "echo", ResultStatus::Succeeded)
    );
    let (output, task) = (output?, task?);

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let view: Value = serde_json::from_str(&stdout(&output)).expect("one JSON object");
    assert_eq!(view["task_id"], task.id.to_string());
    assert_eq!(view["status"], "succeeded");
    assert_eq!(view["state"], "succeeded");
    assert_eq!(view["output"], hello());
    assert_eq!(view["error"], Value::Null);
    assert_eq!(view["result"]["output"], hello());
    assert_eq!(view["node"], "test-node");
    assert!(view["finished_at"].is_string());
    env.cleanup().await
}

#[tokio::test]
async fn submit_wait_of_a_failing_task_prints_its_error_and_exits_one() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let args = [
        "submit",
        "--executor",
        "echo",
        "--task",
        "demo.echo",
        "--wait",
    ];
    let (output, task) = tokio::join!(
        gantry(&env, &args),
        dispatch_one(&env, "echo", ResultStatus::Failed)
    );
    let (output, task) = (output?, task?);

    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.starts_with(&format!("task_id          {}\n", task.id)),
        "{text}"
    );
    assert!(text.contains("\nstate            failed\n"), "{text}");
    assert!(
        text.contains("\nerror            command_failed: exit status 3\n"),
        "{text}"
    );
    assert!(!text.contains("\noutput"), "{text}");
    env.cleanup().await
}

#[tokio::test]
async fn submit_prints_only_the_task_id() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let output = gantry(
        &env,
        &["submit", "--executor", "echo", "--task", "demo.echo"],
    )
    .await?;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    let id = text.strip_suffix('\n').expect("one line");
    assert!(
        id.parse::<gantry_shared::message::TaskId>().is_ok(),
        "{text:?}"
    );
    assert_eq!(stderr(&output), "");
    env.cleanup().await
}

#[tokio::test]
async fn an_invalid_payload_is_a_usage_error_that_says_where() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let output = gantry(
        &env,
        &[
            "submit",
            "--executor",
            "echo",
            "--task",
            "demo.echo",
            "--payload",
            "{\"a\": }",
        ],
    )
    .await?;

    assert_eq!(output.status.code(), Some(2));
    assert_eq!(stdout(&output), "");
    let text = stderr(&output);
    assert!(text.contains("--payload is not valid JSON"), "{text}");
    assert!(text.contains("line 1 column 7"), "{text}");
    env.cleanup().await
}

#[tokio::test]
async fn status_of_an_unknown_task_exits_one() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let id = gantry_shared::message::TaskId::new().to_string();
    let output = gantry(&env, &["status", &id]).await?;

    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout(&output), "");
    assert!(
        stderr(&output).starts_with(&format!("task {id} is not known")),
        "{}",
        stderr(&output)
    );
    env.cleanup().await
}

#[tokio::test]
async fn wait_that_runs_out_of_time_exits_three() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let id = gantry_shared::message::TaskId::new().to_string();
    let output = gantry(&env, &["wait", &id, "--timeout", "300ms"]).await?;

    assert_eq!(output.status.code(), Some(3));
    assert!(
        stderr(&output).contains(&format!("task {id} did not finish within 300ms")),
        "{}",
        stderr(&output)
    );
    env.cleanup().await
}

#[tokio::test]
async fn topology_apply_declares_the_queues_and_says_which() -> anyhow::Result<()> {
    let env = TestEnv::without_topology(None).await?;
    let output = gantry(&env, &["topology", "apply"]).await?;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    let queue = env.task_queue("echo")?;
    assert!(text.contains(&format!("task queues   {queue}\n")), "{text}");
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    env.channel()
        .await?
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await
        .expect("the queue exists");
    env.cleanup().await
}

#[tokio::test]
async fn topology_apply_over_a_conflicting_queue_exits_two() -> anyhow::Result<()> {
    let env = TestEnv::without_topology(None).await?;
    // A classic queue where Gantry declares a quorum queue.
    env.channel()
        .await?
        .queue_declare(
            env.task_queue("echo")?.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;

    let output = gantry(&env, &["topology", "apply"]).await?;

    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(
        text.contains(&format!(
            "queue \"{}\" already exists with different arguments",
            env.task_queue("echo")?
        )),
        "{text}"
    );
    env.cleanup().await
}
