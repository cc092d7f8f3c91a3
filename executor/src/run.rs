//! One attempt, from the task file to the published result and the exit code it earns.
//!
//! [`run`] takes the shutdown signal as an argument (a future), so tests drive it exactly as
//! `main` does: read the task, run the engine under the deadline and the signal, publish one
//! result, then report to the runtime (`exit.json`, the termination log).

use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::Utc;
use gantry_shared::catalog::WarmSpec;
use gantry_shared::config::Config;
use gantry_shared::message::{
    Attempt, ErrorKind, Evidence, ReportedBy, ResultStatus, TaskEnvelope, TaskError, TaskResult,
    Usage,
};
use gantry_shared::telemetry::{chain, trace};
use serde_json::Value;
use tracing::{Instrument, Span, error, field, info, instrument, warn};

use crate::engine::{Deltas, Engine, Finished, StopReason};
use crate::job_dir::JobDir;
use crate::progress::ProgressPublisher;
use crate::publish::publish_result;
use crate::report::{ExitReport, write_termination_log};

/// Exit code when flags, configuration or the task file are unusable.
const EXIT_REFUSED: u8 = 2;
/// Exit code when the result could not be published.
const EXIT_NOT_PUBLISHED: u8 = 3;

/// Everything one run needs besides the shared configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) task_file: PathBuf,
    pub(crate) engine: Engine,
    pub(crate) job_dir: Option<JobDir>,
    pub(crate) termination_log: Option<PathBuf>,
    /// Where the attempt runs; `terminal_reason` is filled in by the run.
    pub(crate) evidence: Evidence,
    pub(crate) traceparent: Option<String>,
    /// The task's reply-to queue, which also gets its progress.
    pub(crate) reply_to: Option<String>,
    /// Waited before the engine starts, as a model load would take (benchmarks).
    pub(crate) start_delay: Option<std::time::Duration>,
    /// Set for a warm executor, which serves many tasks instead of `task_file`'s one.
    pub(crate) warm: Option<WarmSettings>,
}

/// What makes an executor warm: its queues and its class's settings.
/// (Read by `crate::warm`.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WarmSettings {
    pub(crate) queue: String,
    pub(crate) control: String,
    pub(crate) spec: WarmSpec,
}

/// How a run ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The result was published and confirmed.
    Published(TaskResult),
    /// A result was made but could not be published.
    NotPublished { result: TaskResult, error: String },
    /// There was no usable task (or configuration); nothing was published.
    Refused(String),
    /// The echo engine's `exit_code` knob: exit with this code, as a crashed executor would.
    Crash(u8),
}

impl Outcome {
    /// The process exit code this outcome earns.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Outcome::Published(_) => 0,
            Outcome::NotPublished { .. } => EXIT_NOT_PUBLISHED,
            Outcome::Refused(_) => EXIT_REFUSED,
            Outcome::Crash(code) => *code,
        }
    }

    /// One sentence for the executor's last log line.
    pub(crate) fn describe(&self) -> String {
        match self {
            Outcome::Published(result) => {
                format!(
                    "published the {} result of task {}",
                    result.status, result.task_id
                )
            }
            Outcome::NotPublished { result, error } => format!(
                "could not publish the {} result of task {}: {error}",
                result.status, result.task_id
            ),
            Outcome::Refused(reason) => format!("ran nothing: {reason}"),
            Outcome::Crash(code) => {
                format!("exiting with code {code} without a result, as the task's exit_code asked")
            }
        }
    }
}

