//! The consumers of the classes in service: one per class whose task queue is declared
//! (see `crate::queues`), kept in step with the catalog's reloads.
//!
//! - A class that enters service gets a consumer.
//! - A class that leaves service stops being dispatched: its consumer is cancelled, the
//!   deliveries it held go back to the queue, and its tasks wait there until the class
//!   comes back or their TTL dead-letters them (`expired`). Its running jobs are followed
//!   to their end.
//! - A changed `max_active_jobs` resizes the class's capacity: more at once, less as
//!   running jobs end.
//!
//! Everything else a class says (image, resources, retry policy) is read from the catalog
//! in force at each use, so a reload applies to the next task.

use std::collections::HashMap;
use std::sync::Arc;

use gantry_shared::catalog::Catalog;
use gantry_shared::message::ExecutorClass;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::consume::run_class;
use super::role::Role;
use crate::runtime::Runtime;

/// Capacity of one class: its semaphore and the size it was given.
struct Capacity {
    semaphore: Arc<Semaphore>,
    size: u32,
}

/// The consumers running, and the capacity of every class ever in service (kept when a
/// class leaves: its running jobs still hold permits of it).
struct Consumers<R: Runtime> {
    role: Arc<Role<R>>,
    capacity: HashMap<ExecutorClass, Capacity>,
    stops: HashMap<ExecutorClass, CancellationToken>,
    running: JoinSet<()>,
}

impl<R: Runtime> Consumers<R> {
    /// Runs a consumer for each class in service, none for the others, and sizes the
    /// capacity of each as the catalog says.
    fn sync(&mut self, catalog: &Catalog, in_service: &[ExecutorClass]) {
        let leaving: Vec<ExecutorClass> = self
            .stops
            .keys()
            .filter(|c| !in_service.contains(c))
            .cloned()
            .collect();
        let metrics = self.role.ctx.metrics.clone();
        for class in leaving {
            if let Some(stop) = self.stops.remove(&class) {
                stop.cancel();
            }
            metrics.capacity_limit(class.as_str(), 0);
        }
        for class in in_service {
            let Some(spec) = catalog.get(class) else {
                continue;
            };
            metrics.capacity_limit(class.as_str(), spec.max_active_jobs);
            if self.capacity.contains_key(class) {
                self.resize(class, spec.task_capacity());
            } else {
                let semaphore = Arc::new(Semaphore::new(spec.task_capacity() as usize));
                let size = spec.task_capacity();
                self.capacity
                    .insert(class.clone(), Capacity { semaphore, size });
            }
            if self.stops.contains_key(class) {
                continue;
            }
            let Some(semaphore) = self.capacity.get(class).map(|c| c.semaphore.clone()) else {
                continue;
            };
            let stop = self.role.ctx.shutdown.child_token();
            self.stops.insert(class.clone(), stop.clone());
            self.running
                .spawn(run_class(self.role.clone(), class.clone(), semaphore, stop));
        }
        while self.running.try_join_next().is_some() {}
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

/// Runs the consumers of the classes in service and follows changes until shutdown, then
/// waits for the consumers to drain. `semaphores` is the capacity reconciliation at start
/// already took permits of.
pub(crate) async fn supervise<R: Runtime>(
    role: Arc<Role<R>>,
    semaphores: HashMap<ExecutorClass, Arc<Semaphore>>,
) {
    let ctx = role.ctx.clone();
    let mut in_service = ctx.in_service.subscribe();
    let catalog = ctx.catalog();
    let mut consumers = Consumers {
        role,
        capacity: semaphores
            .into_iter()
            .filter_map(|(class, semaphore)| {
                let size = catalog.get(&class)?.task_capacity();
                Some((class, Capacity { semaphore, size }))
            })
            .collect(),
        stops: HashMap::new(),
        running: JoinSet::new(),
    };
    loop {
        let classes = in_service.borrow_and_update().clone();
        consumers.sync(&ctx.catalog(), &classes);
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            changed = in_service.changed() => if changed.is_err() { break },
        }
    }
    while consumers.running.join_next().await.is_some() {}
}
