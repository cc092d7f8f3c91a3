//! [`Tracker`]: reads a task's state and history from Postgres and waits for it to end.
//!
//! Needs only the database: `gantry status` and `gantry wait` work while RabbitMQ is down.
//! The store is connected on first use, and never changed: a database without Gantry's
//! schema is refused, not given one (the dispatcher and `gantry db migrate` create it).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use gantry_shared::config::{Config, redact_url};
use gantry_shared::message::{Attempt, TaskId};
use gantry_shared::retry;
use gantry_shared::store::{Store, TaskRecord};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, instrument};

use crate::endings::Endings;
use crate::{Error, Result};

/// How long the first database use keeps trying to reach Postgres.
const STORE_RETRY_FOR: Duration = Duration::from_secs(10);

/// One row of a task's history (`task_events`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskEvent {
    pub attempt: Attempt,
    /// `received`, `dispatched`, `running`, `retrying`, a terminal state, or
    /// `late:<event>` for an event that arrived after the task had moved on.
    pub event: String,
    pub detail: Option<Value>,
    pub at: DateTime<Utc>,
}

/// Reads task state from Postgres. Cheap to clone: clones share one connection pool, and
/// one more connection on which all their waits hear tasks end.
#[derive(Clone)]
pub struct Tracker {
    config: Arc<Config>,
    store: Arc<OnceCell<Store>>,
    endings: Arc<Endings>,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("database_url", &self.database_url_redacted())
            .field("connected", &self.store.initialized())
            .finish()
    }
}

impl Tracker {
    /// A tracker for the configured database. Connects nothing yet.
    pub fn new(config: &Config) -> Tracker {
        Tracker {
            config: Arc::new(config.clone()),
            store: Arc::new(OnceCell::new()),
            endings: Endings::new(),
        }
    }

    /// The configuration this tracker was made with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The database URL with its password hidden, for messages.
    pub fn database_url_redacted(&self) -> String {
        redact_url(self.config.database_url.expose_secret())
    }

    /// The Postgres store, connected on first use, retrying for up to 10 seconds. It
    /// changes nothing in the database: the schema must be there already, at the version
    /// this library knows. Call it before submitting a task you mean to wait for, so a
    /// wrong database URL fails before the task goes out.
    ///
    /// # Errors
    /// [`Error::Database`] when Postgres cannot be reached, or the database has no Gantry
    /// schema, or one of another version (the message says how to create or update it).
    #[instrument(skip_all, fields(database_url = %self.database_url_redacted()))]
    pub async fn store(&self) -> Result<&Store> {
        self.store
            .get_or_try_init(|| async {
                Store::connect_existing(
                    &self.config.database_url,
                    self.config.db_pool_size,
                    retry::for_at_most(STORE_RETRY_FOR),
                )
                .await
                .map_err(|e| self.database_error(e))
            })
            .await
    }

    /// The task as stored, or `None` if no dispatcher has recorded it (yet).
    ///
    /// # Errors
    /// [`Error::Database`].
    #[instrument(skip(self))]
    pub async fn status(&self, id: TaskId) -> Result<Option<TaskRecord>> {
        let store = self.store().await?;
        store.task(id).await.map_err(|e| self.database_error(e))
    }

    /// The task's history, oldest first (empty for an unknown task).
    ///
    /// # Errors
    /// [`Error::Database`].
    #[instrument(skip(self))]
    pub async fn events(&self, id: TaskId) -> Result<Vec<TaskEvent>> {
        let store = self.store().await?;
        let rows = store.events(id).await.map_err(|e| self.database_error(e))?;
        Ok(rows
            .into_iter()
            .map(|(attempt, event, detail, at)| TaskEvent {
                attempt,
                event,
                detail,
                at,
            })
            .collect())
    }

    /// Waits until the task is terminal (succeeded, failed, expired, cancelled or
    /// dead-lettered) and returns it. Reacts to the recorder's commit notification rather
    /// than polling, heard on the one connection every wait of this tracker shares (so
    /// many waits at once take one connection, not one each). A task no dispatcher has recorded yet is waited for as well: it may
    /// still be in its queue.
    ///
    /// # Errors
    /// [`Error::WaitTimeout`] when `timeout` passes first, with the state the task is in;
    /// [`Error::Database`].
    #[instrument(skip(self))]
    pub async fn wait(&self, id: TaskId, timeout: Duration) -> Result<TaskRecord> {
        let store = self.store().await?;
        let listen = || async {
            self.endings
                .subscribe(store)
                .await
                .map_err(|e| self.database_error(e))
        };
        let waiting = async {
            // Listen first, then look: a task that ends between the two is not missed.
            let mut endings = listen().await?;
            loop {
                if let Some(record) = self.status(id).await?
                    && record.state.is_terminal()
                {
                    return Ok(record);
                }
                loop {
                    match endings.recv().await {
                        Ok(finished) if finished == id => break,
                        Ok(_) => continue,
                        // What went by unheard may have been this task's end: look again.
                        Err(RecvError::Lagged(_)) => break,
                        // The connection was lost: listen again, then look again.
                        Err(RecvError::Closed) => {
                            endings = listen()
                                .await
                                .map_err(|_| Error::ListenLost { task_id: id })?;
                            break;
                        }
                    }
                }
                debug!(task_id = %id, "task finished, or its end may have gone unheard");
            }
        };
        match tokio::time::timeout(timeout, waiting).await {
            Ok(outcome) => outcome,
            // One last look: the task may have finished as the time ran out.
            Err(_) => match self.status(id).await? {
                Some(record) if record.state.is_terminal() => Ok(record),
                current => Err(Error::wait_timeout(id, timeout, current.map(|r| r.state))),
            },
        }
    }

    pub(crate) fn database_error(&self, source: gantry_shared::Error) -> Error {
        Error::Database {
            url: self.database_url_redacted(),
            source: Box::new(source),
        }
    }
}
