//! The one error type of the dispatcher library.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Shared(#[from] gantry_shared::Error),
    #[error("state directory {path}: {source}; check --state-dir and its permissions")]
    StateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another dispatcher already uses the state directory {0}; stop it or give this one its own --state-dir"
    )]
    StateDirBusy(String),
    #[error("job {job}: {message}")]
    Job { job: String, message: String },
    #[error(
        "the executor program {0} was not found; build it (cargo build --bins) or set --executor-bin / GANTRY_EXECUTOR_BIN"
    )]
    ExecutorMissing(String),
    #[error("shutting down")]
    ShuttingDown,
}

impl Error {
    /// Whether trying again (after a reconnect) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Shared(e) => e.is_transient(),
            _ => false,
        }
    }

    /// A short label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Shared(e) => e.metric_label(),
            Error::StateDir { .. } | Error::StateDirBusy(_) => "state_dir",
            Error::Job { .. } | Error::ExecutorMissing(_) => "job",
            Error::ShuttingDown => "shutdown",
        }
    }
}
