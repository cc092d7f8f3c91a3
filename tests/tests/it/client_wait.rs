//! The client library (`gantry-producer`) waiting for a task and reading its state, with the
//! recorder's writes made by the test.

use std::time::Duration;

use anyhow::Context;
use gantry_producer::{Error, Tracker};
use gantry_shared::message::{ResultStatus, Task, TaskId};
use gantry_shared::store::TaskState;
use gantry_tests::by_hand::result;
use gantry_tests::{PATIENCE, TestEnv, echo_spec, eventually};
use serde_json::json;

#[tokio::test]
async fn wait_returns_the_task_once_the_recorder_commits_its_result() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let store = env.store().await?;
    let task = Task::new(
        echo_spec("demo.echo", json!({"n": 1}))?,
        &Default::default(),
    )?;
    store.record_received(&task).await?;
    let producer = env.producer().await?;

    let recorder = tokio::spawn({
        let task = task.clone();
        async move {
            // Only to let the wait begin first; the wait reacts to the commit.
            tokio::time::sleep(Duration::from_millis(300)).await;
            store
                .record_results(&[result(&task, ResultStatus::Succeeded)])
                .await
        }
    });
    let record = producer.wait(task.id, PATIENCE).await?;
    recorder.await??;
    producer.close().await;

    assert_eq!(record.task_id, task.id);
    assert_eq!(record.state, TaskState::Succeeded);
    assert_eq!(
        record.result.as_ref().context("a result is recorded")?["output"],
        json!({"n": 1})
    );
    assert_eq!(record.pod_name.as_deref(), Some("test-pod"));
    env.cleanup().await
}

#[tokio::test]
async fn wait_on_a_running_task_times_out_saying_where_it_is() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let store = env.store().await?;
    let task = Task::new(echo_spec("demo.echo", json!({}))?, &Default::default())?;
    store.record_received(&task).await?;
    let tracker = Tracker::new(&env.config());

    let e = tracker
        .wait(task.id, Duration::from_millis(200))
        .await
        .expect_err("the task does not finish");

    assert!(
        matches!(&e, Error::WaitTimeout { task_id, state: Some(TaskState::Received), .. }
            if *task_id == task.id),
        "{e:?}"
    );
    assert!(e.is_timeout());
    assert!(e.to_string().contains("it is still received"), "{e}");
    env.cleanup().await
}

#[tokio::test]
async fn wait_on_a_finished_task_returns_at_once() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let store = env.store().await?;
    let task = Task::new(echo_spec("demo.echo", json!({}))?, &Default::default())?;
    store.record_received(&task).await?;
    store
        .record_results(&[result(&task, ResultStatus::Failed)])
        .await?;

    let record = Tracker::new(&env.config()).wait(task.id, PATIENCE).await?;

    assert_eq!(record.state, TaskState::Failed);
    assert_eq!(
        record.error.as_ref().context("an error is recorded")?["kind"],
        "command_failed"
    );
    env.cleanup().await
}

#[tokio::test]
async fn status_and_events_follow_what_the_dispatcher_recorded() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let tracker = Tracker::new(&env.config());
    let task = Task::new(echo_spec("demo.echo", json!({}))?, &Default::default())?;
    assert!(tracker.status(task.id).await?.is_none());
    assert!(tracker.events(task.id).await?.is_empty());

    let store = env.store().await?;
    store.record_received(&task).await?;
    store
        .record_results(&[result(&task, ResultStatus::Succeeded)])
        .await?;

    let record = tracker
        .status(task.id)
        .await?
        .context("the task is known")?;
    assert_eq!(record.state, TaskState::Succeeded);
    let events: Vec<(u32, String)> = tracker
        .events(task.id)
        .await?
        .into_iter()
        .map(|e| (e.attempt.get(), e.event))
        .collect();
    assert_eq!(
        events,
        [(1, "received".to_owned()), (1, "succeeded".to_owned())]
    );
    env.cleanup().await
}

