//! The real Celery client (celery 5 from PyPI) against a dispatcher with its Celery bridge
//! on: `send_task` and `get`, a failure raised in the caller, a time limit, an expired task
//! reported `REVOKED` (and replayed from its dead letter), a countdown honoured, revokes of
//! a queued and of a running task, a thousand tasks gathered, and the messages Gantry
//! cannot take dead-lettered with their reasons while the bridge goes on.

use std::time::Duration;

use chrono::Utc;
use gantry_shared::message::TaskId;
use gantry_shared::store::{TaskRecord, TaskState};
use gantry_tests::by_hand::{gantry, stderr, stdout};
use gantry_tests::celery::{CeleryClient, CeleryNames};
use gantry_tests::{TestEnv, eventually};
use serde_json::{Value, json};

/// `echo` runs `proj.echo` (its result is the payload, `{args, kwargs}`); `work` runs
/// `proj.work.*` with `tests/celery/work.py`, one at a time, never retried.
fn catalog() -> String {
    let work = concat!(env!("CARGO_MANIFEST_DIR"), "/celery/work.py");
    format!(
        "executors:
  echo:
    engine: {{ kind: echo }}
    max_active_jobs: 8
    celery: {{ tasks: [proj.echo] }}
  work:
    engine: {{ kind: command, command: [python3, {work}] }}
    max_active_jobs: 1
    retry: {{ max_attempts: 1 }}
    celery: {{ tasks: [\"proj.work.*\"], ttl: 10m }}
"
    )
}

/// A world with a Celery bridge, a dispatcher and a client.
struct World {
    env: TestEnv,
    names: CeleryNames,
    client: CeleryClient,
    dispatcher: gantry_tests::InProcessDispatcher,
}

impl World {
    async fn new() -> anyhow::Result<World> {
        let env = TestEnv::new(Some(&catalog())).await?;
        let names = CeleryNames::of(&env);
        let dispatcher = env.celery_dispatcher().await?;
        let client = CeleryClient::start(&names)?;
        Ok(World {
            env,
            names,
            client,
            dispatcher,
        })
    }

    async fn record(&self, id: &str) -> anyhow::Result<Option<TaskRecord>> {
        let id: TaskId = id.parse()?;
        Ok(self.env.store().await?.task(id).await?)
    }

    /// Waits until the task `id` is in `state`.
    async fn reaches(&self, id: &str, state: TaskState) -> anyhow::Result<TaskRecord> {
        let store = self.env.store().await?;
        let id: TaskId = id.parse()?;
        eventually(
            &format!("task {id} to be {state}"),
            Duration::from_secs(60),
            || async { Ok(store.task(id).await?.filter(|r| r.state == state)) },
        )
        .await
    }

    async fn cleanup(self) -> anyhow::Result<()> {
        drop(self.client);
        self.dispatcher.stop().await?;
        self.names.remove(&self.env).await?;
        self.env.cleanup().await
    }
}

const GET: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_celery_client_sends_a_task_and_gets_its_result() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    let id = w
        .client
        .send("proj.echo", json!([1, 2]), json!({"a": "b"}), json!({}))
        .await?;
    let got = w.client.get(&id, GET).await?;
    assert_eq!(got["state"], "SUCCESS", "{got}");
    assert_eq!(got["result"], json!({"args": [1, 2], "kwargs": {"a": "b"}}));

    let id = w
        .client
        .send("proj.work.add", json!([1, 2, 3]), json!({}), json!({}))
        .await?;
    let got = w.client.get(&id, GET).await?;
    assert_eq!(got["result"], json!({"sum": 6}), "{got}");

    // An ordinary Gantry task: in Postgres, and in `gantry status` under the Celery id.
    let record = w.record(&id).await?.expect("the task is recorded");
    assert_eq!(record.state, TaskState::Succeeded);
    assert_eq!(record.task, "proj.work.add");
    assert_eq!(record.executor, "work");
    assert!(
        record.forwarded_at.is_some(),
        "the reply was sent after the commit"
    );
    let origin = w
        .env
        .store()
        .await?
        .celery_origin(id.parse()?)
        .await?
        .expect("the Celery origin is kept");
    assert!(origin.reply_to.is_some());
    assert_eq!(origin.root_id.as_deref(), Some(id.as_str()));
    let out = gantry(&w.env, &["status", &id]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("succeeded"), "{}", stdout(&out));
    w.cleanup().await
}

#[tokio::test]
async fn a_failing_task_raises_in_the_caller_with_the_executors_error() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    let id = w
        .client
        .send(
            "proj.work.fail",
            json!([]),
            json!({"fail": "disk on fire"}),
            json!({}),
        )
        .await?;
    let got = w.client.get(&id, GET).await?;
    assert_eq!(got["state"], "FAILURE", "{got}");
    assert_eq!(got["exc_type"], "RuntimeError", "{got}");
    let message = got["exc"].as_str().unwrap_or_default();
    assert!(message.starts_with("command_failed: "), "{message}");
    assert!(message.contains("disk on fire"), "{message}");
    assert_eq!(
        w.record(&id).await?.map(|r| r.state),
        Some(TaskState::Failed)
    );
    w.cleanup().await
}

#[tokio::test]
async fn a_time_limit_stops_the_task_and_raises_time_limit_exceeded() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    let started = std::time::Instant::now();
    let id = w
        .client
        .send(
            "proj.work.sleep",
            json!([]),
            json!({"sleep": 120}),
            json!({"time_limit": 3}),
        )
        .await?;
    let got = w.client.get(&id, GET).await?;
    assert_eq!(got["state"], "FAILURE", "{got}");
    assert_eq!(got["exc_type"], "TimeLimitExceeded", "{got}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(
        w.record(&id).await?.map(|r| r.state),
        Some(TaskState::Expired)
    );
    w.cleanup().await
}

