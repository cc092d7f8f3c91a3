//! The pool of Postgres connections ([`Store`]) and the two ways to open it: migrating
//! the schema, or requiring it in place and changing nothing.

use std::str::FromStr;
use std::time::Duration;

use backon::Retryable;
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::NoTls;
use tracing::warn;

use super::migrate::{self, Migrated};
use crate::{Error, Result};

/// A pool of Postgres connections with the schema in place.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    pub(super) config: tokio_postgres::Config,
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
        let migrated =
            (|| async { migrate::apply(&mut store.client().await?, store.database()).await })
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
        (|| async { migrate::check(&store.client().await?, store.database()).await })
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

    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object> {
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
