//! [`TaskStream`]: a task's progress as it is made (an LLM's tokens), then its end, for a
//! task submitted with [`Producer::submit_streaming`](crate::Producer::submit_streaming).
//!
//! Before the task is published, a queue of the caller's own (exclusive, auto-delete, named
//! by the broker) is bound to `<prefix>.progress` with the task id as routing key and
//! consumed, so no piece can be published before someone listens. The stream ends exactly,
//! not after a pause: an executor has sent all its progress before it publishes the result,
//! and the task is terminal in Postgres only once that result is stored. When Postgres says
//! the task has ended, every piece is therefore in the queue already; a marker sent to the
//! queue behind them comes back after the last one (a queue is first in, first out), and
//! only then does the stream yield [`StreamEvent::Finished`].
//!
//! Progress is best effort. Each piece carries its attempt and a sequence number counting
//! from 0 within the attempt: a number skipped is a piece lost on the way, and a retried task
//! starts over at 0 with the next attempt. The result is stored whole whatever was lost: the
//! text of the attempt that succeeded is the result's, not the pieces'.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use gantry_shared::amqp::{is_not_found, timed};
use gantry_shared::message::{Progress, TaskId};
use gantry_shared::store::TaskRecord;
use gantry_shared::topology::Topology;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Consumer};
use tokio::sync::mpsc;
use tracing::{debug, instrument, warn};

use crate::tracker::Tracker;
use crate::{Error, Result};

/// Events held for a reader that has not taken them yet; the broker holds the rest.
const BUFFERED_EVENTS: usize = 64;

/// The `type` property of the marker that closes a stream.
const END_MARKER: &str = "gantry.stream-end";

/// What happens to a streamed task, in the order it happens.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// A piece of the answer, as the executor sent it. A skipped `seq` is a lost piece; a
    /// greater `attempt` starts over at `seq` 0 (the earlier attempt failed and was retried).
    Progress(Progress),
    /// No more progress will come (the broker connection that carried it broke, or its end
    /// marker did not come back); [`StreamEvent::Finished`] still comes, with the whole
    /// result.
    ProgressLost {
        /// What happened, for a log or a note to the user.
        reason: String,
    },
    /// The task is terminal in Postgres, and every piece that reached the queue was yielded
    /// before this. The last event.
    Finished(Box<TaskRecord>),
}

/// The events of one streamed task: [`StreamEvent::Progress`] as the pieces arrive, then
/// [`StreamEvent::Finished`], or an error that ends it ([`Error::WaitTimeout`] when the task
/// is not over in time, [`Error::Database`], [`Error::ListenLost`]).
///
/// Its queue and channel are removed when the stream ends or is dropped; the task itself
/// goes on regardless (follow it with [`Producer::wait`](crate::Producer::wait)).
#[derive(Debug)]
pub struct TaskStream {
    task_id: TaskId,
    events: mpsc::Receiver<Result<StreamEvent>>,
}

impl TaskStream {
    /// The id of the task this stream follows.
    pub fn task_id(&self) -> TaskId {
        self.task_id
    }
}

