//! Waiting for a condition, never for a fixed time.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// Re-checks `probe` every 50 ms until it yields a value or `timeout` passes: waiting for a
/// condition, never for a fixed time.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until process `pid` no longer exists.
pub async fn process_gone(what: &str, pid: i32, timeout: Duration) -> Result<()> {
    eventually(what, timeout, || async {
        let alive = kill(Pid::from_raw(pid), None).is_ok();
        Ok((!alive).then_some(()))
    })
    .await
}
