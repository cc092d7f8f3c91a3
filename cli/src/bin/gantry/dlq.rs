//! `gantry dlq list | show | replay | purge`: the command line of dead letters, and what
//! each subcommand does. The library side is `gantry_cli::dlq`; how results are printed
//! is in [`crate::dlq_view`].

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use clap::builder::PossibleValuesParser;
use clap::{Args, Subcommand};
use gantry_cli::dlq::{
    Action, DEFAULT_IN_FLIGHT, DeadLetters, PurgeOptions, ReplayOptions, Selection, Summary,
    parse_age, parse_time,
};
use gantry_shared::config::Config;
use gantry_shared::message::TaskId;
use gantry_shared::store::DeadLetterFilter;
use uuid::Uuid;

use crate::dlq_view;
use crate::exit::Exit;

/// The reason kinds a dead letter can have (the text before the colon of its reason).
const REASON_KINDS: [&str; 8] = [
    "invalid",
    "expired",
    "delivery_limit",
    "max_attempts",
    "cancelled",
    "rejected",
    "maxlen",
    "unknown",
];

/// The help after `gantry dlq --help`.
pub(crate) const DLQ_AFTER_HELP: &str = "\
A task that cannot run (invalid, expired, poison, out of attempts) is dead-lettered: the
recorder stores it in Postgres and the message waits in <prefix>.dead. `list` and `show`
read Postgres; `replay` and `purge` act on the queue and record what they did. The runbook
docs/runbooks/dead-letters.md walks through finding, replaying and purging.

Examples:
  gantry dlq list --since 2h
  gantry dlq show 0f8e4c2a-5d1b-4e7f-9a3c-6b2d8e1f4a70
  gantry dlq replay --reason expired --since 2h --dry-run
  gantry dlq purge --older-than 7d --yes";

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List recorded dead letters, newest first, and how many the queue holds now
    List(ListArgs),
    /// Show one dead letter: reason, headers, x-death history and body
    Show(ShowArgs),
    /// Publish dead letters again, each as the next attempt of its task
    Replay(ReplayArgs),
    /// Remove dead letters from the dead-letter queue for good
    Purge(PurgeArgs),
}

/// Which dead letters `replay` and `purge` take: by id, or every one, narrowed by filters.
#[derive(Debug, Args)]
pub(crate) struct SelectArgs {
    /// Only these dead letters (repeat, or list several)
    #[arg(long, value_name = "ID", num_args = 1.., action = clap::ArgAction::Append)]
    pub(crate) id: Vec<Uuid>,

    /// Every dead letter in the queue (filters still narrow it)
    #[arg(long, conflicts_with = "id")]
    pub(crate) all: bool,

    #[command(flatten)]
    pub(crate) filter: FilterArgs,
}

impl SelectArgs {
    /// The selection these arguments make, with `filter` (their filters, maybe adjusted).
    fn selection(&self, filter: DeadLetterFilter) -> Selection {
        let mut selection = Selection::filtered(DeadLetterFilter {
            ids: self.id.clone(),
            ..filter
        });
        selection.all = self.all;
        selection
    }
}

/// The filters `list`, `replay` and `purge` share; all given must match.
#[derive(Debug, Args)]
pub(crate) struct FilterArgs {
    /// Reason kind
    #[arg(long, value_name = "KIND", value_parser = PossibleValuesParser::new(REASON_KINDS))]
    pub(crate) reason: Option<String>,

    /// Executor class the task was for (e.g. vllm)
    #[arg(long, value_name = "CLASS")]
    pub(crate) executor: Option<String>,

    /// Task name (e.g. llm.chat)
    #[arg(long, value_name = "NAME")]
    pub(crate) task: Option<String>,

    /// One task's dead letters
    #[arg(long, value_name = "TASK_ID")]
    pub(crate) task_id: Option<TaskId>,

