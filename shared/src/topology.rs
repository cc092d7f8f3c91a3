//! The queue topology: every exchange and queue name under one prefix, and `apply`, which
//! declares them idempotently (applying twice changes nothing).

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};
use serde::{Deserialize, Serialize};
use tracing::{info, instrument};

use crate::message::ExecutorClass;
use crate::{Error, Result};

/// Queue arguments that operators may tune.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    /// Deliveries of one message before the task queue dead-letters it as poison.
    pub delivery_limit: u32,
    /// Delay tiers of the retry queues, shortest first.
    #[serde(with = "humantime_list")]
    pub retry_delays: Vec<Duration>,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            delivery_limit: 10,
            retry_delays: [1, 5, 30, 120, 600].map(Duration::from_secs).to_vec(),
        }
    }
}

impl QueueSettings {
    /// Checks the settings make a topology.
    ///
    /// # Errors
    /// No retry tier, or two tiers with the same name (e.g. `500ms` and `1s`).
    pub fn validate(&self) -> Result<()> {
        let err = |message: String| Error::Config {
            origin: "queues".into(),
            message,
        };
        if self.retry_delays.is_empty() {
            return Err(err(
                "retry_delays needs at least one delay, e.g. [1s, 30s, 10m]".into(),
            ));
        }
        let mut names: Vec<String> = self.retry_delays.iter().map(|d| tier_name(*d)).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(err(format!(
                "two retry_delays share the tier name {:?}; use whole seconds that differ",
                w[0]
            )));
        }
        if self.delivery_limit == 0 {
            return Err(err("delivery_limit must be at least 1".into()));
        }
        Ok(())
    }
}

