//! The command line: every flag, its environment variable and its help text, and the
//! conversion into [`Settings`]. The runtime sets the environment variables; the flags exist
//! for running the executor by hand.

use std::path::PathBuf;

use clap::builder::{OsStringValueParser, TypedValueParser};
use clap::{Parser, ValueEnum};
use gantry_shared::catalog::{OpenAiEngine, WarmSpec};
use gantry_shared::cli::GlobalArgs;
use gantry_shared::message::Evidence;

use crate::engine::Engine;
use crate::job_dir::JobDir;
use crate::report;
use crate::run::{Settings, WarmSettings};

const ABOUT: &str = "\
Runs one Gantry task inside its job and publishes its result.

Reads the task (a gantry.task/v1 JSON body) from --task-file, runs the engine until it
finishes or the task's deadline passes, and publishes one gantry.result/v1 message to the
results exchange (<prefix>.results) with publisher confirms. SIGTERM or SIGINT stops the
engine and publishes `cancelled` (or `expired` once the deadline has passed).

The broker URL, the name prefix and the broker timeout come from the shared configuration:
--config / GANTRY_CONFIG, then GANTRY_AMQP_URL, GANTRY_PREFIX, GANTRY_BROKER_TIMEOUT,
GANTRY_LOG_FORMAT, then --amqp-url and --prefix.";

const EXIT_CODES: &str = "\
Exit codes:
  0  the result was published and confirmed
  2  bad flags, configuration or task file; nothing was published
  3  the result could not be published (the error is logged and written to exit.json)
  N  the echo engine's `exit_code` knob asked for code N (a simulated crash)";

/// The executor's flags.
#[derive(Debug, Parser)]
#[command(
    name = "gantry-executor",
    version,
    about = "Runs one Gantry task inside its job and publishes its result.",
    long_about = ABOUT,
    after_help = EXIT_CODES,
    // Accepted like every Gantry binary's, so one set of global flags fits them all, but not
    // shown: the executor never opens Postgres.
    mut_arg("database_url", |a| a.hide(true))
)]
pub(crate) struct Args {
    /// `--config`, `--amqp-url`, `--prefix` (and a hidden `--database-url`), as every Gantry
    /// binary takes them.
    #[command(flatten)]
    pub(crate) global: GlobalArgs,

