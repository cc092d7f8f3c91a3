//! AMQP plumbing: connecting with backoff, publishing with confirms, and a [`Publisher`]
//! that reconnects by itself.
//!
//! Publishing and consuming use separate connections: a memory or disk alarm blocks
//! publishing connections only, and must not stall consumers that would free space.

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Queue};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::config::redact_url;
use crate::{Error, Result};

/// The largest AMQP frame a connection asks for, unless its URL says (`?frame_max=`).
/// lapin keeps two buffers of 32 frames per connection, zero-filled when it connects: at
/// RabbitMQ's default of 128 KiB that is 8 MiB of memory per connection, at 16 KiB 1 MiB.
/// A larger message only travels in more frames.
pub const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// Opens one connection, failing after `timeout`.
///
/// # Errors
/// [`Error::AmqpConnect`] or [`Error::AmqpTimeout`].
pub async fn connect(url: &SecretString, name: &str, timeout: Duration) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    let mut uri: AMQPUri = url
        .expose_secret()
        .parse()
        .map_err(|message| Error::AmqpUrl {
            url: redact_url(url.expose_secret()),
            message,
        })?;
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    let connecting = Connection::connect_uri(uri, props);
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(Error::AmqpConnect {
            url: redact_url(url.expose_secret()),
            source,
        }),
        Err(_) => Err(Error::AmqpTimeout {
            operation: "connect",
            timeout,
        }),
    }
}

/// Connects, retrying with backoff for as long as `policy` allows.
///
/// # Errors
/// The last connection error once the policy gives up.
pub async fn connect_with_retry(
    url: &SecretString,
    name: &str,
    timeout: Duration,
    policy: backon::ExponentialBuilder,
) -> Result<Connection> {
    (|| connect(url, name, timeout))
        .retry(policy)
        .notify(|e, delay| warn!(error = %e, ?delay, "RabbitMQ unavailable; retrying"))
        .await
}

/// Looks at a queue without creating it (a passive declare, within `timeout`): its ready
/// messages and consumers. A missing queue is an [`Error::Amqp`] whose source is a 404 (and the
/// broker closes the channel).
///
/// # Errors
/// As [`timed`].
pub async fn peek_queue(channel: &Channel, queue: &str, timeout: Duration) -> Result<Queue> {
    timed(
        "queue.declare",
        timeout,
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
}

/// Puts `timeout` around one broker operation.
///
/// # Errors
/// [`Error::AmqpTimeout`] or the operation's own error as [`Error::Amqp`].
pub async fn timed<T>(
    operation: &'static str,
    timeout: Duration,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(|source| Error::Amqp { operation, source }),
        Err(_) => Err(Error::AmqpTimeout { operation, timeout }),
    }
}

/// Publishes one message on a confirm-mode channel and waits for the broker's confirm.
///
/// A `mandatory` publish that no queue takes is confirmed as an ack that carries the
/// returned message: that is [`Error::Unroutable`], not success.
///
/// # Errors
/// [`Error::Unroutable`], [`Error::PublishNacked`], or a broker error or timeout.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    mandatory: bool,
    timeout: Duration,
) -> Result<()> {
    let options = BasicPublishOptions {
        mandatory,
        ..BasicPublishOptions::default()
    };
    let routing = ShortString::try_new(routing_key).map_err(|e| Error::Config {
        origin: "routing key".into(),
        message: e.to_string(),
    })?;
    let confirm = timed(
        "basic.publish",
        timeout,
        channel.basic_publish(exchange.into(), routing, options, body, props),
    )
    .await?;
    match timed("publisher confirm", timeout, confirm).await? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(Error::Unroutable {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        }),
        Confirmation::Nack(_) => Err(Error::PublishNacked {
            exchange: exchange.to_owned(),
        }),
        Confirmation::NotRequested => {
            unreachable!("publish_confirmed is only used on confirm-mode channels")
        }
    }
}

/// Opens a channel with publisher confirms on.
///
/// # Errors
/// A broker error or timeout.
pub async fn confirm_channel(conn: &Connection, timeout: Duration) -> Result<Channel> {
    let channel = timed("channel.open", timeout, conn.create_channel()).await?;
    timed(
        "confirm.select",
        timeout,
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(channel)
}

/// Whether the broker refused the operation for good (no such exchange, access refused):
/// trying again cannot help, the topology or the permissions must change.
pub fn is_refusal(e: &Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    let source = match e {
        Error::Amqp { source, .. } | Error::AmqpConnect { source, .. } => source,
        _ => return false,
    };
    matches!(
        source.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND | AMQPSoftError::ACCESSREFUSED)
            )
    )
}

/// Whether the broker closed the channel with 404 NOT_FOUND: a publish to an exchange, or a
/// passive declare of a queue, that does not exist.
pub fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

/// A publisher with confirms that reconnects when its connection breaks.
///
/// Concurrent publishes share one channel, each awaiting its own confirm. A publish that
/// fails because the connection broke is sent again on a new connection, so consumers must
/// tolerate duplicates (Gantry's do: every write is idempotent).
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<PublisherInner>,
}

struct PublisherInner {
    url: SecretString,
    name: String,
    timeout: Duration,
    channel: Mutex<Option<(Connection, Channel)>>,
}

impl Publisher {
    /// Connects now, so a wrong URL fails at start rather than at the first publish.
    ///
    /// # Errors
    /// The broker cannot be reached within `timeout`.
    pub async fn connect(url: &SecretString, name: &str, timeout: Duration) -> Result<Publisher> {
        let publisher = Publisher {
            inner: Arc::new(PublisherInner {
                url: url.clone(),
                name: name.to_owned(),
                timeout,
                channel: Mutex::new(None),
            }),
        };
        publisher.channel().await?;
        Ok(publisher)
    }

    /// The open channel, reconnecting if the last one broke.
    async fn channel(&self) -> Result<Channel> {
        let mut slot = self.inner.channel.lock().await;
        if let Some((conn, channel)) = slot.as_ref()
            && conn.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        debug!(name = %self.inner.name, "opening publishing connection");
        let conn = connect(&self.inner.url, &self.inner.name, self.inner.timeout).await?;
        let channel = confirm_channel(&conn, self.inner.timeout).await?;
        *slot = Some((conn, channel.clone()));
        Ok(channel)
    }

    /// Publishes and waits for the confirm, reconnecting and re-sending on broker failures
    /// for as long as `policy` allows. Unroutable and nacked messages are not retried.
    ///
    /// # Errors
    /// [`Error::Unroutable`], [`Error::PublishNacked`], or the last broker error.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
        mandatory: bool,
        policy: backon::ExponentialBuilder,
    ) -> Result<()> {
        let attempt = || async {
            let channel = self.channel().await?;
            publish_confirmed(
                &channel,
                exchange,
                routing_key,
                body,
                props.clone(),
                mandatory,
                self.inner.timeout,
            )
            .await
        };
        attempt
            .retry(policy)
            .when(|e| {
                matches!(
                    e,
                    Error::AmqpConnect { .. } | Error::Amqp { .. } | Error::AmqpTimeout { .. }
                ) && !is_refusal(e)
            })
            .notify(|e, delay| warn!(error = %e, ?delay, exchange, "publish failed; retrying"))
            .await
    }

    /// Closes the connection cleanly.
    pub async fn close(&self) {
        if let Some((conn, _)) = self.inner.channel.lock().await.take() {
            let _ = conn.close(200, "bye".into()).await;
        }
    }
}
