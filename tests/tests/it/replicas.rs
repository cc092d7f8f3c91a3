//! Dispatchers side by side on the `local` runtime: two processes, each with its own state
//! directory, share one database and one class's `max_active_jobs`.

use std::time::Duration;

use gantry_shared::message::{ExecutorClass, TaskSpec};
use gantry_tests::executions::Executions;
use gantry_tests::replicas::{Claims, ended_once, presence};
use gantry_tests::{Dispatcher, TestEnv, eventually};
use tokio_postgres::NoTls;

const MAX_ACTIVE: i64 = 2;

/// A task of class `work` that runs for `sleep_ms`, recorded in `executions`.
fn work(executions: &Executions, sleep_ms: u64) -> anyhow::Result<TaskSpec> {
    Ok(TaskSpec {
        executor: ExecutorClass::parse("work")?,
        ..gantry_tests::echo_spec("replicas.work", executions.payload(sleep_ms))?
    })
}

/// A local dispatcher of `env` on a state directory of its own.
fn dispatcher_on(env: &TestEnv, state: &str) -> anyhow::Result<Dispatcher> {
    let dir = env.dir.path().join(state).display().to_string();
    Dispatcher::start(env, &[("GANTRY_STATE_DIR", dir.as_str())])
}

/// One of two dispatchers is SIGKILLed while its jobs run and comes back on its state
/// directory, as a replaced replica with its volume would: the other goes on within the
/// shared capacity, the returning one takes its jobs over, and every task runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_local_dispatchers_share_max_active_jobs_and_one_killed_loses_nothing()
-> anyhow::Result<()> {
    const TASKS: usize = 24;
    let catalog = format!(
        "executors:\n  work:\n    engine: {}\n    max_active_jobs: {MAX_ACTIVE}\n    retry: {{ max_attempts: 3, min_delay: 1s, max_delay: 1s }}\n",
        Executions::engine()
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let executions = Executions::new(&env.dir.path().join("executions"))?;
    let first = dispatcher_on(&env, "state-a")?;
    let _second = dispatcher_on(&env, "state-b")?;
    let claims = Claims::watch(&env.database_url, "work").await?;
    let producer = env.producer().await?;
    let mut ids = Vec::new();
    for _ in 0..TASKS {
        ids.push(producer.submit(work(&executions, 500)?).await?);
    }
    let id = presence(&first.log_text()).expect("the dispatcher logs its presence");
    eventually(
        "a job claimed by the first",
        Duration::from_secs(60),
        || async { Ok((claims.held_by(id) > 0).then_some(())) },
    )
    .await?;
    first.kill_hard()?;
    let _returned = dispatcher_on(&env, "state-a")?;

    ended_once(&producer, &ids, &executions).await?;
    let seen = claims.stop().await?;
    assert!(
        seen.most_active <= MAX_ACTIVE,
        "at most {MAX_ACTIVE} attempts held a job at once: {seen:?}"
    );
    assert!(seen.dispatchers.len() >= 2, "both claimed: {seen:?}");
    producer.close().await;
    env.cleanup().await
}

/// The backends of `database` that hold a session advisory lock of one key: a dispatcher's
/// presence.
async fn presence_backends(env: &TestEnv) -> anyhow::Result<Vec<i32>> {
    let (client, connection) = tokio_postgres::connect(&env.database_url, NoTls).await?;
    tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT pid FROM pg_locks
              WHERE locktype = 'advisory' AND objsubid = 1 AND granted
                AND database = (SELECT oid FROM pg_database WHERE datname = $1)",
            &[&env.database],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A dispatcher whose presence connection is closed under it (as a Postgres restart or a
/// network cut would) claims nothing until it has taken its presence again, under the same
/// id, and then goes on dispatching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_whose_presence_connection_is_lost_takes_it_again_and_goes_on()
-> anyhow::Result<()> {
    let catalog = format!(
        "executors:\n  work:\n    engine: {}\n    max_active_jobs: {MAX_ACTIVE}\n",
        Executions::engine()
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let executions = Executions::new(&env.dir.path().join("executions"))?;
    let mut dispatcher = dispatcher_on(&env, "state")?;
    let before = presence_backends(&env).await?;
    assert_eq!(before.len(), 1, "one presence: {before:?}");
    let (admin, connection) = tokio_postgres::connect(&env.database_url, NoTls).await?;
    tokio::spawn(connection);
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&before[0]])
        .await?;
    dispatcher.wait_for_log(
        "this dispatcher's presence is back",
        Duration::from_secs(60),
    )?;
    let log = dispatcher.log_text();
    assert!(log.contains("lost the Postgres connection that holds this dispatcher's presence"));
    let after = presence_backends(&env).await?;
    assert!(
        after.len() == 1 && after != before,
        "{before:?} then {after:?}"
    );

    let producer = env.producer().await?;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(producer.submit(work(&executions, 100)?).await?);
    }
    ended_once(&producer, &ids, &executions).await?;
    producer.close().await;
    env.cleanup().await
}