impl Stream for TaskStream {
    type Item = Result<StreamEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

/// A queue of the caller's own, bound to one task's progress and consumed, before the task
/// is published.
pub(crate) struct Listening {
    channel: Channel,
    queue: ShortString,
    consumer: Consumer,
    task_id: TaskId,
    broker_timeout: Duration,
}

impl Listening {
    /// Declares the queue on `channel`, binds it to the progress exchange for `task_id`,
    /// and consumes it.
    ///
    /// # Errors
    /// [`Error::NoExchange`] when the progress exchange was never declared;
    /// [`Error::Broker`] when RabbitMQ refuses or does not answer within `broker_timeout`.
    #[instrument(skip_all, fields(%task_id))]
    pub(crate) async fn start(
        channel: Channel,
        topology: &Topology,
        task_id: TaskId,
        broker_timeout: Duration,
    ) -> Result<Listening> {
        let exchange = topology.progress_exchange();
        let queue = timed(
            "queue.declare",
            broker_timeout,
            channel.queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .map_err(Error::broker)?
        .name()
        .clone();
        timed(
            "queue.bind",
            broker_timeout,
            channel.queue_bind(
                queue.clone(),
                exchange.as_str().into(),
                ShortString::from(task_id.to_string()),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .map_err(|e| match e {
            gantry_shared::Error::Amqp { source, .. } if is_not_found(&source) => {
                Error::NoExchange {
                    exchange: exchange.clone(),
                    prefix: topology.prefix().to_owned(),
                }
            }
            other => Error::broker(other),
        })?;
        let consumer = timed(
            "basic.consume",
            broker_timeout,
            channel.basic_consume(
                queue.clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .map_err(Error::broker)?;
        debug!(queue = %queue, exchange, "listening for progress");
        Ok(Listening {
            channel,
            queue,
            consumer,
            task_id,
            broker_timeout,
        })
    }

    /// Follows the task, now published, in a task of its own: its progress until Postgres
    /// says it has ended (within `timeout`), the rest of its progress, then its end.
    pub(crate) fn follow(self, tracker: Tracker, timeout: Duration) -> TaskStream {
        let (events, receiver) = mpsc::channel(BUFFERED_EVENTS);
        let task_id = self.task_id;
        tokio::spawn(self.pump(tracker, timeout, events));
        TaskStream {
            task_id,
            events: receiver,
        }
    }

    /// Closes the channel, which removes the queue.
    pub(crate) async fn close(self) {
        let closing = self.channel.close(200, "stream done".into());
        if let Err(e) = timed("channel.close", self.broker_timeout, closing).await {
            debug!(error = %e, "closing the progress channel");
        }
    }

    #[instrument(skip_all, fields(task_id = %self.task_id, queue = %self.queue))]
    async fn pump(
        mut self,
        tracker: Tracker,
        timeout: Duration,
        events: mpsc::Sender<Result<StreamEvent>>,
    ) {
        let waiting = tracker.wait(self.task_id, timeout);
        tokio::pin!(waiting);
        let mut listening = true;
        let record = loop {
            tokio::select! {
                biased;
                () = events.closed() => return self.close().await,
                delivery = self.consumer.next(), if listening => {
                    let event = match delivery {
                        Some(Ok(delivery)) => {
                            match self.progress(&delivery.properties, &delivery.data) {
                                Some(progress) => StreamEvent::Progress(progress),
                                None => continue,
                            }
                        }
                        Some(Err(e)) => {
                            listening = false;
                            lost(format!("the progress channel failed: {e}"))
                        }
                        None => {
                            listening = false;
                            lost("the progress channel closed".into())
                        }
                    };
                    if events.send(Ok(event)).await.is_err() {
                        return self.close().await;
                    }
                }
                ended = &mut waiting => match ended {
                    Ok(record) => break record,
                    Err(e) => {
                        let _ = events.send(Err(e)).await;
                        return self.close().await;
                    }
                },
            }
        };
        if listening && let Err(reason) = self.drain(&events).await {
            let _ = events.send(Ok(lost(reason))).await;
        }
        self.close().await;
        let _ = events
            .send(Ok(StreamEvent::Finished(Box::new(record))))
            .await;
    }

    /// Yields what is left in the queue: sends the end marker behind it and reads until the
    /// marker comes back.
    ///
    /// # Errors
    /// Why the rest of the progress cannot be read.
    async fn drain(&mut self, events: &mpsc::Sender<Result<StreamEvent>>) -> Result<(), String> {
        let marker = BasicProperties::default()
            .with_type(END_MARKER.into())
            .with_message_id(self.queue.clone());
        let sending = self.channel.basic_publish(
            "".into(),
            self.queue.clone(),
            BasicPublishOptions::default(),
            &[],
            marker,
        );
        timed("basic.publish", self.broker_timeout, sending)
            .await
            .map_err(|e| format!("the end marker could not be sent: {e}"))?;
        loop {
            let delivery = tokio::time::timeout(self.broker_timeout, self.consumer.next())
                .await
                .map_err(|_| {
                    format!(
                        "the end marker did not come back within {}",
                        crate::human_duration(self.broker_timeout)
                    )
                })?
                .ok_or("the progress channel closed")?
                .map_err(|e| format!("the progress channel failed: {e}"))?;
            if self.is_end_marker(&delivery.properties) {
                return Ok(());
            }
            if let Some(progress) = self.progress(&delivery.properties, &delivery.data)
                && events
                    .send(Ok(StreamEvent::Progress(progress)))
                    .await
                    .is_err()
            {
                // Nobody reads any more: the rest does not matter.
                return Ok(());
            }
        }
    }

    /// The progress of this task that a message carries, if it carries any.
    fn progress(&self, properties: &BasicProperties, body: &[u8]) -> Option<Progress> {
        match Progress::from_amqp(properties, body) {
            Ok(progress) if progress.task_id == self.task_id => Some(progress),
            Ok(progress) => {
                warn!(other = %progress.task_id, "ignoring the progress of another task");
                None
            }
            Err(e) => {
                warn!(error = %e, "ignoring a message that is not progress");
                None
            }
        }
    }

    fn is_end_marker(&self, properties: &BasicProperties) -> bool {
        properties.kind().as_ref().map(ShortString::as_str) == Some(END_MARKER)
            && properties.message_id().as_ref() == Some(&self.queue)
    }
}

fn lost(reason: String) -> StreamEvent {
    warn!(%reason, "no more progress will come; the result will");
    StreamEvent::ProgressLost { reason }
}
