//! Where an engine sends pieces of its answer as it makes them (an LLM's tokens), for the
//! progress publisher.

/// The sending end: a piece is sent as soon as it is made, never waiting for the broker.
pub(crate) type Deltas = tokio::sync::mpsc::UnboundedSender<String>;
