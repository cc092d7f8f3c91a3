//! The `openai` engine against a real OpenAI-compatible server (llama.cpp's, on CPU, with a
//! tiny random model): answers with usage, the server's refusals, a server that never gets
//! ready, one that dies mid-generation, cancel and the deadline while it generates, and a
//! bad payload refused before any job starts.
//!
//! The tiny model never ends an answer by itself, so every answer runs to `max_tokens`; on
//! this server a few thousand tokens take seconds, which is what the mid-generation
//! scenarios need.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use gantry_producer::Producer;
use gantry_shared::message::{ExecutorClass, Progress, Task, TaskId, TaskName, TaskSpec};
use gantry_shared::retry;
use gantry_shared::store::{TaskRecord, TaskState};
use gantry_tests::by_hand::{gantry, stderr, stdout};
use gantry_tests::{TestEnv, eventually, llm};
use lapin::options::{BasicConsumeOptions, QueueBindOptions};
use lapin::types::FieldTable;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// The catalog of these tests: `chat` (a 512-token context, retried up to 3 attempts),
/// `long` (an 8192-token context, for answers that take seconds) and `never` (a server
/// whose readiness path never answers 200).
fn catalog() -> anyhow::Result<String> {
    let server = llm::server_argv()?;
    let long: Vec<String> = server
        .iter()
        .map(|a| if a == "512" { "8192".into() } else { a.clone() })
        .collect();
    let (server, long) = (
        serde_json::to_string(&server)?,
        serde_json::to_string(&long)?,
    );
    Ok(format!(
        "executors:
  chat:
    engine: {{ kind: openai, model: tiny, server: {server}, startup_timeout: 90s, stop_grace: 5s }}
    max_active_jobs: 2
    retry: {{ max_attempts: 3, min_delay: 1s, max_delay: 1s }}
  long:
    engine: {{ kind: openai, model: tiny, server: {long}, startup_timeout: 90s, stop_grace: 5s }}
    max_active_jobs: 2
    retry: {{ max_attempts: 2, min_delay: 1s, max_delay: 1s }}
  never:
    engine: {{ kind: openai, model: tiny, server: {server}, ready_path: /health, startup_timeout: 3s, stop_grace: 5s }}
    max_active_jobs: 1
    retry: {{ max_attempts: 1 }}
"
    ))
}

fn spec(class: &str, payload: Value, ttl: Duration) -> anyhow::Result<TaskSpec> {
    Ok(TaskSpec {
        executor: ExecutorClass::parse(class)?,
        name: TaskName::parse("llm.test")?,
        payload,
        ttl,
        reply_to: None,
        idempotency_key: None,
        priority: None,
        resources: None,
    })
}

fn chat(max_tokens: u64) -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "temperature": 0})
}

/// The stored result envelope of a finished task.
fn result_of(record: &TaskRecord) -> anyhow::Result<&Value> {
    record
        .result
        .as_ref()
        .context("a finished task has its result stored")
}

/// Submits `spec` with streaming on, and a queue that gets its progress (bound before the
/// task is published, so nothing is missed).
async fn submit_streaming(
    env: &TestEnv,
    producer: &Producer,
    spec: TaskSpec,
) -> anyhow::Result<(Task, lapin::Consumer, lapin::Channel)> {
    let mut task = producer.new_task(spec)?;
    task.stream = true;
    let channel = env.channel().await?;
    let queue = env.reply_queue(&channel).await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            env.topology().progress_exchange().into(),
            task.id.to_string().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "llm-test".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    producer.submit_task(&task).await?;
    Ok((task, consumer, channel))
}

/// The next progress message, within a minute.
async fn next_progress(consumer: &mut lapin::Consumer) -> anyhow::Result<Progress> {
    let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.next())
        .await
        .context("no progress within a minute")?
        .context("the progress consumer ended")??;
    Progress::from_amqp(&delivery.properties, &delivery.data)
        .map_err(|r| anyhow::anyhow!("not a progress message: {r}"))
}

