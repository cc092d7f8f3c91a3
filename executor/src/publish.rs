//! Publishing the one result of an attempt: to the results exchange, `mandatory`, waiting
//! for the broker's confirm, reconnecting and re-sending on broker failures for up to a
//! minute. A result that no queue takes or that the broker refuses is not retried.

use std::time::{Duration, Instant};

use backon::Retryable;
use gantry_shared::amqp::Publisher;
use gantry_shared::config::Config;
use gantry_shared::message::{TaskResult, traceparent, with_traceparent};
use gantry_shared::topology::Topology;
use gantry_shared::{Error, Result, retry};
use lapin::BasicProperties;
use tracing::{debug, info, instrument, warn};

/// How long connecting and publishing may keep retrying, together.
const PUBLISH_BUDGET: Duration = Duration::from_secs(60);

/// Publishes `result` to `<prefix>.results` with the executor class as routing key.
///
/// # Errors
/// The broker cannot be reached or does not confirm within the budget, no queue is bound to
/// the results exchange ([`Error::Unroutable`]), or the broker refuses the message.
#[instrument(skip_all, fields(task_id = %result.task_id, status = %result.status, exchange))]
pub(crate) async fn publish_result(
    config: &Config,
    executor: &str,
    result: &TaskResult,
    trace: Option<&str>,
) -> Result<()> {
    let exchange = Topology::new(&config.prefix)?.results_exchange();
    tracing::Span::current().record("exchange", exchange.as_str());
    let (body, props) = result.to_amqp()?;
    let props = with_trace_context(props, trace);
    debug!(body = %String::from_utf8_lossy(&body), "publishing the result");

    let began = Instant::now();
    let name = format!("gantry-executor {}", result.task_id);
    let connect = || Publisher::connect(&config.amqp_url, &name, config.broker_timeout);
    let publisher = connect
        .retry(retry::for_at_most(PUBLISH_BUDGET))
        .when(Error::is_transient)
        .notify(|e, delay| warn!(error = %e, ?delay, "RabbitMQ unavailable; retrying"))
        .await?;
    let left = PUBLISH_BUDGET.saturating_sub(began.elapsed());
    let published = send(&publisher, &exchange, executor, &body, props, left).await;
    publisher.close().await;
    published?;
    info!(elapsed = ?began.elapsed(), "result published and confirmed");
    Ok(())
}

/// Publishes `result` as [`publish_result`] does, on a connection that stays open for the
/// next one (a warm executor's).
///
/// # Errors
/// As [`publish_result`].
#[instrument(skip_all, fields(task_id = %result.task_id, status = %result.status))]
pub(crate) async fn publish_result_on(
    publisher: &Publisher,
    config: &Config,
    executor: &str,
    result: &TaskResult,
    trace: Option<&str>,
) -> Result<()> {
    let exchange = Topology::new(&config.prefix)?.results_exchange();
    let (body, props) = result.to_amqp()?;
    let props = with_trace_context(props, trace);
    send(publisher, &exchange, executor, &body, props, PUBLISH_BUDGET).await?;
    debug!("result published and confirmed");
    Ok(())
}

/// Publishes `mandatory` and waits for the confirm, retrying broker failures for `left`.
async fn send(
    publisher: &Publisher,
    exchange: &str,
    executor: &str,
    body: &[u8],
    props: BasicProperties,
    left: Duration,
) -> Result<()> {
    let left = left.max(Duration::from_secs(1));
    publisher
        .publish(
            exchange,
            executor,
            body,
            props,
            true,
            retry::for_at_most(left),
        )
        .await
}

/// Carries the task's trace context on the result, when it is well formed.
fn with_trace_context(props: BasicProperties, trace: Option<&str>) -> BasicProperties {
    let Some(trace) = trace else {
        return props;
    };
    if !traceparent::is_valid(trace) {
        warn!(
            traceparent = trace,
            "ignoring a malformed GANTRY_TRACEPARENT"
        );
        return props;
    }
    with_traceparent(props, trace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::message::{FieldTableExt, headers};

    #[test]
    fn a_valid_traceparent_travels_as_a_header() {
        let trace = traceparent::generate();
        let props = with_trace_context(BasicProperties::default(), Some(&trace));
        let table = props.headers().clone().unwrap();
        assert_eq!(table.get_str(headers::TRACEPARENT), Some(trace.as_str()));
        let props = with_trace_context(BasicProperties::default(), Some("junk"));
        assert!(props.headers().is_none());
    }
}
