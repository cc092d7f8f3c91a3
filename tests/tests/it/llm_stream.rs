//! Streamed LLM tasks, end to end: a real dispatcher on the local runtime runs the executor,
//! which starts the real model server (`gantry_tests::llm`) and sends its pieces as
//! progress; the client library and `gantry submit --stream` follow them to the stored
//! result. A stream also ends exactly for a class that sends no progress, and with the
//! timeout for a task that does not end. And a payload the class cannot take is refused
//! before it is published.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::TryStreamExt;
use gantry_producer::{
    Error, ExecutorClass, Progress, StreamEvent, TaskName, TaskRecord, TaskSpec, TaskState,
    TaskStream,
};
use gantry_shared::message::Rejection;
use gantry_tests::by_hand::{gantry, gantry_command, stderr, stdout};
use gantry_tests::llm::{self, MODEL_NAME};
use gantry_tests::{TestEnv, echo_spec};
use serde_json::{Value, json};

/// Longest a streamed task may take: the executor starts the model server (a few seconds),
/// which then writes a few dozen tokens.
const LLM_PATIENCE: Duration = Duration::from_secs(180);

/// A catalog whose class `chat` runs the real model server in each job.
async fn chat_catalog() -> anyhow::Result<String> {
    let server = tokio::task::spawn_blocking(llm::server_argv).await??;
    Ok(format!(
        "executors:\n  chat:\n    engine: {{ kind: openai, model: {MODEL_NAME}, server: {}, startup_timeout: 60s }}\n    max_active_jobs: 2\n",
        serde_json::to_string(&server)?
    ))
}

/// A task of class `chat` carrying `payload`.
fn chat(payload: Value) -> anyhow::Result<TaskSpec> {
    Ok(TaskSpec {
        executor: ExecutorClass::parse("chat")?,
        name: TaskName::parse("llm.chat")?,
        payload,
        ttl: Duration::from_secs(600),
        reply_to: None,
        idempotency_key: None,
        priority: None,
        resources: None,
    })
}

