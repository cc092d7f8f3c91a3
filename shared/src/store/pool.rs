//! The pool of Postgres connections ([`Store`]) and the two ways to open it: migrating
//! the schema, or requiring it in place and changing nothing. Connections use TLS when the
//! URL's `sslmode` asks for it (see [`tls::postgres_tls`]).

use std::str::FromStr;
use std::time::Duration;

use backon::Retryable;
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::oneshot;
use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::warn;

use super::migrate::{self, Migrated};
use crate::config::tls::{self, PostgresTls};
use crate::{Error, Result};

/// A pool of Postgres connections with the schema in place.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    pub(super) config: tokio_postgres::Config,
    /// How the connections use TLS, when they do.
    tls: Option<StoreTls>,
}

#[derive(Clone)]
struct StoreTls {
    /// What the URL asked for: for the message of a refusal.
    asked: PostgresTls,
    connector: MakeRustlsConnect,
}

/// What a connection of its own sends besides answers (notifications, notices), until it
/// closes. The connection does its work only while this is read.
pub(crate) type Messages =
    BoxStream<'static, std::result::Result<AsyncMessage, tokio_postgres::Error>>;

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
        let (url, tls) = tls::postgres_tls(url.expose_secret())?;
        let config = tokio_postgres::Config::from_str(&url)
            .map_err(|e| Error::DatabaseUrl(e.to_string()))?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let tls = match tls {
            None => None,
            Some(asked) => Some(StoreTls {
                connector: MakeRustlsConnect::new(asked.trust.client_config(asked.check)?),
                asked,
            }),
        };
        let manager = match &tls {
            None => Manager::from_config(config.clone(), NoTls, manager_config),
            Some(tls) => {
                Manager::from_config(config.clone(), tls.connector.clone(), manager_config)
            }
        };
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
        Ok(Store { pool, config, tls })
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

    /// A connection of its own, outside the pool, made as the pool's are (the URL's settings
    /// and TLS): for `LISTEN`.
    ///
    /// # Errors
    /// The server cannot be reached within 10 seconds, or its certificate is refused.
    pub(crate) async fn dedicated_connection(&self) -> Result<(Client, Messages)> {
        let mut config = self.config.clone();
        config.connect_timeout(Duration::from_secs(10));
        let connected = match &self.tls {
            None => connect_apart(&config, NoTls).await,
            Some(tls) => connect_apart(&config, tls.connector.clone()).await,
        };
        connected.map_err(|source| {
            self.refusal(&source).unwrap_or(Error::Postgres {
                operation: "connect",
                source,
            })
        })
    }

    /// A connection of its own, outside the pool, made as the pool's are (the URL's settings
    /// and TLS), named `application_name`: for work that prepares its statements once and
    /// keeps them for its life. Its notices are dropped; its end is logged.
    ///
    /// # Errors
    /// As [`Store::dedicated_connection`].
    pub async fn connection_apart(&self, application_name: &str) -> Result<Client> {
        let mut store = self.clone();
        store.config.application_name(application_name);
        let (client, mut messages) = store.dedicated_connection().await?;
        let name = application_name.to_owned();
        tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                if let Err(e) = message {
                    warn!(error = %e, connection = %name, "a Postgres connection ended");
                    break;
                }
            }
        });
        Ok(client)
    }

    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| self.refusal(&e).unwrap_or(Error::PostgresPool(e)))
    }

    /// The error that says the server's certificate was refused, when it was.
    fn refusal(&self, e: &(dyn std::error::Error + 'static)) -> Option<Error> {
        let tls = self.tls.as_ref()?;
        tls::refusal(
            e,
            &self.server(),
            &tls.asked.trust,
            tls::POSTGRES_CA_SETTING,
        )
    }

    /// `host:port` of the server (each, when the URL names several), for messages.
    fn server(&self) -> String {
        let ports = self.config.get_ports();
        let servers: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let host = match host {
                    Host::Tcp(name) => name.clone(),
                    Host::Unix(path) => path.display().to_string(),
                };
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                format!("{host}:{port}")
            })
            .collect();
        servers.join(",")
    }
}

/// Drives a connection of its own, in a task, until it is lost or `notified` (given each
/// notification's payload) says to stop. Its client is sent on the first channel once it
/// is set up, and kept, so the session lives as long as the task; the second channel
/// closes when the task ends.
pub(super) fn drive(
    mut messages: Messages,
    mut notified: impl FnMut(&str) -> bool + Send + 'static,
) -> (oneshot::Sender<Client>, oneshot::Receiver<()>) {
    let (keep, mut kept) = oneshot::channel();
    let (ended, end) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ended = ended;
        let mut _client = None;
        loop {
            tokio::select! {
                c = &mut kept, if _client.is_none() => match c {
                    Ok(c) => _client = Some(c),
                    Err(_) => break,
                },
                message = messages.next() => match message {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if !notified(n.payload()) {
                            break;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                },
            }
        }
    });
    (keep, end)
}

async fn connect_apart<T>(
    config: &tokio_postgres::Config,
    tls: T,
) -> std::result::Result<(Client, Messages), tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = config.connect(tls).await?;
    let messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    Ok((client, messages.boxed()))
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
