//! What one request measured, whichever way it went.

use std::time::Duration;

/// One request's times, whichever way it went.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// From the send (the submit, through Gantry) to the whole answer (stored in Postgres).
    pub(crate) latency: Duration,
    /// From the send (the submit) to the first piece of text, when streaming.
    pub(crate) first_token: Option<Duration>,
    pub(crate) completion_tokens: u64,
    /// Where a task's time went, through Gantry: see [`STAGE_NAMES`].
    pub(crate) stages: Option<[Duration; STAGES]>,
    /// What the executor measured, through Gantry.
    pub(crate) executor: Option<Timings>,
}

/// The stages of a task's way through Gantry, as its record in Postgres times them.
pub(crate) const STAGES: usize = 5;
pub(crate) const STAGE_NAMES: [&str; STAGES] = [
    "  submit → received by the dispatcher",
    "  → dispatched",
    "  → the executor running it (process started)",
    "  → its engine done (the request included)",
    "  → the result read from Postgres",
];

/// The executor's own timings, from the task's output (`timings`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timings {
    /// Until the server was ready (about 0 with a running server).
    pub(crate) server_start: Duration,
    /// From its request to the first piece of text, when streaming.
    pub(crate) first_token: Option<Duration>,
    /// From its request to the whole answer: the server's time, its queue included.
    pub(crate) generation: Duration,
}
