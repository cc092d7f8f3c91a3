//! [`DeadLetters`], the handle every command on dead letters goes through: its prefix's
//! topology, its reader of Postgres, and the broker connections it opens.

use std::fmt;
use std::time::Duration;

use gantry_producer::Tracker;
use gantry_shared::amqp::{self, is_not_found};
use gantry_shared::config::Config;
use gantry_shared::topology::Topology;
use lapin::{Channel, Connection};

use crate::{Error, Result};

/// The name the connections of `gantry dlq` show in RabbitMQ's management UI.
const CONNECTION_NAME: &str = "gantry-dlq";

/// Reads, replays and purges the dead letters of one prefix. Connects nothing until a
/// method needs it: Postgres for `list` and `show`, RabbitMQ for the queue.
#[derive(Clone)]
pub struct DeadLetters {
    pub(super) tracker: Tracker,
    pub(super) topology: Topology,
}

impl fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetters")
            .field("queue", &self.topology.dead_queue())
            .field("tracker", &self.tracker)
            .finish()
    }
}

impl DeadLetters {
    /// A handle for the configured prefix and database.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid prefix.
    pub fn new(config: &Config) -> Result<DeadLetters> {
        Ok(DeadLetters {
            tracker: Tracker::new(config),
            topology: Topology::new(&config.prefix).map_err(Error::config)?,
        })
    }

    /// The queue that keeps dead letters for operators, `<prefix>.dead`.
    pub fn queue(&self) -> String {
        self.topology.dead_queue()
    }

    /// The reader of Postgres this handle uses.
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    pub(super) fn config(&self) -> &Config {
        self.tracker.config()
    }

    /// A failed query of this handle's database, naming the database (not its password).
    pub(super) fn database_error(&self, source: gantry_shared::Error) -> Error {
        Error::Database {
            url: self.tracker.database_url_redacted(),
            source: Box::new(source),
        }
    }

    pub(super) async fn connect(&self, name: &str) -> Result<Connection> {
        let name = format!("{CONNECTION_NAME}/{name}");
        amqp::connect(&self.config().amqp_url, &name, self.config().broker_timeout)
            .await
            .map_err(Error::broker)
    }

    /// The passive declare of `<prefix>.dead` on `channel` (which a missing queue closes).
    pub(super) async fn depth(&self, channel: &Channel) -> Result<u32> {
        let queue = self.queue();
        let declared = amqp::peek_queue(channel, &queue, self.config().broker_timeout).await;
        match declared {
            Ok(q) => Ok(q.message_count()),
            Err(gantry_shared::Error::Amqp { source, .. }) if is_not_found(&source) => {
                Err(Error::NoDeadQueue {
                    queue,
                    prefix: self.topology.prefix().to_owned(),
                })
            }
            Err(e) => Err(Error::broker(e)),
        }
    }
}

/// Closes a channel (if still open) and its connection, politely and briefly: the broker
/// cleans up after a dropped connection as well. Un-acked deliveries return to their queue.
pub(super) async fn close(channel: Option<&Channel>, conn: &Connection) {
    let closing = async {
        if let Some(channel) = channel.filter(|c| c.status().connected()) {
            let _ = channel.close(200, "bye".into()).await;
        }
        if conn.status().connected() {
            let _ = conn.close(200, "bye".into()).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
}
