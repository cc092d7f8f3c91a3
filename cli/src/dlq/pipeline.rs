//! The stages a pass that changes something hands its matching deliveries to, so that
//! Postgres, the publisher and the acks all work at once:
//!
//! 1. record: a replay whose executor class has no queue is kept ([`Routes`]); the new
//!    attempts of the others, of whatever deliveries are ready, are recorded in one
//!    transaction ([`Writes::record_replays`]), which also notes replayed the dead letters
//!    acked since the last one; a task Postgres does not know yet is recorded from its dead
//!    letter first ([`record::record_replay`]).
//! 2. send: each replay published with `mandatory` and awaited until confirmed, up to
//!    `in_flight` at once, and its dead letter acked only then (a purge only acks).
//! 3. mark: the acked dead letters are handed back to the first stage, which notes them
//!    replayed with the next batch it records, or on their own (and purged ones always so)
//!    when none comes soon.
//!
//! A delivery that fails at any stage is dropped un-acked: it stays held, and returns to
//! the queue when the pass closes its channel.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::amqp::{self, publish_confirmed, timed};
use gantry_shared::dead_letter::Replay;
use gantry_shared::message::TaskId;
use gantry_shared::store::{Applied, Store};
use gantry_shared::telemetry::chain;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::{Channel, Connection};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::task::{JoinError, JoinSet};
use tracing::info;
use uuid::Uuid;

use super::handle::{DeadLetters, close};
use super::record;
use super::routes::Routes;
use super::summary::{Action, Entry, Outcome, Summary, collect};
use super::writes::{Mark, Writes};
use crate::{Error, Result};

/// Most deliveries recorded in one transaction, or marked in one statement. Each statement
/// costs Postgres about 0.8 ms whatever its size: measured on 10,240 replays,
/// the backend's CPU per replay is 22 µs in batches of 256, 21 in batches of 512, and 20
/// in batches of 1,024.
const BATCH: usize = 1024;
/// How long acked dead letters wait for a batch to be noted with before they are written
/// on their own: longer means fewer, larger writes, and a longer window in which a killed
/// pass leaves a replayed dead letter unmarked.
const MARK_LINGER: Duration = Duration::from_millis(50);

/// One matching delivery on its way through the stages.
pub(super) struct Item {
    pub(super) delivery: Delivery,
    pub(super) entry: Entry,
    /// The message to publish, for a replay.
    pub(super) replay: Option<Replay>,
}

/// What the stages tell the reading loop.
enum Report {
    Outcome(Outcome),
    Warning(String),
    /// Going on is pointless (Postgres or the publishing connection failed): stop reading.
    Stop(String),
}

/// The running stages of one pass.
pub(super) struct Pipeline {
    input: mpsc::Sender<Item>,
    reports_tx: UnboundedSender<Report>,
    reports: UnboundedReceiver<Report>,
    stages: JoinSet<()>,
    stop: Option<String>,
}

/// What the send stage does with a delivery.
enum Sender {
    Replay {
        /// A confirm-mode channel on a connection of its own: a memory or disk alarm
        /// blocks publishing, and must not block the acks of the consuming connection.
        channel: Channel,
        connection: Arc<Connection>,
        exchange: String,
    },
    Purge,
}

