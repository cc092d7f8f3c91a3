//! Dead-lettering a message the dispatcher or recorder refuses, with a readable reason.
//!
//! RabbitMQ's own `basic.reject` would dead-letter the message but cannot say why, so the
//! message is republished to the dead-letter exchange with `x-gantry-reason` (and an id that
//! makes its audit idempotent), confirmed, and only then acked by the caller. The stale
//! `expiration` is dropped: a dead letter must not expire out of `gantry.dead`.

use chrono::Utc;
use gantry_shared::amqp::Publisher;
use gantry_shared::message::headers;
use gantry_shared::retry;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use tracing::warn;
use uuid::Uuid;

use crate::Result;

/// A message refused: where it came from and what it is.
pub(crate) struct Refused<'a> {
    pub(crate) routing_key: &'a str,
    pub(crate) properties: &'a BasicProperties,
    pub(crate) body: &'a [u8],
}

impl<'a> From<&'a Delivery> for Refused<'a> {
    fn from(delivery: &'a Delivery) -> Self {
        Refused {
            routing_key: delivery.routing_key.as_str(),
            properties: &delivery.properties,
            body: &delivery.data,
        }
    }
}

/// Publishes `delivery` to the dead-letter exchange `dlx` with `reason`, from `queue`.
///
/// # Errors
/// The publish could not be confirmed (after retries); the caller must not ack.
pub(crate) async fn publish(
    publisher: &Publisher,
    dlx: &str,
    queue: &str,
    delivery: &Delivery,
    reason: &str,
) -> Result<()> {
    publish_message(publisher, dlx, queue, &Refused::from(delivery), reason).await
}

/// Publishes a refused message to the dead-letter exchange `dlx` with `reason`, from
/// `queue`: a delivery, or a message made from one (a Celery task converted, then refused).
///
/// # Errors
/// As [`publish`].
pub(crate) async fn publish_message(
    publisher: &Publisher,
    dlx: &str,
    queue: &str,
    message: &Refused<'_>,
    reason: &str,
) -> Result<()> {
    let mut table = message.properties.headers().clone().unwrap_or_default();
    let mut put = |k: &str, v: &str| {
        table.insert(k.into(), AMQPValue::LongString(v.into()));
    };
    put(headers::REASON, reason);
    put(
        headers::DEAD_LETTER_ID,
        &letter_id(queue, message, reason).to_string(),
    );
    put(headers::ORIGINAL_QUEUE, queue);
    put(headers::ORIGINAL_ROUTING_KEY, message.routing_key);
    table.insert(
        headers::DEAD_AT.into(),
        AMQPValue::Timestamp(Utc::now().timestamp().max(0) as u64),
    );
    let props = strip_expiration(message.properties.clone()).with_headers(table);
    publisher
        .publish(
            dlx,
            queue,
            message.body,
            props,
            true,
            retry::for_at_most(std::time::Duration::from_secs(60)),
        )
        .await
        .inspect_err(
            |e| warn!(error = %e, "could not dead-letter a message; it stays in its queue"),
        )?;
    Ok(())
}

/// The same id for the same message refused for the same reason, so a redelivery after a
/// lost ack (the dead letter is published again) is recorded once.
fn letter_id(queue: &str, message: &Refused<'_>, reason: &str) -> Uuid {
    let mut key = Vec::with_capacity(message.body.len() + 128);
    for part in [
        queue,
        reason,
        message
            .properties
            .message_id()
            .as_ref()
            .map_or("", |m| m.as_str()),
    ] {
        key.extend_from_slice(part.as_bytes());
        key.push(0);
    }
    key.extend_from_slice(message.body);
    Uuid::new_v5(&Uuid::NAMESPACE_OID, &key)
}

/// The same properties without `expiration`.
fn strip_expiration(p: BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default().with_headers(p.headers().clone().unwrap_or_default());
    macro_rules! copy {
        ($get:ident, $with:ident) => {
            if let Some(v) = p.$get().clone() {
                out = out.$with(v);
            }
        };
    }
    copy!(content_type, with_content_type);
    copy!(content_encoding, with_content_encoding);
    copy!(delivery_mode, with_delivery_mode);
    copy!(priority, with_priority);
    copy!(correlation_id, with_correlation_id);
    copy!(reply_to, with_reply_to);
    copy!(message_id, with_message_id);
    copy!(timestamp, with_timestamp);
    copy!(kind, with_type);
    copy!(app_id, with_app_id);
    out
}
