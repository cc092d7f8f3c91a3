//! Publishing a streamed answer's pieces as `gantry.progress/v1` messages: to the
//! `<prefix>.progress` topic exchange (routing key = task id) and to the task's reply-to
//! queue when it has one.
//!
//! Best effort by design: the engine hands pieces over a channel and never waits for the
//! broker; the publisher connects while the engine starts, sends without confirms, and
//! after a broker failure drops the rest (the result still carries the whole answer). It is
//! closed before the result is published, so a reader sees the pieces before the result.

use std::time::Duration;

use gantry_shared::amqp;
use gantry_shared::config::Config;
use gantry_shared::message::{Attempt, Progress, TaskId};
use gantry_shared::topology::Topology;
use lapin::options::BasicPublishOptions;
use lapin::{Channel, Connection};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::engine::Deltas;

/// Longest wait for the last pieces to leave before the result is published.
const FLUSH_WITHIN: Duration = Duration::from_secs(5);

/// A running publisher of one attempt's progress.
pub(crate) struct ProgressPublisher {
    deltas: Deltas,
    task: JoinHandle<Sent>,
}

/// What the publisher did.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    published: u64,
    dropped: u64,
}

impl ProgressPublisher {
    /// Starts publishing the progress of `attempt` of `task_id`; pieces go in through
    /// [`ProgressPublisher::deltas`].
    pub(crate) fn start(
        config: &Config,
        task_id: TaskId,
        attempt: Attempt,
        reply_to: Option<String>,
    ) -> ProgressPublisher {
        let (deltas, pieces) = mpsc::unbounded_channel();
        let task = tokio::spawn(publish(config.clone(), task_id, attempt, reply_to, pieces));
        ProgressPublisher { deltas, task }
    }

    pub(crate) fn deltas(&self) -> &Deltas {
        &self.deltas
    }

    /// Sends what is left and closes the connection, within a bound.
    pub(crate) async fn finish(self) {
        drop(self.deltas);
        match tokio::time::timeout(FLUSH_WITHIN, self.task).await {
            Ok(Ok(sent)) => info!(
                published = sent.published,
                dropped = sent.dropped,
                "progress published"
            ),
            Ok(Err(e)) => warn!(error = %e, "the progress publisher failed"),
            Err(_) => {
                warn!(within = ?FLUSH_WITHIN, "progress was still being sent; the rest is dropped")
            }
        }
    }
}

async fn publish(
    config: Config,
    task_id: TaskId,
    attempt: Attempt,
    reply_to: Option<String>,
    mut pieces: mpsc::UnboundedReceiver<String>,
) -> Sent {
    let mut sent = Sent::default();
    let target = match connect(&config).await {
        Ok(target) => Some(target),
        Err(e) => {
            warn!(error = %e, "cannot reach RabbitMQ for progress; the answer's pieces are not streamed (the result still holds it all)");
            None
        }
    };
    let exchange = Topology::new(&config.prefix).map(|t| t.progress_exchange());
    let routing_key = task_id.to_string();
    let mut seq = 0;
    while let Some(delta) = pieces.recv().await {
        let progress = Progress {
            task_id,
            attempt,
            seq,
            delta,
        };
        seq += 1;
        let (Some((_, channel)), Ok(exchange)) = (&target, &exchange) else {
            sent.dropped += 1;
            continue;
        };
        let Ok((body, props)) = progress.to_amqp() else {
            sent.dropped += 1;
            continue;
        };
        let mut ok = send(channel, exchange, &routing_key, &body, props.clone()).await;
        if let Some(queue) = &reply_to {
            ok &= send(channel, "", queue, &body, props).await;
        }
        if ok {
            sent.published += 1;
        } else {
            sent.dropped += 1;
        }
    }
    if let Some((connection, channel)) = target {
        // Closing the channel waits until the broker has taken everything sent on it.
        let _ = channel.close(200, "progress done".into()).await;
        let _ = connection.close(200, "progress done".into()).await;
    }
    sent
}

async fn connect(config: &Config) -> gantry_shared::Result<(Connection, Channel)> {
    let connection = amqp::connect(
        &config.amqp_url,
        "gantry-executor progress",
        config.broker_timeout,
    )
    .await?;
    let channel = amqp::timed(
        "open a channel",
        config.broker_timeout,
        connection.create_channel(),
    )
    .await?;
    Ok((connection, channel))
}

async fn send(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: lapin::BasicProperties,
) -> bool {
    match channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
    {
        Ok(_) => true,
        Err(e) => {
            debug!(exchange, routing_key, error = %e, "a progress message was not sent");
            false
        }
    }
}
