//! [`Endings`]: the ids of tasks as they end, heard on one `LISTEN` connection that every
//! wait of a [`Tracker`](crate::Tracker) and of its clones shares. A connection per wait
//! would make a thousand waits at once take a thousand of Postgres's connections, past
//! its `max_connections` (100 by default).
//!
//! The connection opens at the first wait and stays open for the tracker's life (its
//! last clone); one that is lost is opened again by the next wait, and the waits it
//! leaves are told so ([`RecvError::Closed`](tokio::sync::broadcast::error::RecvError)),
//! listen again and look again.

use std::sync::{Arc, Weak};

use gantry_shared::message::TaskId;
use gantry_shared::store::Store;
use tokio::sync::{Mutex, broadcast, watch};
use tracing::{debug, warn};

/// How many endings a wait may fall behind before it is told it missed some (and looks
/// again at its task).
const BACKLOG: usize = 4096;

pub(crate) struct Endings {
    /// The channel of the connection in use: none before the first wait, nor once that
    /// connection is lost.
    current: Mutex<Option<broadcast::Sender<TaskId>>>,
    /// Dropped with the tracker: ends the listening, and so closes the connection.
    _alive: watch::Sender<()>,
    gone: watch::Receiver<()>,
}

impl Endings {
    pub(crate) fn new() -> Arc<Endings> {
        let (alive, gone) = watch::channel(());
        Arc::new(Endings {
            current: Mutex::new(None),
            _alive: alive,
            gone,
        })
    }

    /// The endings heard from now on, on the connection in use, or on a new one made from
    /// `store` when there is none.
    ///
    /// # Errors
    /// The connection cannot be made.
    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        store: &Store,
    ) -> gantry_shared::Result<broadcast::Receiver<TaskId>> {
        let mut current = self.current.lock().await;
        if let Some(sender) = current.as_ref() {
            return Ok(sender.subscribe());
        }
        let heard = store.terminal_notifications().await?;
        let (sender, receiver) = broadcast::channel(BACKLOG);
        *current = Some(sender.clone());
        tokio::spawn(forward(
            heard,
            sender,
            Arc::downgrade(self),
            self.gone.clone(),
        ));
        debug!("listening for task endings");
        Ok(receiver)
    }
}

/// Passes on what the connection hears until it is lost or the tracker is gone; then
/// forgets the connection, and drops the last sender, which tells every wait on it.
async fn forward(
    mut heard: tokio::sync::mpsc::UnboundedReceiver<TaskId>,
    sender: broadcast::Sender<TaskId>,
    endings: Weak<Endings>,
    mut gone: watch::Receiver<()>,
) {
    loop {
        tokio::select! {
            id = heard.recv() => match id {
                // None waiting now is no error: the connection stays for the next wait.
                Some(id) => drop(sender.send(id)),
                None => break,
            },
            _ = gone.changed() => return,
        }
    }
    warn!("lost the Postgres connection that hears task endings; the next wait opens another");
    if let Some(endings) = endings.upgrade() {
        let mut current = endings.current.lock().await;
        if current.as_ref().is_some_and(|c| c.same_channel(&sender)) {
            *current = None;
        }
    }
}