impl Pipeline {
    /// Connects what the action writes to (Postgres, and the publisher of a replay) and
    /// starts the stages.
    ///
    /// # Errors
    /// [`Error::Database`] or [`Error::Broker`]: nothing has been read yet.
    pub(super) async fn start(dl: &DeadLetters, action: &Action) -> Result<Pipeline> {
        let config = dl.config();
        let timeout = config.broker_timeout;
        let queue = dl.queue();
        let in_flight = action.in_flight();
        // Postgres (the store, then the connection of the batched writes beside its pool)
        // and the publisher are connected at once: a pass is timed from its start.
        let publisher = async {
            match action {
                Action::Replay(_) => open_publisher(dl, timeout).await.map(Some),
                Action::Purge(_) => Ok(None),
            }
        };
        let postgres = async {
            let store = dl.tracker.store().await.map_err(Error::from)?.clone();
            let writes = Writes::connect(&store)
                .await
                .map_err(|e| dl.database_error(e))?;
            Ok::<_, Error>((store, writes))
        };
        let (postgres, publisher) = tokio::join!(postgres, publisher);
        let (store, writes) = match postgres {
            Ok(connected) => connected,
            Err(e) => {
                if let Ok(Some((channel, connection))) = &publisher {
                    close(Some(channel), connection).await;
                }
                return Err(e);
            }
        };
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let (input, input_rx) = mpsc::channel(BATCH);
        let (marks, marks_rx) = mpsc::unbounded_channel();
        let mut stages = JoinSet::new();
        let send = Send {
            timeout,
            in_flight,
            reports: reports_tx.clone(),
            queue: queue.clone(),
        };
        let (to_send, send_rx) = mpsc::channel(2);
        let (sender, routes, mark_as) = match publisher? {
            Some((channel, connection)) => {
                let connection = Arc::new(connection);
                let routes = Routes::new(connection.clone(), dl.topology.clone(), timeout);
                let sender = Sender::Replay {
                    channel,
                    connection,
                    exchange: dl.topology.tasks_exchange(),
                };
                (sender, Some(routes), Mark::Replayed)
            }
            None => (Sender::Purge, None, Mark::Purged),
        };
        let acker = Acker {
            timeout,
            marks,
            reports: reports_tx.clone(),
            queue: queue.clone(),
            replaying: mark_as == Mark::Replayed,
        };
        let recorder = Recorder {
            routes,
            writes,
            mark_as,
            store,
            reports: reports_tx.clone(),
            queue,
        };
        stages.spawn(recorder.run(input_rx, to_send, marks_rx));
        stages.spawn(send.run(send_rx, sender, acker));
        Ok(Pipeline {
            input,
            reports_tx,
            reports,
            stages,
            stop: None,
        })
    }

    /// Hands one delivery to the stages, waiting while they are full.
    pub(super) async fn send(&mut self, item: Item) {
        if let Err(mpsc::error::SendError(item)) = self.input.send(item).await {
            let error = "the pass is stopping; it stays in the queue".to_owned();
            let _ = self
                .reports_tx
                .send(Report::Outcome((item.entry, Err(error))));
        }
    }

    /// Adds what the stages reported so far to `summary`; the reason to stop reading, once,
    /// if a stage found one.
    pub(super) fn collect(&mut self, summary: &mut Summary) -> Option<String> {
        while let Ok(report) = self.reports.try_recv() {
            apply(&mut self.stop, summary, report);
        }
        self.stop.take()
    }

    /// Lets every delivery handed over go through all the stages, and adds what they did
    /// to `summary`.
    pub(super) async fn finish(self, summary: &mut Summary) {
        let Pipeline {
            input,
            reports_tx,
            mut reports,
            mut stages,
            ..
        } = self;
        drop(input);
        drop(reports_tx);
        while let Some(joined) = stages.join_next().await {
            if let Err(e) = joined {
                summary
                    .warnings
                    .push(format!("a stage of the pass failed: {e}"));
            }
        }
        // A late reason to stop concerns deliveries already reported failed, with it.
        let mut late_stop = None;
        while let Some(report) = reports.recv().await {
            apply(&mut late_stop, summary, report);
        }
    }
}

/// The publisher of a replay: a confirm-mode channel on a connection of its own.
async fn open_publisher(dl: &DeadLetters, timeout: Duration) -> Result<(Channel, Connection)> {
    let connection = dl.connect("publish").await?;
    match amqp::confirm_channel(&connection, timeout).await {
        Ok(channel) => Ok((channel, connection)),
        Err(e) => {
            close(None, &connection).await;
            Err(Error::broker(e))
        }
    }
}

fn apply(stop: &mut Option<String>, summary: &mut Summary, report: Report) {
    match report {
        Report::Outcome(outcome) => collect(summary, outcome),
        Report::Warning(warning) => summary.warnings.push(warning),
        Report::Stop(why) => {
            stop.get_or_insert(why);
        }
    }
}

/// Stage 1 (and 3): gathers what is ready into batches and, for a replay, records their
/// new attempts; hands each batch on whole, so it records the next while the last is
/// sent. Notes the dead letters the send stage acked, with the next batch or on their own.
struct Recorder {
    /// `None` for a purge: nothing to check or record before the ack.
    routes: Option<Routes>,
    writes: Writes,
    mark_as: Mark,
    store: Store,
    reports: UnboundedSender<Report>,
    queue: String,
}

