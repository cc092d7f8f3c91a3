//! Dead letters: `gantry.dead.audit` → `dead_letters`, and the task's terminal state.
//! `gantry.dead` itself is never consumed here: it is kept for operators.

use std::sync::Arc;

use gantry_shared::store::{Applied, DeadLetter};
use gantry_shared::telemetry::chain;
use lapin::Consumer;
use tracing::{info, warn};

use super::{ack_batch, next_batch};
use crate::consume::{SessionEnd, Source, open_until_shutdown};
use crate::metrics::inc;
use crate::service::Ctx;

pub(crate) async fn run_audit(ctx: Arc<Ctx>) {
    let d = &ctx.settings.dispatcher;
    let source = Source {
        url: &ctx.settings.common.amqp_url,
        name: "gantry-recorder/dead-letters".into(),
        queue: ctx.topology.dead_audit_queue(),
        prefetch: u16::try_from(d.record_batch * 2).unwrap_or(u16::MAX),
        timeout: ctx.settings.common.broker_timeout,
    };
    while let Some(mut session) = open_until_shutdown(&source, &ctx.shutdown).await {
        let end = audit_batches(&ctx, &mut session.consumer).await;
        let stop = matches!(end, SessionEnd::Shutdown);
        session.close(&end, &source.queue).await;
        if stop {
            return;
        }
    }
}

async fn audit_batches(ctx: &Ctx, consumer: &mut Consumer) -> SessionEnd {
    let d = &ctx.settings.dispatcher;
    loop {
        let Some(batch) =
            next_batch(consumer, d.record_batch, d.record_linger, &ctx.shutdown).await
        else {
            return if ctx.shutdown.is_cancelled() {
                SessionEnd::Shutdown
            } else {
                SessionEnd::Broken
            };
        };
        let letters: Vec<DeadLetter> = batch
            .iter()
            .map(|d| DeadLetter::from_message(&d.properties, &d.data))
            .collect();
        match ctx
            .persist("record dead letters", || {
                ctx.store.record_dead_letters(&letters)
            })
            .await
        {
            Ok(outcomes) => {
                for (letter, outcome) in letters.iter().zip(outcomes) {
                    if outcome != Applied::Duplicate {
                        inc(&ctx.metrics.dead_letters_recorded);
                        info!(dead_letter_id = %letter.id, task_id = ?letter.task_id.map(|t| t.to_string()), reason = %letter.reason, "dead letter recorded");
                    }
                }
                ack_batch(&batch).await;
            }
            Err(e) => {
                warn!(error = %chain(&e), "dead letters not recorded");
                return if ctx.shutdown.is_cancelled() {
                    SessionEnd::Shutdown
                } else {
                    SessionEnd::Broken
                };
            }
        }
    }
}
