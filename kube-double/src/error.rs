//! What the double's helpers report when they fail.

use std::time::Duration;

/// A failure of a [`KubeDouble`](crate::KubeDouble) helper.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A wait ended before its condition held.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
    /// A stored object did not decode as its type.
    #[error("decoding the {kind}")]
    Decode {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
