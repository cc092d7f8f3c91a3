//! Celery's wire protocol, as Gantry's Celery bridge speaks it: task messages of protocol 2
//! in, results in the format of Celery's `rpc://` result backend out, and the `revoke`
//! broadcast of Celery's control exchange. Nothing here does I/O; the dispatcher's bridge
//! (`gantry_dispatcher::celery`) consumes and publishes.
//!
//! A Celery task becomes an ordinary Gantry task ([`CeleryTask::envelope`]): its id is the
//! Celery id, its payload `{"args": [...], "kwargs": {...}}`, its executor class the one
//! whose `celery.tasks` patterns claim its name ([`claim`]). What only Celery needs later
//! (the reply queue, `root_id`, `parent_id`, where the deadline came from) is kept beside it
//! as a [`CeleryOrigin`] in Postgres: its row is what marks the task's reply as Celery's.
//!
//! # Layout
//!
//! - `task`: [`CeleryTask`], a protocol-2 message parsed and checked, and its conversion.
//! - `reply`: [`CeleryState`] and the `rpc://` result message.
//! - `control`: [`Revoke`], read from a control broadcast.
//! - `class`: [`CeleryClass`], a class's `celery:` settings. `names`: [`claim`].
//! - `origin`: [`CeleryOrigin`], what is kept beside a Celery task, and the headers and
//!   routing key the bridge uses.

pub(crate) mod class;
mod control;
mod names;
mod origin;
mod reply;
mod task;

pub use class::CeleryClass;
pub use control::Revoke;
pub use names::claim;
pub use origin::{
    CeleryOrigin, DeadlineFrom, ETA_ROUTING_KEY, NOT_BEFORE_HEADER, ORIGIN_HEADER,
    is_celery_message,
};
pub use reply::{CeleryState, reply};
pub use task::CeleryTask;
