//! The one error type of `gantry-cli`'s library.

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when declaring the topology or handling dead letters. Each
/// variant says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading Postgres through the client library failed (see [`gantry_producer::Error`]).
    #[error(transparent)]
    Producer(#[from] gantry_producer::Error),

    /// The configuration cannot be used (for example a prefix with spaces).
    #[error(transparent)]
    Config(Box<gantry_shared::Error>),

    /// RabbitMQ could not be reached, refused an operation, or did not answer in time.
    #[error(transparent)]
    Broker(Box<gantry_shared::Error>),

    /// An exchange or queue already exists with other arguments than Gantry declares.
    #[error(transparent)]
    TopologyConflict(Box<gantry_shared::Error>),

    /// Postgres could not be reached or a query failed.
    #[error("Postgres at {url}: {source}")]
    Database {
        /// The database URL with its password hidden.
        url: String,
        #[source]
        source: Box<gantry_shared::Error>,
    },

    /// A time on the command line that is neither RFC 3339 nor a duration.
    #[error(
        "{input:?} is neither an RFC 3339 time (2026-11-23T10:00:00Z) nor a duration back from now (90s, 2h, 7d): {reason}"
    )]
    InvalidTime { input: String, reason: String },

    /// A replay or purge was asked for without saying which dead letters.
    #[error(
        "say which dead letters to {action}: --id ID, --all, or a filter (--reason, --executor, --task, --task-id, --since, --until); `gantry dlq list` shows what is there"
    )]
    NothingSelected {
        /// `replay` or `purge`.
        action: &'static str,
    },

    /// `<prefix>.dead` does not exist on the broker.
    #[error(
        "queue {queue} does not exist: check the prefix ({prefix}), or declare the topology with `gantry topology apply`"
    )]
    NoDeadQueue { queue: String, prefix: String },

    /// Another `gantry dlq replay` or `purge` is reading the dead-letter queue.
    #[error(
        "another consumer holds {queue} exclusively (another `gantry dlq replay` or `purge` is running?); wait for it to finish and run this again"
    )]
    DeadQueueBusy { queue: String },
}

impl Error {
    /// A short label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Producer(e) => e.metric_label(),
            Error::Config(_) => "config",
            Error::Broker(_) | Error::NoDeadQueue { .. } | Error::DeadQueueBusy { .. } => "amqp",
            Error::TopologyConflict(_) => "topology",
            Error::Database { .. } => "postgres",
            Error::InvalidTime { .. } | Error::NothingSelected { .. } => "usage",
        }
    }

    pub(crate) fn config(e: gantry_shared::Error) -> Self {
        Error::Config(Box::new(e))
    }

    /// A broker error; a topology conflict keeps its own variant.
    pub(crate) fn broker(e: gantry_shared::Error) -> Self {
        match e {
            gantry_shared::Error::TopologyConflict { .. } => Error::TopologyConflict(Box::new(e)),
            other => Error::Broker(Box::new(other)),
        }
    }
}
