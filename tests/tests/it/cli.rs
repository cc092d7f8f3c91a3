//! The `gantry` binary, run as a user would, with the test standing in for the dispatcher.

use gantry_shared::message::ResultStatus;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::Value;

use crate::helpers::{dispatch_one, gantry, hello, scenario, stderr, stdout};

#[tokio::test]
async fn submit_wait_json_prints_the_succeeded_result_and_exits_zero() {
    scenario(async |env| {
        env.apply(&["echo"]).await;
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
            gantry(env, &args),
            dispatch_one(env, "echo", ResultStatus::Succeeded)
        );

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
    })
    .await;
}

#[tokio::test]
async fn submit_wait_of_a_failing_task_prints_its_error_and_exits_one() {
    scenario(async |env| {
        env.apply(&["echo"]).await;
        let args = [
            "submit",
            "--executor",
            "echo",
            "--task",
            "demo.echo",
            "--wait",
        ];
        let (output, task) = tokio::join!(
            gantry(env, &args),
            dispatch_one(env, "echo", ResultStatus::Failed)
        );

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
    })
    .await;
}

#[tokio::test]
async fn submit_prints_only_the_task_id() {
    scenario(async |env| {
        env.apply(&["echo"]).await;
        let output = gantry(
            env,
            &["submit", "--executor", "echo", "--task", "demo.echo"],
        )
        .await;

        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let text = stdout(&output);
        let id = text.strip_suffix('\n').expect("one line");
        assert!(
            id.parse::<gantry_shared::message::TaskId>().is_ok(),
            "{text:?}"
        );
        assert_eq!(stderr(&output), "");
    })
    .await;
}

#[tokio::test]
async fn an_invalid_payload_is_a_usage_error_that_says_where() {
    scenario(async |env| {
        let output = gantry(
            env,
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
        .await;

        assert_eq!(output.status.code(), Some(2));
        assert_eq!(stdout(&output), "");
        let text = stderr(&output);
        assert!(text.contains("--payload is not valid JSON"), "{text}");
        assert!(text.contains("line 1 column 7"), "{text}");
    })
    .await;
}

#[tokio::test]
async fn status_of_an_unknown_task_exits_one() {
    scenario(async |env| {
        let id = gantry_shared::message::TaskId::new().to_string();
        let output = gantry(env, &["status", &id]).await;

        assert_eq!(output.status.code(), Some(1));
        assert_eq!(stdout(&output), "");
        assert!(
            stderr(&output).starts_with(&format!("task {id} is not known")),
            "{}",
            stderr(&output)
        );
    })
    .await;
}

#[tokio::test]
async fn wait_that_runs_out_of_time_exits_three() {
    scenario(async |env| {
        let id = gantry_shared::message::TaskId::new().to_string();
        let output = gantry(env, &["wait", &id, "--timeout", "300ms"]).await;

        assert_eq!(output.status.code(), Some(3));
        assert!(
            stderr(&output).contains(&format!("task {id} did not finish within 300ms")),
            "{}",
            stderr(&output)
        );
    })
    .await;
}

#[tokio::test]
async fn topology_apply_declares_the_queues_and_says_which() {
    scenario(async |env| {
        let output = gantry(env, &["topology", "apply"]).await;

        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let text = stdout(&output);
        let queue = env.task_queue("echo");
        assert!(text.contains(&format!("task queues   {queue}\n")), "{text}");
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        env.channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .expect("the queue exists");
    })
    .await;
}

#[tokio::test]
async fn topology_apply_over_a_conflicting_queue_exits_two() {
    scenario(async |env| {
        // A classic queue where Gantry declares a quorum queue.
        env.channel
            .queue_declare(
                env.task_queue("echo").as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();

        let output = gantry(env, &["topology", "apply"]).await;

        assert_eq!(output.status.code(), Some(2));
        let text = stderr(&output);
        assert!(
            text.contains(&format!(
                "queue \"{}\" already exists with different arguments",
                env.task_queue("echo")
            )),
            "{text}"
        );
    })
    .await;
}
