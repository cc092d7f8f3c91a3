//! Dead letters: `gantry.dead.audit` → `dead_letters`, and the task's terminal state.
//! `gantry.dead` itself is never consumed here: it is kept for operators.

use gantry_shared::store::{Applied, DeadLetter};
use lapin::message::Delivery;
use tracing::info;

use crate::Result;
use crate::context::Ctx;

/// Records one batch of dead letters in one transaction.
pub(super) async fn record(ctx: &Ctx, batch: &[Delivery]) -> Result<()> {
    let letters: Vec<DeadLetter> = batch
        .iter()
        .map(|d| DeadLetter::from_message(&d.properties, &d.data))
        .collect();
    let outcomes = ctx
        .persist("record dead letters", || {
            ctx.store.record_dead_letters(&letters)
        })
        .await?;
    let mut ended = Vec::new();
    for ((DeadLetter { label: letter, .. }, outcome), delivery) in
        letters.iter().zip(outcomes).zip(batch)
    {
        if let (Applied::Changed { .. }, Some(id)) = (&outcome, letter.task_id) {
            ended.push((id, &delivery.properties));
        }
        if outcome != Applied::Duplicate {
            ctx.metrics.dead_letter_recorded(letter.reason_kind());
            info!(dead_letter_id = %letter.id, task_id = ?letter.task_id.map(|t| t.to_string()), reason = %letter.reason, "dead letter recorded");
        }
    }
    crate::celery::reply::after_dead_letters(ctx, &ended).await
}
