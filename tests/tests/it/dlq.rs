//! `gantry dlq`: dead letters of every kind are listed with their reason; a replay moves
//! each selected dead letter exactly once, at the asked rate, even when killed half-way; a
//! dry run changes nothing; filters select exactly what they say; a purge removes only what
//! it was told to, and never without confirmation.

use std::collections::{HashMap, HashSet};
use std::process::{Output, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::{StreamExt, TryStreamExt};
use gantry_cli::dlq::{DeadLetters, ReplayOptions, Selection};
use gantry_shared::amqp::Publisher;
use gantry_shared::message::{ExecutorClass, Limits, Task, TaskId, TaskName, TaskSpec, headers};
use gantry_shared::retry;
use gantry_shared::store::DeadLetterFilter;
use gantry_tests::by_hand::{gantry_command, stderr, stdout};
use gantry_tests::queue_state;
use gantry_tests::{TestEnv, amqp_url, eventually};
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, ShortString};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use uuid::Uuid;

/// Long enough for a thousand echo jobs on a busy two-core machine.
const PATIENCE: Duration = Duration::from_secs(240);

fn spec(executor: &str, ttl: Duration) -> TaskSpec {
    TaskSpec {
        executor: ExecutorClass::parse(executor).expect("class"),
        name: TaskName::parse("dlq.echo").expect("name"),
        payload: json!({"hello": "dead letters"}),
        ttl,
        reply_to: None,
        idempotency_key: None,
        priority: None,
        resources: None,
    }
}

/// Publishes `n` echo tasks whose TTL runs out before anything consumes them (no
/// dispatcher runs), and waits until all of them are in `<prefix>.dead`.
async fn expire_in_queue(env: &TestEnv, n: usize, ttl: Duration) -> anyhow::Result<Vec<TaskId>> {
    let producer = env.producer().await?;
    let ids: Vec<TaskId> = futures_util::stream::iter(0..n)
        .map(|_| producer.submit(spec("echo", ttl)))
        .buffer_unordered(32)
        .try_collect()
        .await?;
    producer.close().await;
    let dead = env.topology().dead_queue();
    eventually(
        "the tasks to expire into the dead-letter queue",
        PATIENCE,
        || async { Ok((env.queue_depth(&dead).await? as usize >= n).then_some(())) },
    )
    .await?;
    Ok(ids)
}

/// Publishes a dead letter straight to the dead-letter exchange, as the dispatcher does
/// when it refuses a task: a valid task of `executor`, with `reason` and `dead_at`.
async fn dead_letter(
    env: &TestEnv,
    publisher: &Publisher,
    executor: &str,
    reason: &str,
    dead_at: DateTime<Utc>,
) -> anyhow::Result<(Uuid, TaskId)> {
    let task = Task::new(spec(executor, Duration::from_secs(600)), &Limits::default())?;
    let (body, props) = task.to_amqp(Utc::now())?;
    let id = Uuid::new_v4();
    let queue = format!("{}.tasks.{executor}", env.prefix);
    let mut table = props.headers().clone().unwrap_or_default();
    let mut put = |k: &str, v: &str| {
        table.insert(k.into(), AMQPValue::LongString(v.into()));
    };
    put(headers::REASON, reason);
    put(headers::DEAD_LETTER_ID, &id.to_string());
    put(headers::ORIGINAL_QUEUE, &queue);
    put(headers::ORIGINAL_ROUTING_KEY, executor);
    table.insert(
        headers::DEAD_AT.into(),
        AMQPValue::Timestamp(dead_at.timestamp() as u64),
    );
    let message_id = ShortString::from(task.id.to_string());
    let props = BasicProperties::default()
        .with_message_id(message_id.clone())
        .with_correlation_id(message_id)
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(table);
    publisher
        .publish(
            &env.topology().dlx(),
            &queue,
            &body,
            props,
            true,
            retry::for_at_most(Duration::from_secs(10)),
        )
        .await?;
    Ok((id, task.id))
}

