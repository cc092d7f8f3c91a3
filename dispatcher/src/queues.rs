//! The task queues in service, kept in step with the catalog's reloads: a class a reload
//! adds gets its topology declared (its task queue, bound to the tasks exchange) and then
//! counts as in service; a class a reload removes leaves service, and its queue is kept
//! (deleting it would lose tasks). The classes in service are published on
//! [`Ctx::in_service`], which the dispatch role follows with its consumers.

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use gantry_shared::amqp::{self, confirm_channel};
use gantry_shared::message::ExecutorClass;
use gantry_shared::retry;
use gantry_shared::telemetry::chain;
use tracing::{error, info, warn};

use crate::context::Ctx;
use crate::{Error, Result};

/// Follows the catalog's reloads until shutdown, declaring the queues of added classes.
pub(crate) async fn keep_in_step(ctx: Arc<Ctx>) {
    let mut reloads = ctx.catalog.subscribe();
    reloads.borrow_and_update();
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            changed = reloads.changed() => if changed.is_err() { return },
        }
        let catalog = reloads.borrow_and_update().clone();
        let in_service = ctx.in_service.borrow().clone();
        let added: Vec<ExecutorClass> = catalog
            .classes()
            .into_iter()
            .filter(|c| !in_service.contains(c))
            .collect();
        let mut undeclared = Vec::new();
        if !added.is_empty() {
            match declare(&ctx, &added).await {
                Ok(()) => {
                    info!(classes = ?added, "task queues of the new executor classes declared")
                }
                Err(Error::ShuttingDown) => return,
                Err(e) => {
                    // Left out of service: the next reload tries again.
                    error!(classes = ?added, error = %chain(&e), "cannot declare the task queues of the new executor classes; they are not dispatched");
                    undeclared = added;
                }
            }
        }
        for class in in_service.iter().filter(|c| catalog.get(c).is_none()) {
            warn!(executor = %class, "executor class left the catalog: its tasks are no longer dispatched and wait in their queue until it comes back or they expire; its running jobs are followed to their end");
        }
        let now: Vec<ExecutorClass> = catalog
            .classes()
            .into_iter()
            .filter(|c| !undeclared.contains(c))
            .collect();
        ctx.in_service.send_replace(now);
    }
}

/// Declares the topology of `classes`, retrying transient broker failures until shutdown.
async fn declare(ctx: &Ctx, classes: &[ExecutorClass]) -> Result<()> {
    let common = &ctx.settings.common;
    let mut delays = retry::forever().build();
    loop {
        let attempt = async {
            let conn = amqp::connect(
                &common.amqp_url,
                "gantry-dispatcher/topology",
                common.broker_timeout,
            )
            .await?;
            let channel = confirm_channel(&conn, common.broker_timeout).await?;
            let applied = ctx.topology.apply(&channel, classes, &common.queues).await;
            let _ = conn.close(200, "topology applied".into()).await;
            applied
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                warn!(error = %chain(&e), ?delay, "cannot declare the new task queues yet; retrying");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Err(Error::ShuttingDown),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}
