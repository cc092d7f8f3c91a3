//! Dispatchers side by side on the `local` runtime: two processes, each with its own state
//! directory, share one database and one class's `max_active_jobs`.

use std::time::Duration;

use gantry_shared::message::{ExecutorClass, TaskName, TaskSpec};
use gantry_tests::executions::Executions;
use gantry_tests::replicas::{Claims, ended_once, presence};
use gantry_tests::{Dispatcher, TestEnv, eventually};

const MAX_ACTIVE: i64 = 2;

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
        let spec = TaskSpec {
            executor: ExecutorClass::parse("work")?,
            name: TaskName::parse("replicas.work")?,
            payload: executions.payload(500),
            ttl: Duration::from_secs(600),
            reply_to: None,
            idempotency_key: None,
            priority: None,
            resources: None,
        };
        ids.push(producer.submit(spec).await?);
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
