//! The executor classes in service: one consumer per class of the catalog in force, kept in
//! step with its reloads.
//!
//! - A class added by a reload gets its topology declared (its task queue, bound to the
//!   tasks exchange) and, under the dispatch role, a consumer.
//! - A class removed by a reload stops being dispatched: its consumer is cancelled, the
//!   deliveries it held go back to the queue, and its tasks wait there until the class
//!   comes back or their TTL dead-letters them (`expired`). Its running jobs are followed to
//!   their end. The queue is kept: deleting it would lose tasks.
//! - A changed `max_active_jobs` resizes the class's capacity: more at once, less as
//!   running jobs end.
//!
//! Everything else a class says (image, resources, retry policy) is read from the catalog
//! in force at each use, so a reload applies to the next task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use gantry_shared::amqp::{self, confirm_channel};
use gantry_shared::catalog::Catalog;
use gantry_shared::message::ExecutorClass;
use gantry_shared::retry;
use gantry_shared::telemetry::chain;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::service::Ctx;
use crate::{Result, dispatch};

/// Capacity of one class: its semaphore and the size it was given.
struct Capacity {
    semaphore: Arc<Semaphore>,
    size: u32,
}

/// The consumers running, and the capacity of every class ever in service (kept when a
/// class leaves: its running jobs still hold permits of it).
#[derive(Default)]
struct Consumers {
    capacity: HashMap<ExecutorClass, Capacity>,
    stops: HashMap<ExecutorClass, CancellationToken>,
    running: JoinSet<()>,
}

impl Consumers {
    /// Starts the consumer of each of `classes` that has none, and resizes the others.
    fn sync(&mut self, ctx: &Arc<Ctx>, catalog: &Catalog, classes: &[ExecutorClass]) {
        for class in classes {
            let Some(spec) = catalog.get(class) else {
                continue;
            };
            if self.capacity.contains_key(class) {
                self.resize(class, spec.max_active_jobs);
            } else {
                let semaphore = Arc::new(Semaphore::new(spec.max_active_jobs as usize));
                let size = spec.max_active_jobs;
                self.capacity
                    .insert(class.clone(), Capacity { semaphore, size });
            }
            if self.stops.contains_key(class) {
                continue;
            }
            let Some(semaphore) = self.capacity.get(class).map(|c| c.semaphore.clone()) else {
                continue;
            };
            let stop = ctx.shutdown.child_token();
            self.stops.insert(class.clone(), stop.clone());
            self.running.spawn(dispatch::run_class(
                ctx.clone(),
                class.clone(),
                semaphore,
                stop,
            ));
        }
        while self.running.try_join_next().is_some() {}
    }

    fn stop(&mut self, class: &ExecutorClass) {
        if let Some(stop) = self.stops.remove(class) {
            stop.cancel();
        }
    }

    /// Gives `class` the capacity `size`: permits are added at once, or taken away as
    /// running jobs give theirs back.
    fn resize(&mut self, class: &ExecutorClass, size: u32) {
        let Some(cap) = self.capacity.get_mut(class) else {
            return;
        };
        let old = cap.size;
        if size > old {
            cap.semaphore.add_permits((size - old) as usize);
        } else if size < old {
            let semaphore = cap.semaphore.clone();
            tokio::spawn(async move {
                if let Ok(permits) = semaphore.acquire_many_owned(old - size).await {
                    permits.forget();
                }
            });
        }
        if size != old {
            info!(executor = %class, from = old, to = size, "max_active_jobs changed");
        }
        cap.size = size;
    }
}

/// Runs the consumers of the catalog's classes (with `dispatch`) and follows the catalog's
/// reloads until shutdown, then waits for the consumers to drain. `semaphores` is the
/// capacity reconciliation at start already took permits of.
pub(crate) async fn supervise(
    ctx: Arc<Ctx>,
    semaphores: HashMap<ExecutorClass, Arc<Semaphore>>,
    dispatch: bool,
) {
    let mut reloads = ctx.catalog.subscribe();
    let catalog = reloads.borrow_and_update().clone();
    let mut consumers = Consumers {
        capacity: semaphores
            .into_iter()
            .filter_map(|(class, semaphore)| {
                let size = catalog.get(&class)?.max_active_jobs;
                Some((class, Capacity { semaphore, size }))
            })
            .collect(),
        ..Consumers::default()
    };
    let mut in_service: Vec<ExecutorClass> = catalog.classes();
    if dispatch {
        consumers.sync(&ctx, &catalog, &in_service);
    }
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            changed = reloads.changed() => if changed.is_err() { break },
        }
        let catalog = reloads.borrow_and_update().clone();
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
                Err(e) => {
                    // Left out of service: the next reload tries again.
                    error!(classes = ?added, error = %chain(&e), "cannot declare the task queues of the new executor classes; they are not dispatched");
                    undeclared = added;
                }
            }
        }
        for class in in_service.iter().filter(|c| catalog.get(c).is_none()) {
            consumers.stop(class);
            warn!(executor = %class, "executor class left the catalog: its tasks are no longer dispatched and wait in their queue until it comes back or they expire; its running jobs are followed to their end");
        }
        in_service = catalog
            .classes()
            .into_iter()
            .filter(|c| !undeclared.contains(c))
            .collect();
        if dispatch {
            consumers.sync(&ctx, &catalog, &in_service);
        }
    }
    while consumers.running.join_next().await.is_some() {}
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
                    _ = ctx.shutdown.cancelled() => return Err(crate::Error::ShuttingDown),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}