    /// The task to run: a JSON task message body (gantry.task/v1), e.g. the file the
    /// dispatcher mounts from the job's Secret.
    /// The task to run (a gantry.task/v1 JSON body). Not used by a warm executor.
    #[arg(
        long,
        env = "GANTRY_TASK_FILE",
        value_name = "PATH",
        required_unless_present = "warm_queue"
    )]
    task_file: Option<PathBuf>,

    /// Serve the tasks the dispatcher hands over on this queue, many on one engine, instead
    /// of one task file (a warm executor). Its orders come on `<QUEUE>.control`.
    #[arg(long, env = "GANTRY_WARM_QUEUE", value_name = "QUEUE", help_heading = WARM)]
    warm_queue: Option<String>,

    /// The class's warm settings, as JSON: max_concurrency, max_tasks_per_job, idle_timeout,
    /// max_job_lifetime.
    #[arg(long, env = "GANTRY_WARM", value_name = "JSON", value_parser = parse_warm, help_heading = WARM)]
    warm: Option<WarmSpec>,

    /// Wait this long before the engine starts, as loading a model would (for benchmarks
    /// and tests of what a slow start costs), e.g. 20s.
    #[arg(long, env = "GANTRY_ENGINE_START_DELAY", value_name = "DURATION", value_parser = humantime::parse_duration)]
    start_delay: Option<std::time::Duration>,

    /// How to do the work: `echo` returns the task's payload (for tests; the payload may
    /// carry the knobs sleep_ms, exit_code, fail, retryable and stderr); `command` runs
    /// --command; `openai` sends the payload (a chat or completion request) to the model
    /// server that --openai describes.
    #[arg(long, env = "GANTRY_ENGINE", value_enum, default_value_t = EngineKind::Echo)]
    engine: EngineKind,

    /// The program the `command` engine runs, as a JSON array of strings, e.g.
    /// '["python3","/app/run.py"]'. It gets the task JSON on stdin and must print the output
    /// JSON on stdout and exit 0. A non-zero exit fails the task; exit code 75 (EX_TEMPFAIL)
    /// marks the failure retryable. Its stderr is passed through and the last 4 KiB of it go
    /// into the error message. Required with --engine command.
    #[arg(
        long,
        env = "GANTRY_COMMAND",
        value_name = "JSON_ARRAY",
        value_parser = parse_command,
        required_if_eq("engine", "command")
    )]
    command: Option<Argv>,

    /// The `openai` engine's settings, as the class's `engine` in the catalog (JSON):
    /// '{"model":"Qwen/Qwen2.5-7B-Instruct"}' starts `vllm serve {model} --host 127.0.0.1
    /// --port {port}`; "server" gives another command ({model} and {port} are filled in),
    /// "endpoint" (http://host:port) uses a running server instead; "startup_timeout"
    /// (default 10m), "ready_path" (default /v1/models), "stop_grace" (default 10s).
    /// Required with --engine openai.
    #[arg(
        long,
        env = "GANTRY_OPENAI",
        value_name = "JSON",
        value_parser = parse_openai,
        required_if_eq("engine", "openai")
    )]
    openai: Option<OpenAiEngine>,

    /// A queue that also gets the task's progress messages (the task's AMQP reply-to; the
    /// dispatcher sets it). Progress always goes to the <prefix>.progress exchange.
    #[arg(long, env = "GANTRY_REPLY_TO", value_name = "QUEUE")]
    reply_to: Option<String>,

    /// The `local` runtime's job directory: the executor writes `started` there before any
    /// work and `exit.json` (whether the result was published) when it is done.
    #[arg(long, env = "GANTRY_JOB_DIR", value_name = "PATH", value_parser = any_path())]
    job_dir: Option<PathBuf>,

    /// Where to write a one-line final status (at most 4096 bytes), like a Kubernetes
    /// termination message. Without it, /dev/termination-log is used if it exists.
    #[arg(long, env = "GANTRY_TERMINATION_LOG", value_name = "PATH", value_parser = any_path())]
    termination_log: Option<PathBuf>,

    /// The dispatch that started this job (recorded in the result's evidence).
    #[arg(long, env = "GANTRY_DISPATCH_ID", value_name = "ID", help_heading = EVIDENCE)]
    dispatch_id: Option<String>,

    /// The job's name (recorded in the result's evidence).
    #[arg(long, env = "GANTRY_JOB_NAME", value_name = "NAME", help_heading = EVIDENCE)]
    job_name: Option<String>,

    /// The pod's name (recorded in the result's evidence).
    #[arg(long, env = "GANTRY_POD_NAME", value_name = "NAME", help_heading = EVIDENCE)]
    pod_name: Option<String>,

    /// The node the job runs on (recorded in the result's evidence).
    #[arg(long, env = "GANTRY_NODE_NAME", value_name = "NAME", help_heading = EVIDENCE)]
    node_name: Option<String>,

    /// W3C trace context the run continues (its span's parent, when spans are exported:
    /// GANTRY_OTLP_ENDPOINT); the result's `traceparent` header names the run's span, or
    /// this same context when nothing is exported.
    #[arg(long, env = "GANTRY_TRACEPARENT", value_name = "TRACEPARENT", help_heading = EVIDENCE)]
    traceparent: Option<String>,
}

const EVIDENCE: &str = "Runtime evidence (set by the dispatcher)";
const WARM: &str = "Warm executor (set by the dispatcher)";

fn parse_warm(s: &str) -> Result<WarmSpec, String> {
    serde_json::from_str(s).map_err(|e| {
        format!(
            "{s:?} is not a class's warm settings ({e}); write it like '{{\"max_concurrency\":8}}'"
        )
    })
}

/// The engine named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EngineKind {
    Echo,
    Command,
    Openai,
}

/// A command line for the `command` engine, parsed from a JSON array.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Argv(Vec<String>);

/// A path that may be empty (an empty environment variable counts as unset).
fn any_path() -> impl TypedValueParser<Value = PathBuf> {
    OsStringValueParser::new().map(PathBuf::from)
}

/// Parses `--command`. An empty value (a manifest that sets `GANTRY_COMMAND: ""`) means no
/// command: harmless for `echo`, a `spawn_failed` result for `command`.
fn parse_command(s: &str) -> Result<Argv, String> {
    if s.trim().is_empty() {
        return Ok(Argv(Vec::new()));
    }
    let argv: Vec<String> = serde_json::from_str(s).map_err(|e| {
        format!(
            "{s:?} is not a JSON array of strings ({e}); write it like '[\"python3\",\"/app/run.py\"]'"
        )
    })?;
    if argv.first().is_none_or(|program| program.is_empty()) {
        return Err("the command must name a program as its first element".into());
    }
    Ok(Argv(argv))
}

/// Parses `--openai`: the class's engine settings as JSON.
fn parse_openai(s: &str) -> Result<OpenAiEngine, String> {
    serde_json::from_str(s).map_err(|e| {
        format!("{s:?} is not the openai engine's settings ({e}); write it like '{{\"model\":\"Qwen/Qwen2.5-7B-Instruct\"}}'")
    })
}

