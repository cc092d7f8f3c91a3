//! The backoff policy for reconnects and transient failures, built on `backon`.

use std::time::Duration;

use backon::ExponentialBuilder;

/// Exponential backoff with jitter from 100 ms up to 5 s between tries, without end: used where
/// giving up would lose work (the recorder, the dispatcher's consumers). Callers bound it
/// with their shutdown signal.
pub fn forever() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

/// The same backoff, giving up after `total` has passed (for the CLI and start-up checks).
pub fn for_at_most(total: Duration) -> ExponentialBuilder {
    forever().with_total_delay(Some(total))
}
