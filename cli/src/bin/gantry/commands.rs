//! What each subcommand does: talk to RabbitMQ or Postgres, print, and choose the exit.

use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use gantry_cli::topology;
use gantry_producer::{Producer, Tracker, human_duration};
use gantry_shared::amqp::Publisher;
use gantry_shared::catalog::Catalog;
use gantry_shared::celery::CeleryState;
use gantry_shared::config::{Config, redact_url};
use gantry_shared::message::{Task, TaskId, TaskSpec};
use gantry_shared::retry;
use gantry_shared::store::{Migrated, SCHEMA_VERSION, Store, TaskRecord};
use secrecy::ExposeSecret;
use serde::Serialize;

use crate::args::{
    ApplyArgs, CancelArgs, Command, DbCommand, StatusArgs, SubmitArgs, TopologyCommand, WaitArgs,
};
use crate::exit::Exit;
use crate::follow::follow;
use crate::payload;
use crate::view::TaskView;

/// How much longer than the task's deadline `submit --wait` waits by default: the time the
/// dispatcher needs to notice the deadline and record the task as expired.
const DEADLINE_GRACE: Duration = Duration::from_secs(30);

/// Runs one subcommand.
pub(crate) async fn run(command: Command, config: &Config) -> Result<Exit> {
    match command {
        Command::Submit(args) => submit(config, args).await,
        Command::Status(args) => status(config, args).await,
        Command::Wait(args) => wait(config, args).await,
        Command::Cancel(args) => cancel(config, args).await,
        Command::Topology(TopologyCommand::Apply(args)) => apply(config, args).await,
        Command::Db(DbCommand::Migrate) => migrate(config).await,
        Command::Dlq(command) => crate::dlq::run(command, config).await,
    }
}

async fn submit(config: &Config, args: SubmitArgs) -> Result<Exit> {
    let arg = args.payload.clone();
    let payload = tokio::task::spawn_blocking(move || payload::load(&arg, std::io::stdin().lock()))
        .await
        .context("reading the payload")??;
    let catalog = args
        .catalog
        .as_deref()
        .map(|path| Catalog::load(Some(path)))
        .transpose()
        .context("loading the executor catalog (--catalog or GANTRY_CATALOG)")?;
    // Checked before connecting: an invalid task needs no broker to be refused. The
    // catalog's check is the producer's, before anything is published.
    let mut task = Task::new(
        TaskSpec {
            executor: args.executor.clone(),
            name: args.task.clone(),
            payload,
            ttl: args.ttl,
            reply_to: args.reply_to.clone(),
            idempotency_key: args.idempotency_key.clone(),
            priority: args.priority,
            resources: None,
        },
        &config.limits,
    )
    .map_err(gantry_producer::Error::from)?;
    task.stream = args.stream;
    let mut producer = Producer::connect(config).await?;
    if let Some(catalog) = catalog {
        producer = producer.with_catalog(catalog);
    }
    let outcome = publish_and_wait(&producer, &task, &args).await;
    producer.close().await;
    match outcome? {
        Some(record) => show_end(&record, args.json),
        None if args.json => {
            let submitted = Submitted {
                task_id: task.id,
                task: task.name.as_str(),
                executor: task.executor.as_str(),
                submitted_at: task.submitted_at,
                deadline: task.deadline,
            };
            println!("{}", serde_json::to_string_pretty(&submitted)?);
            Ok(Exit::Done)
        }
        None => {
            println!("{}", task.id);
            Ok(Exit::Done)
        }
    }
}

/// What `submit --json` prints without `--wait`.
#[derive(Serialize)]
struct Submitted<'a> {
    task_id: TaskId,
    task: &'a str,
    executor: &'a str,
    submitted_at: DateTime<Utc>,
    deadline: DateTime<Utc>,
}

/// Publishes the task and, with `--wait` or `--stream`, waits for its end (printing its
/// pieces as they come with `--stream`).
async fn publish_and_wait(
    producer: &Producer,
    task: &Task,
    args: &SubmitArgs,
) -> Result<Option<TaskRecord>> {
    // A payload the catalog refuses is refused before Postgres is asked anything.
    producer.check_task(task)?;
    let wait = args.wait || args.stream;
    if !wait {
        producer.submit_task(task).await?;
        return Ok(None);
    }
    let timeout = args.timeout.unwrap_or_else(|| {
        let left = (task.deadline - Utc::now()).to_std().unwrap_or_default();
        left + DEADLINE_GRACE
    });
    let waiting = || {
        if !args.json {
            eprintln!(
                "submitted {}; waiting up to {} for it to finish",
                task.id,
                human_duration(timeout)
            );
        }
    };
    if args.stream {
        // Listens to the task's progress before publishing it, and fails on a wrong
        // database URL before the task goes out.
        let stream = producer.submit_task_streaming(task, timeout).await?;
        waiting();
        return Ok(Some(follow(stream, args.json).await?));
    }
    // Fail on a wrong database URL before the task goes out, not after.
    producer.tracker().store().await?;
    producer.submit_task(task).await?;
    waiting();
    Ok(Some(producer.wait(task.id, timeout).await?))
}

async fn cancel(config: &Config, args: CancelArgs) -> Result<Exit> {
    let tracker = Tracker::new(config);
    let store = tracker.store().await?;
    match store.cancel(args.task_id, &args.reason).await? {
        gantry_shared::store::Cancel::Cancelled(was) => {
            let was = was.map_or("not yet received".to_owned(), |s| s.to_string());
            println!("cancelled {} (it was {was})", args.task_id);
            tell_celery_client(config, store, args.task_id).await;
            Ok(Exit::Done)
        }
        gantry_shared::store::Cancel::AlreadyEnded(state) => {
            eprintln!(
                "task {} had already ended: {state}; nothing to cancel",
                args.task_id
            );
            Ok(Exit::TaskDidNotSucceed)
        }
    }
}

