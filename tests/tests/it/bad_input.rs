//! Bad input never crashes the dispatcher and never vanishes: it is dead-lettered with a
//! readable reason, recorded in Postgres, counted, and the dispatcher goes on.

use std::time::Duration;

use chrono::Utc;
use gantry_shared::message::{ExecutorClass, Limits, Task, TaskName, TaskSpec, headers};
use gantry_shared::retry;
use gantry_shared::store::TaskState;
use gantry_tests::{TestEnv, eventually};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

fn valid_task() -> Task {
    Task::new(
        TaskSpec {
            executor: ExecutorClass::parse("echo").expect("class"),
            name: TaskName::parse("bad.input").expect("name"),
            payload: json!({"ok": true}),
            ttl: Duration::from_secs(120),
            reply_to: None,
            idempotency_key: None,
            priority: None,
            resources: None,
        },
        &Limits::default(),
    )
    .expect("valid task")
}

/// A valid task's body and properties, with `edit` applied to the body JSON.
fn message(edit: impl FnOnce(&mut Value)) -> (Vec<u8>, BasicProperties) {
    let task = valid_task();
    let (body, props) = task.to_amqp(Utc::now()).expect("encodes");
    let mut json: Value = serde_json::from_slice(&body).expect("json");
    edit(&mut json);
    (serde_json::to_vec(&json).expect("json"), props)
}

fn with_schema(props: BasicProperties, schema: &str) -> BasicProperties {
    let mut h = props.headers().clone().unwrap_or_default();
    h.insert(headers::SCHEMA.into(), AMQPValue::LongString(schema.into()));
    props.with_headers(h)
}

#[tokio::test]
async fn every_kind_of_bad_input_is_dead_lettered_with_its_reason_and_the_dispatcher_goes_on()
-> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let dispatcher = env.dispatcher_process()?;
    let publisher = env.publisher().await?;

    let (_, plain) = message(|_| {});
    let not_json = (b"{not json".to_vec(), plain.clone());
    let wrong_schema = {
        let (b, p) = message(|_| {});
        (b, with_schema(p, "gantry.task/v0"))
    };
    let missing_field = message(|j| {
        j.as_object_mut().expect("object").remove("deadline");
    });
    let unknown_executor = message(|j| j["executor"] = json!("vlm"));
    let oversize = message(|j| j["payload"] = json!({"blob": "x".repeat(300 * 1024)}));
    let past_deadline = message(|j| {
        j["deadline"] = json!((Utc::now() - chrono::Duration::minutes(5)).to_rfc3339())
    });
    let no_correlation_id = {
        let (b, p) = message(|_| {});
        let stripped = BasicProperties::default()
            .with_headers(p.headers().clone().unwrap_or_else(FieldTable::default))
            .with_content_type("application/json".into());
        (b, stripped)
    };
    let bad_name = message(|j| j["task"] = json!("not a name!"));
    let cases: [(&str, (Vec<u8>, BasicProperties)); 8] = [
        ("invalid: body is not JSON", not_json),
        (
            "invalid: wrong schema (header x-gantry-schema is \"gantry.task/v0\"",
            wrong_schema,
        ),
        (
            "invalid: wrong schema (missing field `deadline`",
            missing_field,
        ),
        ("invalid: unknown executor \"vlm\"", unknown_executor),
        ("invalid: payload is", oversize),
        ("expired: deadline", past_deadline),
        ("invalid: message has no correlation_id", no_correlation_id),
        ("invalid: task: task name \"not a name!\"", bad_name),
    ];
    let exchange = env.topology().tasks_exchange();
    for (_, (body, props)) in &cases {
        publisher
            .publish(
                &exchange,
                "echo",
                body,
                props.clone(),
                true,
                retry::for_at_most(Duration::from_secs(10)),
            )
            .await?;
    }
    // And a good task after them: the dispatcher goes on.
    let producer = env.producer().await?;
    let good = valid_task();
    producer.submit_task(&good).await?;
    assert_eq!(
        producer.wait(good.id, Duration::from_secs(60)).await?.state,
        TaskState::Succeeded
    );

    let store = env.store().await?;
    let recorded = eventually(
        "all dead letters recorded",
        Duration::from_secs(60),
        || async {
            let rows = store.dead_letters(100).await?;
            Ok((rows.len() >= cases.len()).then_some(rows))
        },
    )
    .await?;
    assert_eq!(recorded.len(), cases.len());
    for (expected, _) in &cases {
        assert!(
            recorded
                .iter()
                .any(|(_, _, _, reason)| reason.starts_with(expected)),
            "no dead letter with reason {expected:?} in {:#?}",
            recorded.iter().map(|r| &r.3).collect::<Vec<_>>()
        );
    }
    let kinds: Vec<&str> = recorded.iter().map(|r| r.2.as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "expired").count(), 1);
    assert_eq!(
        kinds.iter().filter(|k| **k == "invalid").count(),
        cases.len() - 1
    );
    assert_eq!(
        env.queue_depth(&env.topology().dead_queue()).await?,
        cases.len() as u32,
        "every bad message is kept in the dead-letter queue for operators"
    );
    let log = dispatcher.log_text();
    assert_eq!(
        log.matches("rejected message; dead-lettering it").count(),
        cases.len(),
        "each rejection is logged and counted"
    );
    assert!(log.contains("rejected_total"), "the log counts rejections");
    assert!(dispatcher.terminate(Duration::from_secs(30))?.success());
    publisher.close().await;
    producer.close().await;
    env.cleanup().await
}
