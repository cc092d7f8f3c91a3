//! A database that holds rows written under an older schema: the migrations bring it up
//! to date under its rows, and the rows read back and take new writes as before.

use std::time::Duration;

use gantry_shared::message::{Attempt, TaskId};
use gantry_shared::retry;
use gantry_shared::store::{Change, DeadLetterFilter, SCHEMA_VERSION, Store, TaskState};
use tokio_postgres::NoTls;

const MIGRATION_1: &str = include_str!("../../../shared/src/store/migrations/0001_initial.sql");
const MIGRATION_2: &str =
    include_str!("../../../shared/src/store/migrations/0002_retries_and_replay.sql");

/// What a version-2 dispatcher left: a task that succeeded on its second attempt, one
/// still running, and a dead letter.
const OLD_ROWS: &str = "
INSERT INTO tasks (task_id, task, executor, state, attempt, deadline, submitted_at,
                   dispatched_at, started_at, finished_at, job_name, result, envelope)
VALUES ('6f1c2b7e-0000-4000-8000-000000000001', 'old.echo', 'echo', 'succeeded', 2,
        now() + interval '1 hour', now(), now(), now(), now(), 'gantry-old-a2',
        '{\"status\": \"succeeded\", \"output\": {\"n\": 1}}', '{\"task\": \"old.echo\"}'),
       ('6f1c2b7e-0000-4000-8000-000000000002', 'old.echo', 'echo', 'running', 1,
        now() + interval '1 hour', now(), now(), now(), NULL, 'gantry-old2-a1', NULL,
        '{\"task\": \"old.echo\"}');
INSERT INTO task_events (task_id, attempt, event) VALUES
  ('6f1c2b7e-0000-4000-8000-000000000001', 1, 'received'),
  ('6f1c2b7e-0000-4000-8000-000000000001', 1, 'retrying'),
  ('6f1c2b7e-0000-4000-8000-000000000001', 2, 'received'),
  ('6f1c2b7e-0000-4000-8000-000000000001', 2, 'succeeded'),
  ('6f1c2b7e-0000-4000-8000-000000000002', 1, 'received'),
  ('6f1c2b7e-0000-4000-8000-000000000002', 1, 'running');
INSERT INTO dead_letters (id, message_id, task_id, task, executor, reason, reason_kind,
                          headers, body, dead_at)
VALUES ('6f1c2b7e-0000-4000-8000-0000000000d1', 'm-1', NULL, 'old.echo', 'echo',
        'invalid: body is not JSON (expected value)', 'invalid', '{}', 'not json', now());
";

#[tokio::test]
async fn a_database_with_rows_of_an_older_schema_is_migrated_under_them() -> anyhow::Result<()> {
    let admin = gantry_tests::admin_database_url();
    let name = format!("gantry_test_old_{}", uuid::Uuid::new_v4().simple());
    let url = format!(
        "{}/{name}",
        admin.rsplit_once('/').map_or("", |(base, _)| base)
    );
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "{}/postgres",
            admin.rsplit_once('/').map_or("", |(base, _)| base)
        ),
        NoTls,
    )
    .await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await?;
    let outcome = migrate_under_old_rows(&url).await;
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await?;
    outcome
}

async fn migrate_under_old_rows(url: &str) -> anyhow::Result<()> {
    let (old, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    old.batch_execute(
        "CREATE TABLE gantry_migrations (version integer PRIMARY KEY, name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO gantry_migrations (version, name)
             VALUES (1, 'initial'), (2, 'retries and replay');",
    )
    .await?;
    old.batch_execute(MIGRATION_1).await?;
    old.batch_execute(MIGRATION_2).await?;
    old.batch_execute(OLD_ROWS).await?;

    let (store, migrated) = Store::connect_and_migrate(
        &url.to_owned().into(),
        2,
        retry::for_at_most(Duration::from_secs(10)),
    )
    .await?;
    assert_eq!(migrated.found, 2);
    assert_eq!(
        migrated.applied,
        vec![
            (3, "dead letter fillfactor"),
            (4, "warm executor evidence"),
            (5, "celery tasks"),
            (6, "dispatcher presence")
        ]
    );
    assert_eq!(SCHEMA_VERSION, 6, "a new migration needs its own rows here");

    // The old rows read back, typed.
    let done: TaskId = "6f1c2b7e-0000-4000-8000-000000000001".parse()?;
    let record = store.task(done).await?.expect("the old task is there");
    assert_eq!(record.state, TaskState::Succeeded);
    assert_eq!(record.attempt.get(), 2);
    assert_eq!(record.job_name.as_deref(), Some("gantry-old-a2"));
    let events: Vec<(u32, String)> = store
        .events(done)
        .await?
        .into_iter()
        .map(|(attempt, event, _, _)| (attempt.get(), event))
        .collect();
    assert_eq!(
        events,
        [
            (1, "received".to_owned()),
            (1, "retrying".to_owned()),
            (2, "received".to_owned()),
            (2, "succeeded".to_owned()),
        ]
    );
    let (letters, total) = store
        .find_dead_letters(&DeadLetterFilter::default(), 10, 0)
        .await?;
    assert_eq!(total, 1);
    assert_eq!(letters[0].reason_kind, "invalid");

    // They take new writes by the rules: the running one ends, the ended one stays.
    let running: TaskId = "6f1c2b7e-0000-4000-8000-000000000002".parse()?;
    let ended = Change {
        finished_at: Some(chrono::Utc::now()),
        ..Change::default()
    };
    assert!(
        store
            .transition(running, Attempt::FIRST, TaskState::Succeeded, &ended)
            .await?
            .changed()
    );
    assert!(
        !store
            .transition(done, Attempt::FIRST.next(), TaskState::Failed, &ended)
            .await?
            .changed()
    );

    // And the new migration took hold.
    let (fresh, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    let options: Option<Vec<String>> = fresh
        .query_one(
            "SELECT reloptions FROM pg_class WHERE relname = 'dead_letters'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(options, Some(vec!["fillfactor=50".to_owned()]));
    Ok(())
}
