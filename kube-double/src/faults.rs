//! Injected faults, and the record of the requests the double received.

use std::time::Duration;

/// What an injected fault does to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// 500 InternalError.
    InternalError,
    /// 429 TooManyRequests with a `Retry-After` header.
    TooManyRequests { retry_after_secs: u64 },
    /// The request is answered normally after this delay.
    Latency(Duration),
    /// The connection closes without a response.
    DropConnection,
}

/// A fault for the requests whose method is `method` (or `*`) and whose path contains
/// `path_contains` (`"POST"`, `"/jobs"`).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    pub method: String,
    pub path_contains: String,
    pub fault: Fault,
}

impl FaultSpec {
    pub fn new(method: &str, path_contains: &str, fault: Fault) -> FaultSpec {
        FaultSpec {
            method: method.to_owned(),
            path_contains: path_contains.to_owned(),
            fault,
        }
    }

    pub fn internal_error(method: &str, path_contains: &str) -> FaultSpec {
        FaultSpec::new(method, path_contains, Fault::InternalError)
    }

    pub fn too_many_requests(
        method: &str,
        path_contains: &str,
        retry_after_secs: u64,
    ) -> FaultSpec {
        FaultSpec::new(
            method,
            path_contains,
            Fault::TooManyRequests { retry_after_secs },
        )
    }

    pub fn latency(method: &str, path_contains: &str, delay: Duration) -> FaultSpec {
        FaultSpec::new(method, path_contains, Fault::Latency(delay))
    }

    pub fn drop_connection(method: &str, path_contains: &str) -> FaultSpec {
        FaultSpec::new(method, path_contains, Fault::DropConnection)
    }

    pub(crate) fn matches(&self, method: &str, path: &str) -> bool {
        (self.method == "*" || self.method.eq_ignore_ascii_case(method))
            && path.contains(&self.path_contains)
    }
}

/// One request the double received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string.
    pub query: String,
    /// The response's status; `None` when the connection was dropped.
    pub status: Option<u16>,
}

impl RequestRecord {
    /// Whether the request changed (or tried to change) something.
    pub fn is_write(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }
}
