//! [`Producer`]: publishes tasks to RabbitMQ with confirms, and follows them through its
//! [`Tracker`].
//!
//! Submitting needs only the broker; Postgres is connected on the first call that reads a
//! task's state, so a backend that only submits never needs a database URL. A streamed
//! task's progress comes on a second connection, opened by the first
//! [`Producer::submit_streaming`]: publishing and consuming never share one.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use gantry_shared::amqp::{self, Publisher, is_not_found};
use gantry_shared::catalog::Catalog;
use gantry_shared::config::Config;
use gantry_shared::message::{Task, TaskId, TaskSpec};
use gantry_shared::retry;
use gantry_shared::store::TaskRecord;
use gantry_shared::telemetry::trace;
use gantry_shared::topology::Topology;
use lapin::{Channel, Connection};
use tokio::sync::Mutex;
use tracing::{Instrument, debug, instrument};

use crate::stream::{Listening, TaskStream};
use crate::tracker::{TaskEvent, Tracker};
use crate::{Error, Result};

/// The name the producer's connection shows in RabbitMQ's management UI.
const CONNECTION_NAME: &str = "gantry-producer";
/// The name of the connection that carries streamed tasks' progress.
const PROGRESS_CONNECTION_NAME: &str = "gantry-producer progress";
/// How long a publish keeps reconnecting and re-sending before it gives up.
const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(30);

