//! The reconnecting consumer loop every role shares: open a connection and a channel,
//! consume, and when the broker goes away, reconnect with backoff and consume again.
//! Unacked deliveries of a broken channel are requeued by RabbitMQ and come back.

use std::time::Duration;

use gantry_shared::amqp::{self, timed};
use gantry_shared::retry;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How a consuming session ended.
pub(crate) enum SessionEnd {
    /// Shutdown was asked for: stop.
    Shutdown,
    /// The channel or connection broke: reconnect.
    Broken,
}

/// What to consume.
pub(crate) struct Source<'a> {
    pub(crate) url: &'a SecretString,
    pub(crate) name: String,
    pub(crate) queue: String,
    pub(crate) prefetch: u16,
    pub(crate) timeout: Duration,
}

/// An open consumer and the connection it lives on.
pub(crate) struct Session {
    conn: Connection,
    pub(crate) consumer: Consumer,
    _channel: Channel,
}

impl Session {
    /// Closes the connection; unacked deliveries go back to their queue.
    pub(crate) async fn close(self, end: &SessionEnd, queue: &str) {
        let _ = self.conn.close(200, "bye".into()).await;
        if let SessionEnd::Broken = end {
            // A pause before reconnecting, so a failure that repeats does not spin.
            warn!(queue, "consumer session ended; reconnecting in a second");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Opens a consumer on `source`, retrying with backoff; `None` once shutdown is asked for.
/// Callers loop: open, consume until the session ends, close, and open again unless the
/// end was a shutdown.
pub(crate) async fn open_until_shutdown(
    source: &Source<'_>,
    shutdown: &CancellationToken,
) -> Option<Session> {
    let (conn, channel, consumer) = tokio::select! {
        _ = shutdown.cancelled() => return None,
        opened = open_with_retry(source) => opened,
    };
    info!(queue = %source.queue, prefetch = source.prefetch, "consuming");
    Some(Session {
        conn,
        consumer,
        _channel: channel,
    })
}

async fn open_with_retry(source: &Source<'_>) -> (Connection, Channel, Consumer) {
    let mut delays = backon::BackoffBuilder::build(retry::forever());
    loop {
        match open(source).await {
            Ok(opened) => return opened,
            Err(e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                warn!(queue = %source.queue, error = %gantry_shared::telemetry::chain(&e), ?delay, "cannot consume; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn open(source: &Source<'_>) -> gantry_shared::Result<(Connection, Channel, Consumer)> {
    let conn = amqp::connect(source.url, &source.name, source.timeout).await?;
    let channel = timed("channel.open", source.timeout, conn.create_channel()).await?;
    timed(
        "basic.qos",
        source.timeout,
        channel.basic_qos(source.prefetch, BasicQosOptions::default()),
    )
    .await?;
    let consumer = timed(
        "basic.consume",
        source.timeout,
        channel.basic_consume(
            source.queue.as_str().into(),
            source.name.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    Ok((conn, channel, consumer))
}
