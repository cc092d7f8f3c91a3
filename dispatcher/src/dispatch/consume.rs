//! One class's consumer: takes its queue's deliveries one at a time, refuses the invalid
//! ones, waits for a unit of the class's capacity with the delivery in hand (un-acked,
//! within a small prefetch, for at most `max_hold`), and hands each valid task off in a
//! task of its own. While the class is at `max_active_jobs`, the rest stays in RabbitMQ.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use futures_util::StreamExt;
use gantry_shared::message::{ExecutorClass, Rejection, Task};
use gantry_shared::telemetry::chain;
use lapin::Consumer;
use lapin::message::Delivery;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info_span, warn};

use super::disposition::{Disposition, settle};
use super::handoff::hand_off;
use super::role::Role;
use crate::Error;
use crate::runtime::Runtime;
use crate::session::{SessionEnd, Source, open_until_shutdown};

/// Consumes the queue of `class` until `stop` (shutdown, or the class leaving service).
pub(crate) async fn run_class<R: Runtime>(
    role: Arc<Role<R>>,
    class: ExecutorClass,
    capacity: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let ctx = &role.ctx;
    let queue = ctx.topology.task_queue(&class);
    // A warm class's hand-offs are quick (no job to start), so many overlap: its
    // deliveries in hand-off count against the prefetch beside those held for capacity.
    let warm_slots = ctx
        .catalog()
        .get(&class)
        .filter(|spec| spec.warm.is_some())
        .map_or(0, |spec| {
            u16::try_from(spec.task_capacity()).unwrap_or(u16::MAX)
        });
    let source = Source {
        url: &ctx.settings.common.amqp_url,
        name: format!("gantry-dispatcher/{class}"),
        queue: queue.clone(),
        prefetch: ctx
            .settings
            .dispatcher
            .max_waiting
            .saturating_add(warm_slots),
        timeout: ctx.settings.common.broker_timeout,
    };
    ctx.metrics.consumer(&source.name);
    while let Some(mut session) = open_until_shutdown(&source, &stop).await {
        let end = consume(
            &role,
            &class,
            &queue,
            &capacity,
            &stop,
            &mut session.consumer,
        )
        .await;
        let stop = matches!(end, SessionEnd::Shutdown);
        session.close(&end, &queue).await;
        if stop {
            return;
        }
        ctx.metrics.reconnected(&source.name);
    }
}

/// What to do with one delivery before its hand-off.
enum Step {
    /// Not a valid task.
    Refuse(Rejection),
    /// A valid task with its unit of capacity, and when its delivery arrived.
    HandOff(Box<Task>, OwnedSemaphorePermit, Instant),
    /// Held too long waiting for capacity: back to the end of the queue.
    Requeue(Box<Task>),
}

async fn consume<R: Runtime>(
    role: &Arc<Role<R>>,
    class: &ExecutorClass,
    queue: &str,
    capacity: &Arc<Semaphore>,
    stop: &CancellationToken,
    consumer: &mut Consumer,
) -> SessionEnd {
    let ctx = &role.ctx;
    let mut handlers = tokio::task::JoinSet::new();
    let end = loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => break SessionEnd::Shutdown,
            d = consumer.next() => d,
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                warn!(queue, error = %e, "consumer failed");
                break SessionEnd::Broken;
            }
            None => break SessionEnd::Broken,
        };
        let arrived = Instant::now();
        let step = match parse(role, class, &delivery) {
            // A refusal needs no capacity.
            Err(rejection) => Step::Refuse(rejection),
            // Wait for capacity with the delivery in hand: it stays un-acked meanwhile,
            // but not so long that RabbitMQ's consumer_timeout closes the channel.
            Ok(task) => tokio::select! {
                _ = stop.cancelled() => break SessionEnd::Shutdown,
                p = capacity.clone().acquire_owned() => match p {
                    Ok(permit) => Step::HandOff(Box::new(task), permit, arrived),
                    Err(_) => break SessionEnd::Shutdown,
                },
                _ = tokio::time::sleep(ctx.settings.dispatcher.max_hold) => Step::Requeue(Box::new(task)),
            },
        };
        let (role, class, queue) = (role.clone(), class.clone(), queue.to_owned());
        handlers.spawn(async move { handle(role, class, queue, delivery, step).await });
        while handlers.try_join_next().is_some() {}
    };
    // Let in-flight hand-offs finish (each is a few quick writes) before the channel
    // closes; anything not acked by then is requeued by RabbitMQ.
    while handlers.join_next().await.is_some() {}
    end
}

/// Decides what becomes of one delivery and carries it out.
async fn handle<R: Runtime>(
    role: Arc<Role<R>>,
    class: ExecutorClass,
    queue: String,
    delivery: Delivery,
    step: Step,
) {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_default();
    let span = info_span!("task", %message_id, executor = %class);
    async {
        let decided = match step {
            Step::Refuse(rejection) => Ok(Disposition::refuse(&rejection)),
            Step::HandOff(task, permit, arrived) => {
                hand_off(&role, &class, *task, permit, arrived).await
            }
            Step::Requeue(task) => Ok(Disposition::Requeue {
                task,
                reason: "capacity",
                why: "held too long waiting for capacity",
            }),
        };
        let handled = match decided {
            Ok(disposition) => settle(&role, &queue, &delivery, disposition).await,
            // Not acked: the message goes back to its queue when the channel closes.
            Err(Error::ShuttingDown) => crate::metrics::Handled::Requeued("shutdown"),
            Err(e) => {
                // Back to the queue; a message that fails every time reaches the delivery
                // limit and is dead-lettered as poison instead of holding a prefetch slot.
                error!(error = %chain(&e), "could not hand the message off; returning it to its queue");
                settle(&role, &queue, &delivery, Disposition::Return("error")).await
            }
        };
        role.ctx.metrics.deliveries.count(class.as_str(), handled);
    }
    .instrument(span)
    .await;
}

fn parse<R: Runtime>(
    role: &Role<R>,
    class: &ExecutorClass,
    delivery: &Delivery,
) -> Result<Task, Rejection> {
    let ctx = &role.ctx;
    let task = Task::from_amqp(
        &delivery.properties,
        &delivery.data,
        &ctx.settings.common.limits,
        Utc::now(),
    )?;
    if &task.executor != class {
        if ctx.catalog().get(&task.executor).is_none() {
            return Err(Rejection::UnknownExecutor(task.executor.to_string()));
        }
        return Err(Rejection::BadField {
            field: "executor",
            detail: format!(
                "{:?} arrived on the queue of class {class:?}; publish with routing key = executor",
                task.executor.as_str()
            ),
        });
    }
    ctx.catalog().check_payload(&task.executor, &task.payload)?;
    Ok(task)
}
