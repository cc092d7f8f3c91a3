//! The operator side of dead letters, behind `gantry dlq`: list and show them from Postgres,
//! and replay or purge them from `<prefix>.dead`.
//!
//! Postgres (`dead_letters`, written by the recorder from `<prefix>.dead.audit`) answers
//! *what died and why*; the queue `<prefix>.dead` holds the messages themselves. Listing
//! reads Postgres and also reports how many messages the queue really holds (a passive
//! `queue.declare`; nothing is taken from it), so a difference between the two is visible.
//! Replaying and purging read the queue itself, in one pass (see [`pass`](self#the-pass)).
//!
//! # The pass
//!
//! A replay or purge opens an exclusive consumer with manual acks on `<prefix>.dead`, reads
//! the queue's depth `N` at the start, and takes exactly `N` deliveries (or fewer, if the
//! queue gives no more within a short idle time). Each is read with
//! [`Label::read`], the same way the recorder read it, so its id is the id in
//! Postgres. A delivery the [`Selection`] does not match is held un-acked: it is never
//! nacked with requeue during the pass, which would bring it back to be read twice. When
//! the pass ends, the channel closes and every held message returns to the queue
//! (`<prefix>.dead` has no delivery limit, so returns cost nothing).
//!
//! A matching delivery is replayed in this order: the task's new attempt is recorded (what
//! `Store::record_replay` does: a `replayed` event of the new attempt, the task reopened);
//! the message built by [`Label::replay`] is published to `<prefix>.tasks` with the
//! executor class as routing key, `mandatory`, on a separate publishing connection, and
//! awaited until the broker confirms it; only then is the dead letter acked; then it is
//! marked replayed in Postgres. A replay that no queue would take (no queue for its
//! executor class, checked before anything is recorded, and again by the `mandatory`
//! publish) leaves the dead letter held, its task untouched, and is reported as failed.
//! A purge acks the matching
//! deliveries and marks them purged. The steps run as a pipeline (`pipeline`): Postgres
//! writes are batched over whatever deliveries are ready, and several publishes await
//! their confirm at once, but each delivery still goes through them in this order.
//! `--rate` paces deliveries into the pipeline with a `tokio` interval.
//!
//! # Interruption
//!
//! A pass can be killed at any point (SIGKILL included) without losing a dead letter: a
//! message leaves `<prefix>.dead` only by its ack, which comes after the broker confirmed
//! the replay; everything un-acked returns when the connection drops. A pass can also
//! publish a dead letter whose ack never arrived; the next pass replays it again. That
//! runs nothing twice: the attempt number comes from the dead letter's body (so both
//! copies carry the same attempt), the dispatcher names a job after `(task_id, attempt)`
//! and finds the job it already has, and the replay of an attempt is recorded once (the
//! `replayed` event is unique per attempt, and a task already at that attempt is not
//! reopened). So an interrupted replay is simply run again. What a kill can leave behind
//! is a dead letter replayed but not yet marked replayed (the mark follows the ack by at
//! most a moment); `gantry dlq list` then counts it as unhandled while the queue no longer
//! holds it, and says so.
//!
//! A pass holds what it reads until it ends, so it must end within RabbitMQ's
//! `consumer_timeout` (30 minutes by default), or the broker closes its channel: the pass
//! then stops, what it did stands, and running it again goes on. Replaying 100,000 dead
//! letters at `--rate 50` takes longer than that: select fewer, or pace faster.

//! # Layout
//!
//! - [`DeadLetters`]: the handle (`handle`); `list`, `show`, `queue_depth`, `replay`,
//!   `purge` are here.
//! - [`Selection`], [`parse_time`], [`parse_age`]: what a command acts on (`selection`).
//! - [`ReplayOptions`], [`PurgeOptions`], [`Summary`]: how a pass runs and what it did
//!   (`summary`).
//! - `pass` → `pipeline` (with `routes`, `record`, `writes`): one pass over the queue.

mod handle;
mod pass;
mod pipeline;
mod record;
mod routes;
mod selection;
mod summary;
mod writes;

use gantry_shared::amqp::timed;
use gantry_shared::store::{DeadLetterFilter, DeadLetterRecord};
use serde::Serialize;
use tracing::instrument;
use uuid::Uuid;

pub use gantry_shared::dead_letter::{DeadLetter, Label};
pub use handle::DeadLetters;
use handle::close;
pub use selection::{Selection, parse_age, parse_time};
pub use summary::{
    Action, DEFAULT_IN_FLIGHT, Entry, Failure, PurgeOptions, ReplayOptions, Summary,
};

