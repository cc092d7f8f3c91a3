//! The dispatch role's own state ([`Role`]): the shared context, the runtime its jobs run
//! on, the writer of its lifecycle writes, the jobs it follows, and who it is among the
//! dispatchers on the database.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use gantry_shared::message::JobName;

use crate::context::Ctx;
use crate::lifecycle::Lifecycle;
use crate::runtime::Runtime;

/// What every part of the dispatch role shares.
pub(crate) struct Role<R: Runtime> {
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) runtime: R,
    /// The hand-offs' Postgres writes, committed in groups.
    pub(crate) lifecycle: Lifecycle,
    following: Mutex<HashSet<JobName>>,
    /// The warm executors and the tasks in hand on each.
    pub(crate) warm: super::pools::Pools,
    /// This process's presence id, which its claims carry (`super::adopt`).
    pub(crate) dispatcher: i64,
    /// Told when the store announces an attempt's end: capacity may be free again.
    pub(crate) capacity_freed: tokio::sync::Notify,
    /// Whether this process holds its presence now; it claims nothing while it does not.
    pub(crate) present: tokio::sync::watch::Sender<bool>,
}

impl<R: Runtime> Role<R> {
    pub(crate) fn new(ctx: Arc<Ctx>, runtime: R, dispatcher: i64) -> Role<R> {
        let lifecycle = Lifecycle::start(ctx.store.clone(), ctx.metrics.lifecycle.clone());
        Role {
            ctx,
            runtime,
            lifecycle,
            following: Mutex::new(HashSet::new()),
            warm: super::pools::Pools::default(),
            dispatcher,
            capacity_freed: tokio::sync::Notify::new(),
            present: tokio::sync::watch::Sender::new(true),
        }
    }

    /// Whether a job is followed by this dispatcher.
    pub(crate) fn is_following(&self, name: &JobName) -> bool {
        self.following
            .lock()
            .map(|set| set.contains(name))
            .unwrap_or(false)
    }

    /// Claims the following of a job; `None` if something already follows it.
    pub(crate) fn follow_guard(&self, name: &JobName) -> Option<FollowGuard<'_, R>> {
        let mut set = self.following.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(name.clone()).then(|| FollowGuard {
            role: self,
            name: name.clone(),
        })
    }
}

/// Removes a job from the followed set when its follower ends.
pub(crate) struct FollowGuard<'a, R: Runtime> {
    role: &'a Role<R>,
    name: JobName,
}

impl<R: Runtime> Drop for FollowGuard<'_, R> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.role.following.lock() {
            set.remove(&self.name);
        }
    }
}
