//! The one error type of the registry service library: what can go wrong talking to a
//! container registry, serving, or writing the audit log. An image that is refused is not
//! an error: it is a [`crate::Refusal`], logged with its reason.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Shared(#[from] gantry_shared::Error),
    /// The registry could not be reached, or did not answer in time.
    #[error("{url}: {message}")]
    Unreachable { url: String, message: String },
    /// The registry answered with a status the API does not allow here.
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    /// The registry wants credentials the service does not have, or refused them.
    #[error(
        "{url}: {message}; give the source credentials (http://user:password@host/namespace) that may pull and list"
    )]
    Unauthorized { url: String, message: String },
    /// An answer that does not follow the distribution API (bad JSON, a digest that does
    /// not match the content, a missing header).
    #[error("{url}: {message}")]
    Malformed { url: String, message: String },
    #[error("cannot listen on {addr}: {source}; check --listen / GANTRY_REGISTRY_LISTEN")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("audit log {path}: {source}; check GANTRY_REGISTRY_AUDIT_LOG and its directory")]
    Audit {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS set-up: {0}")]
    Tls(String),
}

impl Error {
    /// The label of this error in counters and the health answer.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Shared(_) => "config",
            Error::Unreachable { .. } => "unreachable",
            Error::Status { .. } => "status",
            Error::Unauthorized { .. } => "unauthorized",
            Error::Malformed { .. } => "malformed",
            Error::Listen { .. } => "listen",
            Error::Audit { .. } => "audit",
            Error::Tls(_) => "tls",
        }
    }
}