/// Runs one attempt: see the module docs. The run is a span of the task's trace, the child
/// of the span `settings.traceparent` names (the dispatcher's hand-off), and the result
/// names it as the parent of what follows (the recorder's commit).
pub(crate) async fn run(
    settings: &Settings,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Outcome {
    let span = tracing::info_span!(
        target: trace::TARGET,
        "gantry.run",
        otel.kind = "consumer",
        gantry.task_id = field::Empty,
        gantry.attempt = field::Empty,
        gantry.executor = field::Empty,
        gantry.job_name = settings.evidence.job_name.as_deref(),
    );
    trace::set_parent(&span, settings.traceparent.as_deref());
    let own;
    let settings = match trace::traceparent(&span) {
        Some(tp) => {
            own = Settings {
                traceparent: Some(tp),
                ..settings.clone()
            };
            &own
        }
        None => settings,
    };
    attempt(settings, config, shutdown, &span)
        .instrument(span.clone())
        .await
}

/// [`run`], in its span.
#[instrument(
    name = "task",
    skip_all,
    fields(task_id = field::Empty, attempt = field::Empty, executor = field::Empty,
           job_name = settings.evidence.job_name.as_deref(),
           traceparent = settings.traceparent.as_deref())
)]
async fn attempt(
    settings: &Settings,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send,
    traced: &Span,
) -> Outcome {
    if let Some(job_dir) = &settings.job_dir
        && let Err(e) = job_dir.write_started().await
    {
        warn!(
            error = format!("{e:#}"),
            "cannot write `started`; running the task anyway"
        );
    }
    let task = match read_task(&settings.task_file).await {
        Ok(task) => task,
        Err(e) => return refuse(settings, format!("{e:#}")).await,
    };
    let Some(attempt) = Attempt::new(task.attempt) else {
        let reason = format!(
            "the task file {} gives attempt 0; attempts count from 1",
            settings.task_file.display()
        );
        return refuse(settings, reason).await;
    };
    let span = Span::current();
    span.record("task_id", field::display(task.task_id));
    span.record("attempt", task.attempt);
    span.record("executor", task.executor.as_str());
    traced.record("gantry.task_id", field::display(task.task_id));
    traced.record("gantry.attempt", i64::from(task.attempt));
    traced.record("gantry.executor", task.executor.as_str());
    info!(task = %task.task, deadline = %task.deadline, "task read");

    let started_at = Utc::now();
    let group_file = settings.job_dir.as_ref().map(JobDir::engine_group_file);
    let progress = task.stream.then(|| {
        ProgressPublisher::start(config, task.task_id, attempt, settings.reply_to.clone())
    });
    let deltas = progress.as_ref().map(ProgressPublisher::deltas);
    if let Some(delay) = settings.start_delay {
        info!(
            ?delay,
            "waiting GANTRY_ENGINE_START_DELAY before the engine starts"
        );
        tokio::time::sleep(delay).await;
    }
    let execution = execute(
        &settings.engine,
        &task,
        group_file.as_deref(),
        deltas,
        shutdown,
    )
    .await;
    // Every piece leaves before the result, so a reader sees them first.
    if let Some(progress) = progress {
        progress.finish().await;
    }
    let verdict = match execution {
        Execution::Done(verdict) => verdict,
        Execution::Exit(code) => return Outcome::Crash(code),
    };
    let result = result_of(&task, attempt, verdict, &settings.evidence, started_at);
    let published = publish_result(
        config,
        &task.executor,
        &result,
        settings.traceparent.as_deref(),
    )
    .await;
    let (outcome, report) = match published {
        Ok(()) => {
            let report = ExitReport::new(true, result.status, None);
            (Outcome::Published(result), report)
        }
        Err(e) => {
            let error = chain(&e);
            error!(%error, "could not publish the result; exiting with code 3 so the runtime reports the attempt");
            let report = ExitReport::new(false, result.status, Some(error.clone()));
            (Outcome::NotPublished { result, error }, report)
        }
    };
    write_reports(settings, &report).await;
    outcome
}

/// The result of an attempt that ran from `started_at` to now, as the engine decided it.
pub(crate) fn result_of(
    task: &TaskEnvelope,
    attempt: Attempt,
    verdict: Verdict,
    evidence: &Evidence,
    started_at: chrono::DateTime<Utc>,
) -> TaskResult {
    let result = TaskResult {
        task_id: task.task_id,
        status: verdict.status,
        output: verdict.output,
        error: verdict.error,
        attempt,
        evidence: Evidence {
            terminal_reason: Some(verdict.terminal_reason),
            ..evidence.clone()
        },
        started_at: Some(started_at),
        finished_at: Utc::now(),
        usage: verdict.usage,
        reported_by: ReportedBy::Executor,
    };
    match &result.error {
        None => info!(status = %result.status, "task finished"),
        Some(e) => warn!(status = %result.status, kind = %e.kind, retryable = e.retryable,
                         error = e.message, "task finished without output"),
    }
    result
}

/// Gives up before any work: logs `reason`, reports it as a failure that was not published
/// and returns [`Outcome::Refused`].
pub(crate) async fn refuse(settings: &Settings, reason: String) -> Outcome {
    error!(%reason, "nothing to run; no result published (exit code 2)");
    let report = ExitReport::new(false, ResultStatus::Failed, Some(reason.clone()));
    write_reports(settings, &report).await;
    Outcome::Refused(reason)
}

/// Writes `exit.json` (with a job directory) and the termination log (when there is one).
pub(crate) async fn write_reports(settings: &Settings, report: &ExitReport) {
    if let Some(job_dir) = &settings.job_dir
        && let Err(e) = job_dir.write_exit(report).await
    {
        error!(error = format!("{e:#}"), "cannot write exit.json");
    }
    if let Some(path) = &settings.termination_log
        && let Err(e) = write_termination_log(path, report).await
    {
        warn!(path = %path.display(), error = %e, "cannot write the termination log");
    }
}

