//! The dispatch loop's Postgres writes (`received`, `dispatched`, `running`), committed in
//! groups: each hand-off asks and awaits its own write as before, and one writer applies
//! whatever writes are waiting in one transaction per kind ([`Store::record_received_many`],
//! [`Store::transitions`]; the claims with capacity, [`Store::claim_many`], in one per
//! class, which counts the class's active jobs once for the group). Under load, the writes that arrive while a group commits form
//! the next group; alone, a write is committed at once, so grouping adds no wait.
//!
//! One transaction per write made Postgres and the round trips to it the larger part of a
//! dispatch's cost: three transactions of four or five statements for every task.

use std::sync::Arc;

use gantry_shared::message::{Attempt, Task, TaskId};
use gantry_shared::store::{Applied, Change, Claim, Claimed, Store, TaskState, Transition};
use gantry_shared::telemetry::chain;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::metrics::Groups;

type Result<T> = gantry_shared::Result<T>;

/// Most writes of one kind in one transaction.
const GROUP: usize = 128;
/// How long a group that already has company waits for more writes.
const LINGER: std::time::Duration = std::time::Duration::from_millis(3);

/// The writes waiting for the writer.
enum Request {
    Received(Box<Task>, oneshot::Sender<Result<(TaskState, Attempt)>>),
    Transition(Box<Transition>, oneshot::Sender<Result<Applied>>),
    Claim(Box<Claim>, oneshot::Sender<Result<Claimed>>),
}

/// The handle the dispatch loop writes through; the writer runs while a handle exists.
pub(crate) struct Lifecycle {
    store: Store,
    requests: mpsc::Sender<Request>,
}

impl Lifecycle {
    /// Starts the writer on `store`, counting its groups in `counts`.
    pub(crate) fn start(store: Store, counts: Arc<Groups>) -> Lifecycle {
        let (requests, incoming) = mpsc::channel(4 * GROUP);
        tokio::spawn(write(store.clone(), incoming, counts));
        Lifecycle { store, requests }
    }

    /// [`Store::record_received`], committed with the writes waiting beside it.
    ///
    /// # Errors
    /// Postgres errors, as [`Store::record_received`] has them.
    pub(crate) async fn received(&self, task: &Task) -> Result<(TaskState, Attempt)> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Received(Box::new(task.clone()), reply);
        match self.ask(request, answer).await {
            Some(outcome) => outcome,
            None => self.store.record_received(task).await,
        }
    }

    /// [`Store::transition`], committed with the writes waiting beside it.
    ///
    /// # Errors
    /// Postgres errors, as [`Store::transition`] has them.
    pub(crate) async fn transition(
        &self,
        id: TaskId,
        attempt: Attempt,
        state: TaskState,
        change: &Change,
    ) -> Result<Applied> {
        let (reply, answer) = oneshot::channel();
        let transition = Box::new(Transition {
            id,
            attempt,
            state,
            change: change.clone(),
        });
        match self
            .ask(Request::Transition(transition, reply), answer)
            .await
        {
            Some(outcome) => outcome,
            None => self.store.transition(id, attempt, state, change).await,
        }
    }

    /// [`Store::claim`], committed with the claims of its class waiting beside it.
    ///
    /// # Errors
    /// Postgres errors, as [`Store::claim`] has them.
    pub(crate) async fn claim(&self, claim: &Claim) -> Result<Claimed> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Claim(Box::new(claim.clone()), reply);
        match self.ask(request, answer).await {
            Some(outcome) => outcome,
            None => self.store.claim(claim).await,
        }
    }

    /// Hands `request` to the writer and awaits its answer; `None` if the writer is gone
    /// (then the caller writes on its own).
    async fn ask<T>(&self, request: Request, answer: oneshot::Receiver<T>) -> Option<T> {
        self.requests.send(request).await.ok()?;
        answer.await.ok()
    }
}

/// The writer: takes what is waiting, commits it, answers each, until every handle is gone.
async fn write(store: Store, mut incoming: mpsc::Receiver<Request>, counts: Arc<Groups>) {
    let mut waiting = Vec::with_capacity(GROUP);
    while incoming.recv_many(&mut waiting, GROUP).await > 0 {
        // Others are writing too: give them a moment to join this group.
        if waiting.len() > 1 {
            let until = tokio::time::Instant::now() + LINGER;
            while waiting.len() < GROUP {
                let more = GROUP - waiting.len();
                tokio::select! {
                    n = incoming.recv_many(&mut waiting, more) => if n == 0 { break },
                    () = tokio::time::sleep_until(until) => break,
                }
            }
        }
        let (mut received, mut transitions, mut claims) = (Vec::new(), Vec::new(), Vec::new());
        for request in waiting.drain(..) {
            match request {
                Request::Received(task, reply) => received.push((task, reply)),
                Request::Transition(t, reply) => transitions.push((*t, reply)),
                Request::Claim(c, reply) => claims.push((*c, reply)),
            }
        }
        debug!(
            received = received.len(),
            transitions = transitions.len(),
            claims = claims.len(),
            "committing a group of lifecycle writes"
        );
        tokio::join!(
            write_received(&store, received, &counts),
            write_transitions(&store, transitions, &counts),
            write_claims(&store, claims, &counts)
        );
    }
}