/// The model server's process group, as the executor records it in its job directory.
async fn server_group(env: &TestEnv, id: TaskId, attempt: u32) -> anyhow::Result<Pid> {
    let file: PathBuf = env
        .dir
        .path()
        .join("state/jobs")
        .join(format!("gantry-{}-a{attempt}", id.as_uuid().simple()))
        .join("engine.pgid");
    eventually(
        "the model server's process group",
        Duration::from_secs(30),
        || async {
            Ok(std::fs::read_to_string(&file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .map(Pid::from_raw))
        },
    )
    .await
}

/// Waits until no process of the group is left.
async fn gone(group: Pid) -> anyhow::Result<()> {
    eventually(
        "the model server to be stopped",
        Duration::from_secs(30),
        || async { Ok(killpg(group, None).is_err().then_some(())) },
    )
    .await
}

#[tokio::test]
async fn a_chat_and_a_completion_succeed_with_their_usage_recorded() -> anyhow::Result<()> {
    let env = TestEnv::new(Some(&catalog()?)).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let chat_id = producer
        .submit(spec("chat", chat(16), Duration::from_secs(300))?)
        .await?;
    let completion_id = producer
        .submit(spec(
            "chat",
            json!({"prompt": "Once upon a time", "max_tokens": 8, "seed": 1, "stop": ["zzz"]}),
            Duration::from_secs(300),
        )?)
        .await?;

    let record = producer.wait(chat_id, Duration::from_secs(180)).await?;
    assert_eq!(record.state, TaskState::Succeeded, "{record:?}");
    let result = result_of(&record)?;
    let output = &result["output"];
    assert_eq!(output["message"]["role"], "assistant");
    assert!(
        !output["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{output}"
    );
    // The tiny model never stops by itself: every answer runs to max_tokens.
    assert_eq!(output["finish_reason"], "length");
    assert_eq!(output["model"], "tiny");
    assert_eq!(output["usage"]["completion_tokens"], 16);
    assert_eq!(output["usage"]["counted_by"], "server");
    let prompt_tokens = output["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    assert!(prompt_tokens > 0, "{output}");
    assert_eq!(output["usage"]["total_tokens"], prompt_tokens + 16);
    // The result's own usage, as every engine reports it.
    assert_eq!(result["usage"]["completion_tokens"], 16);
    assert_eq!(result["usage"]["prompt_tokens"], prompt_tokens);
    assert!(
        output["timings"]["server_start_ms"].as_u64().is_some(),
        "{output}"
    );
    assert!(
        output["timings"]["generation_ms"].as_u64().is_some(),
        "{output}"
    );
    // Not streamed: there is no first token to time.
    assert_eq!(output["timings"]["time_to_first_token_ms"], Value::Null);
    assert!(
        record.job_name.is_some() && record.node.is_some(),
        "{record:?}"
    );

    let record = producer
        .wait(completion_id, Duration::from_secs(180))
        .await?;
    assert_eq!(record.state, TaskState::Succeeded, "{record:?}");
    let output = &result_of(&record)?["output"];
    assert!(
        output["text"].as_str().is_some_and(|t| !t.is_empty()),
        "{output}"
    );
    assert_eq!(output["usage"]["completion_tokens"], 8);
    assert!(output.get("message").is_none(), "{output}");
    Ok(())
}

#[tokio::test]
async fn a_prompt_over_the_context_fails_once_with_the_servers_message() -> anyhow::Result<()> {
    let env = TestEnv::new(Some(&catalog()?)).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let long_prompt = "hello world ".repeat(1000);
    let id = producer
        .submit(spec(
            "chat",
            json!({"messages": [{"role": "user", "content": long_prompt}], "max_tokens": 16}),
            Duration::from_secs(300),
        )?)
        .await?;
    let record = producer.wait(id, Duration::from_secs(180)).await?;
    assert_eq!(record.state, TaskState::Failed, "{record:?}");
    // The class retries up to 3 attempts, but a refusal is not worth another.
    assert_eq!(record.attempt.get(), 1, "{record:?}");
    let error = record
        .error
        .as_ref()
        .context("a failed task has its error")?;
    assert_eq!(error["kind"], "engine_refused", "{error}");
    assert_eq!(error["retryable"], false, "{error}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("HTTP 400"), "{message}");
    assert!(
        message.contains("maximum context length is 512"),
        "{message}"
    );
    Ok(())
}

#[tokio::test]
async fn a_server_that_never_gets_ready_fails_within_its_startup_timeout() -> anyhow::Result<()> {
    let env = TestEnv::new(Some(&catalog()?)).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let id = producer
        .submit(spec("never", chat(4), Duration::from_secs(300))?)
        .await?;
    let record = producer.wait(id, Duration::from_secs(120)).await?;
    // Retryable, but the class allows one attempt: its attempts are spent.
    assert_eq!(record.state, TaskState::DeadLettered, "{record:?}");
    let error = record
        .error
        .as_ref()
        .context("a failed task has its error")?;
    assert_eq!(error["kind"], "engine_start_failed", "{error}");
    assert_eq!(error["retryable"], true, "{error}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("startup_timeout of 3s"), "{message}");
    assert!(
        message.contains("/health never answered 200 (the last answer: HTTP 404)"),
        "{message}"
    );
    // The server's log ends the message: it did start, it just never said it was ready.
    assert!(message.contains("the server's log ends:"), "{message}");
    let result = result_of(&record)?;
    let ran = |field: &str| -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
        Ok(serde_json::from_value(result[field].clone())?)
    };
    let took = (ran("finished_at")? - ran("started_at")?).to_std()?;
    // The startup timeout, then at most the server's stop grace and some slack.
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(3 + 5 + 10),
        "{took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_server_killed_mid_generation_is_retried_and_the_retry_succeeds() -> anyhow::Result<()> {
    let env = TestEnv::new(Some(&catalog()?)).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let (task, mut progress, _channel) = submit_streaming(
        &env,
        &producer,
        spec(
            "long",
            json!({"prompt": "hi", "max_tokens": 3000, "temperature": 0}),
            Duration::from_secs(600),
        )?,
    )
    .await?;
    let first = next_progress(&mut progress).await?;
    assert_eq!((first.attempt.get(), first.seq), (1, 0));
    let group = server_group(&env, task.id, 1).await?;
    kill(group, Signal::SIGKILL)?;

    let record = producer.wait(task.id, Duration::from_secs(300)).await?;
    assert_eq!(record.state, TaskState::Succeeded, "{record:?}");
    assert_eq!(record.attempt.get(), 2, "{record:?}");
    assert_eq!(
        result_of(&record)?["output"]["usage"]["completion_tokens"],
        3000
    );
    let events = producer.events(task.id).await?;
    let failed = events
        .iter()
        .find(|e| e.attempt.get() == 1 && e.event == "retrying")
        .context("attempt 1 is retried")?;
    let detail = failed.detail.clone().unwrap_or_default().to_string();
    assert!(detail.contains("engine_failed"), "{detail}");
    // The second attempt streamed again from the start.
    let mut seen_second = false;
    while !seen_second {
        let p = next_progress(&mut progress).await?;
        seen_second = p.attempt.get() == 2 && p.seq == 0;
    }
    Ok(())
}

#[tokio::test]
async fn cancel_mid_stream_stops_the_request_and_the_server() -> anyhow::Result<()> {
    let env = TestEnv::new(Some(&catalog()?)).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let (task, mut progress, _channel) = submit_streaming(
        &env,
        &producer,
        spec(
            "long",
            json!({"prompt": "hi", "max_tokens": 6000}),
            Duration::from_secs(600),
        )?,
    )
    .await?;
    next_progress(&mut progress).await?;
    let group = server_group(&env, task.id, 1).await?;
    let out = gantry(&env, &["cancel", &task.id.to_string()]).await?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let record = producer.wait(task.id, Duration::from_secs(60)).await?;
    assert_eq!(record.state, TaskState::Cancelled, "{record:?}");
    gone(group).await?;
    Ok(())
}

#[tokio::test]
async fn the_deadline_mid_generation_expires_the_task_and_stops_the_server() -> anyhow::Result<()> {
    let env = TestEnv::new(Some(&catalog()?)).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let (task, mut progress, _channel) = submit_streaming(
        &env,
        &producer,
        spec(
            "long",
            json!({"prompt": "hi", "max_tokens": 8000}),
            Duration::from_secs(15),
        )?,
    )
    .await?;
    // Generating had begun before the deadline: it passes mid-generation.
    next_progress(&mut progress).await?;
    let group = server_group(&env, task.id, 1).await?;
    let record = producer.wait(task.id, Duration::from_secs(120)).await?;
    assert_eq!(record.state, TaskState::Expired, "{record:?}");
    let error = record
        .error
        .as_ref()
        .context("an expired task has its error")?;
    assert_eq!(error["kind"], "deadline_exceeded", "{error}");
    gone(group).await?;
    Ok(())
}

#[tokio::test]
async fn a_bad_payload_for_an_openai_class_is_dead_lettered_naming_the_field() -> anyhow::Result<()>
{
    let env = TestEnv::new(Some(&catalog()?)).await?;
    let _dispatcher = env.dispatcher().await?;
    // Published as any backend might, without the client's check.
    let task = Task::new(
        spec(
            "chat",
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}),
            Duration::from_secs(300),
        )?,
        &Default::default(),
    )?;
    let (body, props) = task.to_amqp(chrono::Utc::now())?;
    env.publisher()
        .await?
        .publish(
            &env.topology().tasks_exchange(),
            "chat",
            &body,
            props,
            true,
            retry::for_at_most(Duration::from_secs(10)),
        )
        .await?;
    let store = env.store().await?;
    let letters = eventually("the dead letter", Duration::from_secs(60), || async {
        let rows = store.dead_letters(10).await?;
        Ok((!rows.is_empty()).then_some(rows))
    })
    .await?;
    let reason = &letters[0].3;
    assert!(
        reason.starts_with("invalid: payload.temperature: must be a number from 0 to 2"),
        "{reason}"
    );
    // No job ran: there is no job directory for it.
    assert!(
        !env.dir
            .path()
            .join("state/jobs")
            .join(format!("gantry-{}-a1", task.id.as_uuid().simple()))
            .exists()
    );
    Ok(())
}

#[tokio::test]
async fn a_server_that_runs_out_of_memory_fails_the_task_as_oom() -> anyhow::Result<()> {
    // The real server, under a memory limit its KV cache cannot fit in: llama.cpp fails
    // to allocate it, as vLLM fails on a GPU too small for its cache.
    let mut server = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        "ulimit -v 1000000; exec \"$0\" \"$@\"".to_owned(),
    ];
    server.extend(
        llm::server_argv()?
            .into_iter()
            .map(|a| if a == "512" { "4000000".into() } else { a }),
    );
    let catalog = format!(
        "executors:\n  chat:\n    engine: {{ kind: openai, model: tiny, server: {}, startup_timeout: 90s }}\n    retry: {{ max_attempts: 3, min_delay: 1s, max_delay: 1s }}\n",
        serde_json::to_string(&server)?
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let id = producer
        .submit(spec("chat", chat(4), Duration::from_secs(300))?)
        .await?;
    let record = producer.wait(id, Duration::from_secs(120)).await?;
    assert_eq!(record.state, TaskState::Failed, "{record:?}");
    // Not retried: the same request would run out again.
    assert_eq!(record.attempt.get(), 1, "{record:?}");
    let error = record
        .error
        .as_ref()
        .context("a failed task has its error")?;
    assert_eq!(error["kind"], "oom", "{error}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("exited"), "{message}");
    assert!(message.contains("failed to allocate"), "{message}");
    Ok(())
}
