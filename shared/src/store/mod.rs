//! The Postgres store: schema, embedded migrations, and every write of a task's life.
//!
//! Writes are idempotent on `(task_id, attempt, event)` and follow
//! [`TaskState::can_become`]: a late or duplicate message never changes a terminal state.
//!
//! Two ways in. [`Store::connect`] applies the migrations the database lacks, under an
//! advisory lock, so replicas that start together apply each migration once: that is what
//! the dispatcher and `gantry db migrate` do. [`Store::connect_existing`] changes nothing:
//! it checks that the schema is there and is the one this binary knows, and refuses the
//! database otherwise, so a command pointed at the wrong database cannot create Gantry's
//! tables in it.

mod batch;
mod dead_letters;
mod migrate;
mod state;
mod tasks;

use std::str::FromStr;
use std::time::Duration;

use backon::Retryable;
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::NoTls;
use tracing::warn;

pub use batch::Transition;
pub use dead_letters::{DeadLetter, DeadLetterFilter, DeadLetterRecord};
pub use migrate::{Migrated, SCHEMA_VERSION};
pub use state::TaskState;
pub use tasks::{Applied, Cancel, Change, ResultWrite, TaskRecord};

use crate::{Error, Result};

/// Channel on which the store announces that a task reached a terminal state.
pub const DONE_CHANNEL: &str = "gantry_task_done";

/// A pool of Postgres connections with the schema in place.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    config: tokio_postgres::Config,
}

impl Store {
    /// Connects, retrying with backoff for as long as `policy` allows, and applies the
    /// migrations the database lacks (creating the schema in a database without it).
    ///
    /// # Errors
    /// A bad URL, a server that stays unreachable, a failed migration, or a schema newer
    /// than this binary ([`Error::SchemaTooNew`]).
    pub async fn connect(
        url: &SecretString,
        pool_size: usize,
        policy: backon::ExponentialBuilder,
    ) -> Result<Store> {
        Ok(Store::connect_and_migrate(url, pool_size, policy).await?.0)
    }

    /// [`Store::connect`], also saying what the migrations found and did.
    ///
    /// # Errors
    /// As [`Store::connect`].
    pub async fn connect_and_migrate(
        url: &SecretString,
        pool_size: usize,
        policy: backon::ExponentialBuilder,
    ) -> Result<(Store, Migrated)> {
        let store = Store::pool(url, pool_size)?;
        let migrated = (|| store.migrate())
            .retry(policy)
            .when(Error::is_transient)
            .notify(|e, delay| warn!(error = %e, ?delay, "Postgres unavailable; retrying"))
            .await?;
        Ok((store, migrated))
    }

    /// Connects, retrying with backoff for as long as `policy` allows, to a database whose
    /// schema is already in place, and changes nothing in it: for whatever only reads (or
    /// writes rows into tables that must already exist).
    ///
    /// # Errors
    /// A bad URL or a server that stays unreachable; [`Error::SchemaMissing`] when the
    /// database has no Gantry schema, [`Error::SchemaBehind`] when it lacks migrations this
    /// binary knows, [`Error::SchemaTooNew`] when it has migrations this binary does not.
    pub async fn connect_existing(
        url: &SecretString,
        pool_size: usize,
        policy: backon::ExponentialBuilder,
    ) -> Result<Store> {
        let store = Store::pool(url, pool_size)?;
        (|| store.check_schema())
            .retry(policy)
            .when(Error::is_transient)
            .notify(|e, delay| warn!(error = %e, ?delay, "Postgres unavailable; retrying"))
            .await?;
        Ok(store)
    }

    /// The pool, not connected yet.
    fn pool(url: &SecretString, pool_size: usize) -> Result<Store> {
        let config = tokio_postgres::Config::from_str(url.expose_secret())
            .map_err(|e| Error::DatabaseUrl(e.to_string()))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .post_create(Hook::async_fn(|client, _| {
                Box::pin(async move { set_up_session(client).await.map_err(HookError::Backend) })
            }))
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(10)))
            .wait_timeout(Some(Duration::from_secs(30)))
            .build()
            .map_err(|e| Error::DatabaseUrl(e.to_string()))?;
        Ok(Store { pool, config })
    }

    /// The database's name, for messages (its URL may carry a password; the name does
    /// not). Without one in the URL, Postgres takes the user's name.
    fn database(&self) -> String {
        self.config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or_default()
            .to_owned()
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }
}

/// Sets up a new connection for the store's statements: custom plans for every execution.
///
/// The lifecycle's statements are prepared once per connection, and Postgres would soon
/// plan them once for all values ("generic plans"), with the table sizes of that moment.
/// On a fresh database that moment comes while `tasks` holds a handful of rows, where
/// reading the whole table is the cheapest plan; the connection then kept scanning the
/// whole table for every task as it grew to thousands of rows (a pool connection lives for
/// the process). Custom plans cost a little planning at each use and always fit the table
/// (the dispatch benchmark's Postgres CPU per task: 550 → 390 µs).
///
/// # Errors
/// Postgres errors.
pub async fn set_up_session(
    client: &tokio_postgres::Client,
) -> std::result::Result<(), tokio_postgres::Error> {
    client
        .batch_execute("SET plan_cache_mode = force_custom_plan")
        .await
}

/// The same JSON without NUL characters, which Postgres refuses in `jsonb` (U+0000 becomes
/// U+FFFD): one odd byte in an output must not make a whole batch unrecordable.
pub(crate) fn scrub(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let clean = |s: &str| s.replace('\u{0}', "\u{FFFD}");
    match v {
        Value::String(s) if s.contains('\u{0}') => Value::String(clean(s)),
        Value::Array(a) => Value::Array(a.iter().map(scrub).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (clean(k), scrub(v))).collect()),
        other => other.clone(),
    }
}

/// Text without NUL characters, which Postgres refuses in `text` columns.
pub(crate) fn clean(s: Option<&str>) -> Option<String> {
    s.map(|s| s.replace('\u{0}', "\u{FFFD}"))
}

fn pg(operation: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |source| Error::Postgres { operation, source }
}
