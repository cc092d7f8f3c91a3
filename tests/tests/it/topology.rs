//! `gantry topology apply` is idempotent and refuses conflicting definitions.

use std::time::Duration;

use gantry_shared::amqp::{self, confirm_channel};
use gantry_shared::message::{ExecutorClass, Task, TaskName, TaskSpec};
use gantry_shared::topology::QueueSettings;
use gantry_shared::{Error, message::Limits};
use gantry_tests::{TestEnv, amqp_url};
use serde_json::json;

#[tokio::test]
async fn applying_the_topology_twice_changes_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let producer = env.producer().await?;
    let task = Task::new(
        TaskSpec {
            executor: ExecutorClass::parse("echo")?,
            name: TaskName::parse("topology.check")?,
            payload: json!({}),
            ttl: Duration::from_secs(60),
            reply_to: None,
            idempotency_key: None,
            priority: None,
            resources: None,
        },
        &Limits::default(),
    )?;
    producer.submit_task(&task).await?;
    let queue = env.topology().task_queue(&task.executor);
    assert_eq!(env.queue_depth(&queue).await?, 1);

    let conn = amqp::connect(&amqp_url().into(), "gantry-tests", Duration::from_secs(10)).await?;
    let channel = confirm_channel(&conn, Duration::from_secs(10)).await?;
    let classes = env.catalog.classes();
    env.topology()
        .apply(&channel, &classes, &QueueSettings::default())
        .await?;
    env.topology()
        .apply(&channel, &classes, &QueueSettings::default())
        .await?;
    assert_eq!(
        env.queue_depth(&queue).await?,
        1,
        "re-applying keeps queued tasks"
    );

    let other = QueueSettings {
        delivery_limit: 3,
        ..QueueSettings::default()
    };
    let conflict = env.topology().apply(&channel, &classes, &other).await;
    assert!(
        matches!(conflict, Err(Error::TopologyConflict { .. })),
        "a different delivery limit on an existing queue is a conflict, got {conflict:?}"
    );
    let _ = conn.close(200, "ok".into()).await;
    producer.close().await;
    env.cleanup().await
}
