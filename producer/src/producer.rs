//! [`Producer`]: publishes tasks to RabbitMQ with confirms, and follows them through its
//! [`Tracker`].
//!
//! Submitting needs only the broker; Postgres is connected on the first call that reads a
//! task's state, so a backend that only submits never needs a database URL.

use std::fmt;
use std::time::Duration;

use chrono::Utc;
use gantry_shared::amqp::{Publisher, is_not_found};
use gantry_shared::config::Config;
use gantry_shared::message::{Task, TaskId, TaskSpec};
use gantry_shared::retry;
use gantry_shared::store::TaskRecord;
use gantry_shared::topology::Topology;
use tracing::{debug, instrument};

use crate::tracker::{TaskEvent, Tracker};
use crate::{Error, Result};

/// The name the producer's connection shows in RabbitMQ's management UI.
const CONNECTION_NAME: &str = "gantry-producer";
/// How long a publish keeps reconnecting and re-sending before it gives up.
const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(30);

/// Submits tasks and reads their state. Cheap to clone: clones share the connection and the
/// database pool.
#[derive(Clone)]
pub struct Producer {
    tracker: Tracker,
    topology: Topology,
    publisher: Publisher,
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("prefix", &self.topology.prefix())
            .field("amqp_url", &self.config().amqp_url_redacted())
            .field("tracker", &self.tracker)
            .finish_non_exhaustive()
    }
}

impl Producer {
    /// Connects to RabbitMQ now, so a wrong URL fails here rather than at the first submit.
    /// Postgres is connected later, on first use.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid prefix; [`Error::Broker`] when RabbitMQ cannot be
    /// reached within the configured `broker_timeout`.
    #[instrument(skip_all, fields(prefix = %config.prefix, amqp_url = %config.amqp_url_redacted()))]
    pub async fn connect(config: &Config) -> Result<Producer> {
        let topology = Topology::new(&config.prefix).map_err(Error::config)?;
        let publisher =
            Publisher::connect(&config.amqp_url, CONNECTION_NAME, config.broker_timeout)
                .await
                .map_err(Error::broker)?;
        debug!("connected to RabbitMQ");
        Ok(Producer {
            tracker: Tracker::new(config),
            topology,
            publisher,
        })
    }

    /// The configuration this producer was connected with.
    pub fn config(&self) -> &Config {
        self.tracker.config()
    }

    /// The names of the exchanges and queues under this producer's prefix.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Turns a spec into a first attempt with a fresh id and a deadline `spec.ttl` from now,
    /// checked against the configured limits, without publishing it.
    ///
    /// # Errors
    /// [`Error::Rejected`] when the dispatcher would refuse the task (payload too large,
    /// zero TTL, priority out of range, …).
    pub fn new_task(&self, spec: TaskSpec) -> Result<Task> {
        Ok(Task::new(spec, &self.config().limits)?)
    }

    /// Submits a new task and returns its id once RabbitMQ has confirmed that a queue
    /// stored it.
    ///
    /// # Errors
    /// [`Error::Rejected`] for an invalid task, [`Error::Unroutable`] when no queue takes
    /// its executor class, [`Error::NoExchange`] when the topology was never declared,
    /// [`Error::Broker`] when RabbitMQ refused the message or stayed unreachable for 30
    /// seconds.
    #[instrument(skip_all, fields(executor = %spec.executor, task = %spec.name))]
    pub async fn submit(&self, spec: TaskSpec) -> Result<TaskId> {
        let task = self.new_task(spec)?;
        self.submit_task(&task).await?;
        Ok(task.id)
    }

    /// Publishes a task the caller built (with [`Producer::new_task`] or [`Task::new`]),
    /// with `mandatory` set, and waits for the broker's confirm. A publish interrupted by a
    /// broken connection is sent again, so the dispatcher may see it twice (it tolerates
    /// that: the job of a task attempt has a deterministic name).
    ///
    /// # Errors
    /// As [`Producer::submit`]; also [`Error::Rejected`] when the task's deadline has
    /// already passed.
    #[instrument(skip_all, fields(task_id = %task.id, executor = %task.executor))]
    pub async fn submit_task(&self, task: &Task) -> Result<()> {
        let (body, props) = task.to_amqp(Utc::now())?;
        self.publisher
            .publish(
                &self.topology.tasks_exchange(),
                task.executor.as_str(),
                &body,
                props,
                true,
                retry::for_at_most(PUBLISH_RETRY_FOR),
            )
            .await
            .map_err(|e| match e {
                gantry_shared::Error::Unroutable { .. } => Error::Unroutable {
                    executor: task.executor.clone(),
                    prefix: self.topology.prefix().to_owned(),
                },
                gantry_shared::Error::Amqp { source, .. } if is_not_found(&source) => {
                    Error::NoExchange {
                        exchange: self.topology.tasks_exchange(),
                        prefix: self.topology.prefix().to_owned(),
                    }
                }
                other => Error::broker(other),
            })?;
        debug!("task published and confirmed");
        Ok(())
    }

    /// The reader of task state this producer uses (and connects to Postgres lazily).
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// The task as stored; see [`Tracker::status`].
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn status(&self, id: TaskId) -> Result<Option<TaskRecord>> {
        self.tracker.status(id).await
    }

    /// The task's history; see [`Tracker::events`].
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn events(&self, id: TaskId) -> Result<Vec<TaskEvent>> {
        self.tracker.events(id).await
    }

    /// Waits until the task is terminal; see [`Tracker::wait`].
    ///
    /// # Errors
    /// [`Error::WaitTimeout`] when `timeout` passes first; [`Error::Database`].
    pub async fn wait(&self, id: TaskId, timeout: Duration) -> Result<TaskRecord> {
        self.tracker.wait(id, timeout).await
    }

    /// Closes the broker connection. The database pool closes when the last clone drops.
    #[instrument(skip_all)]
    pub async fn close(&self) {
        self.publisher.close().await;
    }
}
