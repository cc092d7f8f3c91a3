//! The store's set-wise writes (the dispatcher's grouped commits, the recorder's batches)
//! end every task as the transition rules say.

use gantry_shared::message::{Attempt, Evidence, Limits, Task, TaskId};
use gantry_shared::store::{Applied, Change, Store, TaskState, Transition};
use gantry_tests::TestEnv;
use gantry_tests::echo_spec;
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
        attempt: Attempt::new(attempt).expect("attempts count from 1"),
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

/// What the store holds of a task, without times.
#[derive(Debug, PartialEq)]
struct Held {
    state: TaskState,
    attempt: u32,
    job: Option<String>,
    /// Whether `dispatched_at`, `started_at` and `finished_at` are set.
    times: [bool; 3],
    result: Option<serde_json::Value>,
    events: Vec<String>,
}

async fn held(store: &Store, id: TaskId) -> anyhow::Result<Option<Held>> {
    let Some(r) = store.task(id).await? else {
        return Ok(None);
    };
    let events = store
        .events(id)
        .await?
        .into_iter()
        .map(|(attempt, event, _, _)| format!("{attempt}:{event}"))
        .collect();
    Ok(Some(Held {
        state: r.state,
        attempt: r.attempt.get(),
        job: r.job_name,
        times: [
            r.dispatched_at.is_some(),
            r.started_at.is_some(),
            r.finished_at.is_some(),
        ],
        result: r.result,
        events,
    }))
}

/// What a task should hold: state, attempt, job, times set, result, events.
fn expect(
    state: TaskState,
    attempt: u32,
    job: Option<&str>,
    times: [bool; 3],
    result: Option<serde_json::Value>,
    events: &[&str],
) -> Option<Held> {
    Some(Held {
        state,
        attempt,
        job: job.map(str::to_owned),
        times,
        result,
        events: events.iter().map(|e| (*e).to_owned()).collect(),
    })
}

/// The batched writes are checked against outcomes written out by hand from the rules
/// (monotonic within an attempt, a later attempt resets the row, a terminal state stays,
/// every write idempotent on `(task, attempt, event)`), not against the same code run one
/// write at a time.
#[tokio::test]
async fn a_batch_of_writes_ends_every_task_as_the_transition_rules_say() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let store = env.store().await?;
    let t = tasks()?;
    let received: Vec<&Task> = vec![&t[0], &t[1], &t[0], &t[2]];
    let outcomes = store.record_received_many(&received).await?;
    assert_eq!(outcomes, vec![(TaskState::Received, Attempt::FIRST); 4]);

    let applied = store.transitions(&script(&t)).await?;
    assert_eq!(
        applied
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
    // a: received → dispatched → running; the repeated running is a duplicate.
    let running_a = expect(
        TaskState::Running,
        1,
        Some("job-a"),
        [true, true, false],
        None,
        &["1:received", "1:dispatched", "1:running"],
    );
    assert_eq!(held(&store, t[0].id).await?, running_a);
    // b: running two steps ahead; the late dispatched is noted; attempt 2 resets the row.
    assert_eq!(
        held(&store, t[1].id).await?,
        expect(
            TaskState::Received,
            2,
            None,
            [false, false, false],
            None,
            &["1:received", "1:running", "1:late:dispatched", "2:received"],
        )
    );
    // c: the first terminal state wins; the contradicting one is noted as late.
    assert_eq!(
        held(&store, t[2].id).await?,
        expect(
            TaskState::Succeeded,
            1,
            Some("job-c"),
            [false, false, true],
            Some(json!({"status": "succeeded"})),
            &["1:received", "1:succeeded", "1:late:failed"],
        )
    );
    // d: never received, so nothing was written.
    assert!(held(&store, t[3].id).await?.is_none());

    // A repeated delivery of a task further along is told where the task stands (so the
    // dispatcher does not start it again) and changes nothing; beside it, a fresh task.
    let again = store.record_received_many(&[&t[0], &t[3]]).await?;
    assert_eq!(
        again,
        vec![
            (TaskState::Running, Attempt::FIRST),
            (TaskState::Received, Attempt::FIRST)
        ]
    );
    assert_eq!(held(&store, t[0].id).await?, running_a, "nothing changed");
    env.cleanup().await
}

#[tokio::test]
async fn a_state_the_code_does_not_know_is_an_error_that_names_it() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let store = env.store().await?;
    let t = tasks()?;
    store.record_received(&t[0]).await?;
    let (client, conn) = tokio_postgres::connect(&env.database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client
        .execute(
            "UPDATE tasks SET state = 'frozen' WHERE task_id = $1",
            &[&t[0].id.as_uuid()],
        )
        .await?;
    let error = store
        .task(t[0].id)
        .await
        .expect_err("an unknown state is refused");
    let text = gantry_shared::telemetry::chain(&error);
    assert!(text.contains("unknown task state \"frozen\""), "{text}");
    let transition = store
        .transition(
            t[0].id,
            Attempt::FIRST,
            TaskState::Dispatched,
            &Change::default(),
        )
        .await
        .expect_err("no write over a state the code does not know");
    assert!(
        gantry_shared::telemetry::chain(&transition).contains("frozen"),
        "{transition}"
    );
    env.cleanup().await
}

/// Claims with capacity, many at once: a class's room goes to its claims in order, the rest
/// are told the class is full, and a repeated claim of an attempt already claimed is told
/// so rather than full. An attempt's end gives its unit back.
#[tokio::test]
async fn claims_of_a_full_class_wait_and_an_ended_attempt_gives_its_unit_back() -> anyhow::Result<()>
{
    use gantry_shared::message::ExecutorClass;
    use gantry_shared::store::{Claim, Claimed};

    let env = TestEnv::new(None).await?;
    let store = env.store().await?;
    let tasks = tasks()?;
    for task in &tasks {
        store.record_received(task).await?;
    }
    let claim = |task: &Task| Claim {
        id: task.id,
        attempt: task.attempt,
        change: Change::default(),
        executor: ExecutorClass::parse("echo").expect("a class name"),
        limit: 2,
        dispatcher: 7,
    };
    let mut claims: Vec<Claim> = tasks.iter().map(claim).collect();
    claims.push(claim(&tasks[0]));
    let claimed = store.claim_many(&claims).await?;
    let changed = |c: &Claimed| matches!(c, Claimed::Applied(a) if a.changed());
    assert!(changed(&claimed[0]) && changed(&claimed[1]), "{claimed:?}");
    assert_eq!(claimed[2], Claimed::Full { active: 2 });
    assert_eq!(claimed[3], Claimed::Full { active: 2 });
    assert_eq!(
        claimed[4],
        Claimed::Applied(Applied::Duplicate),
        "a claimed attempt is claimed, full or not"
    );

    let ended = Change {
        finished_at: Some(chrono::Utc::now()),
        ..Change::default()
    };
    store
        .transition(tasks[0].id, tasks[0].attempt, TaskState::Succeeded, &ended)
        .await?;
    assert!(changed(&store.claim(&claims[2]).await?));
    assert_eq!(store.claim(&claims[3]).await?, Claimed::Full { active: 2 });
    env.cleanup().await
}