impl Recorder {
    async fn run(
        mut self,
        mut input: mpsc::Receiver<Item>,
        output: mpsc::Sender<Vec<Item>>,
        mut acked: UnboundedReceiver<Uuid>,
    ) {
        // Dropped when reading ends, so the send stage ends, and with it the acks.
        let mut output = Some(output);
        let (mut reading, mut acking) = (true, true);
        // Acked dead letters not noted yet, and when they are to be written on their own.
        let mut unmarked: Vec<Uuid> = Vec::new();
        let mut linger = tokio::time::Instant::now();
        while reading || acking || !unmarked.is_empty() {
            tokio::select! {
                item = input.recv(), if reading => {
                    let (Some(first), Some(out)) = (item, output.as_ref()) else {
                        reading = false;
                        output = None;
                        continue;
                    };
                    let mut batch = vec![first];
                    while batch.len() < BATCH {
                        match input.try_recv() {
                            Ok(item) => batch.push(item),
                            Err(_) => break,
                        }
                    }
                    if unmarked.is_empty() {
                        linger = tokio::time::Instant::now() + MARK_LINGER;
                    }
                    while let Ok(id) = acked.try_recv() {
                        unmarked.push(id);
                    }
                    let batch = self.record(batch, &mut unmarked).await;
                    if let Err(mpsc::error::SendError(batch)) = out.send(batch).await {
                        for item in batch {
                            fail(&self.reports, item, "the pass is stopping; nothing was done".into());
                        }
                    }
                }
                id = acked.recv(), if acking => match id {
                    Some(id) => {
                        if unmarked.is_empty() {
                            linger = tokio::time::Instant::now() + MARK_LINGER;
                        }
                        unmarked.push(id);
                    }
                    None => acking = false,
                },
                () = tokio::time::sleep_until(linger), if !unmarked.is_empty() => {
                    self.mark(std::mem::take(&mut unmarked)).await;
                }
            }
            if unmarked.len() >= BATCH || (!reading && !acking && !unmarked.is_empty()) {
                self.mark(std::mem::take(&mut unmarked)).await;
            }
        }
    }

    /// Notes dead letters replayed (or purged) on their own.
    async fn mark(&mut self, ids: Vec<Uuid>) {
        if let Err(e) = self.writes.mark(&ids, self.mark_as).await {
            unmarked(&self.reports, ids.len(), self.mark_as, &e);
        }
    }

    /// Checks that each replay has a queue to go to, and records the new attempts of those
    /// that do, noting `acked` replayed in the same transaction (it is emptied if it was
    /// written); returns the items to send on.
    async fn record(&mut self, batch: Vec<Item>, acked: &mut Vec<Uuid>) -> Vec<Item> {
        let Some(routes) = self.routes.as_mut() else {
            return batch;
        };
        let mut routed = Vec::with_capacity(batch.len());
        for item in batch {
            let Some(replay) = item.replay.as_ref() else {
                routed.push(item);
                continue;
            };
            match routes.missing(&replay.routing_key).await {
                Ok(None) => routed.push(item),
                Ok(Some(why)) => {
                    let error = format!("{why}; nothing was published, it stays in {}", self.queue);
                    fail(&self.reports, item, error);
                }
                Err(why) => {
                    let _ = self.reports.send(Report::Stop(format!(
                        "the broker did not say whether a queue takes the replays: {why}"
                    )));
                    let error = format!(
                        "could not check that a queue takes it ({why}); nothing was published, it stays in {}",
                        self.queue
                    );
                    fail(&self.reports, item, error);
                }
            }
        }
        let replays_of: Vec<(TaskId, u32, Uuid)> = routed
            .iter()
            .filter_map(|i| i.replay.as_ref()?.task.map(|(t, a)| (t, a, i.entry.id)))
            .collect();
        let applied = if replays_of.is_empty() {
            Ok(Vec::new())
        } else {
            let recorded = self.writes.record_replays(&replays_of, acked).await;
            if let Err(e) = &recorded {
                unmarked(&self.reports, acked.len(), self.mark_as, e);
            }
            acked.clear();
            recorded
        };
        let applied = match applied {
            Ok(applied) => applied,
            Err(e) => {
                let why = chain(&e);
                let _ = self
                    .reports
                    .send(Report::Stop(format!("Postgres failed: {why}")));
                for item in routed {
                    fail(&self.reports, item, unrecorded(&why, &self.queue));
                }
                return Vec::new();
            }
        };
        let mut applied = applied.into_iter();
        let mut recorded = Vec::with_capacity(routed.len());
        for item in routed {
            let Some((task_id, attempt)) = item.replay.as_ref().and_then(|r| r.task) else {
                recorded.push(item);
                continue;
            };
            if applied.next() == Some(Applied::Unknown) {
                let backfilled = record::record_replay(
                    &self.store,
                    &item.entry,
                    &item.delivery.properties,
                    &item.delivery.data,
                    task_id,
                    attempt,
                )
                .await;
                if let Err(e) = backfilled {
                    fail(&self.reports, item, unrecorded(&chain(&e), &self.queue));
                    continue;
                }
            }
            recorded.push(item);
        }
        recorded
    }
}

