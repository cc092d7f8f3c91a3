//! Tests of one attempt without a broker: deadlines, signals, and the runs that end before
//! anything is published.

use std::future::pending;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value, json};

use super::*;
use crate::engine::test_support::{is_gone, task, task_due, wait_for_pids};

fn sh(script: String) -> Engine {
    Engine::Command(vec!["sh".into(), "-c".into(), script])
}

fn verdict(execution: Execution) -> Verdict {
    match execution {
        Execution::Done(verdict) => verdict,
        Execution::Exit(code) => panic!("unexpected exit {code}"),
    }
}

#[tokio::test]
async fn the_deadline_kills_the_command_group_and_expires_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let engine = sh(format!(
        "echo $$ > {0}; sleep 30 & echo $! >> {0}; wait",
        pids.display()
    ));
    let task = task_due(Value::Null, Utc::now() + Duration::from_millis(500));
    let began = Instant::now();
    let verdict = verdict(execute(&engine, &task, None, None, pending()).await);
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(verdict.status, ResultStatus::Expired);
    assert_eq!(verdict.terminal_reason, "deadline_exceeded");
    let error = verdict.error.unwrap();
    assert_eq!(error.kind, ErrorKind::DeadlineExceeded);
    assert!(!error.retryable);
    let pids = wait_for_pids(&pids).await;
    assert_eq!(pids.len(), 2, "the shell and its sleep");
    for pid in pids {
        assert!(is_gone(pid).await, "process {pid} outlived the deadline");
    }
}

#[tokio::test]
async fn a_signal_before_the_deadline_fails_the_attempt_as_retryable() {
    let shutdown = tokio::time::sleep(Duration::from_millis(200));
    let began = Instant::now();
    let verdict = verdict(
        execute(
            &sh("sleep 30".into()),
            &task(Value::Null),
            None,
            None,
            shutdown,
        )
        .await,
    );
    assert!(began.elapsed() < Duration::from_secs(5));
    assert_eq!(verdict.status, ResultStatus::Failed);
    assert_eq!(verdict.terminal_reason, "terminated");
    let error = verdict.error.unwrap();
    assert_eq!(error.kind, ErrorKind::Terminated);
    assert!(error.retryable);
}

#[tokio::test]
async fn a_task_past_its_deadline_expires_without_running() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let engine = sh(format!("touch {}; echo 1", marker.display()));
    let task = task_due(Value::Null, Utc::now() - Duration::from_secs(1));
    let verdict = verdict(execute(&engine, &task, None, None, pending()).await);
    assert_eq!(verdict.status, ResultStatus::Expired);
    assert_eq!(verdict.error.unwrap().kind, ErrorKind::DeadlineExceeded);
    assert!(!marker.exists(), "the engine ran");
}

#[tokio::test]
async fn a_finished_engine_succeeds_with_its_output() {
    let verdict =
        verdict(execute(&Engine::Echo, &task(json!({"a": 1})), None, None, pending()).await);
    assert_eq!(verdict.status, ResultStatus::Succeeded);
    assert_eq!(verdict.output, Some(json!({"a": 1})));
    assert_eq!(verdict.terminal_reason, "completed");
}

/// Settings for a run in `dir`, which is also the job directory.
fn settings(dir: &std::path::Path, engine: Engine) -> Settings {
    Settings {
        task_file: dir.join("task.json"),
        engine,
        job_dir: Some(JobDir::new(dir.to_owned())),
        termination_log: Some(dir.join("termination-log")),
        evidence: Evidence::default(),
        traceparent: None,
        reply_to: None,
        start_delay: None,
        warm: None,
    }
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test]
async fn an_unreadable_task_file_is_refused_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("task.json"), "{not json").unwrap();
    let settings = settings(dir.path(), Engine::Echo);
    let outcome = run(&settings, &Config::default(), pending()).await;
    let Outcome::Refused(reason) = &outcome else {
        panic!("expected a refusal, got {outcome:?}");
    };
    assert!(reason.contains("task.json"), "{reason}");
    assert_eq!(outcome.exit_code(), 2);
    assert!(dir.path().join("started").exists());
    let exit = read_json(&dir.path().join("exit.json"));
    assert_eq!(exit["published"], false);
    assert!(
        exit["error"]
            .as_str()
            .unwrap()
            .contains("not a gantry.task/v1")
    );
    let termination = std::fs::read_to_string(dir.path().join("termination-log")).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&termination).unwrap(), exit);
}

#[tokio::test]
async fn exit_code_leaves_started_but_no_exit_json() {
    let dir = tempfile::tempdir().unwrap();
    let body = serde_json::to_vec(&task(json!({"exit_code": 7}))).unwrap();
    std::fs::write(dir.path().join("task.json"), body).unwrap();
    let settings = settings(dir.path(), Engine::Echo);
    let outcome = run(&settings, &Config::default(), pending()).await;
    assert!(matches!(outcome, Outcome::Crash(7)), "{outcome:?}");
    assert_eq!(outcome.exit_code(), 7);
    assert_eq!(
        read_json(&dir.path().join("started"))["pid"],
        std::process::id()
    );
    assert!(!dir.path().join("exit.json").exists());
    assert!(!dir.path().join("termination-log").exists());
}
