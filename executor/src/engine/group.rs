//! A child program that leads its own process group, so that stopping it stops everything
//! it started.

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Child;
use tracing::warn;

/// Secrets of the executor that a program it starts has no use for: removed from its
/// environment.
pub(super) const HIDDEN_ENV: [&str; 2] = ["GANTRY_AMQP_URL", "GANTRY_DATABASE_URL"];

/// The program, leader of its own process group.
pub(super) struct Group {
    pub(super) child: Child,
    pub(super) pid: Pid,
    reaped: bool,
}

impl Group {
    pub(super) fn new(child: Child) -> Option<Group> {
        let pid = Pid::from_raw(i32::try_from(child.id()?).ok()?);
        Some(Group {
            child,
            pid,
            reaped: false,
        })
    }

    /// Asks the group to stop with SIGTERM, waits up to `grace` for the leader to exit,
    /// then kills and reaps whatever is left.
    pub(super) async fn terminate(&mut self, grace: Duration) {
        match killpg(self.pid, Signal::SIGTERM) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => warn!(pgid = self.pid.as_raw(), error = %e, "cannot send SIGTERM"),
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            warn!(
                pid = self.pid.as_raw(),
                ?grace,
                "the program did not exit within its grace after SIGTERM; killing it"
            );
        }
        self.kill_and_reap().await;
    }

    /// SIGKILLs every process left in the group.
    fn kill(&self) {
        match killpg(self.pid, Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                warn!(pgid = self.pid.as_raw(), error = %e, "cannot kill the command's process group")
            }
        }
    }

    /// Kills the group and waits for the leader to exit.
    pub(super) async fn kill_and_reap(&mut self) {
        self.kill();
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot reap the command"),
            Err(_) => warn!(
                pid = self.pid.as_raw(),
                "the command did not die within 10s of SIGKILL"
            ),
        }
        self.reaped = true;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Only reached without kill_and_reap when the attempt itself is abandoned.
        if !self.reaped {
            self.kill();
        }
    }
}
