//! A warm executor: one job that makes its engine ready once (the model server loaded)
//! and then runs the tasks the dispatcher hands it, several at once, each under its own
//! deadline, each with its own result.
//!
//! The dispatcher is the only publisher to the executor's two queues: its task queue
//! (`<prefix>.warm.<job>`, consumed with a prefetch of `max_concurrency`, so the broker
//! never gives it more than it runs) and its control queue (`<prefix>.warm.<job>.control`:
//! cancel one task, or drain). A task's delivery is acked only once its result is
//! confirmed by the broker; if the executor dies first, the delivery goes back to the queue
//! and the dispatcher, which follows the job, fails the attempt on its behalf.
//!
//! It ends, finishing the tasks in hand first, when the dispatcher says drain, after
//! SIGTERM (tasks in hand are stopped and reported `terminated`, retryable), when its model
//! server dies, or, should no dispatcher tell it, after `idle_timeout` plus a margin with
//! nothing to do.

use std::collections::{HashMap, HashSet};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use gantry_shared::amqp::{self, Publisher};
use gantry_shared::config::Config;
use gantry_shared::message::{Attempt, Evidence, HandedTask, ResultStatus, TaskId, WarmOrder};
use gantry_shared::telemetry::{chain, trace};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::engine::{StopReason, Warm};
use crate::progress::ProgressPublisher;
use crate::publish::publish_result_on;
use crate::report::ExitReport;
use crate::run::{Execution, Settings, WarmSettings, judge, result_of, write_reports};

/// Exit code when the engine could not be made ready.
const EXIT_ENGINE: u8 = 4;
/// Exit code when the broker could not be reached or a result not published.
const EXIT_BROKER: u8 = 3;
/// How much longer than `idle_timeout` an executor waits for the dispatcher's drain order
/// before it ends by itself.
const IDLE_MARGIN: Duration = Duration::from_secs(30);
/// Cancellations remembered for tasks not yet received.
const EARLY_CANCELS: usize = 10_000;

/// Serves tasks until told to end; returns the exit code.
pub(crate) async fn serve(
    settings: &Settings,
    warm: &WarmSettings,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send,
) -> u8 {
    if let Some(job_dir) = &settings.job_dir
        && let Err(e) = job_dir.write_started().await
    {
        warn!(
            error = format!("{e:#}"),
            "cannot write `started`; serving anyway"
        );
    }
    let mut shutdown = pin!(shutdown);
    let stopping = CancellationToken::new();
    let group_file = settings
        .job_dir
        .as_ref()
        .map(crate::job_dir::JobDir::engine_group_file);
    let began = std::time::Instant::now();
    let warming = async {
        if let Some(delay) = settings.start_delay {
            info!(
                ?delay,
                "waiting GANTRY_ENGINE_START_DELAY before the engine starts"
            );
            tokio::time::sleep(delay).await;
        }
        settings
            .engine
            .warm_up(group_file.as_deref(), async {
                stopping.cancelled().await;
                StopReason::Signal
            })
            .await
    };
    let engine = tokio::select! {
        engine = warming => engine,
        () = &mut shutdown => {
            warn!("stopped before the engine was ready; no task was taken");
            return finish(settings, true, None).await;
        }
    };
    let engine = match engine {
        Ok(engine) => engine,
        Err(finished) => {
            let reason = format!("the engine did not get ready: {finished:?}");
            error!(%reason, "ending; the dispatcher fails the tasks handed to this executor");
            return finish_with(settings, EXIT_ENGINE, Some(reason)).await;
        }
    };
    info!(took = ?began.elapsed(), queue = %warm.queue, max_concurrency = warm.spec.max_concurrency, "engine ready; taking tasks");
    let engine = Arc::new(engine);
    let code = match Server::open(settings, warm, config).await {
        Ok(server) => server.run(&engine, shutdown).await,
        Err(e) => {
            error!(error = %chain(&e), "cannot consume the executor's queues");
            EXIT_BROKER
        }
    };
    // Every task has ended, so the engine is this function's alone again.
    if let Ok(engine) = Arc::try_unwrap(engine) {
        engine.close(group_file.as_deref()).await;
    }
    let reason = (code != 0).then(|| format!("ended with code {code}"));
    finish_with(settings, code, reason).await
}

