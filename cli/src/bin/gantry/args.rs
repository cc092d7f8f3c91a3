//! The command line: global options, subcommands, and the help that explains them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use gantry_shared::cli::GlobalArgs;
use gantry_shared::message::{ExecutorClass, TaskId, TaskName};

pub(crate) use crate::dlq::DlqCommand;

const ABOUT: &str = "Submit GPU tasks to Gantry and follow them to their end";

const LONG_ABOUT: &str = "\
Submit GPU tasks to Gantry and follow them to their end.

A task is published to RabbitMQ (exchange <prefix>.tasks, routing key = executor class); a
dispatcher runs it as a job and records every state in Postgres. `submit` needs RabbitMQ;
`status` and `wait` need only Postgres; `topology apply` needs only RabbitMQ. Tasks that
could not run end in <prefix>.dead: `dlq` lists, shows, replays and purges them.

No command but `db migrate` changes Postgres's schema: the others need the tables a
dispatcher (or `gantry db migrate`) created, and refuse a database without them.";

const AFTER_HELP: &str = "\
Configuration, later wins: built-in defaults, the --config file, GANTRY_* environment
variables (GANTRY_AMQP_URL, GANTRY_DATABASE_URL, GANTRY_PREFIX, …), then these flags.
Prefer the environment for URLs that carry a password: flags show up in `ps`.

Exit codes:
  0  the task succeeded, or the command did its job
  1  the task failed, expired, was cancelled or dead-lettered; `status` of an unknown task;
     `dlq show` of an unknown dead letter; a `dlq replay` or `purge` that left some behind
  2  usage error, invalid task or payload, RabbitMQ or Postgres unreachable
  3  timed out waiting: the task is still queued or running

Examples:
  gantry db migrate
  gantry topology apply
  gantry submit --executor echo --task demo.echo --payload '{\"hello\":\"world\"}'
  gantry submit --executor echo --task demo.echo --payload @request.json --wait --json
  gantry submit --executor chat --task llm.chat --payload @chat.json --stream
  gantry status 5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90
  gantry wait 5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90 --timeout 5m
  gantry dlq list --reason expired --since 2h
  gantry dlq replay --reason expired --since 2h --dry-run

Logs go to stderr; RUST_LOG sets their level (e.g. RUST_LOG=debug).";

/// The help heading of the options every subcommand takes.
const GLOBAL: &str = "Global options";

/// `gantry`: the command line. The global options are the ones every Gantry binary takes
/// ([`GlobalArgs`]), accepted here before or after the subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "gantry",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    propagate_version = true,
    max_term_width = 100,
    mut_arg("config", |a| a.global(true)),
    mut_arg("amqp_url", |a| a.global(true)),
    mut_arg("database_url", |a| a.global(true)),
    mut_arg("prefix", |a| a.global(true))
)]
pub(crate) struct Cli {
    #[command(flatten, next_help_heading = GLOBAL)]
    pub(crate) global: GlobalArgs,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Submit a task; print its id, or with --wait its result
    Submit(SubmitArgs),
    /// Show a task's state, runtime evidence, result and history
    Status(StatusArgs),
    /// Wait for a task to finish and print its result
    Wait(WaitArgs),
    /// Cancel a task: skipped if still queued, its job stopped if running
    Cancel(CancelArgs),
    /// Manage the RabbitMQ exchanges and queues
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Manage the Postgres schema
    #[command(subcommand)]
    Db(DbCommand),
    /// Inspect, replay and purge dead letters (tasks that could not run)
    #[command(subcommand, after_help = crate::dlq::DLQ_AFTER_HELP)]
    Dlq(DlqCommand),
}

const SUBMIT_AFTER_HELP: &str = "\
Without --wait, prints the task id alone on one line once RabbitMQ has confirmed that a queue
stored the task. With --wait, waits for the task to finish, prints its result, and exits 0
when it succeeded, 1 when it failed, expired, was cancelled or dead-lettered, 3 on timeout.
With --json, prints one JSON object instead: {task_id, task, executor, submitted_at,
deadline}, or with --wait the task as `gantry status --json` shows it.

