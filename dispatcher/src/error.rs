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
    /// The task can never run as it asks (e.g. more GPUs than its class allows): no attempt
    /// would do better, so it is dead-lettered, not retried.
    #[error("task {task} cannot run as asked: {reason}")]
    Unrunnable { task: String, reason: String },
    #[error(
        "the executor program {0} was not found; build it (cargo build --bins) or set --executor-bin / GANTRY_EXECUTOR_BIN"
    )]
    ExecutorMissing(String),
    #[error(
        "cannot serve HTTP on {addr} (http_addr, GANTRY_HTTP_ADDR): {source}; give it a free address of this machine, or \"off\""
    )]
    HttpAddr {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("shutting down")]
    ShuttingDown,
    #[error("the executor catalog {origin}: {message}")]
    CatalogSource { origin: String, message: String },
    #[error("cannot {what} through the Kubernetes API: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("executor class {class} has no image: {tried}")]
    NoImage { class: String, tried: String },
    #[error(
        "executor class {class}: image {image} is not pinned to a digest; write it as {repository}@sha256:<digest> (`docker buildx imagetools inspect` or `crane digest` prints the digest), or turn on dispatcher.kubernetes.dev_mode on a development cluster"
    )]
    ImageNotPinned {
        class: String,
        image: String,
        repository: String,
    },
    #[error(
        "executor class {class}: image {image} is not from an allowed registry ({allowed}); pin it to one of them or add its registry to dispatcher.kubernetes.allowed_registries"
    )]
    RegistryNotAllowed {
        class: String,
        image: String,
        allowed: String,
    },
    #[error(
        "executor class {class}: image {image} does not handle task {task} (the executor registry lists {tasks}); send the task to another class or register it for this image"
    )]
    TaskNotSupported {
        class: String,
        image: String,
        task: String,
        tasks: String,
    },
    #[error(
        "the executor registry {url} did not answer for class {class} ({message}); the task waits in its queue until it does"
    )]
    RegistryUnavailable {
        url: String,
        class: String,
        message: String,
    },
}

impl Error {
    /// Whether trying again (after a reconnect, or once a service answers) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Shared(e) => e.is_transient(),
            Error::RegistryUnavailable { .. } => true,
            _ => false,
        }
    }

    /// A short label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Shared(e) => e.metric_label(),
            Error::StateDir { .. } | Error::StateDirBusy(_) => "state_dir",
            Error::Job { .. } | Error::ExecutorMissing(_) => "job",
            Error::Unrunnable { .. } => "invalid",
            Error::HttpAddr { .. } => "http",
            Error::ShuttingDown => "shutdown",
            Error::CatalogSource { .. } => "config",
            Error::Kube { .. } => "kubernetes",
            Error::NoImage { .. }
            | Error::ImageNotPinned { .. }
            | Error::RegistryNotAllowed { .. }
            | Error::TaskNotSupported { .. } => "image",
            Error::RegistryUnavailable { .. } => "executor_registry",
        }
    }
}