/// Writes the executor's report (`exit.json`, the termination log) and returns `code`.
async fn finish_with(settings: &Settings, code: u8, reason: Option<String>) -> u8 {
    let report = ExitReport::new(code == 0, ResultStatus::Succeeded, reason);
    write_reports(settings, &report).await;
    code
}

async fn finish(settings: &Settings, clean: bool, reason: Option<String>) -> u8 {
    finish_with(settings, if clean { 0 } else { EXIT_BROKER }, reason).await
}

/// The executor's connection: its two consumers and its result publisher.
struct Server<'a> {
    settings: &'a Settings,
    warm: &'a WarmSettings,
    config: &'a Config,
    channel: Channel,
    tasks: Consumer,
    orders: Consumer,
    publisher: Publisher,
    conn: lapin::Connection,
}

/// One task in hand.
struct InHand {
    cancel: CancellationToken,
}

impl<'a> Server<'a> {
    async fn open(
        settings: &'a Settings,
        warm: &'a WarmSettings,
        config: &'a Config,
    ) -> gantry_shared::Result<Server<'a>> {
        let name = format!(
            "gantry-executor (warm) {}",
            settings.evidence.job_name.as_deref().unwrap_or("")
        );
        let conn = amqp::connect(&config.amqp_url, &name, config.broker_timeout).await?;
        let amqp_err = |operation| move |source| gantry_shared::Error::Amqp { operation, source };
        let channel = conn
            .create_channel()
            .await
            .map_err(amqp_err("channel.open"))?;
        channel
            .basic_qos(warm.spec.max_concurrency, BasicQosOptions::default())
            .await
            .map_err(amqp_err("basic.qos"))?;
        let consume = |queue: &str, tag: &str| {
            channel.basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
        };
        let tasks = consume(&warm.queue, "tasks")
            .await
            .map_err(amqp_err("basic.consume"))?;
        let orders = consume(&warm.control, "orders")
            .await
            .map_err(amqp_err("basic.consume"))?;
        let publisher = Publisher::connect(&config.amqp_url, &name, config.broker_timeout).await?;
        Ok(Server {
            settings,
            warm,
            config,
            channel,
            tasks,
            orders,
            publisher,
            conn,
        })
    }

    /// Takes tasks until drained, idle, interrupted or broken; returns the exit code.
    async fn run(mut self, engine: &Arc<Warm>, shutdown: impl Future<Output = ()>) -> u8 {
        let mut shutdown = pin!(shutdown);
        let terminate = CancellationToken::new();
        let mut running: JoinSet<(TaskId, bool)> = JoinSet::new();
        let mut in_hand: HashMap<TaskId, InHand> = HashMap::new();
        let mut cancelled_early: HashSet<TaskId> = HashSet::new();
        let mut taking = true;
        let mut code = 0;
        let idle_for = self.warm.spec.idle_timeout + IDLE_MARGIN;
        let mut idle_since = tokio::time::Instant::now();
        let mut health = tokio::time::interval(Duration::from_secs(1));
        loop {
            if !taking && running.is_empty() {
                break;
            }
            tokio::select! {
                () = &mut shutdown, if !terminate.is_cancelled() => {
                    warn!(in_hand = in_hand.len(), "SIGTERM: stopping the tasks in hand and taking no more");
                    terminate.cancel();
                    self.stop_taking(&mut taking).await;
                }
                delivery = self.tasks.next(), if taking => match delivery {
                    Some(Ok(delivery)) => {
                        let Some((task, cancel)) = self.accept(&delivery, &mut cancelled_early).await else {
                            continue;
                        };
                        in_hand.insert(task.envelope.task_id, InHand { cancel: cancel.clone() });
                        let work = self.work(engine, task, delivery, cancel, terminate.clone());
                        running.spawn(work);
                    }
                    Some(Err(e)) => {
                        error!(error = %e, "the task consumer failed; ending");
                        taking = false;
                        code = EXIT_BROKER;
                    }
                    None => taking = false,
                },
                order = self.orders.next() => match order {
                    Some(Ok(delivery)) => {
                        self.obey(&delivery, &in_hand, &mut cancelled_early, &mut taking).await;
                    }
                    Some(Err(e)) => {
                        error!(error = %e, "the order consumer failed; ending");
                        self.stop_taking(&mut taking).await;
                        code = EXIT_BROKER;
                    }
                    None => {}
                },
                done = running.join_next(), if !running.is_empty() => {
                    if let Some(Ok((id, published))) = done {
                        in_hand.remove(&id);
                        if !published {
                            self.stop_taking(&mut taking).await;
                            code = EXIT_BROKER;
                        }
                    }
                    if running.is_empty() {
                        idle_since = tokio::time::Instant::now();
                    }
                }
                _ = health.tick() => {
                    if let Some(reason) = engine.broken().await {
                        error!(%reason, "the engine can take no more tasks; ending");
                        self.stop_taking(&mut taking).await;
                        code = EXIT_ENGINE;
                    }
                }
                () = tokio::time::sleep_until(idle_since + idle_for), if taking && running.is_empty() => {
                    warn!(?idle_for, "idle without word from the dispatcher; ending");
                    self.stop_taking(&mut taking).await;
                }
            }
        }
        self.publisher.close().await;
        let _ = self.conn.close(200, "bye".into()).await;
        code
    }

    /// Stops the task consumer: the broker gives this executor nothing more.
    async fn stop_taking(&self, taking: &mut bool) {
        if !*taking {
            return;
        }
        *taking = false;
        if let Err(e) = self
            .channel
            .basic_cancel("tasks".into(), BasicCancelOptions::default())
            .await
        {
            warn!(error = %e, "cannot cancel the task consumer");
        }
    }

    /// Reads a delivery; `None` (and acked) for one that is not run.
    async fn accept(
        &self,
        delivery: &Delivery,
        cancelled_early: &mut HashSet<TaskId>,
    ) -> Option<(HandedTask, CancellationToken)> {
        let task = match HandedTask::from_amqp(&delivery.properties, &delivery.data) {
            Ok(task) => task,
            Err(reason) => {
                // Only the dispatcher publishes here: a message it did not make is dropped
                // with a log line, and the attempt it may stand for is failed on its behalf
                // when this executor ends.
                error!(%reason, "a message on the task queue is not a handed-over task; dropped");
                ack(delivery).await;
                return None;
            }
        };
        if cancelled_early.remove(&task.envelope.task_id) {
            info!(task_id = %task.envelope.task_id, "cancelled before it arrived; not run");
            ack(delivery).await;
            return None;
        }
        Some((task, CancellationToken::new()))
    }

    /// Carries out one order.
    async fn obey(
        &self,
        delivery: &Delivery,
        in_hand: &HashMap<TaskId, InHand>,
        cancelled_early: &mut HashSet<TaskId>,
        taking: &mut bool,
    ) {
        match serde_json::from_slice::<WarmOrder>(&delivery.data) {
            Ok(WarmOrder::Cancel { task_id }) => match in_hand.get(&task_id) {
                Some(task) => {
                    info!(%task_id, "cancelled; aborting its request");
                    task.cancel.cancel();
                }
                None => {
                    if cancelled_early.len() >= EARLY_CANCELS {
                        cancelled_early.clear();
                    }
                    cancelled_early.insert(task_id);
                }
            },
            Ok(WarmOrder::Drain) => {
                info!(
                    in_hand = in_hand.len(),
                    "drain: finishing the tasks in hand, then ending"
                );
                self.stop_taking(taking).await;
            }
            Err(e) => warn!(error = %e, "an order that is not a warm order; ignored"),
        }
        ack(delivery).await;
    }

    /// Runs one task and publishes its result; acks its delivery once the result is
    /// confirmed. Says whether it was.
    fn work(
        &self,
        engine: &Arc<Warm>,
        task: HandedTask,
        delivery: Delivery,
        cancel: CancellationToken,
        terminate: CancellationToken,
    ) -> impl Future<Output = (TaskId, bool)> + Send + 'static {
        let id = task.envelope.task_id;
        let span =
            info_span!("task", task_id = %id, attempt = task.envelope.attempt, seq = task.seq);
        let evidence = Evidence {
            dispatch_id: Some(task.dispatch_id.clone()),
            warm_seq: Some(task.seq),
            ..self.settings.evidence.clone()
        };
        let (engine, publisher, config) =
            (engine.clone(), self.publisher.clone(), self.config.clone());
        async move {
            let ran = run_one(
                &engine, &task, &evidence, &publisher, &config, cancel, terminate,
            )
            .await;
            match ran {
                Ok(()) => {
                    ack(&delivery).await;
                    (id, true)
                }
                Err(error) => {
                    // Not acked: the delivery stays with this executor until it ends, and the
                    // dispatcher fails the attempt on its behalf then.
                    error!(%error, "could not publish the result; ending after the tasks in hand");
                    (id, false)
                }
            }
        }
        .instrument(span)
    }
}