/// Every event of `stream`, which must be pieces and then the end, and nothing else.
async fn pieces_and_end(stream: TaskStream) -> anyhow::Result<(Vec<Progress>, TaskRecord)> {
    let mut events: Vec<StreamEvent> = stream.try_collect().await?;
    let Some(StreamEvent::Finished(record)) = events.pop() else {
        bail!("the last event is not the end: {events:?}");
    };
    let pieces = events
        .into_iter()
        .map(|event| match event {
            StreamEvent::Progress(piece) => Ok(piece),
            other => Err(anyhow::anyhow!("an event that is not a piece: {other:?}")),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((pieces, *record))
}

/// Checks that the pieces are the one attempt's, numbered 0, 1, 2, … without a gap, and
/// returns their text joined.
fn joined_in_order(pieces: &[Progress], record: &TaskRecord) -> String {
    for (i, piece) in pieces.iter().enumerate() {
        assert_eq!(
            piece.seq, i as u64,
            "pieces out of order or lost: {pieces:?}"
        );
        assert_eq!(piece.task_id, record.task_id);
        assert_eq!(piece.attempt, record.attempt);
    }
    pieces.iter().map(|p| p.delta.as_str()).collect()
}

/// The stored result's `output`.
fn output(record: &TaskRecord) -> &Value {
    record
        .result
        .as_ref()
        .and_then(|r| r.get("output"))
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn a_streamed_chat_comes_piece_by_piece_and_the_pieces_are_the_stored_answer()
-> anyhow::Result<()> {
    let env = TestEnv::new(Some(&chat_catalog().await?)).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let payload = json!({
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 24,
        "temperature": 0,
    });

    let stream = producer
        .submit_streaming(chat(payload)?, LLM_PATIENCE)
        .await?;
    let id = stream.task_id();
    let (pieces, record) = pieces_and_end(stream).await?;

    assert_eq!(record.task_id, id);
    assert_eq!(record.state, TaskState::Succeeded, "{record:?}");
    assert!(!pieces.is_empty(), "no progress came");
    let text = joined_in_order(&pieces, &record);
    let output = output(&record);
    assert_eq!(output["message"]["content"], text, "{output}");
    assert_eq!(
        output["usage"]["completion_tokens"],
        pieces.len(),
        "{output}"
    );
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_streamed_completion_comes_piece_by_piece_and_the_pieces_are_the_stored_text()
-> anyhow::Result<()> {
    let env = TestEnv::new(Some(&chat_catalog().await?)).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;
    let payload = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0});

    let stream = producer
        .submit_streaming(chat(payload)?, LLM_PATIENCE)
        .await?;
    let (pieces, record) = pieces_and_end(stream).await?;

    assert_eq!(record.state, TaskState::Succeeded, "{record:?}");
    assert!(!pieces.is_empty(), "no progress came");
    let text = joined_in_order(&pieces, &record);
    let output = output(&record);
    assert_eq!(output["text"], text, "{output}");
    assert_eq!(
        output["usage"]["completion_tokens"],
        pieces.len(),
        "{output}"
    );
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn submit_stream_json_prints_the_pieces_on_stderr_and_the_result_on_stdout()
-> anyhow::Result<()> {
    let env = TestEnv::new(Some(&chat_catalog().await?)).await?;
    let _dispatcher = env.dispatcher().await?;
    let payload = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#;
    let args = [
        "submit",
        "--executor",
        "chat",
        "--task",
        "llm.chat",
        "--payload",
        payload,
        "--wait",
        "--stream",
        "--json",
    ];

    let run = gantry_command(&env).args(args).output();
    let output = tokio::time::timeout(LLM_PATIENCE, run)
        .await
        .context("gantry submit --stream did not finish")??;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let view: Value = serde_json::from_str(&stdout(&output)).context("one JSON object")?;
    assert_eq!(view["state"], "succeeded", "{view}");
    let content = view["output"]["message"]["content"]
        .as_str()
        .with_context(|| format!("no content: {view}"))?;
    assert!(!content.is_empty(), "{view}");
    assert!(
        view["output"]["usage"]["completion_tokens"].as_u64() >= Some(1),
        "{view}"
    );
    // The pieces, as they came, then the newline that ends them: nothing else.
    let pieces = stderr(&output);
    let printed = pieces.strip_suffix('\n').unwrap_or(&pieces);
    assert_eq!(printed, content, "stderr: {pieces:?}");
    env.cleanup().await
}

/// A catalog whose class `chat` is served by a server that never needs to run: the task is
/// refused before any job could start.
const CATALOG_NO_SERVER: &str = "executors:\n  chat:\n    engine: { kind: openai, model: tiny, endpoint: \"http://127.0.0.1:9\" }\n";

/// The payload no chat takes: a robot is not a role.
fn robot() -> Value {
    json!({"messages": [{"role": "robot", "content": "x"}]})
}

#[tokio::test]
async fn submit_with_a_catalog_refuses_a_bad_payload_naming_the_field_and_publishes_nothing()
-> anyhow::Result<()> {
    let env = TestEnv::new(Some(CATALOG_NO_SERVER)).await?;
    let catalog = env.catalog_path.display().to_string();
    let payload = robot().to_string();
    let output = gantry(
        &env,
        &[
            "submit",
            "--executor",
            "chat",
            "--task",
            "llm.chat",
            "--payload",
            &payload,
            "--catalog",
            &catalog,
            "--stream",
        ],
    )
    .await?;

    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(stdout(&output), "");
    let text = stderr(&output);
    assert!(text.contains("payload.messages[0].role"), "{text}");
    assert!(text.contains("was not submitted"), "{text}");
    assert_eq!(env.queue_depth(&env.task_queue("chat")?).await?, 0);
    let stored: i64 = env
        .sql()
        .await?
        .query_one("SELECT count(*) FROM tasks", &[])
        .await?
        .get(0);
    assert_eq!(stored, 0);
    env.cleanup().await
}

#[tokio::test]
async fn a_producer_with_a_catalog_refuses_a_bad_payload_before_publishing() -> anyhow::Result<()> {
    let env = TestEnv::new(Some(CATALOG_NO_SERVER)).await?;
    let producer = env.producer().await?.with_catalog(env.catalog.clone());

    let Err(refused) = producer.submit(chat(robot())?).await else {
        bail!("a payload with the role robot was submitted");
    };
    let Error::Rejected(Rejection::BadPayload { field, .. }) = &refused else {
        bail!("not a rejected payload: {refused:?}");
    };
    assert_eq!(field, "payload.messages[0].role");
    let Err(refused) = producer
        .submit_streaming(chat(robot())?, LLM_PATIENCE)
        .await
    else {
        bail!("a payload with the role robot was streamed");
    };
    assert!(matches!(refused, Error::Rejected(_)), "{refused:?}");
    assert_eq!(env.queue_depth(&env.task_queue("chat")?).await?, 0);
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_class_that_does_not_stream_ends_the_stream_with_its_result_alone() -> anyhow::Result<()>
{
    let env = TestEnv::new(None).await?;
    let _dispatcher = env.dispatcher().await?;
    let producer = env.producer().await?;

    let stream = producer
        .submit_streaming(echo_spec("stream.echo", json!({"n": 1}))?, LLM_PATIENCE)
        .await?;
    let (pieces, record) = pieces_and_end(stream).await?;

    assert!(pieces.is_empty(), "{pieces:?}");
    assert_eq!(record.state, TaskState::Succeeded, "{record:?}");
    assert_eq!(output(&record), &json!({"n": 1}));
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_stream_whose_task_does_not_end_in_time_ends_with_the_timeout() -> anyhow::Result<()> {
    let env = TestEnv::new(None).await?;
    let producer = env.producer().await?;

    let mut stream = producer
        .submit_streaming(
            echo_spec("stream.echo", json!({}))?,
            Duration::from_millis(500),
        )
        .await?;
    let id = stream.task_id();

    let Err(e) = stream.try_next().await else {
        bail!("an event although no dispatcher runs");
    };
    assert!(e.is_timeout(), "{e}");
    assert!(e.to_string().contains(&format!("gantry wait {id}")), "{e}");
    assert!(stream.try_next().await?.is_none(), "the stream goes on");
    assert_eq!(env.queue_depth(&env.task_queue("echo")?).await?, 1);
    producer.close().await;
    env.cleanup().await
}

#[tokio::test]
async fn streaming_without_the_progress_exchange_says_to_declare_the_topology() -> anyhow::Result<()>
{
    let env = TestEnv::without_topology(None).await?;
    let producer = env.producer().await?;

    let Err(refused) = producer
        .submit_streaming(echo_spec("stream.echo", json!({}))?, LLM_PATIENCE)
        .await
    else {
        bail!("streamed without a topology");
    };
    let Error::NoExchange { exchange, .. } = &refused else {
        bail!("not a missing exchange: {refused:?}");
    };
    assert_eq!(exchange, &env.topology().progress_exchange());
    assert!(
        refused.to_string().contains("gantry topology apply"),
        "{refused}"
    );
    producer.close().await;
    env.cleanup().await
}
