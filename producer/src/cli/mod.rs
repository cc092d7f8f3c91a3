//! The `gantry` command line, compiled into the `gantry` binary only (it uses `anyhow`; the
//! library does not).
//!
//! # Layout
//!
//! - [`args`]: the command line and its help.
//! - [`commands`]: what each subcommand does.
//! - [`payload`]: reading `--payload` (inline JSON, `@FILE`, `@-`).
//! - [`view`]: how a task is printed.
//! - [`exit`]: exit codes.

pub(crate) mod args;
pub(crate) mod commands;
pub(crate) mod exit;
pub(crate) mod payload;
pub(crate) mod view;
