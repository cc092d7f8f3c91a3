//! Tests of the `command` engine with real programs (`sh`).

use std::future::pending;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::engine::test_support::{is_gone, task, wait_for_pids};

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

async fn run_sh(script: &str) -> Finished {
    run(&sh(script), &task(json!({"n": 1})), None, pending()).await
}

fn failure(finished: Finished) -> TaskError {
    match finished {
        Finished::Failed(error) => error,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn json_on_stdout_is_the_output() {
    let finished = run_sh(r#"cat >/dev/null; echo '{"ok":1}'"#).await;
    assert_eq!(finished, Finished::output(json!({"ok": 1})));
}

#[tokio::test]
async fn the_task_envelope_arrives_on_stdin() {
    let task = task(json!({"n": 1}));
    let Finished::Output { output, .. } = run(&sh("cat"), &task, None, pending()).await else {
        panic!("cat should echo the task");
    };
    assert_eq!(output, serde_json::to_value(&task).unwrap());
}

#[tokio::test]
async fn a_non_zero_exit_fails_with_the_stderr_tail() {
    let error = failure(run_sh("echo starting >&2; echo boom >&2; exit 3").await);
    assert_eq!(error.kind, ErrorKind::CommandFailed);
    assert_eq!(error.message, "command exited with code 3: starting\nboom");
    assert!(!error.retryable);
}

#[tokio::test]
async fn only_the_last_4_kib_of_stderr_are_kept() {
    let error = failure(
        run_sh("i=0; while [ $i -lt 2000 ]; do echo line $i >&2; i=$((i+1)); done; exit 1").await,
    );
    assert!(error.message.ends_with("line 1999"), "{}", error.message);
    assert!(!error.message.contains("line 10\n"));
    assert!(error.message.len() < 4096 + 100);
}

#[tokio::test]
async fn exit_75_is_a_retryable_failure() {
    assert!(failure(run_sh("exit 75").await).retryable);
}

#[tokio::test]
async fn a_killed_command_names_the_signal() {
    let error = failure(run_sh("echo dying >&2; kill -9 $$").await);
    assert_eq!(error.kind, ErrorKind::CommandFailed);
    assert_eq!(error.message, "killed by signal 9: dying");
}

#[tokio::test]
async fn stdout_that_is_not_json_is_bad_output() {
    let error = failure(run_sh("echo 'hello world'").await);
    assert_eq!(error.kind, ErrorKind::BadOutput);
    assert!(error.message.contains("not JSON"), "{}", error.message);
    assert!(error.message.contains("hello world"), "{}", error.message);
}

#[tokio::test]
async fn too_much_stdout_is_output_too_large() {
    let error = failure(run_sh("head -c 5000000 /dev/zero").await);
    assert_eq!(error.kind, ErrorKind::OutputTooLarge);
}

#[tokio::test]
async fn a_missing_program_is_a_spawn_failure() {
    let argv = vec!["/nonexistent/gantry-no-such-program".to_owned()];
    let error = failure(run(&argv, &task(Value::Null), None, pending()).await);
    assert_eq!(error.kind, ErrorKind::SpawnFailed);
    assert!(
        error
            .message
            .contains("/nonexistent/gantry-no-such-program"),
        "{}",
        error.message
    );
    assert!(!error.retryable);
}

#[tokio::test]
async fn background_processes_do_not_outlive_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let script = format!("sleep 30 & echo $! > {}; echo '{{}}'", pids.display());
    let started = Instant::now();
    let finished = run_sh(&script).await;
    assert_eq!(finished, Finished::output(json!({})));
    assert!(started.elapsed() < Duration::from_secs(10));
    for pid in wait_for_pids(Path::new(&pids)).await {
        assert!(is_gone(pid).await, "background sleep {pid} still runs");
    }
}

#[tokio::test]
async fn stop_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let script = format!(
        "echo $$ > {0}; sleep 30 & echo $! >> {0}; wait",
        pids.display()
    );
    let stop = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        StopReason::Signal
    };
    let started = Instant::now();
    let finished = run(&sh(&script), &task(Value::Null), None, stop).await;
    assert_eq!(finished, Finished::Stopped(StopReason::Signal));
    assert!(started.elapsed() < Duration::from_secs(5));
    let pids = wait_for_pids(Path::new(&pids)).await;
    assert_eq!(pids.len(), 2);
    for pid in pids {
        assert!(is_gone(pid).await, "{pid} still runs");
    }
}
