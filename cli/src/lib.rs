//! The operator's side of Gantry, behind the `gantry` command line: declaring the broker's
//! topology, and handling dead letters. Backends link `gantry-producer` instead, which
//! submits and follows tasks without any of this.
//!
//! The command line itself (its arguments, what each command prints, its exit codes) is the
//! `gantry` binary of this crate, in `src/bin/gantry/`; it uses `anyhow`, this library does
//! not.
//!
//! # Layout
//!
//! - [`topology`]: declares the exchanges and queues for a catalog (`gantry topology apply`).
//! - [`dlq`]: lists, shows, replays and purges dead letters (`gantry dlq …`).
//! - [`Error`]: everything that can go wrong here, each variant saying what to do.

pub mod dlq;
mod error;
pub mod topology;

pub use error::{Error, Result};
