//! The `gantry` command line, compiled into the `gantry` binary only (it uses `anyhow`; the
//! library does not).
//!
//! # Layout
//!
//! - [`args`]: the command line and its help.
//! - [`commands`]: what each subcommand does.
//! - [`dlq`]: `gantry dlq …`, its arguments and what it does; [`dlq_view`] prints it.
//! - [`payload`]: reading `--payload` (inline JSON, `@FILE`, `@-`).
//! - [`view`]: how a task is printed.
//! - [`exit`]: exit codes.

pub(crate) mod args;
pub(crate) mod commands;
pub(crate) mod dlq;
pub(crate) mod dlq_view;
pub(crate) mod exit;
pub(crate) mod payload;
pub(crate) mod view;
