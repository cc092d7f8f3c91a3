//! What other modules hold to count with: a writer's [`Groups`], a unit of capacity in use
//! ([`InUse`]), and the `kubernetes` runtime's API calls ([`ApiCalls`]).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::labels::{ApiCall, ApiError, WriterLabel};

/// Writes committed in groups by one writer, and the groups' transactions.
pub(crate) struct Groups {
    pub(crate) writes: Counter,
    pub(crate) commits: Counter,
}

impl Groups {
    /// The counters of `writer` in the families `(commits, writes)`.
    pub(super) fn from(
        (commits, writes): &(Family<WriterLabel, Counter>, Family<WriterLabel, Counter>),
        writer: &'static str,
    ) -> Groups {
        let labels = WriterLabel { writer };
        Groups {
            writes: writes.get_or_create_owned(&labels),
            commits: commits.get_or_create_owned(&labels),
        }
    }

    pub(crate) fn committed(&self, writes: usize) {
        self.writes.inc_by(writes as u64);
        self.commits.inc();
    }
}

/// A unit of an executor class's capacity in use, counted in `gantry_capacity_in_use` for
/// as long as it lives.
pub(crate) struct InUse(pub(super) Gauge);

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The `kubernetes` runtime's API calls: writes by verb and resource, and failures by HTTP
/// code as well.
#[derive(Clone, Default)]
pub(crate) struct ApiCalls {
    pub(super) writes: Family<ApiCall, Counter>,
    pub(super) errors: Family<ApiError, Counter>,
}

impl ApiCalls {
    /// Gives each write of the runtime its counter, at zero.
    pub(crate) fn touch(&self) {
        for (verb, resource) in [
            ("create", "jobs"),
            ("create", "secrets"),
            ("delete", "jobs"),
        ] {
            let _ = self.writes.get_or_create(&ApiCall { verb, resource });
        }
    }

    /// Counts one try of a call; a `get` is not a write.
    pub(crate) fn tried(&self, verb: &'static str, resource: &'static str) {
        if verb != "get" {
            self.writes.get_or_create(&ApiCall { verb, resource }).inc();
        }
    }

    /// Counts one failed try, by the API server's HTTP code (`transport` when none came).
    pub(crate) fn failed(&self, verb: &'static str, resource: &'static str, code: String) {
        let labels = ApiError {
            verb,
            resource,
            code,
        };
        self.errors.get_or_create(&labels).inc();
    }
}
