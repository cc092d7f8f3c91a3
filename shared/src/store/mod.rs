//! The Postgres store: schema, embedded migrations, and every write of a task's life.
//!
//! Writes are idempotent on `(task_id, attempt, event)` and follow
//! [`TaskState::can_become`]: a late or duplicate message never changes a terminal state.
//!
//! Two ways in. [`Store::connect`] applies the migrations the database lacks, under an
//! advisory lock, so replicas that start together apply each migration once: that is what
//! the dispatcher and `gantry db migrate` do. [`Store::connect_existing`] changes nothing:
//! it checks that the schema is there and is the one this binary knows, and refuses the
//! database otherwise, so a command pointed at the wrong database cannot create Gantry's
//! tables in it.
//!
//! # Layout
//!
//! - `pool`: [`Store`] and how it is opened. `migrate`: the embedded migrations and the
//!   schema check.
//! - `rules`: the transition rule for one task under its row lock. `batch`: the same for
//!   many tasks in a few statements. `state`: [`TaskState`].
//! - `tasks`: the task lifecycle's reads and writes. `dead_letters`: dead letters.
//!   `celery`: what is kept of a task from a Celery client.
//! - `capacity`: what dispatchers side by side share: presence, a class's capacity,
//!   adoption of a gone dispatcher's claims. `warm_executors`: the same for warm
//!   executors.
//! - `sql`: what every statement needs (errors, cleaning, prepared statements).
//! - `column`: Gantry's types as Postgres columns.

mod batch;
mod capacity;
mod celery;
mod column;
mod dead_letters;
mod migrate;
mod pool;
mod rules;
mod sql;
mod state;
mod tasks;
mod warm_executors;

pub use batch::Transition;
pub use capacity::{Claim, Claimed, Presence};
pub use dead_letters::{DeadLetter, DeadLetterFilter, DeadLetterRecord};
pub use migrate::{Migrated, SCHEMA_VERSION};
pub use pool::{Store, set_up_session};
pub use rules::{Applied, Change};
pub use sql::DONE_CHANNEL;
pub use state::TaskState;
pub use tasks::{Cancel, ResultWrite, TaskRecord};
pub use warm_executors::WarmExecutor;
