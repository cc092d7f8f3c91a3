//! Spans exported over OTLP to a real receiver (oteltest's sink, from PyPI): a task's trace
//! holds every span of its way, each the child of the one before, across the `gantry`
//! CLI, the dispatcher and the executor; retries and a replay continue the same trace.

use std::time::Duration;

use gantry_shared::message::TaskId;
use gantry_shared::store::TaskState;
use gantry_tests::by_hand::gantry_command;
use gantry_tests::otlp::{OtlpReceiver, ReceivedSpan};
use gantry_tests::{Dispatcher, PATIENCE, TestEnv, eventually};

/// OTLP span kinds.
const CLIENT: i64 = 3;
const PRODUCER: i64 = 4;
const CONSUMER: i64 = 5;

/// A dispatcher process exporting to `receiver`, its batches sent every 100 ms.
fn traced_dispatcher(env: &TestEnv, receiver: &OtlpReceiver) -> anyhow::Result<Dispatcher> {
    Dispatcher::start(
        env,
        &[
            ("GANTRY_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
}

/// `gantry submit` exporting its span to `receiver`; the task's id.
async fn submit(
    env: &TestEnv,
    receiver: &OtlpReceiver,
    class: &str,
    payload: &str,
    reply_to: Option<&str>,
) -> anyhow::Result<TaskId> {
    let mut command = gantry_command(env);
    command
        .env("GANTRY_OTLP_ENDPOINT", receiver.endpoint())
        .args(["submit", "--executor", class, "--task", "traces.task"])
        .args(["--payload", payload]);
    if let Some(queue) = reply_to {
        command.args(["--reply-to", queue]);
    }
    let out = tokio::time::timeout(PATIENCE, command.output()).await??;
    anyhow::ensure!(
        out.status.success(),
        "gantry submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

/// The one span named `name` among `spans`.
fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span: {spans:#?}");
    found[0]
}

/// The spans of the trace whose `gantry.task_id` is `id`, all of them.
fn trace_of(spans: &[ReceivedSpan], id: TaskId) -> Vec<ReceivedSpan> {
    let id = id.to_string();
    let Some(trace) = spans
        .iter()
        .find(|s| s.attribute("gantry.task_id").as_str() == Some(id.as_str()))
        .map(|s| s.trace_id.clone())
    else {
        return Vec::new();
    };
    spans
        .iter()
        .filter(|s| s.trace_id == trace)
        .cloned()
        .collect()
}

fn count(spans: &[ReceivedSpan], name: &str) -> usize {
    spans.iter().filter(|s| s.name == name).count()
}

#[tokio::test]
async fn a_tasks_trace_holds_submit_dispatch_run_commit_and_reply_each_the_child_of_the_one_before()
-> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let env = TestEnv::new(None).await?;
    let channel = env.channel().await?;
    let reply = env.reply_queue(&channel).await?;
    let dispatcher = traced_dispatcher(&env, &receiver)?;
    let id = submit(
        &env,
        &receiver,
        "echo",
        r#"{"hello": "trace"}"#,
        Some(&reply),
    )
    .await?;

    let spans = receiver
        .wait_for("the five spans of the task", PATIENCE, |all| {
            let trace = trace_of(all, id);
            [
                "gantry.submit",
                "gantry.dispatch",
                "gantry.run",
                "gantry.commit",
                "gantry.reply",
            ]
            .iter()
            .all(|name| count(&trace, name) >= 1)
        })
        .await?;
    let trace = trace_of(&spans, id);
    assert_eq!(trace.len(), 5, "{trace:#?}");
    let submit = one(&trace, "gantry.submit");
    let dispatch = one(&trace, "gantry.dispatch");
    let run = one(&trace, "gantry.run");
    let commit = one(&trace, "gantry.commit");
    let reply_span = one(&trace, "gantry.reply");
    assert_eq!(submit.parent_span_id, "", "the submit starts the trace");
    assert_eq!(dispatch.parent_span_id, submit.span_id);
    assert_eq!(run.parent_span_id, dispatch.span_id);
    assert_eq!(commit.parent_span_id, run.span_id);
    assert_eq!(reply_span.parent_span_id, commit.span_id);
    let services: Vec<&str> = [submit, dispatch, run, commit, reply_span]
        .iter()
        .map(|s| s.service.as_str())
        .collect();
    assert_eq!(
        services,
        [
            "gantry",
            "gantry-dispatcher",
            "gantry-executor",
            "gantry-dispatcher",
            "gantry-dispatcher"
        ]
    );
    assert_eq!(
        (submit.kind, dispatch.kind, reply_span.kind),
        (PRODUCER, CONSUMER, PRODUCER)
    );
    assert_eq!(run.attribute("gantry.attempt"), 1);
    assert_eq!(commit.attribute("gantry.status"), "succeeded");

    // The same trace id is the one Postgres keeps for the task.
    let stored: Option<String> = env
        .sql()
        .await?
        .query_one(
            "SELECT traceparent FROM tasks WHERE task_id = $1",
            &[&id.as_uuid()],
        )
        .await?
        .get(0);
    assert!(
        stored.is_some_and(|tp| tp.contains(&submit.trace_id)),
        "tasks.traceparent names the trace"
    );
    dispatcher.terminate(Duration::from_secs(30))?;
    env.cleanup().await
}

#[tokio::test]
async fn a_retried_task_and_its_replay_continue_one_trace() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let catalog = "executors:\n  echo:\n    engine: { kind: echo }\n    max_active_jobs: 4\n    retry: { max_attempts: 2, min_delay: 1s, max_delay: 1s }\n";
    let env = TestEnv::new(Some(catalog)).await?;
    let dispatcher = traced_dispatcher(&env, &receiver)?;
    let id = submit(
        &env,
        &receiver,
        "echo",
        r#"{"fail": "not today", "retryable": true}"#,
        None,
    )
    .await?;
    let store = env.store().await?;
    eventually("the task to be dead-lettered", PATIENCE, || async {
        let record = store.task(id).await?;
        Ok(record
            .filter(|r| r.state == TaskState::DeadLettered)
            .map(|_| ()))
    })
    .await?;
    let replayed = tokio::time::timeout(
        PATIENCE,
        gantry_command(&env)
            .args(["dlq", "replay", "--all", "--yes"])
            .output(),
    )
    .await??;
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );

    // Attempts 1 and 2 (the retry), then 3 (the replay), each dispatched, run and
    // committed in the trace the submit began.
    let spans = receiver
        .wait_for("three attempts in the task's trace", PATIENCE, |all| {
            let trace = trace_of(all, id);
            ["gantry.dispatch", "gantry.run", "gantry.commit"]
                .iter()
                .all(|name| count(&trace, name) == 3)
        })
        .await?;
    let trace = trace_of(&spans, id);
    let submit = one(&trace, "gantry.submit");
    let mut attempts: Vec<i64> = trace
        .iter()
        .filter(|s| s.name == "gantry.dispatch")
        .map(|s| s.attribute("gantry.attempt").as_i64().unwrap_or_default())
        .collect();
    attempts.sort_unstable();
    assert_eq!(attempts, [1, 2, 3]);
    for dispatch in trace.iter().filter(|s| s.name == "gantry.dispatch") {
        assert_eq!(
            dispatch.parent_span_id, submit.span_id,
            "every attempt's dispatch is the child of the submit"
        );
        let run = trace
            .iter()
            .find(|s| s.name == "gantry.run" && s.parent_span_id == dispatch.span_id)
            .expect("each dispatch has its run");
        assert!(
            trace
                .iter()
                .any(|s| s.name == "gantry.commit" && s.parent_span_id == run.span_id),
            "each run has its commit"
        );
    }
    dispatcher.terminate(Duration::from_secs(30))?;
    env.cleanup().await
}

#[tokio::test]
async fn a_receiver_that_is_down_costs_no_task_and_is_logged_once() -> anyhow::Result<()> {
    // A port nothing listens on: every export is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let endpoint = format!("http://{closed}");
    let env = TestEnv::new(None).await?;
    let mut dispatcher = Dispatcher::start(
        &env,
        &[
            ("GANTRY_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    )?;
    let producer = env.producer().await?;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            producer
                .submit(gantry_tests::echo_spec(
                    "traces.down",
                    serde_json::json!({"i": i}),
                )?)
                .await?,
        );
    }
    for id in ids {
        let record = producer.wait(id, PATIENCE).await?;
        assert_eq!(record.state, TaskState::Succeeded);
    }
    dispatcher.wait_for_log("cannot export spans", PATIENCE)?;
    producer.close().await;
    // Its spans went out in many batches, all refused, the last at its exit.
    let log = dispatcher.log.clone();
    assert!(dispatcher.terminate(Duration::from_secs(30))?.success());
    let log = std::fs::read_to_string(log)?;
    assert_eq!(log.matches("cannot export spans").count(), 1, "{log}");
    env.cleanup().await
}

#[tokio::test]
async fn an_llm_request_is_a_genai_span_of_the_run_with_its_model_and_tokens() -> anyhow::Result<()>
{
    let receiver = OtlpReceiver::start().await?;
    let server = serde_json::to_string(&gantry_tests::llm::server_argv()?)?;
    let catalog = format!(
        "executors:\n  chat:\n    engine: {{ kind: openai, model: tiny, server: {server}, startup_timeout: 90s, stop_grace: 5s }}\n    max_active_jobs: 1\n"
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let dispatcher = traced_dispatcher(&env, &receiver)?;
    let payload =
        r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}"#;
    let id = submit(&env, &receiver, "chat", payload, None).await?;

    let spans = receiver
        .wait_for("the run's span and its request's", PATIENCE, |all| {
            let trace = trace_of(all, id);
            count(&trace, "chat tiny") == 1 && count(&trace, "gantry.run") == 1
        })
        .await?;
    let trace = trace_of(&spans, id);
    let run = one(&trace, "gantry.run");
    let request = one(&trace, "chat tiny");
    assert_eq!(request.parent_span_id, run.span_id);
    assert_eq!(request.kind, CLIENT);
    assert_eq!(request.service, "gantry-executor");
    assert_eq!(request.attribute("gen_ai.operation.name"), "chat");
    assert_eq!(request.attribute("gen_ai.system"), "openai");
    assert_eq!(request.attribute("gen_ai.request.model"), "tiny");
    // The tiny model never ends an answer by itself: it runs to max_tokens.
    assert_eq!(request.attribute("gen_ai.usage.output_tokens"), 8);
    let input = request.attribute("gen_ai.usage.input_tokens");
    assert!(input.as_i64().is_some_and(|n| n > 0), "{input}");
    assert_eq!(
        request.attribute("gen_ai.response.finish_reasons"),
        "length"
    );
    dispatcher.terminate(Duration::from_secs(30))?;
    env.cleanup().await
}

#[tokio::test]
async fn a_task_run_by_a_warm_executor_is_its_dispatchs_child_as_a_jobs_run_is()
-> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let catalog = "executors:\n  echo:\n    engine: { kind: echo }\n    max_active_jobs: 1\n    warm: { max_concurrency: 2, max_tasks_per_job: 10, idle_timeout: 1s, max_job_lifetime: 1h }\n";
    let env = TestEnv::new(Some(catalog)).await?;
    let dispatcher = traced_dispatcher(&env, &receiver)?;
    let id = submit(&env, &receiver, "echo", r#"{"warm": true}"#, None).await?;

    // The warm executor exports as it goes (every 100 ms: the local runtime passes on the
    // dispatcher's environment).
    let spans = receiver
        .wait_for("the warm run's span and its commit", PATIENCE, |all| {
            let trace = trace_of(all, id);
            count(&trace, "gantry.run") == 1 && count(&trace, "gantry.commit") == 1
        })
        .await?;
    let trace = trace_of(&spans, id);
    let dispatch = one(&trace, "gantry.dispatch");
    let run = one(&trace, "gantry.run");
    let commit = one(&trace, "gantry.commit");
    assert_eq!(run.parent_span_id, dispatch.span_id);
    assert_eq!(commit.parent_span_id, run.span_id);
    assert_eq!(run.attribute("gantry.warm"), true);
    assert_eq!(run.service, "gantry-executor");
    dispatcher.terminate(Duration::from_secs(30))?;
    env.cleanup().await
}

#[tokio::test]
async fn a_result_published_on_an_executors_behalf_is_committed_in_the_tasks_trace()
-> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;

    let receiver = OtlpReceiver::start().await?;
    let catalog = "executors:\n  echo:\n    engine: { kind: echo }\n    max_active_jobs: 2\n    retry: { max_attempts: 1 }\n";
    let env = TestEnv::new(Some(catalog)).await?;
    // An executor that ends without publishing: the dispatcher reports for it.
    let bin = env.dir.path().join("gantry-executor");
    std::fs::write(&bin, "#!/bin/sh\nexit 3\n")?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    let bin = bin.display().to_string();
    let dispatcher = Dispatcher::start(
        &env,
        &[
            ("GANTRY_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("GANTRY_EXECUTOR_BIN", &bin),
        ],
    )?;
    let id = submit(&env, &receiver, "echo", "{}", None).await?;

    let task = id.to_string();
    let of_task = |s: &ReceivedSpan| s.attribute("gantry.task_id").as_str() == Some(task.as_str());
    let spans = receiver
        .wait_for(
            "the commit of the result on the executor's behalf",
            PATIENCE,
            |all| {
                all.iter().any(|s| s.name == "gantry.commit" && of_task(s))
                    && all.iter().any(|s| s.name == "gantry.submit" && of_task(s))
            },
        )
        .await?;
    let submit = spans
        .iter()
        .find(|s| s.name == "gantry.submit" && of_task(s))
        .expect("the submit span");
    let commit = spans
        .iter()
        .find(|s| s.name == "gantry.commit" && of_task(s))
        .expect("the commit span");
    assert_eq!(
        commit.attribute("gantry.reported_by").as_str(),
        Some("dispatcher"),
        "{commit:#?}"
    );
    assert_eq!(
        commit.trace_id, submit.trace_id,
        "the commit is in the task's trace, not one of its own"
    );
    dispatcher.terminate(Duration::from_secs(30))?;
    env.cleanup().await
}