fn unrecorded(why: &str, queue: &str) -> String {
    format!(
        "could not record the replay in Postgres ({why}); nothing was published, it stays in {queue}"
    )
}

/// Reports that `item` stays in the queue, and why.
fn fail(reports: &UnboundedSender<Report>, item: Item, error: String) {
    let _ = reports.send(Report::Outcome((item.entry, Err(error))));
}

/// Stage 2: publish with a confirm, several at once, then ack.
///
/// While every delivery the channel gave so far has come this way, in order, a run of
/// confirmed deliveries at the front is acked at once, with one `multiple` ack of its
/// last: one frame, and one settlement for the queue, instead of one per dead letter.
/// After the first gap (a delivery the pass keeps, or one that failed), each is acked on
/// its own, so a `multiple` ack never takes a delivery the pass holds.
struct Send {
    timeout: Duration,
    in_flight: usize,
    reports: UnboundedSender<Report>,
    queue: String,
}

/// A delivery whose replay was confirmed (or that is purged), waiting for its ack.
struct Confirmed {
    delivery: Delivery,
    entry: Entry,
}

/// What a publish ended with: the delivery's tag, and the delivery to ack or the reports
/// of its failure.
type Published = (u64, std::result::Result<Confirmed, Vec<Report>>);

/// The deliveries handed to the send stage and not acked yet (`T`: a [`Confirmed`]).
struct Acks<T> {
    /// The tag the next delivery must have for the deliveries to stay unbroken (tags
    /// count from 1 on the pass's channel).
    next_tag: u64,
    /// Whether every delivery up to `next_tag` came here and none failed.
    unbroken: bool,
    /// By tag: confirmed, or still publishing.
    pending: BTreeMap<u64, Option<T>>,
}

impl<T> Acks<T> {
    fn new() -> Acks<T> {
        Acks {
            next_tag: 1,
            unbroken: true,
            pending: BTreeMap::new(),
        }
    }

    fn handed(&mut self, tag: u64) {
        self.unbroken &= tag == self.next_tag;
        self.next_tag = tag + 1;
        self.pending.insert(tag, None);
    }

    fn published(&mut self, tag: u64, confirmed: Option<T>) {
        match confirmed {
            Some(c) => {
                self.pending.insert(tag, Some(c));
            }
            None => {
                self.pending.remove(&tag);
                self.unbroken = false;
            }
        }
    }

    /// What to ack now, and whether as one `multiple` ack of the last: the confirmed run
    /// at the front once it has `run` deliveries (or any, with `flush`) while unbroken;
    /// otherwise every confirmed delivery, each on its own.
    fn take(&mut self, run: usize, flush: bool) -> (Vec<T>, bool) {
        if self.unbroken {
            let front = self
                .pending
                .values()
                .take_while(|c| c.is_some())
                .take(run)
                .count();
            if front == 0 || (front < run && !flush) {
                return (Vec::new(), true);
            }
            let taken = (0..front)
                .filter_map(|_| self.pending.pop_first().and_then(|(_, c)| c))
                .collect();
            return (taken, true);
        }
        let done: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(t, _)| *t)
            .collect();
        let taken = done
            .into_iter()
            .filter_map(|t| self.pending.remove(&t).flatten())
            .collect();
        (taken, false)
    }
}

