//! Restarts of RabbitMQ and Postgres under a running dispatcher. These restart the servers
//! every other test uses, so they are `#[ignore]`d in the parallel suite and run on their
//! own, one at a time (`scripts/test.sh` does so after the main suite).

use std::time::Duration;

use anyhow::{Result, bail};
use gantry_producer::Producer;
use gantry_shared::message::{ExecutorClass, TaskId, TaskName, TaskSpec};
use gantry_shared::store::TaskState;
use gantry_tests::observability::get;
use gantry_tests::services::{restart_postgres, restart_rabbitmq};
use gantry_tests::{TestEnv, eventually};
use serde_json::json;

async fn submit_batch(producer: &Producer, n: usize, sleep_ms: u64) -> Result<Vec<TaskId>> {
    let mut ids = Vec::new();
    for i in 0..n {
        let spec = TaskSpec {
            executor: ExecutorClass::parse("echo")?,
            name: TaskName::parse("resilience.echo")?,
            payload: json!({"i": i, "sleep_ms": sleep_ms}),
            ttl: Duration::from_secs(300),
            reply_to: None,
            idempotency_key: None,
            priority: None,
            resources: None,
        };
        ids.push(producer.submit(spec).await?);
    }
    Ok(ids)
}

async fn all_succeed(producer: &Producer, ids: &[TaskId]) -> Result<()> {
    for id in ids {
        let record = producer.wait(*id, Duration::from_secs(180)).await?;
        if record.state != TaskState::Succeeded {
            bail!("task {id} ended {}: {:?}", record.state, record.error);
        }
    }
    Ok(())
}

#[tokio::test]
#[ignore = "restarts the shared RabbitMQ; run alone: cargo test -p gantry-tests --test resilience -- --ignored --test-threads=1"]
async fn tasks_in_flight_survive_a_rabbitmq_restart() -> Result<()> {
    let env = TestEnv::new(None).await?;
    let dispatcher = env.dispatcher_process()?;
    let producer = env.producer().await?;
    let before = submit_batch(&producer, 5, 0).await?;
    all_succeed(&producer, &before).await?;

    // Jobs that run across the restart must publish their results once it is back.
    let in_flight = submit_batch(&producer, 6, 3000).await?;
    restart_rabbitmq()?;
    let after = submit_batch(&producer, 5, 0).await?;
    all_succeed(&producer, &in_flight).await?;
    all_succeed(&producer, &after).await?;
    assert!(
        dispatcher.log_text().contains("reconnecting"),
        "the dispatcher noticed and reconnected"
    );
    // Its publisher reconnects at its first publish after the restart: a dead letter.
    env.publish_raw("echo", b"{not json").await?;
    let addr = dispatcher.http_addr()?;
    for connection in ["gantry-dispatcher/echo", "gantry-dispatcher/publish"] {
        let line = format!("gantry_amqp_reconnects_total{{consumer=\"{connection}\"}} ");
        eventually(&line, Duration::from_secs(30), || async {
            let (_, text) = get(addr, "/metrics").await?;
            let count = text
                .lines()
                .find_map(|l| l.strip_prefix(&line))
                .and_then(|n| n.parse::<f64>().ok());
            Ok(count.filter(|n| *n >= 1.0))
        })
        .await?;
    }
    assert!(dispatcher.terminate(Duration::from_secs(30))?.success());
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
#[ignore = "restarts the shared Postgres; run alone: cargo test -p gantry-tests --test resilience -- --ignored --test-threads=1"]
async fn tasks_in_flight_survive_a_postgres_restart() -> Result<()> {
    let env = TestEnv::new(None).await?;
    let dispatcher = env.dispatcher_process()?;
    let producer = env.producer().await?;
    let before = submit_batch(&producer, 5, 0).await?;
    all_succeed(&producer, &before).await?;

    let in_flight = submit_batch(&producer, 6, 2000).await?;
    restart_postgres()?;
    let after = submit_batch(&producer, 5, 0).await?;
    all_succeed(&producer, &in_flight).await?;
    all_succeed(&producer, &after).await?;
    assert!(dispatcher.terminate(Duration::from_secs(30))?.success());
    producer.close().await;
    env.cleanup().await
}