/// Submits tasks and reads their state. Cheap to clone: clones share the connection and the
/// database pool.
#[derive(Clone)]
pub struct Producer {
    tracker: Tracker,
    topology: Topology,
    publisher: Publisher,
    /// The executor catalog payloads are checked against, when the caller gave one.
    catalog: Option<Arc<Catalog>>,
    /// The connection that consumes progress, opened on first use.
    progress: Arc<Mutex<Option<Connection>>>,
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("prefix", &self.topology.prefix())
            .field("amqp_url", &self.config().amqp_url_redacted())
            .field("tracker", &self.tracker)
            .field("catalog", &self.catalog.is_some())
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
            catalog: None,
            progress: Arc::new(Mutex::new(None)),
        })
    }

    /// This producer, checking every task's payload against `catalog` before it is
    /// published, as the dispatcher will: a payload its class's engine cannot take (an
    /// `openai` class takes only an OpenAI-shaped request), or a class the catalog lacks, is
    /// refused here instead of dead-lettered there. Give it the dispatcher's catalog.
    pub fn with_catalog(mut self, catalog: Catalog) -> Producer {
        self.catalog = Some(Arc::new(catalog));
        self
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
    /// zero TTL, priority out of range, …, or a payload the catalog's class cannot take: see
    /// [`Producer::with_catalog`]).
    pub fn new_task(&self, spec: TaskSpec) -> Result<Task> {
        let task = Task::new(spec, &self.config().limits)?;
        self.check_task(&task)?;
        Ok(task)
    }

    /// Checks a task's payload against the catalog given to [`Producer::with_catalog`]; a
    /// producer without one accepts any payload. [`Producer::submit_task`] checks this before
    /// it publishes.
    ///
    /// # Errors
    /// [`Error::Rejected`] naming the field that is wrong (`payload.messages[0].role`), or
    /// the class the catalog does not have.
    pub fn check_task(&self, task: &Task) -> Result<()> {
        if let Some(catalog) = &self.catalog {
            catalog.check_payload(&task.executor, &task.payload)?;
        }
        Ok(())
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
    ///
    /// The publish is a span of the task's trace (`gantry.submit`, a child of the caller's
    /// current span) when the process exports spans (see
    /// [`gantry_shared::telemetry::init_service`]); the message then names it as the
    /// parent of what follows, in place of the task's own `traceparent`.
    #[instrument(skip_all, fields(task_id = %task.id, executor = %task.executor))]
    pub async fn submit_task(&self, task: &Task) -> Result<()> {
        let span = tracing::info_span!(
            target: trace::TARGET,
            "gantry.submit",
            otel.kind = "producer",
            gantry.task_id = %task.id,
            gantry.executor = %task.executor,
            gantry.task = %task.name,
        );
        self.publish_task(task, trace::traceparent(&span))
            .instrument(span)
            .await
    }

    /// [`Producer::submit_task`] in its span, whose `traceparent` (when exported) the message
    /// carries.
    async fn publish_task(&self, task: &Task, traceparent: Option<String>) -> Result<()> {
        self.check_task(task)?;
        let traced;
        let task = match traceparent {
            Some(tp) => {
                traced = Task {
                    traceparent: Some(tp),
                    ..task.clone()
                };
                &traced
            }
            None => task,
        };
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

    /// Submits a new task with streaming on, and follows it: the stream yields its progress
    /// (an LLM's tokens, from an executor whose engine streams) as it arrives, then
    /// [`StreamEvent::Finished`](crate::StreamEvent::Finished) with the task as stored,
    /// once it is terminal in Postgres (within `timeout` of the publish). No piece is
    /// missed for being early: the stream listens before the task is published. See
    /// [`TaskStream`] for how it ends and how lost pieces and retries show.
    ///
    /// ```no_run
    /// # async fn demo(producer: gantry_producer::Producer, spec: gantry_producer::TaskSpec)
    /// # -> Result<(), gantry_producer::Error> {
    /// use std::time::Duration;
    /// use futures_util::TryStreamExt;
    /// use gantry_producer::StreamEvent;
    ///
    /// let mut events = producer.submit_streaming(spec, Duration::from_secs(600)).await?;
    /// while let Some(event) = events.try_next().await? {
    ///     match event {
    ///         StreamEvent::Progress(piece) => print!("{}", piece.delta),
    ///         StreamEvent::ProgressLost { reason } => eprintln!("({reason})"),
    ///         StreamEvent::Finished(record) => println!("\n{}", record.state),
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Producer::submit_task_streaming`].
    #[instrument(skip_all, fields(executor = %spec.executor, task = %spec.name))]
    pub async fn submit_streaming(&self, spec: TaskSpec, timeout: Duration) -> Result<TaskStream> {
        let task = self.new_task(spec)?;
        self.submit_task_streaming(&task, timeout).await
    }

    /// [`Producer::submit_streaming`] for a task the caller built: it is published with
    /// streaming on, whatever its `stream` says.
    ///
    /// # Errors
    /// As [`Producer::submit_task`]; [`Error::Database`] when Postgres, which says when the
    /// task has ended, cannot be reached (checked before the task goes out);
    /// [`Error::NoExchange`] when the progress exchange was never declared.
    #[instrument(skip_all, fields(task_id = %task.id, executor = %task.executor))]
    pub async fn submit_task_streaming(
        &self,
        task: &Task,
        timeout: Duration,
    ) -> Result<TaskStream> {
        self.check_task(task)?;
        self.tracker.store().await?;
        let channel = self.progress_channel().await?;
        let listening = Listening::start(
            channel,
            &self.topology,
            task.id,
            self.config().broker_timeout,
        )
        .await?;
        let mut streamed = task.clone();
        streamed.stream = true;
        if let Err(e) = self.submit_task(&streamed).await {
            listening.close().await;
            return Err(e);
        }
        Ok(listening.follow(self.tracker.clone(), timeout))
    }

    /// A new channel on the progress connection, connecting (again) when it is not open.
    async fn progress_channel(&self) -> Result<Channel> {
        let timeout = self.config().broker_timeout;
        let mut slot = self.progress.lock().await;
        let connection = match slot.take() {
            Some(connection) if connection.status().connected() => connection,
            _ => amqp::connect(&self.config().amqp_url, PROGRESS_CONNECTION_NAME, timeout)
                .await
                .map_err(Error::broker)?,
        };
        let connection = slot.insert(connection);
        amqp::timed("channel.open", timeout, connection.create_channel())
            .await
            .map_err(Error::broker)
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

    /// Closes the broker connections (which ends the progress of any stream still open).
    /// The database pool closes when the last clone drops.
    #[instrument(skip_all)]
    pub async fn close(&self) {
        self.publisher.close().await;
        if let Some(connection) = self.progress.lock().await.take() {
            let _ = connection.close(200, "bye".into()).await;
        }
    }
}