type Reply<T> = oneshot::Sender<Result<T>>;
type Received = (Box<Task>, Reply<(TaskState, Attempt)>);

async fn write_received(store: &Store, group: Vec<Received>, counts: &Groups) {
    if group.is_empty() {
        return;
    }
    let tasks: Vec<&Task> = group.iter().map(|(t, _)| t.as_ref()).collect();
    match store.record_received_many(&tasks).await {
        Ok(outcomes) => {
            counts.committed(outcomes.len());
            for ((_, reply), outcome) in group.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(e) => {
            let replies = group.into_iter().map(|(task, reply)| (reply, task));
            for (reply, task, alone) in failed("received writes", e, replies) {
                let _ = reply.send(match alone {
                    Some(e) => Err(e),
                    None => store.record_received(&task).await,
                });
            }
        }
    }
}

async fn write_transitions(
    store: &Store,
    group: Vec<(Transition, Reply<Applied>)>,
    counts: &Groups,
) {
    if group.is_empty() {
        return;
    }
    let (batch, replies): (Vec<Transition>, Vec<Reply<Applied>>) = group.into_iter().unzip();
    match store.transitions(&batch).await {
        Ok(outcomes) => {
            counts.committed(outcomes.len());
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(e) => {
            for (reply, t, alone) in failed("transitions", e, replies.into_iter().zip(batch)) {
                let _ = reply.send(match alone {
                    Some(e) => Err(e),
                    None => store.transition(t.id, t.attempt, t.state, &t.change).await,
                });
            }
        }
    }
}

async fn write_claims(store: &Store, group: Vec<(Claim, Reply<Claimed>)>, counts: &Groups) {
    if group.is_empty() {
        return;
    }
    let (batch, replies): (Vec<Claim>, Vec<Reply<Claimed>>) = group.into_iter().unzip();
    match store.claim_many(&batch).await {
        Ok(outcomes) => {
            counts.committed(outcomes.len());
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(e) => {
            for (reply, claim, alone) in failed("claims", e, replies.into_iter().zip(batch)) {
                let _ = reply.send(match alone {
                    Some(e) => Err(e),
                    None => store.claim(&claim).await,
                });
            }
        }
    }
}

/// What each write of a failed group gets: an error to try again later when the failure may
/// pass (Postgres unavailable: writing each alone would only wait for it once per write),
/// or `None`, to be written on its own, when it may be one write's fault (one bad write
/// then fails only itself). A group of one gets its own error.
fn failed<R, W>(
    what: &str,
    error: gantry_shared::Error,
    writes: impl ExactSizeIterator<Item = (R, W)>,
) -> Vec<(R, W, Option<gantry_shared::Error>)> {
    let n = writes.len();
    let why = chain(&error);
    if n == 1 {
        let mut error = Some(error);
        return writes.map(|(r, w)| (r, w, error.take())).collect();
    }
    if error.is_transient() {
        warn!(error = %why, writes = n, "a group of {what} failed; each is tried again");
        writes
            .map(|(r, w)| (r, w, Some(gantry_shared::Error::GroupWrite(why.clone()))))
            .collect()
    } else {
        warn!(error = %why, writes = n, "a group of {what} failed; writing each on its own");
        writes.map(|(r, w)| (r, w, None)).collect()
    }
}

#[cfg(test)]
mod tests {
    use gantry_shared::Error;

    use super::failed;

    fn fates(error: Error, n: usize) -> Vec<Option<String>> {
        let writes = (0..n).map(|i| (i, i));
        failed("writes", error, writes)
            .into_iter()
            .map(|(_, _, e)| e.map(|e| e.to_string()))
            .collect()
    }

    #[test]
    fn a_group_that_failed_for_a_passing_reason_is_tried_again_and_else_written_alone() {
        // Postgres unavailable: every write is to be tried again, none alone now.
        let outage = || Error::GroupWrite("connection closed".into());
        let again = fates(outage(), 3);
        assert_eq!(again.len(), 3);
        assert!(again.iter().all(|e| {
            e.as_deref()
                .is_some_and(|e| e.contains("group of writes") && e.contains("try again"))
        }));
        // Perhaps one write's fault: each is written on its own.
        let refused = || Error::DatabaseUrl("refused".into());
        assert_eq!(fates(refused(), 3), vec![None, None, None]);
        // A group of one gets its own error, whatever it is.
        assert_eq!(fates(refused(), 1), vec![Some(refused().to_string())]);
        assert_eq!(fates(outage(), 1), vec![Some(outage().to_string())]);
    }
}
