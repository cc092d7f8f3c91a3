//! Submitting: what lands in the queue, and what happens when no queue takes the task.

use chrono::Utc;
use gantry_producer::{Error, Producer};
use gantry_shared::message::{FieldTableExt, Limits, TASK_SCHEMA, Task, headers};
use lapin::options::BasicGetOptions;
use serde_json::json;

use crate::helpers::{scenario, spec};

#[tokio::test]
async fn a_submitted_task_waits_in_its_queue_with_the_contracted_properties() {
    scenario(async |env| {
        env.apply(&["echo"]).await;
        let producer = Producer::connect(&env.config).await.unwrap();
        let id = producer
            .submit(spec("echo", json!({"hello": "world"})))
            .await
            .unwrap();
        producer.close().await;

        // The publish was confirmed, so the message is in the queue now.
        let message = env
            .channel
            .basic_get(
                env.task_queue("echo").as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
            .expect("the task is in its queue");
        let props = &message.delivery.properties;
        let id_text = id.to_string();
        assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), id_text);
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), id_text);
        assert_eq!(
            props.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(props.delivery_mode(), &Some(2));
        let ttl_ms: i64 = props
            .expiration()
            .as_ref()
            .expect("expiration is set")
            .as_str()
            .parse()
            .unwrap();
        assert!((1..=60_000).contains(&ttl_ms), "expiration {ttl_ms} ms");
        let headers = props.headers().clone().unwrap();
        assert_eq!(headers.get_str(headers::SCHEMA), Some(TASK_SCHEMA));
        assert_eq!(headers.get_i64(headers::ATTEMPT), Some(1));

        let task = Task::from_amqp(
            props,
            &message.delivery.data,
            &Limits::default(),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(task.id, id);
        assert_eq!(task.executor.as_str(), "echo");
        assert_eq!(task.name.as_str(), "demo.echo");
        assert_eq!(task.payload, json!({"hello": "world"}));
        assert_eq!(task.attempt.get(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_task_no_queue_takes_is_refused_with_what_to_check() {
    scenario(async |env| {
        env.apply(&["echo"]).await;
        let producer = Producer::connect(&env.config).await.unwrap();
        let e = producer.submit(spec("vllm", json!({}))).await.unwrap_err();
        producer.close().await;

        assert!(
            matches!(&e, Error::Unroutable { executor, prefix }
                if executor.as_str() == "vllm" && prefix == env.topology.prefix()),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "no queue takes executor class vllm on prefix {}: is vllm in the executor catalog",
                env.topology.prefix()
            )),
            "{text}"
        );
        assert!(text.contains("gantry topology apply"), "{text}");
    })
    .await;
}

#[tokio::test]
async fn a_task_over_the_payload_limit_never_leaves_the_caller() {
    scenario(async |env| {
        env.apply(&["echo"]).await;
        let mut config = env.config.clone();
        config.limits.max_payload_bytes = 8;
        let producer = Producer::connect(&config).await.unwrap();
        let e = producer
            .submit(spec("echo", json!({"hello": "world"})))
            .await
            .unwrap_err();
        producer.close().await;

        assert!(matches!(e, Error::Rejected(_)), "{e:?}");
        assert!(e.to_string().contains("over the limit of 8 bytes"), "{e}");
        let nothing = env
            .channel
            .basic_get(
                env.task_queue("echo").as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap();
        assert!(nothing.is_none());
    })
    .await;
}

#[tokio::test]
async fn a_task_for_a_prefix_without_topology_is_refused_with_what_to_run() {
    scenario(async |env| {
        let producer = Producer::connect(&env.config).await.unwrap();
        let e = producer.submit(spec("echo", json!({}))).await.unwrap_err();
        producer.close().await;

        assert!(
            matches!(&e, Error::NoExchange { exchange, .. }
                if *exchange == env.topology.tasks_exchange()),
            "{e:?}"
        );
        assert!(e.to_string().contains("gantry topology apply"), "{e}");
    })
    .await;
}