    /// Dead at or after T: RFC 3339, or a duration back from now (30m, 2h, 7d)
    #[arg(long, value_name = "T", value_parser = time_arg)]
    pub(crate) since: Option<DateTime<Utc>>,

    /// Dead before T: RFC 3339, or a duration back from now (30m, 2h, 7d)
    #[arg(long, value_name = "T", value_parser = time_arg)]
    pub(crate) until: Option<DateTime<Utc>>,
}

impl FilterArgs {
    fn to_filter(&self) -> DeadLetterFilter {
        DeadLetterFilter {
            reason_kind: self.reason.clone(),
            executor: self.executor.clone(),
            task: self.task.clone(),
            task_id: self.task_id,
            since: self.since,
            until: self.until,
            ids: Vec::new(),
            include_handled: false,
        }
    }
}

fn time_arg(s: &str) -> Result<DateTime<Utc>, gantry_cli::Error> {
    parse_time(s, Utc::now())
}

const LIST_AFTER_HELP: &str = "\
Reads Postgres (the recorder's record of every dead letter) and asks RabbitMQ how many
messages <prefix>.dead holds right now, warning when the two differ: the recorder may be
behind, or messages were removed outside `gantry dlq`. Replay and purge act on the queue.

Reason kinds: invalid (the task failed validation), expired (its TTL or deadline passed),
delivery_limit (delivered too often without an ack: a poison message), max_attempts (it
failed on every attempt), cancelled.

With --json, prints one object: {total, page, limit, queue_depth, dead_letters: [...]}.

Examples:
  gantry dlq list
  gantry dlq list --reason expired --since 2h
  gantry dlq list --executor vllm --task llm.chat --limit 200 --page 2
  gantry dlq list --all --json | jq '.dead_letters[].reason'";

/// `gantry dlq list`.
#[derive(Debug, Args)]
#[command(after_help = LIST_AFTER_HELP)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    pub(crate) filter: FilterArgs,

    /// Include dead letters already replayed or purged
    #[arg(long)]
    pub(crate) all: bool,

    /// Dead letters per page
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) limit: u32,

    /// Page to show, from 1
    #[arg(long, value_name = "P", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) page: u32,

    /// Print one JSON object on stdout instead of a table
    #[arg(long)]
    pub(crate) json: bool,
}

const SHOW_AFTER_HELP: &str = "\
Shows every recorded field, the headers, RabbitMQ's x-death history and the body (JSON
pretty-printed; bodies over 64 KiB are recorded truncated). Exits 1 when no dead letter has
this id.

Example:
  gantry dlq show 0f8e4c2a-5d1b-4e7f-9a3c-6b2d8e1f4a70 --json | jq .body";

/// `gantry dlq show`.
#[derive(Debug, Args)]
#[command(after_help = SHOW_AFTER_HELP)]
pub(crate) struct ShowArgs {
    /// The dead letter's id, as `gantry dlq list` prints it
    #[arg(value_name = "ID")]
    pub(crate) id: Uuid,

    /// Print one JSON object on stdout instead of text
    #[arg(long)]
    pub(crate) json: bool,
}

const REPLAY_AFTER_HELP: &str = "\
Takes each selected dead letter from <prefix>.dead and publishes it to <prefix>.tasks as the
next attempt of its task (attempt 1 becomes 2), with a fresh deadline --ttl from now, and
records the replay in the task's history. It publishes with a confirm before it acks the
dead letter, so an interrupted replay loses nothing: run it again. Dead letters that do not
match stay in the queue untouched; so does one that cannot be published (no queue for its
executor class), reported as failed.

Say which dead letters: --id, --all, or filters. Without --yes, counts the matches and asks
first (on a terminal only: elsewhere pass --yes). Try --dry-run first.

Exits 0 when every match was replayed, 1 when some failed or the pass was interrupted,
2 on usage or connection errors.

Examples:
  gantry dlq replay --reason expired --since 2h --dry-run
  gantry dlq replay --reason expired --since 2h --rate 20
  gantry dlq replay --id 0f8e4c2a-5d1b-4e7f-9a3c-6b2d8e1f4a70 --ttl 30m --yes
  gantry dlq replay --executor vllm --task llm.chat --yes --json";