/// Publishes the same dead letter `copies` times, as an at-least-once dead-lettering or
/// a replay whose ack was lost can leave it: one id, one task.
async fn duplicated_dead_letter(
    env: &TestEnv,
    publisher: &Publisher,
    copies: usize,
) -> anyhow::Result<(Uuid, TaskId)> {
    let task = Task::new(spec("echo", Duration::from_secs(600)), &Limits::default())?;
    let (body, props) = task.to_amqp(Utc::now())?;
    let id = Uuid::new_v4();
    let mut table = props.headers().clone().unwrap_or_default();
    table.insert(
        headers::REASON.into(),
        AMQPValue::LongString("max_attempts: failed on every attempt".into()),
    );
    table.insert(
        headers::DEAD_LETTER_ID.into(),
        AMQPValue::LongString(id.to_string().into()),
    );
    table.insert(
        headers::ORIGINAL_ROUTING_KEY.into(),
        AMQPValue::LongString("echo".into()),
    );
    let message_id = ShortString::from(task.id.to_string());
    let props = BasicProperties::default()
        .with_message_id(message_id.clone())
        .with_correlation_id(message_id)
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(table);
    for _ in 0..copies {
        publisher
            .publish(
                &env.topology().dlx(),
                "echo",
                &body,
                props.clone(),
                true,
                retry::for_at_most(Duration::from_secs(10)),
            )
            .await?;
    }
    Ok((id, task.id))
}

/// Whether a dead letter `(executor, reason kind, died in the last two hours)` should match.
type Expect = fn(&str, &str, bool) -> bool;

/// Waits until the recorder has recorded `n` dead letters.
async fn recorded(env: &TestEnv, n: i64) -> anyhow::Result<()> {
    let dl = DeadLetters::new(&env.config())?;
    let all = DeadLetterFilter {
        include_handled: true,
        ..DeadLetterFilter::default()
    };
    eventually("the dead letters to be recorded", PATIENCE, || async {
        Ok((dl.list(&all, 1, 1).await?.total >= n).then_some(()))
    })
    .await
}

/// Waits until `queue` holds exactly `n` messages and nobody consumes it.
async fn settles_at(queue: &str, n: u32) -> anyhow::Result<()> {
    eventually(
        &format!("{queue} to hold {n} messages"),
        PATIENCE,
        || async { Ok((queue_state(queue).await? == (n, 0)).then_some(())) },
    )
    .await
}

/// `gantry args` against this test's world, given the time a replay of a thousand tasks
/// takes.
async fn run(env: &TestEnv, args: &[&str]) -> anyhow::Result<Output> {
    let out = tokio::time::timeout(PATIENCE, gantry_command(env).args(args).output()).await??;
    Ok(out)
}