/// A task from a Celery client: its client gets `REVOKED`, as after `app.control.revoke`.
/// The cancel is recorded whatever happens here; a reply that cannot be sent is said on
/// stderr.
async fn tell_celery_client(config: &Config, store: &Store, id: TaskId) {
    let told = async {
        let Some(queue) = store.celery_origin(id).await?.and_then(|o| o.reply_to) else {
            return Ok(false);
        };
        let state = CeleryState::Revoked("revoked".into());
        let (body, props) = gantry_shared::celery::reply(id, &state);
        let publisher =
            Publisher::connect(&config.amqp_url, "gantry-cli/cancel", config.broker_timeout)
                .await?;
        let sent = publisher
            .publish(
                "",
                &queue,
                &body,
                props,
                true,
                retry::for_at_most(Duration::from_secs(30)),
            )
            .await;
        publisher.close().await;
        match sent {
            // The client has gone: nobody waits for the reply.
            Ok(()) | Err(gantry_shared::Error::Unroutable { .. }) => {}
            Err(e) => return Err(e),
        }
        store.mark_forwarded(id).await?;
        Ok::<_, gantry_shared::Error>(true)
    };
    match told.await {
        Ok(true) => println!("its Celery client was told: REVOKED"),
        Ok(false) => {}
        Err(e) => {
            eprintln!("the task is cancelled, but its Celery client could not be told REVOKED: {e}")
        }
    }
}

async fn status(config: &Config, args: StatusArgs) -> Result<Exit> {
    let tracker = Tracker::new(config);
    let Some(record) = tracker.status(args.task_id).await? else {
        eprintln!("{}", unknown(&tracker, args.task_id));
        return Ok(Exit::TaskDidNotSucceed);
    };
    let events = tracker.events(args.task_id).await?;
    let view = TaskView::new(&record, Some(&events));
    if args.json {
        println!("{}", view.to_json()?);
    } else {
        print!("{}", view.to_human());
    }
    Ok(Exit::Done)
}

async fn wait(config: &Config, args: WaitArgs) -> Result<Exit> {
    let tracker = Tracker::new(config);
    let record = tracker.wait(args.task_id, args.timeout).await?;
    show_end(&record, args.json)
}

/// Prints a task that reached its end and exits by its state.
fn show_end(record: &TaskRecord, json: bool) -> Result<Exit> {
    let view = TaskView::new(record, None);
    if json {
        println!("{}", view.to_json()?);
    } else {
        print!("{}", view.to_human());
    }
    Ok(Exit::for_state(record.state))
}

fn unknown(tracker: &Tracker, id: TaskId) -> String {
    format!(
        "task {id} is not known to Gantry: no dispatcher has recorded it. Check the id; if it \
         was just submitted, it may still be queued (`gantry wait {id}` waits for it); and \
         check that the database {} is the dispatcher's",
        tracker.database_url_redacted()
    )
}

async fn apply(config: &Config, args: ApplyArgs) -> Result<Exit> {
    let catalog = Catalog::load(args.catalog.as_deref())
        .context("loading the executor catalog (--catalog or GANTRY_CATALOG)")?;
    let classes = catalog.classes();
    let declared = topology::apply(config, &classes)
        .await
        .with_context(|| format!("declaring the topology on {}", config.amqp_url_redacted()))?;
    let catalog_origin = args
        .catalog
        .as_ref()
        .map_or_else(|| "built-in".to_owned(), |p| p.display().to_string());
    let exchanges = declared
        .exchanges
        .iter()
        .map(|(name, kind)| format!("{name} ({kind})"))
        .collect::<Vec<_>>();
    let rows = [
        ("broker", config.amqp_url_redacted()),
        ("prefix", declared.prefix.clone()),
        ("catalog", catalog_origin),
        ("exchanges", exchanges.join(", ")),
        ("task queues", declared.task_queues.join(", ")),
        ("retry queues", declared.retry_queues.join(", ")),
        ("results", declared.results_queue.clone()),
        ("dead letters", declared.dead_letter_queues.join(", ")),
    ];
    println!("topology declared");
    for (key, value) in rows {
        println!("  {key:14}{value}");
    }
    Ok(Exit::Done)
}

/// How long `db migrate` keeps trying to reach Postgres, as the tracker does.
const MIGRATE_RETRY_FOR: Duration = Duration::from_secs(10);

async fn migrate(config: &Config) -> Result<Exit> {
    let url = redact_url(config.database_url.expose_secret());
    let policy = retry::for_at_most(MIGRATE_RETRY_FOR);
    let (_store, migrated) = Store::connect_and_migrate(&config.database_url, 1, policy)
        .await
        .with_context(|| format!("migrating the schema of Postgres at {url}"))?;
    let Migrated {
        database,
        found,
        applied,
    } = migrated;
    if applied.is_empty() {
        println!(
            "the Gantry schema of database {database} is current (version {SCHEMA_VERSION}); nothing to do"
        );
        return Ok(Exit::Done);
    }
    if found == 0 {
        println!("created the Gantry schema (version {SCHEMA_VERSION}) in database {database}");
    } else {
        println!(
            "migrated the Gantry schema of database {database} from version {found} to {SCHEMA_VERSION}"
        );
    }
    for (version, name) in applied {
        println!("  applied migration {version} ({name})");
    }
    Ok(Exit::Done)
}