--stream submits the task with streaming on and implies --wait: the answer's pieces (an LLM's
tokens, from a class whose engine is `openai`) are printed on stdout as they are made, then a
newline and the result as --wait prints it. With --json the pieces go to stderr instead, so
that stdout stays one JSON object. The pieces are best effort, the result is not: a note on
stderr says when pieces were lost on the way, or when a failed attempt's text is followed by
a retry that starts over (\"attempt 2 starts over\"); the result printed at the end is whole.

With --catalog (or GANTRY_CATALOG), the task is checked against the executor catalog before
it is published, as the dispatcher would check it: a class the catalog lacks, or a payload its
engine cannot take, is refused with the field named (payload.messages[0].role), exit 2.
Without it, such a task is published and dead-lettered by the dispatcher.

Examples:
  gantry submit --executor echo --task demo.echo --payload '{\"hello\":\"world\"}'
  gantry submit --executor vllm --task llm.chat --payload @chat.json --ttl 15m --wait
  gantry submit --executor chat --task llm.chat --catalog catalog.yaml --stream \\
    --payload '{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":64}'
  generate-request | gantry submit --executor embed --task embed.text --payload @- --json";

/// `gantry submit`.
#[derive(Debug, Args)]
#[command(
    after_help = SUBMIT_AFTER_HELP,
    group(ArgGroup::new("waiting").args(["wait", "stream"]).multiple(true))
)]
pub(crate) struct SubmitArgs {
    #[arg(
        long,
        value_name = "CLASS",
        value_parser = ExecutorClass::parse,
        help = "Executor class that runs the task (routing key; queue <prefix>.tasks.<CLASS>)"
    )]
    pub(crate) executor: ExecutorClass,

    /// Task name, dotted like a Celery task (e.g. llm.chat)
    #[arg(long, value_name = "NAME", value_parser = TaskName::parse)]
    pub(crate) task: TaskName,

    /// Payload: inline JSON, @FILE to read a file, or @- to read standard input
    #[arg(long, value_name = "JSON|@FILE|@-", default_value = "{}")]
    pub(crate) payload: String,

    /// Time to live: the task's end-to-end deadline, from now (e.g. 90s, 15m, 2h)
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub(crate) ttl: Duration,

    /// Queue to forward the result to, once it is stored
    #[arg(long, value_name = "QUEUE")]
    pub(crate) reply_to: Option<String>,

    /// Your key for this unit of work, stored with the task (1 to 200 bytes)
    #[arg(long, value_name = "KEY")]
    pub(crate) idempotency_key: Option<String>,

    /// Priority, 0 (lowest) to 9
    #[arg(long, value_name = "0-9", value_parser = clap::value_parser!(u8).range(0..=9))]
    pub(crate) priority: Option<u8>,

    /// Wait for the task to finish, print its result, and exit by its state
    #[arg(long)]
    pub(crate) wait: bool,

    /// Print the answer's pieces as they are made (an LLM's tokens), then the result;
    /// implies --wait
    #[arg(long)]
    pub(crate) stream: bool,

    /// How long --wait or --stream waits [default: until the task's deadline, plus 30s]
    #[arg(long, value_name = "DURATION", requires = "waiting", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Option<Duration>,

    /// Executor catalog (YAML) to check the task against before it is published
    /// [default: no check]
    #[arg(
        long,
        env = "GANTRY_CATALOG",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub(crate) catalog: Option<PathBuf>,

    /// Print one JSON object on stdout instead of text
    #[arg(long)]
    pub(crate) json: bool,
}

