//! What every role of a running dispatcher shares ([`Ctx`]): settings, topology, the
//! store, the publisher, the counters, the catalog in force and the shutdown signal; and the
//! two things every role does with them: write to Postgres through an outage, and publish a
//! result.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use gantry_shared::amqp::Publisher;
use gantry_shared::catalog::Catalog;
use gantry_shared::message::{ExecutorClass, TaskId, TaskResult, with_traceparent};
use gantry_shared::retry;
use gantry_shared::store::Store;
use gantry_shared::telemetry::chain;
use gantry_shared::topology::Topology;
use lapin::BasicProperties;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::{Error, Result};

/// What every part of the running dispatcher shares.
pub(crate) struct Ctx {
    pub(crate) settings: Settings,
    pub(crate) topology: Topology,
    pub(crate) store: Store,
    pub(crate) publisher: Publisher,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: CancellationToken,
    /// The executor catalog in force; replaced whole on reload (see `crate::catalog`).
    pub(crate) catalog: watch::Sender<Arc<Catalog>>,
    /// The classes whose task queues are declared, in step with the catalog (see
    /// `crate::queues`).
    pub(crate) in_service: watch::Sender<Vec<ExecutorClass>>,
}

impl Ctx {
    /// The executor catalog in force.
    pub(crate) fn catalog(&self) -> Arc<Catalog> {
        self.catalog.borrow().clone()
    }

    /// Runs a store operation, retrying transient failures (Postgres restarting) with
    /// backoff until it succeeds or shutdown is asked for.
    ///
    /// # Errors
    /// A failure that is not transient, or [`Error::ShuttingDown`].
    pub(crate) async fn persist<T, F, Fut>(&self, what: &'static str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = gantry_shared::Result<T>>,
    {
        let mut delays = retry::forever().build();
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    warn!(what, error = %chain(&e), ?delay, "Postgres write failed; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Err(Error::ShuttingDown),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Publishes a result on its executor's behalf to the results exchange, confirmed,
    /// retrying until shutdown. It carries the `traceparent` the task was received with,
    /// so its commit continues the task's trace as the executor's own result would.
    ///
    /// # Errors
    /// The result cannot be encoded, the broker refuses it, or [`Error::ShuttingDown`].
    pub(crate) async fn publish_result(&self, result: &TaskResult) -> Result<()> {
        let (body, mut props) = result.to_amqp().map_err(gantry_shared::Error::from)?;
        match self.store.traceparent(result.task_id).await {
            Ok(Some(traceparent)) => props = with_traceparent(props, &traceparent),
            Ok(None) => {}
            // The result matters more than its place in a trace.
            Err(e) => {
                warn!(task_id = %result.task_id, error = %chain(&e), "cannot read the task's traceparent; its result starts a trace of its own");
            }
        }
        let exchange = self.topology.results_exchange();
        let publishing =
            self.publisher
                .publish(&exchange, "result", &body, props, true, retry::forever());
        tokio::select! {
            r = publishing => Ok(r?),
            _ = self.shutdown.cancelled() => Err(Error::ShuttingDown),
        }
    }

    /// Publishes a task message (`mandatory`, confirmed, re-sent on broker failures for up
    /// to a minute).
    ///
    /// # Errors
    /// No queue takes it, the broker refuses it, or no confirm within the minute.
    pub(crate) async fn publish_task(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<()> {
        self.publisher
            .publish(
                exchange,
                routing_key,
                body,
                props,
                true,
                retry::for_at_most(Duration::from_secs(60)),
            )
            .await?;
        Ok(())
    }

    /// Sends a task's reply to the caller's queue `queue` through the default exchange
    /// (`mandatory`, confirmed, re-sent for up to 30 seconds); `false` when the queue no
    /// longer exists: that is logged and skipped, the caller has gone, and the task's end
    /// stays in Postgres.
    ///
    /// # Errors
    /// A broker failure that outlasts the 30 seconds.
    pub(crate) async fn reply(
        &self,
        task_id: TaskId,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<bool> {
        let sent = self
            .publisher
            .publish(
                "",
                queue,
                body,
                props,
                true,
                retry::for_at_most(Duration::from_secs(30)),
            )
            .await;
        match sent {
            Ok(()) => Ok(true),
            Err(gantry_shared::Error::Unroutable { .. }) => {
                warn!(%task_id, queue, "the caller's reply queue no longer exists; the result stays in Postgres");
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }
}