/// `gantry dlq replay`.
#[derive(Debug, Args)]
#[command(after_help = REPLAY_AFTER_HELP)]
pub(crate) struct ReplayArgs {
    #[command(flatten)]
    pub(crate) select: SelectArgs,

    /// Show what would be replayed; publish, ack and record nothing
    #[arg(long)]
    pub(crate) dry_run: bool,

    /// At most N replays per second [default: as fast as the broker confirms]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rate: Option<u32>,

    /// Time to live of each replayed task, from now (e.g. 30m, 2h)
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub(crate) ttl: Duration,

    /// Do not ask for confirmation
    #[arg(long)]
    pub(crate) yes: bool,

    /// Print one JSON object on stdout instead of text
    #[arg(long)]
    pub(crate) json: bool,
}

const PURGE_AFTER_HELP: &str = "\
Removes the selected dead letters from <prefix>.dead for good and marks them purged in
Postgres (the record stays, for `gantry dlq list --all`). The rest stays in the queue.

Say which dead letters: --id, --all, --older-than, or filters. Without --yes, counts the
matches and asks \"Purge N dead letters? [y/N]\" (on a terminal only: elsewhere it refuses
and exits 2; pass --yes).

Examples:
  gantry dlq purge --older-than 7d --dry-run
  gantry dlq purge --older-than 7d
  gantry dlq purge --id 0f8e4c2a-5d1b-4e7f-9a3c-6b2d8e1f4a70 --yes
  gantry dlq purge --reason invalid --executor vlm --yes";

/// `gantry dlq purge`.
#[derive(Debug, Args)]
#[command(after_help = PURGE_AFTER_HELP)]
pub(crate) struct PurgeArgs {
    #[command(flatten)]
    pub(crate) select: SelectArgs,

    /// Dead letters that died more than DURATION ago (e.g. 7d, 36h)
    #[arg(long, value_name = "DURATION", conflicts_with = "until", value_parser = |s: &str| parse_age(s))]
    pub(crate) older_than: Option<chrono::Duration>,

    /// Show what would be purged; remove and record nothing
    #[arg(long)]
    pub(crate) dry_run: bool,

    /// Do not ask for confirmation
    #[arg(long)]
    pub(crate) yes: bool,

    /// Print one JSON object on stdout instead of text
    #[arg(long)]
    pub(crate) json: bool,
}

/// Runs one `gantry dlq` subcommand.
pub(crate) async fn run(command: DlqCommand, config: &Config) -> Result<Exit> {
    let dl = DeadLetters::new(config)?;
    match command {
        DlqCommand::List(args) => list(&dl, args).await,
        DlqCommand::Show(args) => show(&dl, args).await,
        DlqCommand::Replay(args) => replay(&dl, args).await,
        DlqCommand::Purge(args) => purge(&dl, args).await,
    }
}

async fn list(dl: &DeadLetters, args: ListArgs) -> Result<Exit> {
    let mut filter = args.filter.to_filter();
    filter.include_handled = args.all;
    let listing = dl.list(&filter, args.page, args.limit).await?;
    // The queue is a second opinion: without the broker the listing still stands.
    let depth = match dl.queue_depth().await {
        Ok(depth) => Some(depth),
        Err(e) => {
            eprintln!(
                "warning: cannot tell how many messages {} holds: {e}",
                dl.queue()
            );
            None
        }
    };
    if let Some(depth) = depth {
        let unhandled = dl.unhandled().await?;
        if i64::from(depth) != unhandled {
            eprintln!(
                "warning: {}",
                dlq_view::mismatch(&dl.queue(), depth, unhandled)
            );
        }
    }
    if args.json {
        let out = serde_json::json!({
            "total": listing.total,
            "page": listing.page,
            "limit": listing.limit,
            "queue_depth": depth,
            "dead_letters": listing.dead_letters,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!(
            "{}",
            dlq_view::listing(&listing, &dl.queue(), depth, args.all)
        );
    }
    Ok(Exit::Done)
}

async fn show(dl: &DeadLetters, args: ShowArgs) -> Result<Exit> {
    let Some(record) = dl.show(args.id).await? else {
        eprintln!(
            "no dead letter has id {}: check the id with `gantry dlq list --all`, and that the database {} is the dispatcher's",
            args.id,
            dl.tracker().database_url_redacted()
        );
        return Ok(Exit::INCOMPLETE);
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&dlq_view::record_json(&record))?
        );
    } else {
        print!("{}", dlq_view::record(&record));
    }
    Ok(Exit::Done)
}

