//! Helpers for tests of the engines: a task envelope, and checks that processes are gone.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use gantry_shared::message::{TaskEnvelope, TaskId};
use serde_json::Value;

/// An echo task with `payload`, due far in the future.
pub(crate) fn task(payload: Value) -> TaskEnvelope {
    task_due(payload, "2999-01-01T00:00:00Z".parse().unwrap())
}

/// A task with `payload` and `deadline`.
pub(crate) fn task_due(payload: Value, deadline: DateTime<Utc>) -> TaskEnvelope {
    TaskEnvelope {
        task_id: TaskId::new(),
        task: "demo.echo".into(),
        executor: "echo".into(),
        payload,
        deadline,
        resources: None,
        idempotency_key: None,
        priority: None,
        submitted_at: Utc::now(),
        attempt: 1,
        stream: false,
    }
}

/// The pids a test script wrote to `path`, one a line, once the file is complete.
pub(crate) async fn wait_for_pids(path: &Path) -> Vec<i32> {
    for _ in 0..50 {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return text.lines().map(|l| l.trim().parse().unwrap()).collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} was never written", path.display());
}

/// Whether `pid` has exited within two seconds. A zombie counts as gone: it no longer runs
/// and waits only for whoever adopted it to reap it.
pub(crate) async fn is_gone(pid: i32) -> bool {
    for _ in 0..100 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat) => {
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|s| s.trim().chars().next());
                if matches!(state, Some('Z' | 'X')) {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
