//! Dead letters: `gantry.dead.audit` → `dead_letters`, and the task's terminal state.
//! `gantry.dead` itself is never consumed here: it is kept for operators.

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use gantry_shared::message::{FieldTableExt, TaskId, headers, value_to_json};
use gantry_shared::store::{Applied, DeadLetter};
use gantry_shared::telemetry::chain;
use lapin::Consumer;
use lapin::message::Delivery;
use serde_json::Value;
use tracing::{info, warn};
use uuid::Uuid;

use super::{ack_batch, next_batch};
use crate::consume::{SessionEnd, Source, open_until_shutdown};
use crate::metrics::inc;
use crate::service::Ctx;

/// Bodies are kept up to this size in `dead_letters.body`.
const MAX_BODY: usize = 64 * 1024;

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
        let letters: Vec<DeadLetter> = batch.iter().map(dead_letter_of).collect();
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

/// Reads everything worth keeping out of a dead letter, whatever shape its body has.
pub(crate) fn dead_letter_of(delivery: &Delivery) -> DeadLetter {
    let table = delivery.properties.headers().clone().unwrap_or_default();
    let death = table.inner().get(headers::X_DEATH).map(value_to_json);
    let first_death = death.as_ref().and_then(|d| d.get(0)).cloned();
    let reason = match table.get_str(headers::REASON) {
        Some(r) => r.to_owned(),
        None => rabbit_reason(first_death.as_ref()),
    };
    let body: Option<Value> = serde_json::from_slice(&delivery.data).ok();
    let field = |k: &str| {
        body.as_ref()
            .and_then(|b| b.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string());
    let task_id = field("task_id").and_then(|t| t.parse::<TaskId>().ok());
    let attempt = body
        .as_ref()
        .and_then(|b| b.get("attempt"))
        .and_then(Value::as_u64)
        .or_else(|| {
            table
                .get_i64(headers::ATTEMPT)
                .and_then(|a| u64::try_from(a).ok())
        })
        .and_then(|a| u32::try_from(a).ok());
    let dead_at = table
        .get_i64("x-gantry-dead-at")
        .or_else(|| {
            first_death
                .as_ref()
                .and_then(|d| d.get("time"))
                .and_then(Value::as_i64)
        })
        .and_then(|t| Utc.timestamp_opt(t, 0).single())
        .unwrap_or_else(Utc::now);
    let id = table
        .get_str(headers::DEAD_LETTER_ID)
        .and_then(|s| Uuid::parse_str(s).ok())
        .unwrap_or_else(|| {
            derived_id(
                message_id.as_deref(),
                first_death.as_ref(),
                &delivery.data,
                dead_at,
            )
        });
    DeadLetter {
        id,
        message_id,
        task_id,
        attempt,
        task: field("task"),
        executor: field("executor"),
        reason,
        death,
        headers: table.to_json(),
        body: delivery.data[..delivery.data.len().min(MAX_BODY)].to_vec(),
        body_truncated: delivery.data.len() > MAX_BODY,
        dead_at,
    }
}

/// The reason RabbitMQ recorded in `x-death`, in words.
fn rabbit_reason(first_death: Option<&Value>) -> String {
    let get = |k: &str| {
        first_death
            .and_then(|d| d.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    let queue = get("queue");
    match get("reason") {
        "expired" => format!("expired: the task's TTL ran out while it waited in {queue}"),
        "delivery_limit" => format!(
            "delivery_limit: delivered too many times from {queue} without being acknowledged (poison message)"
        ),
        "rejected" => format!("rejected: refused by a consumer of {queue}"),
        "maxlen" => format!("maxlen: {queue} was full"),
        "" => "unknown: the dead letter carries no reason".into(),
        other => format!("{other}: dead-lettered from {queue}"),
    }
}

/// A stable id for a dead letter RabbitMQ produced itself, so its audit copy is recorded
/// once however often it is redelivered.
fn derived_id(
    message_id: Option<&str>,
    first_death: Option<&Value>,
    body: &[u8],
    dead_at: DateTime<Utc>,
) -> Uuid {
    let mut key = Vec::new();
    key.extend_from_slice(message_id.unwrap_or_default().as_bytes());
    key.extend_from_slice(
        first_death
            .map(Value::to_string)
            .unwrap_or_default()
            .as_bytes(),
    );
    if message_id.is_none() {
        key.extend_from_slice(body);
        key.extend_from_slice(dead_at.to_rfc3339().as_bytes());
    }
    Uuid::new_v5(&Uuid::NAMESPACE_OID, &key)
}