impl Send {
    async fn run(self, mut input: mpsc::Receiver<Vec<Item>>, sender: Sender, acker: Acker) {
        let sender = Arc::new(sender);
        // The acks go out from a task of their own, in the order they are taken (a
        // `multiple` ack must never follow one of a later tag), so that publishing goes
        // on while an ack is written: awaiting each ack here left the window of
        // publishes part empty for a sixth of a replay.
        let (to_acker, taken) = mpsc::unbounded_channel();
        let acker = tokio::spawn(acker.run(taken));
        let mut running: JoinSet<Published> = JoinSet::new();
        let mut queued: VecDeque<Item> = VecDeque::new();
        let mut acks = Acks::new();
        // A run this long is acked without waiting for more.
        let run = (self.in_flight / 2).max(1);
        let mut open = true;
        loop {
            while running.len() < self.in_flight {
                let Some(item) = queued.pop_front() else {
                    break;
                };
                acks.handed(item.delivery.delivery_tag);
                let (sender, timeout, queue) = (sender.clone(), self.timeout, self.queue.clone());
                running.spawn(async move { publish(sender, item, timeout, &queue).await });
            }
            if !open && queued.is_empty() && running.is_empty() {
                break;
            }
            tokio::select! {
                batch = input.recv(), if open && queued.is_empty() => match batch {
                    Some(batch) => queued.extend(batch),
                    None => open = false,
                },
                Some(joined) = running.join_next(), if !running.is_empty() => {
                    self.settle(&mut acks, joined);
                    while let Some(joined) = running.try_join_next() {
                        self.settle(&mut acks, joined);
                    }
                }
            }
            take(&mut acks, run, running.is_empty(), &to_acker);
        }
        take(&mut acks, usize::MAX, true, &to_acker);
        drop(to_acker);
        if let Err(e) = acker.await {
            let warning = format!(
                "acking stopped ({e}); what was not acked stays in {}",
                self.queue
            );
            let _ = self.reports.send(Report::Warning(warning));
        }
        if let Sender::Replay {
            channel,
            connection,
            ..
        } = sender.as_ref()
        {
            close(Some(channel), connection).await;
        }
    }

    fn settle(
        &self,
        acks: &mut Acks<Confirmed>,
        joined: std::result::Result<Published, JoinError>,
    ) {
        match joined {
            Ok((tag, Ok(confirmed))) => acks.published(tag, Some(confirmed)),
            Ok((tag, Err(reports))) => {
                acks.published(tag, None);
                for report in reports {
                    let _ = self.reports.send(report);
                }
            }
            Err(e) => {
                // Its tag is unknown: it stays un-acked, and nothing after it is acked
                // with `multiple`.
                acks.unbroken = false;
                let warning = format!(
                    "a dead letter's publish stopped ({e}); it stays in {}",
                    self.queue
                );
                let _ = self.reports.send(Report::Warning(warning));
            }
        }
    }
}

/// What [`Acks::take`] gives, handed to the acker (nothing when nothing is ready).
fn take(acks: &mut Acks<Confirmed>, run: usize, flush: bool, acker: &UnboundedSender<Taken>) {
    let (taken, multiple) = acks.take(run, flush);
    if !taken.is_empty() {
        // The acker ends only after this sender is dropped.
        let _ = acker.send(Taken { taken, multiple });
    }
}

/// Confirmed deliveries to ack, at once with one `multiple` ack of the last, or each.
struct Taken {
    taken: Vec<Confirmed>,
    multiple: bool,
}

/// Acks the deliveries the send stage takes, one batch after the other, and reports each
/// dead letter done (or why not).
struct Acker {
    timeout: Duration,
    marks: UnboundedSender<Uuid>,
    reports: UnboundedSender<Report>,
    queue: String,
    replaying: bool,
}

impl Acker {
    async fn run(self, mut input: UnboundedReceiver<Taken>) {
        while let Some(Taken { taken, multiple }) = input.recv().await {
            let Some(last) = taken.last() else {
                continue;
            };
            let results = if multiple {
                let result = ack(&last.delivery, true, self.timeout).await;
                vec![result; taken.len()]
            } else {
                let acking = taken.iter().map(|c| ack(&c.delivery, false, self.timeout));
                futures_util::future::join_all(acking).await
            };
            for (confirmed, result) in taken.into_iter().zip(results) {
                let outcome = match result {
                    Ok(()) => {
                        let _ = self.marks.send(confirmed.entry.id);
                        Ok(None)
                    }
                    Err(e) if self.replaying => Err(format!(
                        "published, but {e}: it stays in {}, and the next replay publishes it again (the dispatcher runs one job per attempt)",
                        self.queue
                    )),
                    Err(e) => Err(format!("{e}; it stays in {}", self.queue)),
                };
                let _ = self
                    .reports
                    .send(Report::Outcome((confirmed.entry, outcome)));
            }
        }
    }
}

