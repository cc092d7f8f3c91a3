//! Exit codes: what a script learns from `gantry` without reading its output.

use std::process::ExitCode;

use gantry_shared::store::TaskState;

/// How `gantry` ends. The numbers are documented in `gantry --help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// The task succeeded, or the command did its job.
    Done = 0,
    /// The task failed, expired, was cancelled or dead-lettered; or it is not known.
    TaskDidNotSucceed = 1,
    /// Usage error, invalid task or payload, RabbitMQ or Postgres unreachable.
    Usage = 2,
    /// The wait timed out; the task is still queued or running.
    TimedOut = 3,
}

impl Exit {
    /// `dlq show` of an unknown dead letter; a `dlq replay` or `purge` that left some of the
    /// dead letters it selected in the queue, or was interrupted.
    pub(crate) const INCOMPLETE: Exit = Exit::TaskDidNotSucceed;

    /// The exit for a task that a wait returned.
    pub(crate) fn for_state(state: TaskState) -> Exit {
        match state {
            TaskState::Succeeded => Exit::Done,
            TaskState::Failed
            | TaskState::Expired
            | TaskState::Cancelled
            | TaskState::DeadLettered => Exit::TaskDidNotSucceed,
            TaskState::Received
            | TaskState::Dispatched
            | TaskState::Running
            | TaskState::Retrying => Exit::TimedOut,
        }
    }

    /// The exit for a command that failed with `error`.
    pub(crate) fn for_error(error: &anyhow::Error) -> Exit {
        match error.downcast_ref::<gantry_producer::Error>() {
            Some(e) if e.is_timeout() => Exit::TimedOut,
            _ => Exit::Usage,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use gantry_shared::message::TaskId;

    #[test]
    fn only_success_exits_zero() {
        assert_eq!(Exit::for_state(TaskState::Succeeded), Exit::Done);
        for state in [
            TaskState::Failed,
            TaskState::Expired,
            TaskState::Cancelled,
            TaskState::DeadLettered,
        ] {
            assert_eq!(Exit::for_state(state), Exit::TaskDidNotSucceed, "{state}");
        }
        for state in [
            TaskState::Received,
            TaskState::Dispatched,
            TaskState::Running,
            TaskState::Retrying,
        ] {
            assert_eq!(Exit::for_state(state), Exit::TimedOut, "{state}");
        }
        assert_eq!(Exit::TaskDidNotSucceed as u8, 1);
        assert_eq!(Exit::Usage as u8, 2);
        assert_eq!(Exit::TimedOut as u8, 3);
    }

    #[test]
    fn a_timeout_exits_three_and_other_errors_two() {
        let timeout = gantry_producer::Error::WaitTimeout {
            task_id: TaskId::new(),
            waited: "1s".into(),
            state: Some(TaskState::Running),
        };
        let e = Err::<(), _>(timeout).context("waiting").unwrap_err();
        assert_eq!(Exit::for_error(&e), Exit::TimedOut);
        assert_eq!(
            Exit::for_error(&anyhow::anyhow!("bad payload")),
            Exit::Usage
        );
    }
}
