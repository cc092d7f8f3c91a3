//! The store's set-wise writes (the dispatcher's grouped commits, the recorder's batches)
//! end every task exactly as the same writes one at a time do.

use gantry_shared::message::{Evidence, Limits, Task, TaskId};
use gantry_shared::store::{Applied, Change, Store, TaskState, Transition};
use gantry_tests::TestEnv;
use gantry_tests::bench::echo_spec;
use serde_json::json;

/// Three tasks the store knows and one it never received.
fn tasks() -> anyhow::Result<[Task; 4]> {
    let task = |i: u32| -> anyhow::Result<Task> {
        let spec = echo_spec("store.batch", json!({ "i": i }))?;
        Ok(Task::new(spec, &Limits::default())?)
    };
    Ok([task(0)?, task(1)?, task(2)?, task(3)?])
}

/// Every kind of case, with tasks named more than once: forward moves, a move two steps
/// ahead, a late event, a duplicate, an unknown task, a terminal one, a new attempt.
fn script(t: &[Task; 4]) -> Vec<Transition> {
    let step = |task: &Task, attempt: u32, state: TaskState, job: Option<&str>| Transition {
        id: task.id,
        attempt,
        state,
        change: Change {
            evidence: Evidence {
                job_name: job.map(str::to_owned),
                ..Evidence::default()
            },
            finished_at: state.is_terminal().then(chrono::Utc::now),
            result: state
                .is_terminal()
                .then(|| json!({ "status": state.as_str() })),
            ..Change::default()
        },
    };
    vec![
        step(&t[0], 1, TaskState::Dispatched, Some("job-a")),
        step(&t[1], 1, TaskState::Running, Some("job-b")),
        step(&t[0], 1, TaskState::Running, None),
        step(&t[3], 1, TaskState::Dispatched, None),
        step(&t[1], 1, TaskState::Dispatched, None),
        step(&t[0], 1, TaskState::Running, None),
        step(&t[2], 1, TaskState::Succeeded, Some("job-c")),
        step(&t[2], 1, TaskState::Failed, None),
        step(&t[1], 2, TaskState::Received, None),
    ]
}

/// What the store holds of a task: its state, attempt, job and events (without times).
async fn held(store: &Store, id: TaskId) -> anyhow::Result<String> {
    let Some(r) = store.task(id).await? else {
        return Ok("unknown".into());
    };
    let events: Vec<String> = store
        .events(id)
        .await?
        .into_iter()
        .map(|(attempt, event, _, _)| format!("{attempt}:{event}"))
        .collect();
    Ok(format!(
        "{} attempt {} job {:?} dispatched {} started {} finished {} result {:?} events {events:?}",
        r.state,
        r.attempt,
        r.job_name,
        r.dispatched_at.is_some(),
        r.started_at.is_some(),
        r.finished_at.is_some(),
        r.result
    ))
}

#[tokio::test]
async fn a_batch_of_writes_ends_every_task_as_the_same_writes_one_at_a_time() -> anyhow::Result<()>
{
    let (one_env, batch_env) = (TestEnv::new(None).await?, TestEnv::new(None).await?);
    let (one, batch) = (one_env.store().await?, batch_env.store().await?);
    let t = tasks()?;
    let received: Vec<&Task> = vec![&t[0], &t[1], &t[0], &t[2]];

    let mut one_received = Vec::new();
    for task in &received {
        one_received.push(one.record_received(task).await?);
    }
    let batch_received = batch.record_received_many(&received).await?;
    assert_eq!(batch_received, one_received);
    assert_eq!(batch_received, vec![(TaskState::Received, 1); 4]);

    let script = script(&t);
    let mut one_applied = Vec::new();
    for s in &script {
        one_applied.push(one.transition(s.id, s.attempt, s.state, &s.change).await?);
    }
    let batch_applied = batch.transitions(&script).await?;
    assert_eq!(batch_applied, one_applied);
    assert_eq!(
        batch_applied
            .iter()
            .map(|a| match a {
                Applied::Changed { .. } => "changed".to_owned(),
                Applied::Duplicate => "duplicate".to_owned(),
                Applied::Stale { current, attempt } => format!("stale {current} {attempt}"),
                Applied::Unknown => "unknown".to_owned(),
            })
            .collect::<Vec<_>>(),
        [
            "changed",
            "changed",
            "changed",
            "unknown",
            "stale running 1",
            "duplicate",
            "changed",
            "stale succeeded 1",
            "changed",
        ]
    );
    for task in &t {
        assert_eq!(held(&batch, task.id).await?, held(&one, task.id).await?);
    }
    let a = batch.task(t[0].id).await?.expect("task a is stored");
    assert_eq!(
        (a.state(), a.job_name.as_deref()),
        (TaskState::Running, Some("job-a"))
    );
    let b = batch.task(t[1].id).await?.expect("task b is stored");
    assert_eq!(
        (b.state(), b.attempt, b.job_name),
        (TaskState::Received, 2, None)
    );

    // A redelivery of a task further along, beside a fresh task: the first changes
    // nothing (its job exists; the dispatcher finds it there), the second is new.
    let again = batch.record_received_many(&[&t[0], &t[3]]).await?;
    let one_again = [
        one.record_received(&t[0]).await?,
        one.record_received(&t[3]).await?,
    ];
    assert_eq!(again, one_again);
    assert_eq!(again[1], (TaskState::Received, 1));
    assert_eq!(held(&batch, t[0].id).await?, held(&one, t[0].id).await?);
    assert_eq!(held(&batch, t[3].id).await?, held(&one, t[3].id).await?);

    one_env.cleanup().await?;
    batch_env.cleanup().await?;
    Ok(())
}
