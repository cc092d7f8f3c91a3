//! Task states and the one rule of their transitions: monotonic within an attempt, a later
//! attempt supersedes an earlier one, and a terminal state is never overwritten.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::message::{Attempt, ResultStatus};

/// The state of a task, as stored in `tasks.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Received,
    Dispatched,
    Running,
    Retrying,
    Succeeded,
    Failed,
    Expired,
    Cancelled,
    DeadLettered,
}

impl TaskState {
    pub const ALL: [TaskState; 9] = [
        TaskState::Received,
        TaskState::Dispatched,
        TaskState::Running,
        TaskState::Retrying,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Expired,
        TaskState::Cancelled,
        TaskState::DeadLettered,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            TaskState::Received => "received",
            TaskState::Dispatched => "dispatched",
            TaskState::Running => "running",
            TaskState::Retrying => "retrying",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Expired => "expired",
            TaskState::Cancelled => "cancelled",
            TaskState::DeadLettered => "dead_lettered",
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.rank() == 4
    }

    /// Whether a task entering this state is done with its attempt: terminal, or waiting
    /// to retry it. The store announces both on [`super::DONE_CHANNEL`].
    pub fn ends_attempt(&self) -> bool {
        self.rank() >= 3
    }

    fn rank(&self) -> u8 {
        match self {
            TaskState::Received => 0,
            TaskState::Dispatched => 1,
            TaskState::Running => 2,
            TaskState::Retrying => 3,
            _ => 4,
        }
    }

    /// Whether attempt `delivered` of a task that stands at `(self, attempt)` is over: the
    /// task has ended, has moved on to a later attempt, or waits to retry this one. A
    /// dispatcher never starts a job for such an attempt.
    pub fn has_ended(&self, attempt: Attempt, delivered: Attempt) -> bool {
        self.is_terminal()
            || attempt > delivered
            || (attempt == delivered && *self == TaskState::Retrying)
    }

    /// Whether moving from `(self, attempt)` to `(next, next_attempt)` is progress.
    pub fn can_become(&self, attempt: Attempt, next: TaskState, next_attempt: Attempt) -> bool {
        if self.is_terminal() {
            return false;
        }
        next_attempt > attempt || (next_attempt == attempt && next.rank() > self.rank())
    }
}

impl From<ResultStatus> for TaskState {
    fn from(s: ResultStatus) -> Self {
        match s {
            ResultStatus::Succeeded => TaskState::Succeeded,
            ResultStatus::Failed => TaskState::Failed,
            ResultStatus::Expired => TaskState::Expired,
            ResultStatus::Cancelled => TaskState::Cancelled,
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TaskState::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown task state {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::TaskState::*;
    use super::*;

    fn a(n: u32) -> Attempt {
        Attempt::new(n).expect("attempts count from 1")
    }

    #[test]
    fn states_only_move_forward() {
        assert!(Received.can_become(a(1), Dispatched, a(1)));
        assert!(Dispatched.can_become(a(1), Succeeded, a(1)));
        assert!(Running.can_become(a(1), Failed, a(1)));
        assert!(!Running.can_become(a(1), Dispatched, a(1)));
        assert!(!Running.can_become(a(1), Running, a(1)));
        assert!(Retrying.can_become(a(1), Received, a(2)));
        assert!(!Running.can_become(a(2), Succeeded, a(1)));
    }

    #[test]
    fn an_attempt_is_over_once_the_task_ended_moved_on_or_waits_to_retry_it() {
        for live in [Received, Dispatched, Running] {
            assert!(!live.has_ended(a(2), a(2)), "{live}");
            assert!(live.has_ended(a(3), a(2)), "{live} at a later attempt");
        }
        assert!(Retrying.has_ended(a(2), a(2)));
        assert!(
            !Retrying.has_ended(a(1), a(2)),
            "the retry of attempt 1 is attempt 2"
        );
        for terminal in [Succeeded, Failed, Expired, Cancelled, DeadLettered] {
            assert!(terminal.has_ended(a(1), a(1)));
            assert!(terminal.has_ended(a(1), a(2)));
        }
    }

    #[test]
    fn a_terminal_state_is_never_overwritten() {
        for terminal in [Succeeded, Failed, Expired, Cancelled, DeadLettered] {
            for next in TaskState::ALL {
                assert!(!terminal.can_become(a(1), next, a(1)));
                assert!(!terminal.can_become(a(1), next, a(2)));
            }
        }
    }

    #[test]
    fn states_round_trip_through_text() {
        for s in TaskState::ALL {
            assert_eq!(s.as_str().parse::<TaskState>(), Ok(s));
        }
    }
}