#[tokio::test]
async fn an_expired_task_is_not_run_reports_revoked_and_can_be_replayed() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    let id = w
        .client
        .send(
            "proj.echo",
            json!([7]),
            json!({}),
            json!({"expires_in": -10}),
        )
        .await?;
    let got = w.client.get(&id, GET).await?;
    assert_eq!(got["state"], "REVOKED", "{got}");
    assert_eq!(got["exc_type"], "TaskRevokedError", "{got}");
    let record = w.reaches(&id, TaskState::Expired).await?;
    assert!(record.dispatched_at.is_none(), "an expired task never ran");

    // Its dead letter is the Gantry task it became: `gantry dlq` lists it and replays it
    // (with a new deadline), and it runs.
    let out = gantry(&w.env, &["dlq", "list"]).await?;
    assert!(stdout(&out).contains(&id), "{}", stdout(&out));
    let out = gantry(&w.env, &["dlq", "replay", "--task-id", &id, "--yes"]).await?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let replayed = w.reaches(&id, TaskState::Succeeded).await?;
    assert_eq!(replayed.attempt.get(), 2);
    w.cleanup().await
}

#[tokio::test]
async fn a_countdown_waits_without_holding_a_delivery() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    let sent = Utc::now();
    let id = w
        .client
        .send("proj.echo", json!([1]), json!({}), json!({"countdown": 3}))
        .await?;
    // The Celery message is taken at once; the task waits in the delay queues.
    eventually(
        "the Celery queue to be empty",
        Duration::from_secs(10),
        || async {
            let (ready, _) = gantry_tests::queue_state(&w.names.queue).await?;
            Ok((ready == 0).then_some(()))
        },
    )
    .await?;
    let got = w.client.get(&id, GET).await?;
    assert_eq!(got["state"], "SUCCESS", "{got}");
    let record = w.record(&id).await?.expect("recorded");
    let waited = record.received_at - sent;
    assert!(
        waited >= chrono::Duration::milliseconds(2900),
        "received {waited} after it was sent, before its countdown of 3 s"
    );
    w.cleanup().await
}

#[tokio::test]
async fn revoke_cancels_a_queued_task_and_terminates_a_running_one() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    // `work` runs one task at a time: the second waits behind the first.
    let running = w
        .client
        .send(
            "proj.work.sleep",
            json!([]),
            json!({"sleep": 120}),
            json!({}),
        )
        .await?;
    w.reaches(&running, TaskState::Running).await?;
    // The client asked for STARTED (track_started): it sees the task run.
    let client = tokio::sync::Mutex::new(&mut w.client);
    eventually(
        "the client to see STARTED",
        Duration::from_secs(10),
        || async {
            let answer = client
                .lock()
                .await
                .call(json!({"op": "state", "id": running}), GET)
                .await?;
            Ok((answer["state"] == "STARTED").then_some(()))
        },
    )
    .await?;
    let queued = w
        .client
        .send("proj.work.add", json!([1]), json!({}), json!({}))
        .await?;

    w.client
        .call(json!({"op": "revoke", "id": queued}), GET)
        .await?;
    let got = w.client.get(&queued, GET).await?;
    assert_eq!(got["state"], "REVOKED", "{got}");
    assert_eq!(got["exc_type"], "TaskRevokedError", "{got}");

    let started = std::time::Instant::now();
    w.client
        .call(
            json!({"op": "revoke", "id": running, "terminate": true}),
            GET,
        )
        .await?;
    let got = w.client.get(&running, GET).await?;
    assert_eq!(got["state"], "REVOKED", "{got}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the revoke did not wait for the work"
    );
    let record = w.reaches(&running, TaskState::Cancelled).await?;
    assert_eq!(record.attempt.get(), 1);
    // The job is stopped: its executor ends and the dispatcher marks the job handled.
    let job = w
        .env
        .dir
        .path()
        .join("state/jobs")
        .join(format!("gantry-{}-a1", running.replace('-', "")));
    eventually(
        "the revoked job to be stopped",
        Duration::from_secs(30),
        || async { Ok(job.join("handled").exists().then_some(())) },
    )
    .await?;
    // The queued one never ran, and stays revoked once its message reaches the dispatcher.
    let queued_record = w.reaches(&queued, TaskState::Cancelled).await?;
    assert!(queued_record.dispatched_at.is_none(), "{queued_record:?}");
    w.cleanup().await
}

