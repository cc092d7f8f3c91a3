//! The hand-offs' lifecycle writes: an attempt's `dispatched` (its claim) and `running`,
//! counted as they happen.

use gantry_shared::message::{Attempt, ExecutorClass, Task, TaskId};
use gantry_shared::store::{Applied, Change, TaskState};

use super::role::Role;
use crate::Result;
use crate::runtime::Runtime;

/// Records that the task's attempt entered `state` with `change`, counting it when it did
/// (not when another delivery had recorded it already); a Celery client that asked is told
/// when it runs.
///
/// # Errors
/// A write that Postgres refuses, or [`Error::ShuttingDown`].
pub(super) async fn record<R: Runtime>(
    role: &Role<R>,
    class: &ExecutorClass,
    task: &Task,
    state: TaskState,
    change: &Change,
) -> Result<Applied> {
    record_attempt(role, class, task.id, task.attempt, state, change).await
}

/// [`record`] for an attempt known by its task id.
///
/// # Errors
/// A write that Postgres refuses, or [`Error::ShuttingDown`].
pub(super) async fn record_attempt<R: Runtime>(
    role: &Role<R>,
    class: &ExecutorClass,
    id: TaskId,
    attempt: Attempt,
    state: TaskState,
    change: &Change,
) -> Result<Applied> {
    let what = match state {
        TaskState::Dispatched => "record dispatched",
        _ => "record running",
    };
    let applied = role
        .ctx
        .persist(what, || {
            role.lifecycle.transition(id, attempt, state, change)
        })
        .await?;
    if applied.changed() {
        role.ctx.metrics.task_entered(class.as_str(), state);
        if state == TaskState::Running {
            crate::celery::started(&role.ctx, id).await;
        }
    }
    Ok(applied)
}
