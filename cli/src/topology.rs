//! Declaring Gantry's exchanges and queues for the executor classes of a catalog: what
//! `gantry topology apply` does. Declaring is idempotent; the dispatcher does the same at
//! start, so this is for setting up a broker before any service runs.

use std::time::Duration;

use gantry_shared::amqp;
use gantry_shared::config::Config;
use gantry_shared::message::ExecutorClass;
use gantry_shared::topology::{QueueSettings, Topology};
use serde::Serialize;
use tracing::{debug, instrument};

use crate::{Error, Result};

/// The name the connection shows in RabbitMQ's management UI.
const CONNECTION_NAME: &str = "gantry-topology";

/// The names of everything [`apply`] declares, by role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Declared {
    pub prefix: String,
    /// Exchanges and their kind (`topic`, `headers`, `fanout`).
    pub exchanges: Vec<(String, &'static str)>,
    /// One quorum queue per executor class.
    pub task_queues: Vec<String>,
    /// Delay queues of the retry tiers, shortest first.
    pub retry_queues: Vec<String>,
    pub results_queue: String,
    /// `<prefix>.dead` (kept for operators) and `<prefix>.dead.audit` (recorded).
    pub dead_letter_queues: Vec<String>,
}

impl Declared {
    /// The names `Topology::apply` declares for these classes and settings.
    pub fn new(
        topology: &Topology,
        classes: &[ExecutorClass],
        settings: &QueueSettings,
    ) -> Declared {
        Declared {
            prefix: topology.prefix().to_owned(),
            exchanges: vec![
                (topology.tasks_exchange(), "topic"),
                (topology.retry_exchange(), "headers"),
                (topology.results_exchange(), "fanout"),
                (topology.dlx(), "fanout"),
            ],
            task_queues: classes.iter().map(|c| topology.task_queue(c)).collect(),
            retry_queues: settings
                .retry_delays
                .iter()
                .map(|d| topology.retry_queue(*d))
                .collect(),
            results_queue: topology.results_queue(),
            dead_letter_queues: vec![topology.dead_queue(), topology.dead_audit_queue()],
        }
    }

    /// Every queue name, in declaration order.
    pub fn queues(&self) -> impl Iterator<Item = &str> {
        self.task_queues
            .iter()
            .chain(&self.retry_queues)
            .chain(std::iter::once(&self.results_queue))
            .chain(&self.dead_letter_queues)
            .map(String::as_str)
    }
}

/// Declares the exchanges and queues for `classes` under the configured prefix, on a
/// connection of its own that is closed afterwards.
///
/// # Errors
/// [`Error::Config`] for an invalid prefix, [`Error::TopologyConflict`] when a queue or
/// exchange exists with other arguments, [`Error::Broker`] when RabbitMQ cannot be reached
/// or does not answer within `broker_timeout`.
#[instrument(skip_all, fields(prefix = %config.prefix, classes = classes.len()))]
pub async fn apply(config: &Config, classes: &[ExecutorClass]) -> Result<Declared> {
    let topology = Topology::new(&config.prefix).map_err(Error::config)?;
    let timeout = config.broker_timeout;
    let conn = amqp::connect(&config.amqp_url, CONNECTION_NAME, timeout)
        .await
        .map_err(Error::broker)?;
    let channel = amqp::timed("channel.open", timeout, conn.create_channel())
        .await
        .map_err(Error::broker)?;
    // A dozen declarations, each answered at once by a healthy broker.
    let all = timeout.saturating_mul(2);
    let declared = tokio::time::timeout(all, topology.apply(&channel, classes, &config.queues))
        .await
        .unwrap_or(Err(gantry_shared::Error::AmqpTimeout {
            operation: "declaring the topology",
            timeout: all,
        }));
    // Closing is a courtesy (a conflict has closed the channel already); the broker cleans
    // up after a dropped connection as well.
    let closing = async {
        if channel.status().connected() {
            let _ = channel.close(200, "bye".into()).await;
        }
        let _ = conn.close(200, "bye".into()).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
    declared.map_err(Error::broker)?;
    debug!("topology declared");
    Ok(Declared::new(&topology, classes, &config.queues))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_names_follow_the_prefix() {
        let topology = Topology::new("t9").unwrap();
        let classes = [
            ExecutorClass::parse("echo").unwrap(),
            ExecutorClass::parse("vllm").unwrap(),
        ];
        let d = Declared::new(&topology, &classes, &QueueSettings::default());
        assert_eq!(d.task_queues, ["t9.tasks.echo", "t9.tasks.vllm"]);
        assert_eq!(d.exchanges[0], ("t9.tasks".to_owned(), "topic"));
        let queues: Vec<&str> = d.queues().collect();
        assert_eq!(queues.len(), 2 + 5 + 1 + 2);
        assert!(queues.contains(&"t9.retry.2m"));
        assert!(queues.contains(&"t9.dead.audit"));
    }
}