mod humantime_list {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| humantime::format_duration(*d).to_string()))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| humantime::parse_duration(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Names of everything Gantry declares, under a prefix (default `gantry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    /// # Errors
    /// The prefix is empty, too long, or has characters other than letters, digits, `.`,
    /// `_` and `-`.
    pub fn new(prefix: &str) -> Result<Self> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 100
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(Error::Config {
                origin: "prefix".into(),
                message: format!("{prefix:?} must be 1 to 100 letters, digits, '.', '_' or '-'"),
            });
        }
        Ok(Topology {
            prefix: prefix.to_owned(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Topic exchange that takes tasks; routing key = executor class.
    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.prefix)
    }

    /// Quorum queue of one executor class.
    pub fn task_queue(&self, class: &ExecutorClass) -> String {
        format!("{}.tasks.{class}", self.prefix)
    }

    /// Task queue of one warm executor (job `job`): only the dispatcher publishes to it.
    pub fn warm_queue(&self, job: &str) -> String {
        format!("{}.warm.{job}", self.prefix)
    }

    /// Control queue of one warm executor: the dispatcher's orders (cancel, drain).
    pub fn warm_control_queue(&self, job: &str) -> String {
        format!("{}.warm.{job}.control", self.prefix)
    }

    /// Declares the two queues of a warm executor: durable classic queues, kept until the
    /// dispatcher has dealt with the executor's end (so a task it never took is found there).
    ///
    /// # Errors
    /// The broker refuses.
    pub async fn declare_warm(&self, channel: &Channel, job: &str) -> Result<()> {
        for queue in [self.warm_queue(job), self.warm_control_queue(job)] {
            self.queue(channel, &queue, FieldTable::default()).await?;
        }
        Ok(())
    }

    /// Deletes the two queues of a warm executor whose end was dealt with.
    ///
    /// # Errors
    /// The broker refuses.
    pub async fn delete_warm(&self, channel: &Channel, job: &str) -> Result<()> {
        for queue in [self.warm_queue(job), self.warm_control_queue(job)] {
            channel
                .queue_delete(
                    ShortString::from(queue.as_str()),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await
                .map_err(|source| Error::Amqp {
                    operation: "queue.delete",
                    source,
                })?;
        }
        Ok(())
    }

    /// Headers exchange that routes a retry to the delay queue named by its tier header.
    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }

    /// Delay queue of one retry tier, e.g. `gantry.retry.5s`.
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!("{}.retry.{}", self.prefix, tier_name(delay))
    }

    /// Exchange (fanout) and quorum queue of results, consumed by the recorder.
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.prefix)
    }

    pub fn results_queue(&self) -> String {
        format!("{}.results", self.prefix)
    }

    /// Topic exchange of `gantry.progress/v1` messages (an LLM's tokens as they come);
    /// routing key = task id. Nothing is queued here by Gantry: a caller that wants a task's
    /// progress binds a queue of its own before it submits.
    pub fn progress_exchange(&self) -> String {
        format!("{}.progress", self.prefix)
    }

    /// Fanout dead-letter exchange.
    pub fn dlx(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    /// Dead letters kept for operators; never consumed automatically.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// Copy of every dead letter, consumed by the recorder to record it in Postgres.
    pub fn dead_audit_queue(&self) -> String {
        format!("{}.dead.audit", self.prefix)
    }

    /// Declares everything, for the given executor classes. Idempotent.
    ///
    /// # Errors
    /// The broker is unreachable, or something exists with different arguments
    /// ([`Error::TopologyConflict`]).
    #[instrument(skip_all, fields(prefix = %self.prefix))]
    pub async fn apply(
        &self,
        channel: &Channel,
        classes: &[ExecutorClass],
        settings: &QueueSettings,
    ) -> Result<()> {
        let dlx = self.dlx();
        self.exchange(channel, &self.tasks_exchange(), ExchangeKind::Topic)
            .await?;
        self.exchange(channel, &self.retry_exchange(), ExchangeKind::Headers)
            .await?;
        self.exchange(channel, &self.results_exchange(), ExchangeKind::Fanout)
            .await?;
        self.exchange(channel, &dlx, ExchangeKind::Fanout).await?;
        self.exchange(channel, &self.progress_exchange(), ExchangeKind::Topic)
            .await?;

        let mut task_args = quorum_args();
        task_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(settings.delivery_limit.into()),
        );
        dead_letter_to(&mut task_args, &dlx);
        for class in classes {
            let queue = self.task_queue(class);
            self.queue(channel, &queue, task_args.clone()).await?;
            self.bind(
                channel,
                &queue,
                &self.tasks_exchange(),
                class.as_str(),
                FieldTable::default(),
            )
            .await?;
        }

        for delay in &settings.retry_delays {
            let queue = self.retry_queue(*delay);
            let mut args = quorum_args();
            let ttl_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(ttl_ms.min(i64::MAX as u64) as i64),
            );
            // Expired retries go back to the tasks exchange with their own routing key.
            dead_letter_to(&mut args, &self.tasks_exchange());
            self.queue(channel, &queue, args).await?;
            let mut bind = FieldTable::default();
            bind.insert("x-match".into(), AMQPValue::LongString("all".into()));
            bind.insert(
                RETRY_TIER_HEADER.into(),
                AMQPValue::LongString(tier_name(*delay).into()),
            );
            self.bind(channel, &queue, &self.retry_exchange(), "", bind)
                .await?;
        }

        let results = self.results_queue();
        let mut results_args = quorum_args();
        dead_letter_to(&mut results_args, &dlx);
        self.queue(channel, &results, results_args).await?;
        self.bind(
            channel,
            &results,
            &self.results_exchange(),
            "",
            FieldTable::default(),
        )
        .await?;

        for queue in [self.dead_queue(), self.dead_audit_queue()] {
            self.queue(channel, &queue, quorum_args()).await?;
            self.bind(channel, &queue, &dlx, "", FieldTable::default())
                .await?;
        }
        info!(classes = classes.len(), "topology applied");
        Ok(())
    }

    async fn exchange(&self, channel: &Channel, name: &str, kind: ExchangeKind) -> Result<()> {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                ShortString::from(name),
                kind,
                options,
                FieldTable::default(),
            )
            .await
            .map_err(|source| conflict_or_amqp("exchange", name, source))
    }

    /// Declares a durable queue with `args`.
    ///
    /// # Errors
    /// It exists with other arguments ([`Error::TopologyConflict`]), or the broker fails.
    pub async fn queue(&self, channel: &Channel, name: &str, args: FieldTable) -> Result<()> {
        channel
            .queue_declare(
                ShortString::from(name),
                QueueDeclareOptions::durable(),
                args,
            )
            .await
            .map(drop)
            .map_err(|source| conflict_or_amqp("queue", name, source))
    }

    /// Binds `queue` to `exchange` with `routing_key` and `args`.
    ///
    /// # Errors
    /// The broker refuses.
    pub async fn bind(
        &self,
        channel: &Channel,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        args: FieldTable,
    ) -> Result<()> {
        channel
            .queue_bind(
                ShortString::from(queue),
                ShortString::from(exchange),
                ShortString::from(routing_key),
                QueueBindOptions::default(),
                args,
            )
            .await
            .map_err(|source| Error::Amqp {
                operation: "queue.bind",
                source,
            })
    }
}

/// Header that selects a retry delay tier on the retry exchange.
pub const RETRY_TIER_HEADER: &str = "x-gantry-retry-tier";

/// The tier name of a delay: `1s`, `30s`, `2m`, `10m`, `1h`.
pub fn tier_name(delay: Duration) -> String {
    let s = delay.as_secs().max(1);
    match s {
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The arguments of a quorum queue.
pub fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

fn dead_letter_to(args: &mut FieldTable, exchange: &str) {
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(exchange.into()),
    );
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString("at-least-once".into()),
    );
    // At-least-once dead-lettering requires reject-publish overflow.
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
}

fn conflict_or_amqp(what: &'static str, name: &str, source: lapin::Error) -> Error {
    let text = source.to_string();
    if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
        Error::TopologyConflict {
            what,
            name: name.to_owned(),
            source,
        }
    } else {
        Error::Amqp {
            operation: if what == "queue" {
                "queue.declare"
            } else {
                "exchange.declare"
            },
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_settings_that_make_no_topology_are_refused() {
        assert!(QueueSettings::default().validate().is_ok());
        let none = QueueSettings {
            retry_delays: vec![],
            ..QueueSettings::default()
        };
        assert!(none.validate().is_err());
        let clash = QueueSettings {
            retry_delays: vec![Duration::from_millis(500), Duration::from_secs(1)],
            ..QueueSettings::default()
        };
        assert!(clash.validate().unwrap_err().to_string().contains("\"1s\""));
    }

    #[test]
    fn names_carry_the_prefix() {
        let t = Topology::new("t1").unwrap();
        let echo = ExecutorClass::parse("echo").unwrap();
        assert_eq!(t.task_queue(&echo), "t1.tasks.echo");
        assert_eq!(t.retry_queue(Duration::from_secs(120)), "t1.retry.2m");
        assert_eq!(t.dead_audit_queue(), "t1.dead.audit");
        assert!(Topology::new("").is_err());
        assert!(Topology::new("a b").is_err());
    }
}
