//! Results forwarded to the caller's `reply_to`: only the final result of a task, and only
//! once it is durable in Postgres.

use std::time::Duration;

use gantry_shared::message::{ExecutorClass, TaskName, TaskResult, TaskSpec};
use gantry_shared::store::TaskState;
use gantry_tests::{TestEnv, eventually};
use lapin::options::BasicGetOptions;
use serde_json::json;

#[tokio::test]
async fn only_the_final_result_is_forwarded_to_reply_to_and_only_once_it_is_recorded()
-> anyhow::Result<()> {
    let catalog = "executors:\n  echo:\n    engine: { kind: echo }\n    max_active_jobs: 4\n    retry: { max_attempts: 2, min_delay: 1s, max_delay: 1s }\n";
    let env = TestEnv::new(Some(catalog)).await?;
    let conn = gantry_shared::amqp::connect(
        &gantry_tests::amqp_url().into(),
        "gantry-tests/caller",
        Duration::from_secs(10),
    )
    .await?;
    let channel = conn.create_channel().await?;
    let reply = env.reply_queue(&channel).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    // Fails retryably twice: the first failure is retried, the second is final.
    let id = producer
        .submit(TaskSpec {
            executor: ExecutorClass::parse("echo")?,
            name: TaskName::parse("forward.echo")?,
            payload: json!({"fail": "not today", "retryable": true}),
            ttl: Duration::from_secs(120),
            reply_to: Some(reply.clone()),
            idempotency_key: None,
            priority: None,
            resources: None,
        })
        .await?;
    let delivery = eventually("the reply", Duration::from_secs(60), || async {
        Ok(channel
            .basic_get(reply.as_str().into(), BasicGetOptions { no_ack: true })
            .await?)
    })
    .await?;
    // When the reply arrives, Postgres already has the task in the state it reports.
    let stored = producer.status(id).await?.expect("the task is stored");
    let result = TaskResult::from_amqp(&delivery.properties, &delivery.data)
        .map_err(|r| anyhow::anyhow!("the reply is not a result: {r}"))?;
    assert_eq!(result.task_id, id);
    assert_eq!(
        delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string()),
        Some(id.to_string())
    );
    assert_eq!(
        result.attempt.get(),
        2,
        "the final attempt's result, not the first"
    );
    assert_eq!(stored.state, TaskState::DeadLettered, "{stored:?}");
    assert_eq!(stored.attempt.get(), 2);
    eventually(
        "forwarded_at to be set",
        Duration::from_secs(10),
        || async {
            Ok(producer
                .status(id)
                .await?
                .and_then(|r| r.forwarded_at)
                .map(|_| ()))
        },
    )
    .await?;
    let left = gantry_shared::amqp::peek_queue(&channel, &reply, Duration::from_secs(10))
        .await?
        .message_count();
    assert_eq!(left, 0, "nothing else was forwarded");
    let _ = conn.close(200, "bye".into()).await;
    producer.close().await;
    env.cleanup().await
}
