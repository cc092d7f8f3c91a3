//! The client library (`gantry-producer`) submitting: what lands in the queue, and what
//! happens when no queue takes the task.

use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use gantry_producer::{Error, Producer};
use gantry_shared::message::{
    ExecutorClass, FieldTableExt, Limits, TASK_SCHEMA, Task, TaskSpec, headers,
};
use gantry_tests::{TestEnv, echo_spec};
use lapin::options::BasicGetOptions;
use serde_json::{Value, json};

/// What a backend would submit: a `demo.echo` task for `executor`, with a minute to live.
fn spec(executor: &str, payload: Value) -> anyhow::Result<TaskSpec> {
    Ok(TaskSpec {
        executor: ExecutorClass::parse(executor)?,
        ttl: Duration::from_secs(60),
        ..echo_spec("demo.echo", payload)?
    })
}

#[tokio::test]
async fn a_submitted_task_waits_in_its_queue_with_the_contracted_properties() -> anyhow::Result<()>
{
    let env = TestEnv::new(None).await?;
    let producer = env.producer().await?;
    let id = producer
        .submit(spec("echo", json!({"hello": "world"}))?)
        .await?;
    producer.close().await;

    // The publish was confirmed, so the message is in the queue now.
    let message = env
        .channel()
        .await?
        .basic_get(
            env.task_queue("echo")?.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await?
        .context("the task is in its queue")?;
    let props = &message.delivery.properties;
    let id_text = id.to_string();
    assert_eq!(
        props.correlation_id().as_ref().map(|s| s.as_str()),
        Some(id_text.as_str())
    );
    assert_eq!(
        props.message_id().as_ref().map(|s| s.as_str()),
        Some(id_text.as_str())
    );
    assert_eq!(
        props.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(props.delivery_mode(), &Some(2));
    let ttl_ms: i64 = props
        .expiration()
        .as_ref()
        .context("expiration is set")?
        .as_str()
        .parse()?;
    assert!((1..=60_000).contains(&ttl_ms), "expiration {ttl_ms} ms");
    let headers = props.headers().clone().context("headers are set")?;
    assert_eq!(headers.get_str(headers::SCHEMA), Some(TASK_SCHEMA));
    assert_eq!(headers.get_i64(headers::ATTEMPT), Some(1));

    let task = Task::from_amqp(
        props,
        &message.delivery.data,
        &Limits::default(),
        Utc::now(),
    )?;
    assert_eq!(task.id, id);
    assert_eq!(task.executor.as_str(), "echo");
    assert_eq!(task.name.as_str(), "demo.echo");
    assert_eq!(task.payload, json!({"hello": "world"}));
    assert_eq!(task.attempt.get(), 1);
    env.cleanup().await
}

#[tokio::test]
async fn a_task_no_queue_takes_is_refused_with_what_to_check() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let producer = env.producer().await?;
    let e = producer
        .submit(spec("vllm", json!({}))?)
        .await
        .expect_err("no queue takes vllm");
    producer.close().await;

    assert!(
        matches!(&e, Error::Unroutable { executor, prefix }
            if executor.as_str() == "vllm" && prefix == env.topology().prefix()),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.starts_with(&format!(
            "no queue takes executor class vllm on prefix {}: is vllm in the executor catalog",
            env.topology().prefix()
        )),
        "{text}"
    );
    assert!(text.contains("gantry topology apply"), "{text}");
    env.cleanup().await
}

#[tokio::test]
async fn a_task_over_the_payload_limit_never_leaves_the_caller() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let mut config = env.config();
    config.limits.max_payload_bytes = 8;
    let producer = Producer::connect(&config).await?;
    let e = producer
        .submit(spec("echo", json!({"hello": "world"}))?)
        .await
        .expect_err("the payload is over the limit");
    producer.close().await;

    assert!(matches!(e, Error::Rejected(_)), "{e:?}");
    assert!(e.to_string().contains("over the limit of 8 bytes"), "{e}");
    let nothing = env
        .channel()
        .await?
        .basic_get(
            env.task_queue("echo")?.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await?;
    assert!(nothing.is_none());
    env.cleanup().await
}

#[tokio::test]
async fn a_task_for_a_prefix_without_topology_is_refused_with_what_to_run() -> anyhow::Result<()> {
    let env = TestEnv::without_topology(None).await?;
    let producer = env.producer().await?;
    let e = producer
        .submit(spec("echo", json!({}))?)
        .await
        .expect_err("the prefix has no exchange");
    producer.close().await;

    assert!(
        matches!(&e, Error::NoExchange { exchange, .. }
            if *exchange == env.topology().tasks_exchange()),
        "{e:?}"
    );
    assert!(e.to_string().contains("gantry topology apply"), "{e}");
    env.cleanup().await
}
