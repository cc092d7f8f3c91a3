//! At-least-once delivery, on purpose: a copy of every task message that reaches a test's
//! tasks exchange, published again when the test says so. RabbitMQ may deliver a message
//! more than once (a redelivery after a lost ack, a copy dead-lettered twice out of a delay
//! queue, a republish whose ack was lost), and whatever the copy arrives after (its task
//! running, ended, its Job deleted), the dispatcher must not run an attempt twice.
//!
//! A server-named exclusive queue bound to `<prefix>.tasks` with `#` sees every task
//! message, first publishes and retries alike; copies carry the header
//! [`COPY_HEADER`] so they are not copied again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use gantry_shared::amqp::{self, Publisher};
use gantry_shared::retry;
use lapin::options::{BasicConsumeOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use tokio::sync::watch;

use crate::{TestEnv, amqp_url};

/// Header that marks a copy.
pub const COPY_HEADER: &str = "x-test-copy";

/// One message as the exchange routed it.
#[derive(Clone)]
struct Held {
    routing_key: String,
    body: Vec<u8>,
    props: BasicProperties,
}

/// Copies of a test's task messages, held until [`Duplicator::release`].
pub struct Duplicator {
    conn: Connection,
    held: Arc<Mutex<Vec<Held>>>,
    seen: watch::Receiver<usize>,
    publisher: Publisher,
    exchange: String,
}

impl Duplicator {
    /// Starts copying the task messages of `env`.
    ///
    /// # Errors
    /// The broker cannot be reached.
    pub async fn start(env: &TestEnv) -> Result<Duplicator> {
        let conn = amqp::connect(
            &amqp_url().into(),
            "gantry-tests/duplicator",
            Duration::from_secs(10),
        )
        .await?;
        let channel = conn.create_channel().await?;
        let queue = env
            .reply_queue(&channel)
            .await
            .context("declaring the duplicator's queue")?;
        let exchange = env.topology().tasks_exchange();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "duplicator".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let held = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = watch::channel(0);
        let keep = held.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let headers = delivery.properties.headers().clone().unwrap_or_default();
                if headers.inner().contains_key(COPY_HEADER) {
                    continue;
                }
                let mut copy = FieldTable::default();
                for (k, v) in headers.inner() {
                    if !k.as_str().starts_with("x-death")
                        && !k.as_str().starts_with("x-first-death")
                    {
                        copy.insert(k.clone(), v.clone());
                    }
                }
                copy.insert(COPY_HEADER.into(), AMQPValue::Boolean(true));
                let held = Held {
                    routing_key: delivery.routing_key.to_string(),
                    body: delivery.data.clone(),
                    props: delivery.properties.clone().with_headers(copy),
                };
                let n = {
                    let mut all = keep.lock().unwrap_or_else(|p| p.into_inner());
                    all.push(held);
                    all.len()
                };
                count.send_replace(n);
            }
        });
        let publisher = env.publisher().await?;
        Ok(Duplicator {
            conn,
            held,
            seen,
            publisher,
            exchange,
        })
    }

    /// Waits until `n` messages have been copied.
    ///
    /// # Errors
    /// Fewer arrive within `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Result<()> {
        let mut seen = self.seen.clone();
        match tokio::time::timeout(timeout, seen.wait_for(|seen| *seen >= n)).await {
            Ok(r) => r.map(drop).context("the duplicator stopped"),
            Err(_) => anyhow::bail!(
                "only {} of {n} task messages were seen within {timeout:?}",
                *self.seen.borrow()
            ),
        }
    }

    /// How many task messages have been seen (and copied) so far.
    pub fn seen(&self) -> usize {
        *self.seen.borrow()
    }

    /// Publishes every copy held so far to the tasks exchange, confirmed; how many.
    ///
    /// # Errors
    /// A publish fails.
    pub async fn release(&self) -> Result<usize> {
        let held: Vec<Held> =
            std::mem::take(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()));
        for m in &held {
            self.publisher
                .publish(
                    &self.exchange,
                    &m.routing_key,
                    &m.body,
                    m.props.clone(),
                    true,
                    retry::for_at_most(Duration::from_secs(10)),
                )
                .await?;
        }
        Ok(held.len())
    }

    /// Stops copying.
    pub async fn close(self) {
        self.publisher.close().await;
        let _ = self.conn.close(200, "bye".into()).await;
    }
}
