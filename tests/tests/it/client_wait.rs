//! Waiting for a task and reading its state, with the recorder's writes made by the test.

use std::time::Duration;

use gantry_producer::{Error, Producer, Tracker};
use gantry_shared::message::{ResultStatus, Task, TaskId};
use gantry_shared::store::TaskState;
use serde_json::json;

use crate::helpers::{PATIENCE, result, scenario, scenario_without_schema, spec};

#[tokio::test]
async fn wait_returns_the_task_once_the_recorder_commits_its_result() {
    scenario(async |env| {
        let store = env.store().await;
        let task = Task::new(spec("echo", json!({"n": 1})), &Default::default()).unwrap();
        store.record_received(&task).await.unwrap();
        let producer = Producer::connect(&env.config).await.unwrap();

        let recorder = tokio::spawn({
            let task = task.clone();
            async move {
                // Only to let the wait begin first; the wait reacts to the commit.
                tokio::time::sleep(Duration::from_millis(300)).await;
                store
                    .record_results(&[result(&task, ResultStatus::Succeeded)])
                    .await
                    .unwrap();
            }
        });
        let record = producer.wait(task.id, PATIENCE).await.unwrap();
        recorder.await.unwrap();
        producer.close().await;

        assert_eq!(record.task_id, task.id);
        assert_eq!(record.state, TaskState::Succeeded);
        assert_eq!(record.result.as_ref().unwrap()["output"], json!({"n": 1}));
        assert_eq!(record.pod_name.as_deref(), Some("test-pod"));
    })
    .await;
}

#[tokio::test]
async fn wait_on_a_running_task_times_out_saying_where_it_is() {
    scenario(async |env| {
        let store = env.store().await;
        let task = Task::new(spec("echo", json!({})), &Default::default()).unwrap();
        store.record_received(&task).await.unwrap();
        let tracker = Tracker::new(&env.config);

        let e = tracker
            .wait(task.id, Duration::from_millis(200))
            .await
            .unwrap_err();

        assert!(
            matches!(&e, Error::WaitTimeout { task_id, state: Some(TaskState::Received), .. }
                if *task_id == task.id),
            "{e:?}"
        );
        assert!(e.is_timeout());
        assert!(e.to_string().contains("it is still received"), "{e}");
    })
    .await;
}

#[tokio::test]
async fn wait_on_a_finished_task_returns_at_once() {
    scenario(async |env| {
        let store = env.store().await;
        let task = Task::new(spec("echo", json!({})), &Default::default()).unwrap();
        store.record_received(&task).await.unwrap();
        store
            .record_results(&[result(&task, ResultStatus::Failed)])
            .await
            .unwrap();

        let record = Tracker::new(&env.config)
            .wait(task.id, PATIENCE)
            .await
            .unwrap();

        assert_eq!(record.state, TaskState::Failed);
        assert_eq!(record.error.as_ref().unwrap()["kind"], "command_failed");
    })
    .await;
}

#[tokio::test]
async fn status_and_events_follow_what_the_dispatcher_recorded() {
    scenario(async |env| {
        let tracker = Tracker::new(&env.config);
        let task = Task::new(spec("echo", json!({})), &Default::default()).unwrap();
        assert!(tracker.status(task.id).await.unwrap().is_none());
        assert!(tracker.events(task.id).await.unwrap().is_empty());

        let store = env.store().await;
        store.record_received(&task).await.unwrap();
        store
            .record_results(&[result(&task, ResultStatus::Succeeded)])
            .await
            .unwrap();

        let record = tracker.status(task.id).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::Succeeded);
        let events: Vec<(u32, String)> = tracker
            .events(task.id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.attempt.get(), e.event))
            .collect();
        assert_eq!(
            events,
            [(1, "received".to_owned()), (1, "succeeded".to_owned())]
        );
    })
    .await;
}

#[tokio::test]
async fn a_database_without_the_schema_is_refused_and_left_as_it_was() {
    scenario_without_schema(async |env| {
        let tracker = Tracker::new(&env.config);

        let e = tracker.status(TaskId::new()).await.unwrap_err();

        let Error::Database { url, source } = &e else {
            panic!("not a database error: {e:?}");
        };
        assert!(url.contains(":***@"), "{url}");
        assert!(
            matches!(**source, gantry_shared::Error::SchemaMissing { ref database } if *database == env.database),
            "{source:?}"
        );
        assert!(e.to_string().contains("gantry db migrate"), "{e}");
        assert_eq!(env.tables().await, Vec::<String>::new());
    })
    .await;
}