#[tokio::test]
async fn a_database_without_the_schema_is_refused_and_left_as_it_was() -> anyhow::Result<()> {
    let env = TestEnv::without_schema(None).await?;
    let tracker = Tracker::new(&env.config());

    let e = tracker
        .status(TaskId::new())
        .await
        .expect_err("the database has no schema");

    let Error::Database { url, source } = &e else {
        panic!("not a database error: {e:?}");
    };
    assert!(url.contains(":***@"), "{url}");
    assert!(
        matches!(**source, gantry_shared::Error::SchemaMissing { ref database } if *database == env.database),
        "{source:?}"
    );
    assert!(e.to_string().contains("gantry db migrate"), "{e}");
    assert_eq!(env.tables().await?, Vec::<String>::new());
    env.cleanup().await
}

#[tokio::test]
async fn three_hundred_waits_at_once_take_one_listening_connection() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let store = env.store().await?;
    let sql = env.sql().await?;
    let superuser: bool = sql
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?
        .get(0);
    anyhow::ensure!(
        !superuser,
        "a superuser ignores a database's CONNECTION LIMIT: run the tests as another role"
    );
    let mut tasks = Vec::new();
    for n in 0..300 {
        let task = Task::new(
            echo_spec("demo.echo", json!({"n": n}))?,
            &Default::default(),
        )?;
        store.record_received(&task).await?;
        tasks.push(task);
    }
    // The tracker's pool, the store's, this connection, and one to listen on, with room
    // to spare: far fewer than a connection per wait.
    let config = env.config();
    let limit = i32::try_from(config.db_pool_size + 4 + 1 + 1 + 2)?;
    let database: String = sql
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    sql.batch_execute(&format!(
        "ALTER DATABASE \"{database}\" CONNECTION LIMIT {limit}"
    ))
    .await?;

    let tracker = Tracker::new(&config);
    let waits: Vec<_> = tasks
        .iter()
        .map(|task| {
            let (tracker, id) = (tracker.clone(), task.id);
            tokio::spawn(async move { tracker.wait(id, PATIENCE).await })
        })
        .collect();
    let results: Vec<_> = tasks
        .iter()
        .map(|task| result(task, ResultStatus::Succeeded))
        .collect();
    store.record_results(&results).await?;
    for (wait, task) in waits.into_iter().zip(&tasks) {
        let record = wait.await??;
        assert_eq!(
            (record.task_id, record.state),
            (task.id, TaskState::Succeeded)
        );
    }

    sql.batch_execute(&format!(
        "ALTER DATABASE \"{database}\" CONNECTION LIMIT -1"
    ))
    .await?;
    env.cleanup().await
}

#[tokio::test]
async fn a_wait_whose_listening_connection_is_killed_listens_again_and_sees_the_end()
-> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let store = env.store().await?;
    let task = Task::new(echo_spec("demo.echo", json!({}))?, &Default::default())?;
    store.record_received(&task).await?;
    let tracker = Tracker::new(&env.config());
    let waiting = tokio::spawn({
        let tracker = tracker.clone();
        async move { tracker.wait(task.id, PATIENCE).await }
    });

    let sql = env.sql().await?;
    let listening = "SELECT pid FROM pg_stat_activity
                      WHERE datname = current_database() AND query LIKE 'LISTEN %'";
    let pid: i32 = eventually("the wait's LISTEN connection", PATIENCE, || async {
        Ok(sql
            .query(listening, &[])
            .await?
            .first()
            .map(|row| row.get(0)))
    })
    .await?;
    let killed: bool = sql
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await?
        .get(0);
    assert!(killed, "the LISTEN connection {pid} was not terminated");
    store
        .record_results(&[result(&task, ResultStatus::Succeeded)])
        .await?;

    let record = waiting.await??;
    assert_eq!(record.state, TaskState::Succeeded);
    env.cleanup().await
}