/// Acks a delivery; a failed ack means the channel is gone, which ends the executor anyway.
async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
        warn!(error = %e, "ack failed");
    }
}

/// The attempt of a handed task, which the dispatcher made valid.
fn attempt_of(task: &HandedTask) -> Attempt {
    Attempt::new(task.envelope.attempt).unwrap_or(Attempt::FIRST)
}

/// What ended a task early, as the engine is told.
async fn interrupted(cancel: CancellationToken, terminate: CancellationToken) -> StopReason {
    tokio::select! {
        () = cancel.cancelled() => StopReason::Cancelled,
        () = terminate.cancelled() => StopReason::Signal,
    }
}

/// Runs `task` on `engine` and publishes its result. The run is a span of the task's
/// trace, as a job's run is (`crate::run::run`), and the result names it as the parent.
async fn run_one(
    engine: &Warm,
    task: &HandedTask,
    evidence: &Evidence,
    publisher: &Publisher,
    config: &Config,
    cancel: CancellationToken,
    terminate: CancellationToken,
) -> Result<(), String> {
    let envelope = &task.envelope;
    let span = info_span!(
        target: trace::TARGET,
        "gantry.run",
        otel.kind = "consumer",
        gantry.task_id = %envelope.task_id,
        gantry.attempt = i64::from(envelope.attempt),
        gantry.executor = %envelope.executor,
        gantry.warm = true,
    );
    trace::set_parent(&span, task.traceparent.as_deref());
    let traceparent = trace::traceparent(&span).or_else(|| task.traceparent.clone());
    async {
        let attempt = attempt_of(task);
        let started_at = Utc::now();
        let progress = envelope.stream.then(|| {
            ProgressPublisher::start(config, envelope.task_id, attempt, task.reply_to.clone())
        });
        let deltas = progress.as_ref().map(ProgressPublisher::deltas);
        let execution = judge(envelope, interrupted(cancel, terminate), |stop| {
            engine.run(envelope, deltas, stop)
        })
        .await;
        if let Some(progress) = progress {
            progress.finish().await;
        }
        let verdict = match execution {
            Execution::Done(verdict) => verdict,
            Execution::Exit(code) => {
                // The echo engine's crash knob: the whole executor goes, as a crash would.
                error!(
                    code,
                    "the task asked the executor to exit; exiting without results"
                );
                std::process::exit(i32::from(code));
            }
        };
        let result = result_of(envelope, attempt, verdict, evidence, started_at);
        publish_result_on(
            publisher,
            config,
            envelope.executor.as_str(),
            &result,
            traceparent.as_deref(),
        )
        .await
        .map_err(|e| chain(&e))
    }
    .instrument(span)
    .await
}