/// Publishes one replay (or nothing, for a purge).
async fn publish(sender: Arc<Sender>, item: Item, timeout: Duration, queue: &str) -> Published {
    let Item {
        delivery,
        entry,
        replay,
    } = item;
    let tag = delivery.delivery_tag;
    if let (
        Sender::Replay {
            channel, exchange, ..
        },
        Some(replay),
    ) = (sender.as_ref(), replay)
    {
        let published = publish_confirmed(
            channel,
            exchange,
            &replay.routing_key,
            &replay.body,
            replay.props,
            true,
            timeout,
        )
        .await;
        if let Err(e) = published {
            info!(dead_letter_id = %entry.id, error = %chain(&e), "replay not published; the dead letter stays");
            let error = format!("{}; it stays in {queue}", chain(&e));
            let mut reports = vec![Report::Outcome((entry, Err(error)))];
            if !matches!(
                e,
                gantry_shared::Error::Unroutable { .. }
                    | gantry_shared::Error::PublishNacked { .. }
            ) {
                reports.push(Report::Stop(format!("publishing failed: {}", chain(&e))));
            }
            return (tag, Err(reports));
        }
    }
    let confirmed = Confirmed { delivery, entry };
    (tag, Ok(confirmed))
}

/// Acks one delivery (with `multiple`, every one up to it), within `timeout`.
async fn ack(
    delivery: &Delivery,
    multiple: bool,
    timeout: Duration,
) -> std::result::Result<(), String> {
    match timed(
        "basic.ack",
        timeout,
        delivery.acker.ack(BasicAckOptions { multiple }),
    )
    .await
    {
        Ok(true) => Ok(()),
        Ok(false) => Err("the ack was refused (the channel is closed)".into()),
        Err(e) => Err(format!("the ack failed ({})", chain(&e))),
    }
}

/// Warns that `count` dead letters were handled but could not be noted so in Postgres.
fn unmarked(reports: &UnboundedSender<Report>, count: usize, mark: Mark, e: &gantry_shared::Error) {
    if count == 0 {
        return;
    }
    let (done, column) = match mark {
        Mark::Replayed => ("replayed", "replayed_at"),
        Mark::Purged => ("purged", "purged_at"),
    };
    let _ = reports.send(Report::Warning(format!(
        "{count} dead letters were {done}, but their {column} could not be written ({}); `gantry dlq list` still shows them",
        chain(e)
    )));
}

#[cfg(test)]
mod tests {
    use super::Acks;

    #[test]
    fn an_unbroken_run_is_acked_at_once_and_only_from_the_front() {
        let mut acks = Acks::new();
        for tag in 1..=4 {
            acks.handed(tag);
        }
        acks.published(2, Some(2));
        acks.published(3, Some(3));
        // Tag 1 still publishing: nothing may be acked, not even with a flush.
        assert_eq!(acks.take(2, true), (vec![], true));
        acks.published(1, Some(1));
        assert_eq!(acks.take(2, false), (vec![1, 2], true));
        // A run shorter than asked waits, unless flushed.
        assert_eq!(acks.take(2, false), (vec![], true));
        assert_eq!(acks.take(2, true), (vec![3], true));
    }

    #[test]
    fn after_a_gap_or_a_failure_each_is_acked_on_its_own() {
        let mut acks = Acks::new();
        acks.handed(1);
        // Tag 2 was kept by the pass: a multiple ack of 3 would take it.
        acks.handed(3);
        acks.published(3, Some(3));
        assert_eq!(acks.take(1, false), (vec![3], false));
        acks.published(1, Some(1));
        assert_eq!(acks.take(8, false), (vec![1], false));

        let mut failed = Acks::new();
        for tag in 1..=3 {
            failed.handed(tag);
        }
        failed.published(1, None);
        failed.published(2, Some(2));
        failed.published(3, Some(3));
        assert_eq!(failed.take(1, false), (vec![2, 3], false));
    }
}
