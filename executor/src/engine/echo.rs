//! The `echo` engine: returns the task's payload as its output. It exists for tests, so a
//! payload object may carry knobs that make it behave like real work going wrong:
//!
//! | knob | effect |
//! |---|---|
//! | `stderr` (string) | written to stderr first (to test log capture) |
//! | `sleep_ms` (integer) | sleep that long (deadlines and SIGTERM apply) |
//! | `exit_code` (0..=255) | then exit with that code, publishing nothing (a crash) |
//! | `fail` (true or a message) | then fail with kind `echo_failed` |
//! | `retryable` (bool) | whether that failure is retryable (default false) |
//!
//! A knob of the wrong type fails the task with kind `invalid_payload`.

use std::io::Write;
use std::time::Duration;

use gantry_shared::message::{ErrorKind, TaskEnvelope, TaskError};
use serde_json::{Map, Value};
use tracing::{info, warn};

use super::finished::{Finished, StopReason, permanent};

/// The knobs found in a payload.
#[derive(Debug, Default, PartialEq)]
struct Knobs {
    stderr: Option<String>,
    sleep: Option<Duration>,
    exit_code: Option<u8>,
    fail: Option<TaskError>,
}

impl Knobs {
    /// Reads the knobs of a payload; a payload that is not an object has none.
    fn parse(payload: &Value) -> Result<Knobs, String> {
        let Value::Object(map) = payload else {
            return Ok(Knobs::default());
        };
        let retryable = match map.get("retryable") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(format!("retryable must be true or false, not {other}")),
        };
        let fail = match map.get("fail") {
            None | Some(Value::Null | Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some("failed on request".to_owned()),
            Some(Value::String(message)) => Some(message.clone()),
            Some(other) => {
                return Err(format!("fail must be true or a message, not {other}"));
            }
        };
        Ok(Knobs {
            stderr: match map.get("stderr") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => return Err(format!("stderr must be a string, not {other}")),
            },
            sleep: integer(map, "sleep_ms", u64::MAX)?.map(Duration::from_millis),
            exit_code: integer(map, "exit_code", 255)?.and_then(|c| u8::try_from(c).ok()),
            fail: fail.map(|message| TaskError {
                kind: ErrorKind::EchoFailed,
                message,
                retryable,
            }),
        })
    }
}

/// An optional integer knob in `0..=max`.
fn integer(map: &Map<String, Value>, name: &str, max: u64) -> Result<Option<u64>, String> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| *n <= max)
            .map(Some)
            .ok_or_else(|| format!("{name} must be an integer from 0 to {max}, not {v}")),
    }
}

/// Runs the echo engine.
pub(super) async fn run(task: &TaskEnvelope, stop: impl Future<Output = StopReason>) -> Finished {
    let knobs = match Knobs::parse(&task.payload) {
        Ok(knobs) => knobs,
        Err(detail) => {
            return Finished::Failed(permanent(
                ErrorKind::InvalidPayload,
                format!("the echo engine's payload has a bad knob: {detail}"),
            ));
        }
    };
    if let Some(text) = &knobs.stderr {
        write_stderr(text);
    }
    if let Some(sleep) = knobs.sleep {
        info!(?sleep, "sleeping as the payload asks");
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            reason = stop => return Finished::Stopped(reason),
        }
    }
    if let Some(code) = knobs.exit_code {
        return Finished::Exit(code);
    }
    match knobs.fail {
        Some(error) => Finished::Failed(error),
        None => Finished::output(task.payload.clone()),
    }
}

fn write_stderr(text: &str) {
    let mut line = text.to_owned();
    if !line.ends_with('\n') {
        line.push('\n');
    }
    if let Err(e) = std::io::stderr().write_all(line.as_bytes()) {
        warn!(error = %e, "cannot write the payload's stderr text");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_support::task;
    use serde_json::json;
    use std::future::pending;

    async fn echo(payload: Value) -> Finished {
        run(&task(payload), pending()).await
    }

    #[tokio::test]
    async fn the_output_is_the_whole_payload() {
        let payload = json!({"prompt": "hi", "n": [1, 2]});
        assert_eq!(echo(payload.clone()).await, Finished::output(payload));
        assert_eq!(echo(json!("text")).await, Finished::output(json!("text")));
    }

    #[tokio::test]
    async fn fail_with_a_message_fails_with_that_message() {
        let Finished::Failed(error) = echo(json!({"fail": "model refused"})).await else {
            panic!("expected a failure");
        };
        assert_eq!(error.kind, ErrorKind::EchoFailed);
        assert_eq!(error.message, "model refused");
        assert!(!error.retryable);
    }

    #[tokio::test]
    async fn fail_true_is_retryable_only_when_asked() {
        let Finished::Failed(error) = echo(json!({"fail": true, "retryable": true})).await else {
            panic!("expected a failure");
        };
        assert_eq!(error.message, "failed on request");
        assert!(error.retryable);
        let payload = json!({"fail": false});
        assert_eq!(echo(payload.clone()).await, Finished::output(payload));
    }

    #[tokio::test]
    async fn exit_code_comes_after_the_sleep_and_before_fail() {
        let finished = echo(json!({"sleep_ms": 1, "exit_code": 7, "fail": true})).await;
        assert_eq!(finished, Finished::Exit(7));
    }

    #[tokio::test]
    async fn a_knob_of_the_wrong_type_fails_the_task() {
        for payload in [
            json!({"sleep_ms": "soon"}),
            json!({"exit_code": 300}),
            json!({"fail": 3}),
            json!({"fail": true, "retryable": "yes"}),
            json!({"stderr": 1}),
        ] {
            let Finished::Failed(error) = echo(payload.clone()).await else {
                panic!("{payload} should fail");
            };
            assert_eq!(error.kind, ErrorKind::InvalidPayload, "{payload}");
        }
    }

    #[tokio::test]
    async fn stop_interrupts_the_sleep() {
        let finished = run(&task(json!({"sleep_ms": 60_000})), async {
            StopReason::Signal
        })
        .await;
        assert_eq!(finished, Finished::Stopped(StopReason::Signal));
    }
}