async fn replay(dl: &DeadLetters, args: ReplayArgs) -> Result<Exit> {
    let selection = args.select.selection(args.select.filter.to_filter());
    let action = Action::Replay(ReplayOptions {
        ttl: args.ttl,
        rate: args.rate,
        dry_run: args.dry_run,
        in_flight: DEFAULT_IN_FLIGHT,
    });
    let rate = args
        .rate
        .map(|r| format!(", at most {r} per second"))
        .unwrap_or_default();
    let flags = (args.yes, args.json);
    pass(dl, selection, action, flags, |s| {
        format!("replaying {s} from {}{rate}", dl.queue())
    })
    .await
}

async fn purge(dl: &DeadLetters, args: PurgeArgs) -> Result<Exit> {
    let mut filter = args.select.filter.to_filter();
    if let Some(age) = args.older_than {
        filter.until = Some(Utc::now() - age);
    }
    let selection = args.select.selection(filter);
    let action = Action::Purge(PurgeOptions {
        dry_run: args.dry_run,
        in_flight: DEFAULT_IN_FLIGHT,
    });
    let flags = (args.yes, args.json);
    pass(dl, selection, action, flags, |s| {
        format!("purging {s} from {}", dl.queue())
    })
    .await
}

/// What replay and purge share: an empty selection is refused; a dry run only reports;
/// otherwise, unless `--yes` (`flags.0`), the operator confirms what a dry run found and
/// the pass acts on exactly those; `announce` says what starts (not with `--json`,
/// `flags.1`).
async fn pass(
    dl: &DeadLetters,
    mut selection: Selection,
    action: Action,
    (yes, json): (bool, bool),
    announce: impl FnOnce(&Selection) -> String,
) -> Result<Exit> {
    let verb = action.verb();
    if !selection.is_chosen() {
        return Err(gantry_cli::Error::NothingSelected { action: verb }.into());
    }
    if action.dry_run() {
        let summary = dl.run(&selection, action, interrupted()).await?;
        return report(&summary, json);
    }
    if !yes {
        let Some(ids) = confirm(dl, &selection, verb, json).await? else {
            return Ok(Exit::Done);
        };
        selection.filter.ids = ids;
    }
    if !json {
        eprintln!("{}", announce(&selection));
    }
    let summary = dl.run(&selection, action, interrupted()).await?;
    report(&summary, json)
}