/// Waits until every task is `succeeded` at attempt 2, then checks each has exactly one
/// `replayed` and one `succeeded` event of attempt 2.
async fn all_succeed_once_at_attempt_2(env: &TestEnv, ids: &[TaskId]) -> anyhow::Result<()> {
    let db = env.sql().await?;
    let wanted: Vec<Uuid> = ids.iter().map(TaskId::as_uuid).collect();
    eventually("every replayed task to succeed", PATIENCE, || async {
        let done: i64 = db
            .query_one(
                "SELECT count(*) FROM tasks WHERE task_id = ANY($1) AND state = 'succeeded' AND attempt = 2",
                &[&wanted],
            )
            .await?
            .get(0);
        Ok((done as usize == ids.len()).then_some(()))
    })
    .await?;
    let rows = db
        .query(
            "SELECT task_id,
                    count(*) FILTER (WHERE event = 'replayed' AND attempt = 2),
                    count(*) FILTER (WHERE event = 'succeeded' AND attempt = 2),
                    count(*) FILTER (WHERE attempt > 2)
               FROM task_events WHERE task_id = ANY($1) GROUP BY task_id",
            &[&wanted],
        )
        .await?;
    assert_eq!(rows.len(), ids.len(), "every task has a history");
    for r in rows {
        let (id, replayed, succeeded, later): (Uuid, i64, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        assert_eq!(
            (replayed, succeeded, later),
            (1, 1, 0),
            "task {id}: one replay, one success, no third attempt"
        );
    }
    Ok(())
}

#[tokio::test]
async fn each_reason_appears_in_the_listing_with_its_reason() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let topology = env.topology();
    let dead = topology.dead_queue();

    // expired: a 300 ms TTL runs out in the queue while no dispatcher runs.
    let expired = expire_in_queue(&env, 1, Duration::from_millis(300)).await?[0];

    // delivery_limit: a consumer that rejects the same task again and again.
    let producer = env.producer().await?;
    let poison = producer
        .submit(spec("echo", Duration::from_secs(600)))
        .await?;
    let conn = gantry_shared::amqp::connect(&amqp_url().into(), "gantry-tests", PATIENCE).await?;
    let channel = conn.create_channel().await?;
    let queue = format!("{}.tasks.echo", env.prefix);
    let mut gets = 0;
    while let Some(m) = channel
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await?
    {
        gets += 1;
        m.delivery
            .acker
            .reject(BasicRejectOptions { requeue: true })
            .await?;
        anyhow::ensure!(
            gets <= 20,
            "the delivery limit never dead-lettered the task"
        );
    }
    let _ = conn.close(200, "ok".into()).await;
    assert_eq!(
        gets, 11,
        "delivered once, then redelivered up to the limit of 10"
    );
    settles_at(&dead, 2).await?;

    // invalid: an executor class no catalog knows, refused by the running dispatcher.
    let dispatcher = env.dispatcher().await?;
    let task = Task::new(spec("echo", Duration::from_secs(600)), &Limits::default())?;
    let (body, props) = task.to_amqp(Utc::now())?;
    let mut body: Value = serde_json::from_slice(&body)?;
    body["executor"] = json!("vlm");
    let publisher = env.publisher().await?;
    publisher
        .publish(
            &topology.tasks_exchange(),
            "echo",
            &serde_json::to_vec(&body)?,
            props,
            true,
            retry::for_at_most(Duration::from_secs(10)),
        )
        .await?;
    recorded(&env, 3).await?;

    let dl = DeadLetters::new(&env.config())?;
    let listing = dl.list(&DeadLetterFilter::default(), 1, 50).await?;
    assert_eq!(listing.total, 3);
    let by_kind: HashMap<&str, _> = listing
        .dead_letters
        .iter()
        .map(|d| (d.reason_kind.as_str(), d))
        .collect();
    let reason = |kind: &str| {
        by_kind
            .get(kind)
            .map(|d| d.reason.clone())
            .unwrap_or_default()
    };
    assert!(
        reason("invalid").starts_with("invalid: unknown executor \"vlm\""),
        "{}",
        reason("invalid")
    );
    assert!(
        reason("expired").starts_with("expired: the task's TTL ran out while it waited in"),
        "{}",
        reason("expired")
    );
    assert!(
        reason("delivery_limit").starts_with("delivery_limit: delivered too many times"),
        "{}",
        reason("delivery_limit")
    );
    assert_eq!(
        by_kind["expired"].task_id,
        Some(expired.as_uuid()),
        "the expired dead letter is the expired task's"
    );
    assert_eq!(by_kind["delivery_limit"].task_id, Some(poison.as_uuid()));
    for kind in ["invalid", "expired", "delivery_limit"] {
        let filter = DeadLetterFilter {
            reason_kind: Some(kind.into()),
            ..DeadLetterFilter::default()
        };
        assert_eq!(dl.list(&filter, 1, 50).await?.total, 1, "{kind}");
    }
    assert_eq!(dl.queue_depth().await?, 3);
    assert_eq!(dl.unhandled().await?, 3);

    // The real CLI, as an operator runs it.
    let out = run(&env, &["dlq", "list", "--json"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        out.stderr.is_empty(),
        "no mismatch warning: {}",
        stderr(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["total"], 3);
    assert_eq!(v["queue_depth"], 3);
    assert_eq!(
        (v["page"].clone(), v["limit"].clone()),
        (json!(1), json!(50))
    );
    let kinds: HashSet<&str> = v["dead_letters"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["reason_kind"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        kinds,
        HashSet::from(["invalid", "expired", "delivery_limit"])
    );

    let out = run(&env, &["dlq", "list"]).await?;
    let table = stdout(&out);
    assert!(
        table.contains(&format!("{dead} holds 3 messages now")),
        "{table}"
    );
    assert!(table.contains("page 1 of 1, 3 matching"), "{table}");

    let invalid = by_kind["invalid"].id.to_string();
    let out = run(&env, &["dlq", "show", &invalid]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let shown = stdout(&out);
    assert!(
        shown.contains("invalid: unknown executor \"vlm\""),
        "{shown}"
    );
    assert!(
        shown.contains("\"executor\": \"vlm\""),
        "the body is pretty JSON: {shown}"
    );
    let out = run(&env, &["dlq", "show", &Uuid::new_v4().to_string()]).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no dead letter has id"));

    // A replay with nowhere to go fails, keeps its dead letter and leaves its task alone.
    let invalid_task = TaskId::from(by_kind["invalid"].task_id.unwrap_or_default());
    let before = dl.tracker().events(invalid_task).await?;
    let out = run(&env, &["dlq", "replay", "--reason", "invalid", "--yes"]).await?;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(
        printed.contains("no queue takes executor class \"vlm\""),
        "{printed}"
    );
    assert!(
        printed.contains("replayed 0 of 1 matching dead letter"),
        "{printed}"
    );
    settles_at(&dead, 3).await?;
    assert_eq!(dl.tracker().events(invalid_task).await?, before);

    dispatcher.stop().await?;
    publisher.close().await;
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_thousand_dead_letters_are_replayed_exactly_once_at_the_asked_rate() -> anyhow::Result<()>
{
    let env = TestEnv::new(None).await?;
    let ids = expire_in_queue(&env, 1000, Duration::from_millis(200)).await?;
    let dispatcher = env.dispatcher().await?;
    recorded(&env, 1000).await?;

    let dl = DeadLetters::new(&env.config())?;
    let options = ReplayOptions {
        rate: Some(500),
        ..ReplayOptions::default()
    };
    let summary = dl
        .replay(&Selection::all(), &options, std::future::pending())
        .await?;
    assert_eq!(
        (
            summary.read,
            summary.matched,
            summary.done.len(),
            summary.kept
        ),
        (1000, 1000, 1000, 0)
    );
    assert!(summary.failed.is_empty(), "{:?}", summary.failed);
    assert!(summary.is_complete(), "{summary:?}");
    assert!(
        summary.elapsed >= Duration::from_millis(1900),
        "1,000 at 500/s take about 2 s, not {:?}",
        summary.elapsed
    );
    assert!(summary.done.iter().all(|e| e.attempt == Some(2)));

    all_succeed_once_at_attempt_2(&env, &ids).await?;
    settles_at(&env.topology().dead_queue(), 0).await?;
    let db = env.sql().await?;
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE replayed_at IS NOT NULL AND replay_count = 1), count(*) FROM dead_letters",
            &[],
        )
        .await?;
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (1000, 1000));
    dispatcher.stop().await?;
    env.cleanup().await
}

#[tokio::test]
async fn a_replay_killed_half_way_loses_nothing_and_runs_nothing_twice() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let ids = expire_in_queue(&env, 200, Duration::from_millis(200)).await?;
    let dispatcher = env.dispatcher().await?;
    recorded(&env, 200).await?;
    let dead = env.topology().dead_queue();
    let db = env.sql().await?;

    let mut first = gantry_command(&env)
        .args(["dlq", "replay", "--all", "--rate", "50", "--yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    eventually("50 dead letters replayed", PATIENCE, || async {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM dead_letters WHERE replayed_at IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        Ok((n >= 50).then_some(()))
    })
    .await?;
    let pid = first
        .id()
        .ok_or_else(|| anyhow::anyhow!("the replay exited early"))?;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL)?;
    first.wait().await?;
    // Its connection is gone once the queue has no consumer: the held messages are back.
    eventually("the killed consumer to go away", PATIENCE, || async {
        Ok((queue_state(&dead).await?.1 == 0).then_some(()))
    })
    .await?;
    let left = queue_state(&dead).await?.0;
    assert!(
        left > 0 && left < 200,
        "the kill came half-way: {left} left"
    );

    let out = run(&env, &["dlq", "replay", "--all", "--yes", "--json"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(summary["read"], left);
    assert_eq!(summary["failed"], json!([]));

    all_succeed_once_at_attempt_2(&env, &ids).await?;
    settles_at(&dead, 0).await?;
    let jobs = env.dir.path().join("state").join("jobs");
    let mut dirs: Vec<String> = std::fs::read_dir(&jobs)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<anyhow::Result<_>>()?;
    dirs.sort();
    let expected: Vec<String> = {
        let mut v: Vec<String> = ids
            .iter()
            .map(|id| format!("gantry-{}-a2", id.as_uuid().simple()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        dirs, expected,
        "exactly one attempt-2 job per task, and no other"
    );
    dispatcher.stop().await?;
    env.cleanup().await
}

#[tokio::test]
async fn a_dry_run_changes_nothing_and_lists_what_it_would_replay() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    expire_in_queue(&env, 5, Duration::from_millis(200)).await?;
    let dispatcher = env.dispatcher().await?;
    recorded(&env, 5).await?;
    dispatcher.stop().await?;
    let dead = env.topology().dead_queue();
    let db = env.sql().await?;
    let snapshot = || async {
        let tasks = db
            .query(
                "SELECT task_id, state, attempt, updated_at FROM tasks ORDER BY task_id",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                format!(
                    "{:?} {:?} {:?} {:?}",
                    r.get::<_, Uuid>(0),
                    r.get::<_, String>(1),
                    r.get::<_, i32>(2),
                    r.get::<_, DateTime<Utc>>(3)
                )
            })
            .collect::<Vec<_>>();
        let events: i64 = db
            .query_one("SELECT count(*) FROM task_events", &[])
            .await?
            .get(0);
        let handled: i64 = db
            .query_one(
                "SELECT count(*) FROM dead_letters WHERE replayed_at IS NOT NULL OR purged_at IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        anyhow::Ok((tasks, events, handled))
    };
    let before = snapshot().await?;
    let ids: HashSet<String> = db
        .query("SELECT id FROM dead_letters", &[])
        .await?
        .iter()
        .map(|r| r.get::<_, Uuid>(0).to_string())
        .collect();

    let out = run(&env, &["dlq", "replay", "--all", "--dry-run"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(
        printed.contains("dry run: would replay 5 of 5 messages"),
        "{printed}"
    );
    for id in &ids {
        assert!(printed.contains(id.as_str()), "{id} is listed: {printed}");
    }
    let out = run(
        &env,
        &["dlq", "replay", "--executor", "echo", "--dry-run", "--json"],
    )
    .await?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["dry_run"], true);
    let listed: HashSet<String> = v["done"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(listed, ids);
    assert!(
        v["done"]
            .as_array()
            .is_some_and(|a| a.iter().all(|e| e["attempt"] == 2))
    );

    settles_at(&dead, 5).await?;
    assert_eq!(
        queue_state(&format!("{}.tasks.echo", env.prefix)).await?,
        (0, 0),
        "nothing was published"
    );
    assert_eq!(
        snapshot().await?,
        before,
        "tasks, events and dead letters are unchanged"
    );
    env.cleanup().await
}

#[tokio::test]
async fn filters_select_exactly_what_they_say() -> anyhow::Result<()> {
    let catalog = "executors:\n  echo:\n    engine: { kind: echo }\n    max_active_jobs: 4\n  other:\n    engine: { kind: echo }\n    max_active_jobs: 4\n";
    let env = TestEnv::new(Some(catalog)).await?;
    let publisher = env.publisher().await?;
    let now = Utc::now();
    let hours = |h: i64| now - chrono::Duration::minutes(h * 60);
    let mut letters: Vec<(Uuid, TaskId, &str, &str)> = Vec::new();
    for (executor, reason, at, n) in [
        ("echo", "expired: ran out in the queue", hours(3), 3),
        ("echo", "invalid: payload is too large", hours(1), 2),
        ("other", "expired: ran out in the queue", hours(3), 2),
        (
            "other",
            "delivery_limit: poison",
            now - chrono::Duration::minutes(30),
            1,
        ),
    ] {
        for _ in 0..n {
            let (id, task) = dead_letter(&env, &publisher, executor, reason, at).await?;
            letters.push((id, task, executor, reason.split(':').next().unwrap_or("")));
        }
    }
    let dispatcher = env.dispatcher().await?;
    recorded(&env, 8).await?;
    let dl = DeadLetters::new(&env.config())?;

    let two_hours_ago = now - chrono::Duration::hours(2);
    let cases: [(DeadLetterFilter, Expect); 5] = [
        (
            DeadLetterFilter {
                executor: Some("echo".into()),
                ..Default::default()
            },
            |e, _, _| e == "echo",
        ),
        (
            DeadLetterFilter {
                reason_kind: Some("expired".into()),
                ..Default::default()
            },
            |_, k, _| k == "expired",
        ),
        (
            DeadLetterFilter {
                since: Some(two_hours_ago),
                ..Default::default()
            },
            |_, _, recent| recent,
        ),
        (
            DeadLetterFilter {
                until: Some(two_hours_ago),
                ..Default::default()
            },
            |_, _, recent| !recent,
        ),
        (
            DeadLetterFilter {
                executor: Some("other".into()),
                reason_kind: Some("expired".into()),
                ..Default::default()
            },
            |e, k, _| e == "other" && k == "expired",
        ),
    ];
    let recent: HashSet<Uuid> = {
        let db = env.sql().await?;
        db.query(
            "SELECT id FROM dead_letters WHERE dead_at >= $1",
            &[&two_hours_ago],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert_eq!(recent.len(), 3);
    for (filter, expect) in cases {
        // The last pass's held messages return to the queue as its channel closes, which
        // RabbitMQ finishes a moment after it says so: a pass started before reads fewer.
        settles_at(&env.topology().dead_queue(), 8).await?;
        let want: HashSet<Uuid> = letters
            .iter()
            .filter(|(id, _, e, k)| expect(e, k, recent.contains(id)))
            .map(|l| l.0)
            .collect();
        let listed: HashSet<Uuid> = dl
            .list(&filter, 1, 50)
            .await?
            .dead_letters
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(listed, want, "list {filter:?}");
        let looked = dl
            .replay(
                &Selection::filtered(filter.clone()),
                &ReplayOptions {
                    dry_run: true,
                    ..ReplayOptions::default()
                },
                std::future::pending(),
            )
            .await?;
        let matched: HashSet<Uuid> = looked.done.iter().map(|e| e.id).collect();
        assert_eq!(matched, want, "replay --dry-run {filter:?}");
        assert_eq!(looked.kept as usize, 8 - want.len());
    }

    settles_at(&env.topology().dead_queue(), 8).await?;
    let out = run(&env, &["dlq", "replay", "--executor", "other", "--yes"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("replayed 3 of 3 matching dead letters"),
        "{}",
        stdout(&out)
    );
    settles_at(&env.topology().dead_queue(), 5).await?;
    let db = env.sql().await?;
    for (id, _, executor, _) in &letters {
        let replayed: Option<DateTime<Utc>> = db
            .query_one("SELECT replayed_at FROM dead_letters WHERE id = $1", &[id])
            .await?
            .get(0);
        assert_eq!(
            replayed.is_some(),
            *executor == "other",
            "dead letter {id} of {executor}"
        );
    }
    let others: Vec<TaskId> = letters
        .iter()
        .filter(|l| l.2 == "other")
        .map(|l| l.1)
        .collect();
    all_succeed_once_at_attempt_2(&env, &others).await?;
    let reopened: i64 = db
        .query_one(
            "SELECT count(*) FROM tasks t WHERE executor = 'echo'
               AND (attempt <> 1 OR state NOT IN ('expired', 'dead_lettered')
                    OR EXISTS (SELECT 1 FROM task_events e
                                WHERE e.task_id = t.task_id AND e.event = 'replayed'))",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(reopened, 0, "no echo task was replayed");
    dispatcher.stop().await?;
    publisher.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn purge_removes_what_it_is_told_and_never_without_confirmation() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let publisher = env.publisher().await?;
    let mut old = Vec::new();
    let mut recent = Vec::new();
    for _ in 0..3 {
        old.push(
            dead_letter(
                &env,
                &publisher,
                "echo",
                "expired: long ago",
                Utc::now() - chrono::Duration::days(10),
            )
            .await?
            .0,
        );
    }
    for _ in 0..2 {
        recent.push(
            dead_letter(
                &env,
                &publisher,
                "echo",
                "expired: lately",
                Utc::now() - chrono::Duration::days(1),
            )
            .await?
            .0,
        );
    }
    let dispatcher = env.dispatcher().await?;
    recorded(&env, 5).await?;
    dispatcher.stop().await?;
    let dead = env.topology().dead_queue();
    let db = env.sql().await?;
    let purged = || async {
        let ids: HashSet<Uuid> = db
            .query(
                "SELECT id FROM dead_letters WHERE purged_at IS NOT NULL",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        anyhow::Ok(ids)
    };

    let out = run(
        &env,
        &["dlq", "purge", "--id", &old[0].to_string(), "--yes"],
    )
    .await?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    settles_at(&dead, 4).await?;
    assert_eq!(purged().await?, HashSet::from([old[0]]));

    let out = run(&env, &["dlq", "purge", "--all"]).await?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "no terminal and no --yes: refused"
    );
    assert!(stderr(&out).contains("pass --yes"), "{}", stderr(&out));
    let out = run(&env, &["dlq", "purge"]).await?;
    assert_eq!(out.status.code(), Some(2), "nothing selected: refused");
    settles_at(&dead, 4).await?;
    assert_eq!(purged().await?.len(), 1, "nothing more was purged");

    let out = run(&env, &["dlq", "purge", "--older-than", "7d", "--yes"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("purged 2 of 2 matching"),
        "{}",
        stdout(&out)
    );
    settles_at(&dead, 2).await?;
    assert_eq!(purged().await?, old.iter().copied().collect());
    let listed = DeadLetters::new(&env.config())?
        .list(&DeadLetterFilter::default(), 1, 50)
        .await?;
    let left: HashSet<Uuid> = listed.dead_letters.iter().map(|d| d.id).collect();
    assert_eq!(left, recent.into_iter().collect(), "the recent ones stay");
    publisher.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_dead_letter_replayed_twice_starts_one_attempt_and_runs_one_job() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let publisher = env.publisher().await?;
    let (id, task) = duplicated_dead_letter(&env, &publisher, 2).await?;
    let dead = env.topology().dead_queue();
    settles_at(&dead, 2).await?;
    let dispatcher = env.dispatcher().await?;
    recorded(&env, 1).await?;

    let dl = DeadLetters::new(&env.config())?;
    let summary = dl
        .replay(
            &Selection::ids([id]),
            &ReplayOptions::default(),
            std::future::pending(),
        )
        .await?;
    assert_eq!(
        summary.done.len(),
        2,
        "both copies are replayed: {summary:?}"
    );
    assert!(summary.done.iter().all(|e| e.attempt == Some(2)));
    // A later pass finds nothing: the dead letter is gone from the queue.
    let again = dl
        .replay(
            &Selection::ids([id]),
            &ReplayOptions::default(),
            std::future::pending(),
        )
        .await?;
    assert_eq!((again.read, again.matched), (0, 0));

    all_succeed_once_at_attempt_2(&env, &[task]).await?;
    settles_at(&dead, 0).await?;
    let jobs: Vec<String> = std::fs::read_dir(env.dir.path().join("state").join("jobs"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(jobs, [format!("gantry-{}-a2", task.as_uuid().simple())]);
    let record = dl
        .show(id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("recorded"))?;
    assert!(record.replayed_at.is_some());
    dispatcher.stop().await?;
    publisher.close().await;
    env.cleanup().await
}