const STATUS_AFTER_HELP: &str = "\
Exits 0 when the task is known, whatever its state; 1 when no dispatcher has recorded it
(check the id, and that the database is the dispatcher's). With --json, prints one JSON
object: the task, its runtime evidence, `output`, `error`, the stored `result` envelope and
its `events`.

Example:
  gantry status 5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90 --json | jq .output";

const CANCEL_AFTER_HELP: &str = "\
The task is recorded `cancelled` at once. A dispatcher that receives it later skips it; one that
runs its job stops it (the local process, or the Kubernetes Job with its pod). A task that has
already ended is left as it is. Exits 0 when the task was cancelled, 1 when it had already ended.

Example:
  gantry cancel 5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90 --reason \"superseded by a newer prompt\"";

/// `gantry cancel`.
#[derive(Debug, Args)]
#[command(after_help = CANCEL_AFTER_HELP)]
pub(crate) struct CancelArgs {
    /// The task's id, as `gantry submit` printed it
    #[arg(value_name = "TASK_ID")]
    pub(crate) task_id: TaskId,

    /// Why, recorded with the task
    #[arg(long, default_value = "cancelled by an operator")]
    pub(crate) reason: String,
}

/// `gantry status`.
#[derive(Debug, Args)]
#[command(after_help = STATUS_AFTER_HELP)]
pub(crate) struct StatusArgs {
    /// The task's id, as `gantry submit` printed it
    #[arg(value_name = "TASK_ID")]
    pub(crate) task_id: TaskId,

    /// Print one JSON object on stdout instead of text
    #[arg(long)]
    pub(crate) json: bool,
}

const WAIT_AFTER_HELP: &str = "\
A task not recorded yet is waited for too: it may still be in its queue. Exits 0 when the
task succeeded; 1 when it failed, expired, was cancelled or dead-lettered; 3 when the
timeout passed first (the task may still finish: wait again).

Example:
  gantry wait 5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90 --timeout 30m --json";

/// `gantry wait`.
#[derive(Debug, Args)]
#[command(after_help = WAIT_AFTER_HELP)]
pub(crate) struct WaitArgs {
    /// The task's id, as `gantry submit` printed it
    #[arg(value_name = "TASK_ID")]
    pub(crate) task_id: TaskId,

    /// How long to wait (e.g. 90s, 10m, 1h)
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,

    /// Print one JSON object on stdout instead of text
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TopologyCommand {
    /// Declare the exchanges and queues for every executor class of the catalog
    Apply(ApplyArgs),
}

const APPLY_AFTER_HELP: &str = "\
Declares, under the prefix: the exchanges <prefix>.tasks (topic), .retry (headers), .results
and .dlx (fanout); a quorum queue <prefix>.tasks.<class> per executor class; the retry delay
queues; <prefix>.results; <prefix>.dead and <prefix>.dead.audit. Applying twice changes
nothing. Exits 2 when a queue or exchange already exists with other arguments.

Examples:
  gantry topology apply
  gantry topology apply --catalog deploy/catalog.yaml --prefix staging";

/// `gantry topology apply`.
#[derive(Debug, Args)]
#[command(after_help = APPLY_AFTER_HELP)]
pub(crate) struct ApplyArgs {
    /// Executor catalog (YAML) naming the classes [default: built-in, class `echo` only]
    #[arg(
        long,
        env = "GANTRY_CATALOG",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub(crate) catalog: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DbCommand {
    /// Create Gantry's tables in the database, or bring them up to date
    #[command(after_help = MIGRATE_AFTER_HELP)]
    Migrate,
}

const MIGRATE_AFTER_HELP: &str = "\
Creates Gantry's schema (the tables tasks, task_events, dead_letters and gantry_migrations)
in the database --database-url or GANTRY_DATABASE_URL names, or applies the migrations it
lacks, in one transaction under an advisory lock: a dispatcher starting at the same moment
waits for it. Running it again changes nothing.

A dispatcher does the same at every start. The other commands never change the schema: they
refuse a database without it (or with an older one) and say so. Run this to prepare a
database before any dispatcher runs, or when a command asks for it. The database role needs
the right to create tables.

Exits 0 when the schema is current; 2 when Postgres cannot be reached, a migration fails, or
the database's schema is newer than this binary.

Examples:
  gantry db migrate
  GANTRY_DATABASE_URL=postgres://gantry@db.internal:5432/gantry gantry db migrate";

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_timeout_without_wait_is_a_usage_error() {
        let e = Cli::try_parse_from([
            "gantry",
            "submit",
            "--executor",
            "echo",
            "--task",
            "demo.echo",
            "--timeout",
            "5s",
        ])
        .unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn stream_waits_and_takes_a_timeout_without_wait() {
        let cli = Cli::try_parse_from([
            "gantry",
            "submit",
            "--executor",
            "chat",
            "--task",
            "llm.chat",
            "--stream",
            "--timeout",
            "5s",
        ])
        .unwrap();
        let Command::Submit(args) = cli.command else {
            panic!("not a submit: {:?}", cli.command);
        };
        assert!(args.stream && !args.wait);
        assert_eq!(args.timeout, Some(Duration::from_secs(5)));
    }

    #[test]
    fn bad_names_and_priorities_are_usage_errors() {
        for args in [
            ["--executor", "Echo", "--task", "demo.echo"],
            ["--executor", "echo", "--task", ".demo"],
        ] {
            let e = Cli::try_parse_from(["gantry", "submit"].into_iter().chain(args)).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
        }
        let e = Cli::try_parse_from([
            "gantry",
            "submit",
            "--executor",
            "echo",
            "--task",
            "demo.echo",
            "--priority",
            "10",
        ])
        .unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn flags_override_the_environment_and_the_defaults() {
        let cli = Cli::try_parse_from([
            "gantry",
            "--prefix",
            "flagged",
            "status",
            "5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90",
        ])
        .unwrap();
        let config = cli.global.load().unwrap();
        assert_eq!(config.prefix, "flagged");
    }

    #[test]
    fn global_options_may_follow_the_subcommand() {
        let cli = Cli::try_parse_from([
            "gantry",
            "status",
            "5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90",
            "--prefix",
            "after",
            "--database-url",
            "postgres://u:p@db/x",
        ])
        .unwrap();
        assert_eq!(cli.global.prefix.as_deref(), Some("after"));
        assert!(cli.global.database_url.is_some());
    }
}
