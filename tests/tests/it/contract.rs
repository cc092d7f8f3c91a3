//! The task contract through the real broker.

use std::time::Duration;

use chrono::Utc;
use gantry_shared::amqp;
use gantry_shared::message::{ExecutorClass, Limits, Task, TaskName, TaskSpec};
use gantry_tests::{TestEnv, amqp_url};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use serde_json::json;

#[tokio::test]
async fn a_submitted_task_arrives_with_its_contract_intact() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let producer = env.producer().await?;
    let spec = TaskSpec {
        executor: ExecutorClass::parse("echo")?,
        name: TaskName::parse("contract.check")?,
        payload: json!({"prompt": "hi", "n": [1, 2, 3]}),
        ttl: Duration::from_secs(90),
        reply_to: Some("amq.rabbitmq.reply-to.test".into()),
        idempotency_key: Some("key-1".into()),
        priority: Some(5),
        resources: None,
    };
    let task = producer.new_task(spec)?;
    producer.submit_task(&task).await?;

    let conn = amqp::connect(&amqp_url().into(), "gantry-tests", Duration::from_secs(10)).await?;
    let channel = conn.create_channel().await?;
    let queue = env.topology().task_queue(&task.executor);
    let got = channel
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await?
        .expect("the task is in its queue");
    let props = &got.delivery.properties;
    assert_eq!(
        props.correlation_id().as_ref().map(|c| c.to_string()),
        Some(task.id.to_string())
    );
    assert_eq!(props.message_id(), props.correlation_id());
    assert_eq!(
        props
            .content_type()
            .as_ref()
            .map(|c| c.to_string())
            .as_deref(),
        Some("application/json")
    );
    assert_eq!(props.delivery_mode(), &Some(2));
    let ttl: i64 = props
        .expiration()
        .as_ref()
        .expect("expiration is set")
        .as_str()
        .parse()?;
    assert!(
        ttl > 80_000 && ttl <= 90_000,
        "expiration {ttl} ms should be the time left"
    );
    let back = Task::from_amqp(props, &got.delivery.data, &Limits::default(), Utc::now())?;
    assert_eq!(back, task);
    got.delivery.ack(BasicAckOptions::default()).await?;
    let _ = conn.close(200, "ok".into()).await;
    producer.close().await;
    env.cleanup().await
}
