//! The one error type of `gantry-shared`.

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the shared core. Each variant says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot reach RabbitMQ at {url}: {source}; check GANTRY_AMQP_URL and that the broker runs"
    )]
    AmqpConnect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error(
        "the RabbitMQ URL {url} is not valid ({message}); set GANTRY_AMQP_URL to amqp://USER:PASSWORD@HOST:PORT/VHOST"
    )]
    AmqpUrl { url: String, message: String },
    #[error("RabbitMQ {operation} failed: {source}")]
    Amqp {
        operation: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error(
        "RabbitMQ did not answer {operation} within {timeout:?}; is the broker overloaded or blocked by an alarm?"
    )]
    AmqpTimeout {
        operation: &'static str,
        timeout: std::time::Duration,
    },
    #[error(
        "no queue is bound for routing key {routing_key:?} on exchange {exchange:?}; run `gantry topology apply` or check the executor class"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error(
        "RabbitMQ refused to store the message published to {exchange:?} (nack); the queue may be full (x-overflow=reject-publish)"
    )]
    PublishNacked { exchange: String },
    #[error(
        "{what} {name:?} already exists with different arguments: {source}; delete it or use another GANTRY_PREFIX"
    )]
    TopologyConflict {
        what: &'static str,
        name: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot reach Postgres: {0}; check GANTRY_DATABASE_URL and that the server runs")]
    PostgresPool(#[from] deadpool_postgres::PoolError),
    #[error("Postgres {operation} failed: {source}")]
    Postgres {
        operation: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("invalid database URL: {0}")]
    DatabaseUrl(String),
    #[error(
        "the CA file {path} is not usable: {problem}; check GANTRY_TLS_CA_FILE (or the URL's cacertfile= or sslrootcert=)"
    )]
    TlsCaFile { path: String, problem: String },
    #[error(
        "no trusted root certificates on this system to check a TLS server against ({0}); install them (Debian: ca-certificates), or name the server's CA with GANTRY_TLS_CA_FILE"
    )]
    TlsSystemRoots(String),
    /// The server's certificate failed the check: `problem` says why and what to check.
    #[error("the TLS certificate of {server} {problem}")]
    TlsCertificate { server: String, problem: String },
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "the database has migration {found}, newer than this binary knows ({known}); upgrade the binary"
    )]
    SchemaTooNew { found: i32, known: i32 },
    #[error(
        "database {database} has no Gantry schema: create it with `gantry db migrate` against this database, or by starting a dispatcher on it; or, if the dispatcher uses another database, fix the URL"
    )]
    SchemaMissing { database: String },
    #[error(
        "database {database} has Gantry schema version {found}, older than this binary's ({known}): bring it up to date with `gantry db migrate`, or by starting a dispatcher of this version"
    )]
    SchemaBehind {
        database: String,
        found: i32,
        known: i32,
    },
    #[error("cannot read configuration file {path}: {source}")]
    ConfigRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration in {origin}: {message}")]
    Config { origin: String, message: String },
    #[error("cannot read the executor catalog {path}: {source}; check --catalog / GANTRY_CATALOG")]
    CatalogRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid executor catalog {origin}: {message}")]
    Catalog { origin: String, message: String },
    #[error("invalid message: {0}")]
    Invalid(#[from] crate::message::Rejection),
    #[error("cannot encode message: {0}")]
    Encode(#[from] serde_json::Error),
    /// A write committed in a group with others failed with the group, for a reason that
    /// may pass (Postgres restarting, a lost connection); the write is to be tried again.
    #[error("Postgres failed a group of writes this one was in ({0}); try again")]
    GroupWrite(String),
}

impl Error {
    /// A short label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::AmqpConnect { .. }
            | Error::AmqpUrl { .. }
            | Error::Amqp { .. }
            | Error::AmqpTimeout { .. } => "amqp",
            Error::Unroutable { .. } => "unroutable",
            Error::PublishNacked { .. } => "nacked",
            Error::TopologyConflict { .. } => "topology",
            Error::PostgresPool(_) | Error::Postgres { .. } | Error::DatabaseUrl(_) => "postgres",
            Error::TlsCaFile { .. } | Error::TlsSystemRoots(_) | Error::TlsCertificate { .. } => {
                "tls"
            }
            Error::Migration { .. }
            | Error::SchemaTooNew { .. }
            | Error::SchemaMissing { .. }
            | Error::SchemaBehind { .. } => "migration",
            Error::ConfigRead { .. }
            | Error::Config { .. }
            | Error::Catalog { .. }
            | Error::CatalogRead { .. } => "config",
            Error::Invalid(_) | Error::Encode(_) => "invalid",
            Error::GroupWrite(_) => "postgres",
        }
    }

    /// Whether trying again later (after a reconnect) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::AmqpConnect { .. }
            | Error::Amqp { .. }
            | Error::AmqpTimeout { .. }
            | Error::PostgresPool(_)
            | Error::GroupWrite(_)
            | Error::PublishNacked { .. } => true,
            Error::Postgres { source, .. } => postgres_is_transient(source),
            _ => false,
        }
    }
}

/// Whether a Postgres error may go away by trying again (a lost connection, a server
/// restart, a serialization conflict), as opposed to a bug or bad data.
fn postgres_is_transient(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match e.code() {
        None => true,
        Some(code) => [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
        ]
        .contains(code),
    }
}