#[tokio::test]
async fn gantry_cancel_of_a_celery_task_tells_its_client_revoked() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    let id = w
        .client
        .send("proj.echo", json!([1]), json!({}), json!({"countdown": 60}))
        .await?;
    // Its origin is kept once the bridge has taken it.
    let store = w.env.store().await?;
    let task: TaskId = id.parse()?;
    eventually(
        "the bridge to take the task",
        Duration::from_secs(30),
        || async { Ok(store.celery_origin(task).await?.map(|_| ())) },
    )
    .await?;
    let out = gantry(&w.env, &["cancel", &id]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("REVOKED"), "{}", stdout(&out));
    let got = w.client.get(&id, GET).await?;
    assert_eq!(got["state"], "REVOKED", "{got}");
    w.cleanup().await
}

#[tokio::test]
async fn a_thousand_tasks_are_sent_and_gathered() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    let answer = w
        .client
        .call(
            json!({"op": "many", "name": "proj.echo", "count": 1000, "timeout": 600}),
            Duration::from_secs(660),
        )
        .await?;
    assert_eq!(answer["gathered"], 1000, "{answer}");
    assert_eq!(answer["wrong"], 0, "{answer}");
    let db = w.env.sql().await?;
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'succeeded'), count(*) FROM tasks",
            &[],
        )
        .await?;
    let (succeeded, all): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((succeeded, all), (1000, 1000));
    w.cleanup().await
}

#[tokio::test]
async fn messages_gantry_cannot_take_are_dead_lettered_with_a_reason_and_the_bridge_goes_on()
-> anyhow::Result<()> {
    let mut w = World::new().await?;
    let mut expected = Vec::new();
    for (kind, reason) in [
        ("protocol1", "protocol 1"),
        ("pickle", "task_serializer"),
        ("malformed", "invalid: eta: \"not a time\""),
    ] {
        let answer = w
            .client
            .call(json!({"op": "raw", "kind": kind, "name": "proj.echo"}), GET)
            .await?;
        expected.push((
            kind,
            reason,
            answer["id"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    let unclaimed = w
        .client
        .send("nobody.claims.this", json!([]), json!({}), json!({}))
        .await?;
    expected.push(("unclaimed", "no executor class claims", unclaimed));

    let db = w.env.sql().await?;
    let reasons: Vec<String> = eventually("four dead letters", Duration::from_secs(30), || async {
        let rows = db
            .query("SELECT reason FROM dead_letters ORDER BY dead_at", &[])
            .await?;
        let reasons: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        Ok((reasons.len() >= 4).then_some(reasons))
    })
    .await?;
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    for (kind, reason, _) in &expected {
        assert!(
            reasons.iter().any(|r| r.contains(reason)),
            "{kind}: no dead letter says {reason:?}: {reasons:?}"
        );
    }
    let out = gantry(&w.env, &["dlq", "list"]).await?;
    assert!(stdout(&out).contains("protocol 1"), "{}", stdout(&out));
    // A protocol 2 message names its task: it is in `gantry status`, and the client that
    // waits for it is told why it will not run.
    let (_, _, unclaimed) = &expected[3];
    let got = w.client.get(unclaimed, GET).await?;
    assert_eq!(got["state"], "FAILURE", "{got}");
    assert!(
        got["exc"]
            .as_str()
            .unwrap_or_default()
            .contains("no executor class claims"),
        "{got}"
    );
    for (kind, _, id) in &expected[1..] {
        let record = w.reaches(id, TaskState::DeadLettered).await?;
        assert!(record.dispatched_at.is_none(), "{kind}: {record:?}");
    }

    // The bridge goes on.
    let id = w
        .client
        .send("proj.echo", json!(["still here"]), json!({}), json!({}))
        .await?;
    let got: Value = w.client.get(&id, GET).await?;
    assert_eq!(got["state"], "SUCCESS", "{got}");
    w.cleanup().await
}
