//! The stages a pass that changes something hands its matching deliveries to, so that
//! Postgres, the publisher and the acks all work at once:
//!
//! 1. record (replays only): a replay whose executor class has no queue is kept
//!    ([`Routes`]); the new attempts of the others, of whatever deliveries are ready, are
//!    recorded in one transaction ([`Writes::record_replays`]); a task Postgres does not
//!    know yet is recorded from its dead letter first ([`record::record_replay`]).
//! 2. send: each replay published with `mandatory` and awaited until confirmed, up to
//!    `in_flight` at once, and its dead letter acked only then (a purge only acks).
//! 3. mark: the acked dead letters noted replayed (or purged) in Postgres, in batches.
//!
//! A delivery that fails at any stage is dropped un-acked: it stays held, and returns to
//! the queue when the pass closes its channel.

use std::sync::Arc;
use std::time::Duration;

use gantry_shared::amqp::{self, publish_confirmed, timed};
use gantry_shared::dead_letter::{DeadLetter, Replay};
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

use super::pass::{Action, Entry, Outcome, Summary, collect};
use super::routes::Routes;
use super::writes::{Mark, Writes};
use super::{DeadLetters, record};
use crate::{Error, Result};

/// Most deliveries recorded in one transaction, or marked in one statement.
const BATCH: usize = 256;
/// How long the mark stage gathers acked dead letters before it writes them: longer means
/// fewer, larger writes, and a longer window in which a killed pass leaves a replayed dead
/// letter unmarked.
const MARK_LINGER: Duration = Duration::from_millis(50);

/// One matching delivery on its way through the stages.
pub(super) struct Item {
    pub(super) delivery: Delivery,
    pub(super) letter: DeadLetter,
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
        let store = dl.tracker.store().await?.clone();
        let connect = || async {
            Writes::connect(config)
                .await
                .map_err(|e| dl.tracker.database_error(e))
        };
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let (input, input_rx) = mpsc::channel(BATCH);
        let (marks, marks_rx) = mpsc::unbounded_channel();
        let mut stages = JoinSet::new();
        let send = Send {
            timeout,
            in_flight,
            marks,
            reports: reports_tx.clone(),
            queue: queue.clone(),
        };
        let (to_send, send_rx) = mpsc::channel(2);
        let (sender, replays, mark_as) = match action {
            Action::Replay(_) => {
                let connection = dl.connect("publish").await?;
                let channel = match amqp::confirm_channel(&connection, timeout).await {
                    Ok(channel) => channel,
                    Err(e) => {
                        super::close(None, &connection).await;
                        return Err(Error::broker(e));
                    }
                };
                let connection = Arc::new(connection);
                let routes = Routes::new(connection.clone(), dl.topology.clone(), timeout);
                let sender = Sender::Replay {
                    channel,
                    connection,
                    exchange: dl.topology.tasks_exchange(),
                };
                let writes = connect().await?;
                (sender, Some(Replays { writes, routes }), Mark::Replayed)
            }
            Action::Purge(_) => (Sender::Purge, None, Mark::Purged),
        };
        let mark_writes = connect().await?;
        let recorder = Recorder {
            replays,
            store,
            reports: reports_tx.clone(),
            queue,
        };
        stages.spawn(recorder.run(input_rx, to_send));
        stages.spawn(send.run(send_rx, sender));
        stages.spawn(mark(marks_rx, mark_writes, mark_as, reports_tx.clone()));
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

fn apply(stop: &mut Option<String>, summary: &mut Summary, report: Report) {
    match report {
        Report::Outcome(outcome) => collect(summary, outcome),
        Report::Warning(warning) => summary.warnings.push(warning),
        Report::Stop(why) => {
            stop.get_or_insert(why);
        }
    }
}

/// Stage 1: gathers what is ready into batches and, for a replay, records their new
/// attempts; hands each batch on whole, so it records the next while the last is sent.
struct Recorder {
    /// `None` for a purge: nothing to check or record before the ack.
    replays: Option<Replays>,
    store: Store,
    reports: UnboundedSender<Report>,
    queue: String,
}

/// What the recorder of a replay uses.
struct Replays {
    writes: Writes,
    routes: Routes,
}

impl Recorder {
    async fn run(mut self, mut input: mpsc::Receiver<Item>, output: mpsc::Sender<Vec<Item>>) {
        while let Some(first) = input.recv().await {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match input.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            let batch = self.record(batch).await;
            if let Err(mpsc::error::SendError(batch)) = output.send(batch).await {
                for item in batch {
                    fail(
                        &self.reports,
                        item,
                        "the pass is stopping; nothing was done".into(),
                    );
                }
            }
        }
    }

