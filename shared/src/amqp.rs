//! AMQP plumbing: connecting with backoff (over TLS for `amqps://`), publishing with
//! confirms, and a [`Publisher`] that reconnects by itself.
//!
//! Publishing and consuming use separate connections: a memory or disk alarm blocks
//! publishing connections only, and must not stall consumers that would free space.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use backon::Retryable;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Queue};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::config::redact_url;
use crate::config::tls::{self, Check, Trust};
use crate::{Error, Result};

/// The largest AMQP frame a connection asks for, unless its URL says (`?frame_max=`).
/// lapin keeps two buffers of 32 frames per connection, zero-filled when it connects: at
/// RabbitMQ's default of 128 KiB that is 8 MiB of memory per connection, at 16 KiB 1 MiB.
/// A larger message only travels in more frames.
pub const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// Opens one connection, failing after `timeout`. An `amqps://` URL connects over TLS,
/// trusting its `cacertfile=` or else the system's roots.
///
/// # Errors
/// [`Error::AmqpConnect`] or [`Error::AmqpTimeout`]; [`Error::AmqpUrl`] for a bad URL;
/// [`Error::TlsCertificate`] when the broker's certificate fails the check,
/// [`Error::TlsCaFile`] or [`Error::TlsSystemRoots`] when there is nothing to check it by.
pub async fn connect(url: &SecretString, name: &str, timeout: Duration) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    let (mut uri, trust) = parse_url(url.expose_secret())?;
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    let server = format!("{}:{}", uri.authority.host, uri.authority.port);
    let tls = match &trust {
        Some(trust) => Some(trust.client_config(Check::ChainAndName)?),
        None => None,
    };
    let connecting = async {
        match tls {
            None => Connection::connect_uri(uri, props).await,
            Some(config) => connect_tls(uri, props, config).await,
        }
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(trust
            .and_then(|trust| tls::refusal(&source, &server, &trust, tls::AMQP_CA_SETTING))
            .unwrap_or_else(|| Error::AmqpConnect {
                url: redact_url(url.expose_secret()),
                source,
            })),
        Err(_) => Err(Error::AmqpTimeout {
            operation: "connect",
            timeout,
        }),
    }
}

/// The URL as lapin reads it, but with the host as written (lapin reads an IPv6 address as
/// `localhost`), and what an `amqps://` URL trusts.
fn parse_url(url: &str) -> Result<(AMQPUri, Option<Trust>)> {
    let bad = |message: String| Error::AmqpUrl {
        url: redact_url(url),
        message,
    };
    let mut uri: AMQPUri = url.parse().map_err(bad)?;
    let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if let Some(url::Host::Ipv6(ip)) = parsed.host() {
        uri.authority.host = ip.to_string();
    }
    Ok((uri, tls::amqp_trust(&parsed)))
}

/// Connects over TLS, checking the broker's certificate by `config`.
async fn connect_tls(
    uri: AMQPUri,
    props: ConnectionProperties,
    config: rustls::ClientConfig,
) -> lapin::Result<Connection> {
    let connector = RustlsConnector::from(config);
    let runtime = lapin::runtime::default_runtime()?;
    let open = async move |uri: AMQPUri, runtime| {
        let host = uri.authority.host.as_str();
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, uri.authority.port))
            .await?
            .collect();
        let stream = AsyncTcpStream::connect(&runtime, addrs).await?;
        Ok(stream.into_rustls(&connector, host).await?)
    };
    Connection::connector(uri, runtime, open, props).await
}

/// Connects, retrying with backoff for as long as `policy` allows. What trying again cannot
/// mend (a bad URL, a refused certificate, a missing CA file) fails at once.
///
/// # Errors
/// The last connection error once the policy gives up, or the first that cannot pass.
pub async fn connect_with_retry(
    url: &SecretString,
    name: &str,
    timeout: Duration,
    policy: backon::ExponentialBuilder,
) -> Result<Connection> {
    (|| connect(url, name, timeout))
        .retry(policy)
        .when(Error::is_transient)
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
    /// Told of each connection opened after one broke (see [`Publisher::on_reconnect`]).
    reconnected: OnceLock<Box<dyn Fn() + Send + Sync>>,
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
                reconnected: OnceLock::new(),
            }),
        };
        publisher.channel().await?;
        Ok(publisher)
    }

    /// The open channel (in confirm mode), reconnecting if the last one broke; for
    /// declaring or deleting queues beside the publishing.
    ///
    /// # Errors
    /// The broker cannot be reached within the timeout.
    pub async fn channel(&self) -> Result<Channel> {
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
        // A slot still holding the broken connection means this one replaces it.
        if slot.replace((conn, channel.clone())).is_some() {
            info!(name = %self.inner.name, "publishing connection reopened");
            if let Some(reconnected) = self.inner.reconnected.get() {
                reconnected();
            }
        }
        Ok(channel)
    }

    /// Calls `reconnected` each time a connection is opened in place of one that broke
    /// (not for the first, nor after [`Publisher::close`]): for a reconnect counter. Only the
    /// first hook given is kept, for every clone of this publisher.
    pub fn on_reconnect(&self, reconnected: impl Fn() + Send + Sync + 'static) {
        let _ = self.inner.reconnected.set(Box::new(reconnected));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_named_by_its_ipv6_address_is_reached_there() {
        let lapin_reads: AMQPUri = "amqp://u:p@[::1]:5672/%2f".parse().unwrap();
        assert_eq!(lapin_reads.authority.host, "localhost");
        for (url, host) in [
            ("amqp://u:p@10.1.2.3:5672/%2f", "10.1.2.3"),
            ("amqps://u:p@[::1]:5671/%2f", "::1"),
            ("amqps://u:p@broker.example:5671/%2f", "broker.example"),
        ] {
            assert_eq!(parse_url(url).unwrap().0.authority.host, host, "{url}");
        }
    }

    #[test]
    fn amqps_trusts_its_cacertfile_else_the_system() {
        let trust = |url| parse_url(url).unwrap().1;
        assert_eq!(trust("amqp://h/%2f?cacertfile=/ca.pem"), None);
        assert_eq!(trust("amqps://h/%2f"), Some(Trust::System));
        assert_eq!(
            trust("amqps://h/%2f?heartbeat=5&cacertfile=%2Fetc%2Fca.pem"),
            Some(Trust::CaFile("/etc/ca.pem".into()))
        );
    }
}
