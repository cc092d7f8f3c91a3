//! Whether a replay has somewhere to go, asked before its task is reopened.
//!
//! A replay is published to `<prefix>.tasks` with the executor class as routing key; the
//! broker returns it when no queue is bound for that class (an `invalid` dead letter with a
//! misspelled class, a class removed from the catalog). The publish is `mandatory`, so that
//! is caught; but by then the task's new attempt is already recorded, and the task would
//! wait in `retrying` for a message that never comes. So each routing key is checked once
//! per pass, before anything is recorded, with a passive declare of the class's queue
//! `<prefix>.tasks.<class>` (the queue Gantry's topology binds to that key).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::amqp::{self, is_not_found, timed};
use gantry_shared::message::ExecutorClass;
use gantry_shared::telemetry::chain;
use gantry_shared::topology::Topology;
use lapin::{Channel, Connection};

/// The answers for one pass, on the publishing connection.
pub(super) struct Routes {
    connection: Arc<Connection>,
    /// A missing queue closes the channel that asked; a new one is opened for the next.
    channel: Option<Channel>,
    topology: Topology,
    timeout: Duration,
    known: HashMap<String, bool>,
}

impl Routes {
    pub(super) fn new(
        connection: Arc<Connection>,
        topology: Topology,
        timeout: Duration,
    ) -> Routes {
        Routes {
            connection,
            channel: None,
            topology,
            timeout,
            known: HashMap::new(),
        }
    }

    /// `None` when `routing_key` has a queue; otherwise why not, and what to do.
    ///
    /// # Errors
    /// The broker did not answer: the text says so.
    pub(super) async fn missing(&mut self, routing_key: &str) -> Result<Option<String>, String> {
        let has_queue = match self.known.get(routing_key) {
            Some(known) => *known,
            None => {
                let answer = self.ask(routing_key).await?;
                self.known.insert(routing_key.to_owned(), answer);
                answer
            }
        };
        Ok((!has_queue).then(|| {
            format!(
                "no queue takes executor class {routing_key:?} on prefix {prefix} (there is no {prefix}.tasks.{routing_key}): \
                 add the class to the executor catalog and declare it (`gantry topology apply`, or a dispatcher that serves it), \
                 then replay again; or purge the dead letter",
                prefix = self.topology.prefix()
            )
        }))
    }

    async fn ask(&mut self, routing_key: &str) -> Result<bool, String> {
        // A routing key that is no class name has no queue in Gantry's topology.
        let Ok(class) = ExecutorClass::parse(routing_key) else {
            return Ok(false);
        };
        let channel = match self.channel.take().filter(|c| c.status().connected()) {
            Some(channel) => channel,
            None => timed(
                "channel.open",
                self.timeout,
                self.connection.create_channel(),
            )
            .await
            .map_err(|e| chain(&e))?,
        };
        let queue = self.topology.task_queue(&class);
        let declared = amqp::peek_queue(&channel, &queue, self.timeout).await;
        match declared {
            Ok(_) => {
                self.channel = Some(channel);
                Ok(true)
            }
            Err(gantry_shared::Error::Amqp { source, .. }) if is_not_found(&source) => Ok(false),
            Err(e) => Err(chain(&e)),
        }
    }
}