/// Reads and parses the task file.
#[instrument]
async fn read_task(path: &Path) -> anyhow::Result<TaskEnvelope> {
    let bytes = tokio::fs::read(path).await.with_context(|| {
        format!(
            "cannot read the task file {}; check --task-file / GANTRY_TASK_FILE",
            path.display()
        )
    })?;
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "the task file {} is not a gantry.task/v1 task body",
            path.display()
        )
    })
}

/// What the engine's run amounts to.
#[derive(Debug)]
pub(crate) enum Execution {
    Done(Verdict),
    /// Exit with this code without publishing (the echo engine's `exit_code` knob).
    Exit(u8),
}

/// The parts of the result that the engine decides.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Verdict {
    pub(crate) status: ResultStatus,
    pub(crate) output: Option<Value>,
    pub(crate) error: Option<TaskError>,
    pub(crate) terminal_reason: String,
    pub(crate) usage: Option<Usage>,
}

impl Verdict {
    fn failed(error: TaskError) -> Verdict {
        Verdict {
            status: ResultStatus::Failed,
            terminal_reason: error.kind.to_string(),
            output: None,
            error: Some(error),
            usage: None,
        }
    }

    fn stopped(status: ResultStatus, kind: ErrorKind, message: String, retryable: bool) -> Verdict {
        Verdict {
            status,
            output: None,
            terminal_reason: kind.to_string(),
            error: Some(TaskError {
                kind,
                message,
                retryable,
            }),
            usage: None,
        }
    }
}

/// How an engine's stop future is passed on: boxed, so one judge serves every engine.
pub(crate) type Stop<'a> = std::pin::Pin<Box<dyn Future<Output = StopReason> + Send + 'a>>;

/// Runs the engine until it finishes, the deadline passes or `shutdown` completes.
pub(crate) async fn execute(
    engine: &Engine,
    task: &TaskEnvelope,
    group_file: Option<&std::path::Path>,
    deltas: Option<&Deltas>,
    shutdown: impl Future<Output = ()> + Send,
) -> Execution {
    let interrupt = async {
        shutdown.await;
        StopReason::Signal
    };
    judge(task, interrupt, |stop| {
        engine.run(task, group_file, deltas, stop)
    })
    .await
}

/// Runs `work` until it finishes, the task's deadline passes or `interrupt` completes (with
/// the reason it gives), and says what the attempt amounts to.
pub(crate) async fn judge<'a, Work, Fut>(
    task: &TaskEnvelope,
    interrupt: impl Future<Output = StopReason> + Send + 'a,
    work: Work,
) -> Execution
where
    Work: FnOnce(Stop<'a>) -> Fut,
    Fut: Future<Output = Finished>,
{
    let expired = |message: String| {
        Execution::Done(Verdict::stopped(
            ResultStatus::Expired,
            ErrorKind::DeadlineExceeded,
            message,
            false,
        ))
    };
    let Ok(time_left) = (task.deadline - Utc::now()).to_std() else {
        return expired(format!(
            "the deadline {} had passed before the executor started; the engine did not run",
            task.deadline
        ));
    };
    let stop: Stop<'a> = Box::pin(async move {
        tokio::select! {
            () = tokio::time::sleep(time_left) => StopReason::Deadline,
            reason = interrupt => reason,
        }
    });
    match work(stop).await {
        Finished::Output { output, usage } => Execution::Done(Verdict {
            status: ResultStatus::Succeeded,
            output: Some(output),
            error: None,
            terminal_reason: "completed".into(),
            usage,
        }),
        Finished::Failed(error) => Execution::Done(Verdict::failed(error)),
        Finished::Exit(code) => Execution::Exit(code),
        Finished::Stopped(StopReason::Deadline) => expired(format!(
            "the deadline {} passed while the engine ran; it was stopped",
            task.deadline
        )),
        Finished::Stopped(StopReason::Signal) if Utc::now() >= task.deadline => expired(format!(
            "the executor was terminated after the deadline {} had passed",
            task.deadline
        )),
        // Stopped from outside before the work was done: the pod is evicted, preempted or
        // drained, or the job is cancelled. The attempt failed and may be retried; a
        // cancelled task is recorded `cancelled` before its job is stopped, so this result
        // comes late and changes nothing.
        Finished::Stopped(StopReason::Signal) => Execution::Done(Verdict::stopped(
            ResultStatus::Failed,
            ErrorKind::Terminated,
            "the executor was terminated (SIGTERM or SIGINT) before the engine finished; it was stopped".into(),
            true,
        )),
        // Recorded `cancelled` already; this result only tells the story.
        Finished::Stopped(StopReason::Cancelled) => Execution::Done(Verdict::stopped(
            ResultStatus::Cancelled,
            ErrorKind::Cancelled,
            "the task was cancelled while its warm executor ran it; its request was aborted"
                .into(),
            false,
        )),
    }
}

#[cfg(test)]
#[path = "run_tests.rs"]
mod tests;