use crate::{Error, Result};

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Listing {
    /// Dead letters matching the filter, on every page.
    pub total: i64,
    /// This page's number, from 1.
    pub page: u32,
    /// Dead letters per page.
    pub limit: u32,
    /// Newest first.
    pub dead_letters: Vec<DeadLetterRecord>,
}

impl Listing {
    /// How many pages the matching dead letters fill (at least 1).
    pub fn pages(&self) -> u32 {
        let limit = i64::from(self.limit.max(1));
        u32::try_from((self.total + limit - 1) / limit)
            .unwrap_or(u32::MAX)
            .max(1)
    }
}

impl DeadLetters {
    /// Recorded dead letters matching `filter`, newest first, page `page` (from 1) of
    /// `limit` each.
    ///
    /// # Errors
    /// [`Error::Database`].
    #[instrument(skip(self, filter))]
    pub async fn list(&self, filter: &DeadLetterFilter, page: u32, limit: u32) -> Result<Listing> {
        let store = self.tracker.store().await?;
        let page = page.max(1);
        let limit = limit.max(1);
        let offset = i64::from(page - 1) * i64::from(limit);
        let (dead_letters, total) = store
            .find_dead_letters(filter, i64::from(limit), offset)
            .await
            .map_err(|e| self.database_error(e))?;
        Ok(Listing {
            total,
            page,
            limit,
            dead_letters,
        })
    }

    /// How many recorded dead letters are neither replayed nor purged: what
    /// `<prefix>.dead` should hold once the recorder has caught up.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn unhandled(&self) -> Result<i64> {
        Ok(self.list(&DeadLetterFilter::default(), 1, 1).await?.total)
    }

    /// One recorded dead letter, or `None` if no dead letter has this id.
    ///
    /// # Errors
    /// [`Error::Database`].
    #[instrument(skip(self))]
    pub async fn show(&self, id: Uuid) -> Result<Option<DeadLetterRecord>> {
        let store = self.tracker.store().await?;
        store
            .dead_letter(id)
            .await
            .map_err(|e| self.database_error(e))
    }

    /// Messages ready in `<prefix>.dead` right now (a passive declare: nothing is taken,
    /// nothing is redelivered). Messages a running pass holds are not counted.
    ///
    /// # Errors
    /// [`Error::NoDeadQueue`], or [`Error::Broker`] when RabbitMQ cannot be reached.
    #[instrument(skip(self))]
    pub async fn queue_depth(&self) -> Result<u32> {
        let conn = self.connect("depth").await?;
        let opened = timed(
            "channel.open",
            self.config().broker_timeout,
            conn.create_channel(),
        )
        .await;
        match opened {
            Ok(channel) => {
                let depth = self.depth(&channel).await;
                close(Some(&channel), &conn).await;
                depth
            }
            Err(e) => {
                close(None, &conn).await;
                Err(Error::broker(e))
            }
        }
    }

    /// Replays the selected dead letters: see [the pass](self#the-pass). `shutdown`
    /// stops reading (Ctrl-C); what is in flight finishes first.
    ///
    /// # Errors
    /// [`Error::NothingSelected`], [`Error::NoDeadQueue`], [`Error::DeadQueueBusy`],
    /// [`Error::Broker`] or [`Error::Database`] when the pass cannot start. Failures of
    /// single dead letters are reported in the [`Summary`], not as errors.
    pub async fn replay(
        &self,
        selection: &Selection,
        options: &ReplayOptions,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Summary> {
        pass::run(self, selection, Action::Replay(options.clone()), shutdown).await
    }

    /// Purges the selected dead letters: acks (removes) them from `<prefix>.dead` and marks
    /// them purged in Postgres. The rest stays in the queue.
    ///
    /// # Errors
    /// As [`DeadLetters::replay`].
    pub async fn purge(
        &self,
        selection: &Selection,
        options: &PurgeOptions,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Summary> {
        pass::run(self, selection, Action::Purge(options.clone()), shutdown).await
    }

    /// Runs one pass of `action` (a replay or a purge) over the selected dead letters, as
    /// [`DeadLetters::replay`] and [`DeadLetters::purge`] do.
    ///
    /// # Errors
    /// As [`DeadLetters::replay`].
    pub async fn run(
        &self,
        selection: &Selection,
        action: Action,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Summary> {
        pass::run(self, selection, action, shutdown).await
    }
}