/// Counts the matches with a dry pass and asks on the terminal. The ids it returns are the
/// ones the person agreed to: dead letters arriving meanwhile are not taken. `None` when
/// nothing matches or the answer is no.
async fn confirm(
    dl: &DeadLetters,
    selection: &Selection,
    verb: &'static str,
    json: bool,
) -> Result<Option<Vec<Uuid>>> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "refusing to {verb} without confirmation: standard input is not a terminal; pass --yes to {verb} {selection}, or --dry-run to see what that is"
        );
    }
    let looked = match verb {
        "purge" => {
            dl.purge(
                selection,
                &PurgeOptions {
                    dry_run: true,
                    ..PurgeOptions::default()
                },
                interrupted(),
            )
            .await?
        }
        _ => {
            dl.replay(
                selection,
                &ReplayOptions {
                    dry_run: true,
                    ..ReplayOptions::default()
                },
                interrupted(),
            )
            .await?
        }
    };
    if let Some(why) = &looked.stopped {
        bail!("stopped while counting the dead letters to {verb} ({why}); nothing was done");
    }
    let n = looked.done.len();
    if n == 0 {
        if json {
            return report(&looked, true).map(|_| None);
        }
        eprintln!(
            "no dead letter in {} matches {selection} ({} messages read); nothing to {verb}",
            dl.queue(),
            looked.read
        );
        return Ok(None);
    }
    eprint!("{}", dlq_view::entries(&looked.done, verb == "replay"));
    let question = format!(
        "{} {n} dead letter{}? [y/N] ",
        capitalized(verb),
        if n == 1 { "" } else { "s" }
    );
    let yes = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        let mut err = std::io::stderr().lock();
        write!(err, "{question}")?;
        err.flush()?;
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        Ok(matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
    })
    .await
    .context("reading the answer")??;
    if !yes {
        eprintln!("nothing done");
        return Ok(None);
    }
    Ok(Some(looked.done.iter().map(|e| e.id).collect()))
}

fn capitalized(verb: &str) -> String {
    let mut chars = verb.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// Prints what a pass did and chooses the exit: 1 when a match is left behind.
fn report(summary: &Summary, json: bool) -> Result<Exit> {
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
    } else {
        print!("{}", dlq_view::summary(summary));
    }
    for warning in &summary.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(if summary.is_complete() {
        Exit::Done
    } else {
        Exit::INCOMPLETE
    })
}

/// Ctrl-C: stop reading; what is in flight finishes, the rest stays in the queue.
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use crate::args::{Cli, Command};
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["gantry", "dlq"].iter().chain(args))
    }

    #[test]
    fn filters_parse_times_and_reasons() {
        let cli = parse(&["list", "--reason", "expired", "--since", "2h"]).unwrap();
        let Command::Dlq(DlqCommand::List(args)) = cli.command else {
            panic!("not a list");
        };
        let since = args.filter.since.unwrap();
        let ago = Utc::now() - since;
        assert!((ago - chrono::Duration::hours(2)).num_seconds().abs() < 5);
        assert_eq!(args.limit, 50);
        assert_eq!(args.page, 1);
        assert_eq!(
            parse(&["list", "--reason", "expird"])
                .unwrap_err()
                .exit_code(),
            2
        );
        assert_eq!(
            parse(&["list", "--since", "soon"]).unwrap_err().exit_code(),
            2
        );
    }

    #[test]
    fn ids_and_all_do_not_mix_and_older_than_replaces_until() {
        let id = "0f8e4c2a-5d1b-4e7f-9a3c-6b2d8e1f4a70";
        assert!(parse(&["replay", "--id", id, "--all"]).is_err());
        assert!(parse(&["purge", "--older-than", "7d", "--until", "1d"]).is_err());
        let cli = parse(&["replay", "--id", id, id, "--rate", "5", "--ttl", "30m"]).unwrap();
        let Command::Dlq(DlqCommand::Replay(args)) = cli.command else {
            panic!("not a replay");
        };
        assert_eq!(args.select.id.len(), 2);
        assert_eq!(args.ttl, Duration::from_secs(1800));
        assert_eq!(
            parse(&["replay", "--rate", "0", "--all"])
                .unwrap_err()
                .exit_code(),
            2
        );
    }

    #[test]
    fn a_selection_needs_ids_all_or_a_filter() {
        let select = |args: &[&str]| {
            let Command::Dlq(DlqCommand::Purge(args)) = parse(args).unwrap().command else {
                panic!("not a purge");
            };
            args.select.selection(args.select.filter.to_filter())
        };
        assert!(!select(&["purge"]).is_chosen());
        assert!(select(&["purge", "--all"]).is_chosen());
        assert!(select(&["purge", "--executor", "echo"]).is_chosen());
    }
}
