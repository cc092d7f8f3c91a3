//! The schema: only `gantry db migrate` (and the dispatcher) create or change it; every
//! other command refuses a database without it, says how to create it, and leaves the
//! database as it found it.

use gantry_shared::message::TaskId;
use gantry_shared::store::SCHEMA_VERSION;
use gantry_tests::TestEnv;
use gantry_tests::by_hand::{gantry, stderr, stdout};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

/// Checks that `gantry args` failed as it should against a database without the schema:
/// exit 2, naming the database (never with its password) and saying how to create it.
async fn refuses_for_want_of_schema(env: &TestEnv, args: &[&str]) -> anyhow::Result<()> {
    let output = gantry(env, args).await?;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "gantry {args:?}: {text}");
    assert_eq!(stdout(&output), "", "gantry {args:?}");
    assert!(
        text.contains(&format!(
            "database {} has no Gantry schema: create it with `gantry db migrate`",
            env.database
        )),
        "gantry {args:?}: {text}"
    );
    assert!(
        !text.contains(&env.database_url),
        "gantry {args:?} shows the password: {text}"
    );
    assert!(text.contains(":***@"), "gantry {args:?}: {text}");
    Ok(())
}

#[tokio::test]
async fn status_against_a_database_without_the_schema_fails_and_creates_no_table()
-> anyhow::Result<()> {
    let env = TestEnv::without_schema(None).await?;
    let id = TaskId::new().to_string();

    refuses_for_want_of_schema(&env, &["status", &id]).await?;

    assert_eq!(env.tables().await?, Vec::<String>::new());
    env.cleanup().await
}

#[tokio::test]
async fn no_other_command_creates_the_schema_either() -> anyhow::Result<()> {
    // The topology is declared: only the schema is missing.
    let env = TestEnv::without_schema(None).await?;
    let id = TaskId::new().to_string();
    let dead_letter = uuid::Uuid::new_v4().to_string();
    let commands: [&[&str]; 8] = [
        &["wait", &id, "--timeout", "1s"],
        &["cancel", &id],
        &["dlq", "list"],
        &["dlq", "show", &dead_letter],
        &["dlq", "replay", "--all", "--yes"],
        &["dlq", "purge", "--all", "--yes"],
        // Checked before the task goes out: nothing is published.
        &[
            "submit",
            "--executor",
            "echo",
            "--task",
            "demo.echo",
            "--wait",
        ],
        &["status", &id, "--json"],
    ];
    for args in commands {
        refuses_for_want_of_schema(&env, args).await?;
    }

    assert_eq!(env.tables().await?, Vec::<String>::new());
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = env
        .channel()
        .await?
        .queue_declare(
            env.task_queue("echo")?.as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await?;
    assert_eq!(queue.message_count(), 0, "submit --wait published a task");
    env.cleanup().await
}

#[tokio::test]
async fn db_migrate_creates_the_schema_that_the_other_commands_read() -> anyhow::Result<()> {
    let env = TestEnv::without_schema(None).await?;
    let output = gantry(&env, &["db", "migrate"]).await?;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.starts_with(&format!(
            "created the Gantry schema (version {SCHEMA_VERSION}) in database {}\n  applied migration 1 (initial)\n",
            env.database
        )),
        "{text}"
    );
    let tables = env.tables().await?;
    for table in ["dead_letters", "gantry_migrations", "task_events", "tasks"] {
        assert!(tables.iter().any(|t| t == table), "{table} in {tables:?}");
    }

    let again = gantry(&env, &["db", "migrate"]).await?;
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(
        stdout(&again),
        format!(
            "the Gantry schema of database {} is current (version {SCHEMA_VERSION}); nothing to do\n",
            env.database
        )
    );

    let id = TaskId::new().to_string();
    let status = gantry(&env, &["status", &id]).await?;
    assert_eq!(status.status.code(), Some(1), "{}", stderr(&status));
    assert!(
        stderr(&status).starts_with(&format!("task {id} is not known")),
        "{}",
        stderr(&status)
    );
    env.cleanup().await
}

#[tokio::test]
async fn a_schema_older_or_newer_than_the_binary_is_refused() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let db = env.sql().await?;
    let id = TaskId::new().to_string();
    db.execute(
        "DELETE FROM gantry_migrations WHERE version = $1",
        &[&SCHEMA_VERSION],
    )
    .await?;

    let older = gantry(&env, &["status", &id]).await?;

    assert_eq!(older.status.code(), Some(2));
    let text = stderr(&older);
    let expected = format!(
        "database {} has Gantry schema version {}, older than this binary's ({SCHEMA_VERSION}): bring it up to date with `gantry db migrate`",
        env.database,
        SCHEMA_VERSION - 1
    );
    assert!(text.contains(&expected), "{text}");

    db.execute(
        "INSERT INTO gantry_migrations (version, name) VALUES ($1, 'current'), ($1 + 1, 'from the future')",
        &[&SCHEMA_VERSION],
    )
    .await?;

    let newer = gantry(&env, &["status", &id]).await?;

    assert_eq!(newer.status.code(), Some(2));
    let text = stderr(&newer);
    assert!(text.contains("newer than this binary knows"), "{text}");
    assert!(text.contains("upgrade the binary"), "{text}");
    env.cleanup().await
}