impl Args {
    /// The settings of one run. Empty values count as unset, as in the shared
    /// configuration.
    ///
    /// # Errors
    /// A flag that clap cannot check alone is missing (it says which).
    pub(crate) fn into_settings(self) -> Result<Settings, String> {
        let engine = match self.engine {
            // An empty or missing command fails at spawn with a message that says so.
            EngineKind::Command => Engine::Command(self.command.map(|a| a.0).unwrap_or_default()),
            EngineKind::Echo => Engine::Echo,
            EngineKind::Openai => match self.openai {
                Some(openai) => Engine::Openai(Box::new(openai)),
                None => return Err("--engine openai needs --openai (GANTRY_OPENAI)".into()),
            },
        };
        let path = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        let text = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
        let warm = self
            .warm_queue
            .filter(|q| !q.trim().is_empty())
            .map(|queue| WarmSettings {
                control: format!("{queue}.control"),
                queue,
                spec: self.warm.unwrap_or_default(),
            });
        Ok(Settings {
            task_file: self.task_file.unwrap_or_default(),
            start_delay: self.start_delay,
            warm,
            engine,
            job_dir: path(self.job_dir).map(JobDir::new),
            termination_log: report::termination_log_path(path(self.termination_log)),
            evidence: Evidence {
                dispatch_id: text(self.dispatch_id),
                job_name: text(self.job_name),
                pod_name: text(self.pod_name),
                node: text(self.node_name),
                terminal_reason: None,
                warm_seq: None,
            },
            traceparent: text(self.traceparent),
            reply_to: text(self.reply_to),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn a_command_is_a_json_array_naming_a_program() {
        assert_eq!(
            parse_command(r#"["python3","/app/run.py"]"#),
            Ok(Argv(vec!["python3".into(), "/app/run.py".into()]))
        );
        assert!(parse_command("python3 /app/run.py").is_err());
        assert!(parse_command("[]").is_err());
        assert_eq!(parse_command(""), Ok(Argv(Vec::new())));
        assert!(parse_command(r#"[""]"#).is_err());
    }

    #[test]
    fn empty_values_count_as_unset() {
        let settings = Args::try_parse_from([
            "gantry-executor",
            "--task-file=t.json",
            "--job-dir=",
            "--command=",
            "--job-name=",
            "--termination-log=",
        ])
        .unwrap()
        .into_settings()
        .unwrap();
        assert_eq!(settings.engine, Engine::Echo);
        assert_eq!(settings.job_dir, None);
        assert_eq!(settings.evidence.job_name, None);
    }

    #[test]
    fn the_shared_flags_override_the_configuration() {
        let args = Args::try_parse_from([
            "gantry-executor",
            "--task-file=t.json",
            "--config=",
            "--prefix=by-flag",
        ])
        .unwrap();
        assert_eq!(args.global.config_file(), None);
        let mut config = gantry_shared::config::Config::default();
        args.global.apply_to(&mut config);
        assert_eq!(config.prefix, "by-flag");
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("--amqp-url"), "{help}");
        assert!(!help.contains("--database-url"), "{help}");
    }

    #[test]
    fn the_openai_engine_takes_its_settings_as_json() {
        let settings = Args::try_parse_from([
            "gantry-executor",
            "--task-file=t.json",
            "--engine=openai",
            r#"--openai={"model":"tiny","endpoint":"http://127.0.0.1:9"}"#,
            "--reply-to=amq.gen-x",
        ])
        .unwrap()
        .into_settings()
        .unwrap();
        let Engine::Openai(engine) = &settings.engine else {
            panic!("{:?}", settings.engine);
        };
        assert_eq!(engine.model, "tiny");
        assert_eq!(engine.endpoint.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(settings.reply_to.as_deref(), Some("amq.gen-x"));
        let err = Args::try_parse_from([
            "gantry-executor",
            "--task-file=t.json",
            "--engine=openai",
            "--openai=vllm",
        ])
        .unwrap_err();
        assert!(
            err.to_string().contains("openai engine's settings"),
            "{err}"
        );
    }

    #[test]
    fn the_command_engine_needs_a_command() {
        let err = Args::try_parse_from([
            "gantry-executor",
            "--task-file",
            "t.json",
            "--engine",
            "command",
        ])
        .expect_err("the command engine without a command is refused");
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::MissingRequiredArgument,
            "{err}"
        );
        assert!(err.to_string().contains("--command <JSON_ARRAY>"), "{err}");
    }
}