    /// Checks that each replay has a queue to go to, and records the new attempts of those
    /// that do; returns the items to send on.
    async fn record(&mut self, batch: Vec<Item>) -> Vec<Item> {
        let Some(replays) = self.replays.as_mut() else {
            return batch;
        };
        let mut routed = Vec::with_capacity(batch.len());
        for item in batch {
            let Some(replay) = item.replay.as_ref() else {
                routed.push(item);
                continue;
            };
            match replays.routes.missing(&replay.routing_key).await {
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
            .filter_map(|i| i.replay.as_ref()?.task.map(|(t, a)| (t, a, i.letter.id)))
            .collect();
        let applied = if replays_of.is_empty() {
            Ok(Vec::new())
        } else {
            replays.writes.record_replays(&replays_of).await
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
                    &item.letter,
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

/// Stage 2: publish with a confirm, then ack; several at once.
struct Send {
    timeout: Duration,
    in_flight: usize,
    marks: UnboundedSender<Uuid>,
    reports: UnboundedSender<Report>,
    queue: String,
}

impl Send {
    async fn run(self, mut input: mpsc::Receiver<Vec<Item>>, sender: Sender) {
        let sender = Arc::new(sender);
        let mut running: JoinSet<Vec<Report>> = JoinSet::new();
        while let Some(batch) = input.recv().await {
            for item in batch {
                while running.len() >= self.in_flight {
                    if let Some(joined) = running.join_next().await {
                        self.report(joined);
                    }
                }
                let (sender, marks) = (sender.clone(), self.marks.clone());
                let (timeout, queue) = (self.timeout, self.queue.clone());
                running.spawn(async move { send(sender, item, timeout, &queue, &marks).await });
                while let Some(joined) = running.try_join_next() {
                    self.report(joined);
                }
            }
        }
        while let Some(joined) = running.join_next().await {
            self.report(joined);
        }
        if let Sender::Replay {
            channel,
            connection,
            ..
        } = sender.as_ref()
        {
            super::close(Some(channel), connection).await;
        }
    }

    fn report(&self, joined: std::result::Result<Vec<Report>, JoinError>) {
        match joined {
            Ok(reports) => {
                for report in reports {
                    let _ = self.reports.send(report);
                }
            }
            Err(e) => {
                let warning = format!(
                    "a dead letter's publish stopped ({e}); it stays in {}",
                    self.queue
                );
                let _ = self.reports.send(Report::Warning(warning));
            }
        }
    }
}

/// Publishes one replay (or nothing, for a purge), then acks its dead letter.
async fn send(
    sender: Arc<Sender>,
    item: Item,
    timeout: Duration,
    queue: &str,
    marks: &UnboundedSender<Uuid>,
) -> Vec<Report> {
    let Item {
        delivery,
        letter,
        entry,
        replay,
    } = item;
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
            info!(dead_letter_id = %letter.id, error = %chain(&e), "replay not published; the dead letter stays");
            let error = format!("{}; it stays in {queue}", chain(&e));
            let mut reports = vec![Report::Outcome((entry, Err(error)))];
            if !matches!(
                e,
                gantry_shared::Error::Unroutable { .. }
                    | gantry_shared::Error::PublishNacked { .. }
            ) {
                reports.push(Report::Stop(format!("publishing failed: {}", chain(&e))));
            }
            return reports;
        }
    }
    if let Err(e) = ack(&delivery, timeout).await {
        let error = match sender.as_ref() {
            Sender::Replay { .. } => format!(
                "published, but {e}: it stays in {queue}, and the next replay publishes it again (the dispatcher runs one job per attempt)"
            ),
            Sender::Purge => format!("{e}; it stays in {queue}"),
        };
        return vec![Report::Outcome((entry, Err(error)))];
    }
    let _ = marks.send(letter.id);
    vec![Report::Outcome((entry, Ok(None)))]
}

/// Acks one delivery, within `timeout`.
async fn ack(delivery: &Delivery, timeout: Duration) -> std::result::Result<(), String> {
    match timed(
        "basic.ack",
        timeout,
        delivery.acker.ack(BasicAckOptions::default()),
    )
    .await
    {
        Ok(true) => Ok(()),
        Ok(false) => Err("the ack was refused (the channel is closed)".into()),
        Err(e) => Err(format!("the ack failed ({})", chain(&e))),
    }
}

/// Stage 3: note the acked dead letters in Postgres, in batches.
async fn mark(
    mut ids: UnboundedReceiver<Uuid>,
    mut writes: Writes,
    mark: Mark,
    reports: UnboundedSender<Report>,
) {
    while let Some(first) = ids.recv().await {
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + MARK_LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(until, ids.recv()).await {
                Ok(Some(id)) => batch.push(id),
                Ok(None) | Err(_) => break,
            }
        }
        if let Err(e) = writes.mark(&batch, mark).await {
            let (done, column) = match mark {
                Mark::Replayed => ("replayed", "replayed_at"),
                Mark::Purged => ("purged", "purged_at"),
            };
            let _ = reports.send(Report::Warning(format!(
                "{} dead letters were {done}, but their {column} could not be written ({}); `gantry dlq list` still shows them",
                batch.len(),
                chain(&e)
            )));
        }
    }
}
