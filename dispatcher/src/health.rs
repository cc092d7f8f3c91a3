//! What `/livez` and `/readyz` answer ([`Health`]), and the loops and checks behind them.
//!
//! - **Live**: every loop the dispatcher runs for as long as it runs ([`Loops`]: the
//!   recorder's consumers, the class consumers' supervisor, the cancellation listener, the
//!   catalog's watch, …) is still running, and the heartbeat, a task that wakes every
//!   second, woke within the last [`STALE`]. A loop that ended or panicked before shutdown,
//!   or worker threads too stuck to run a timer, make the dispatcher not live, and the
//!   kubelet restarts it.
//! - **Ready**: the broker, Postgres and, on the `kubernetes` runtime, the API server
//!   answered their last check, the catalog is loaded, and the roles have started; never
//!   while shutting down. Start-up marks each as it gets there; then [`probe`] checks the
//!   three dependencies every [`PROBE_EVERY`], each check bounded by [`PROBE_TIMEOUT`], and
//!   keeps the answers, so a probe of `/readyz` reads them and never waits on a dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_shared::amqp::{self, timed};
use gantry_shared::store::Store;
use gantry_shared::telemetry::chain;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams};
use lapin::Connection;
use secrecy::SecretString;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics::Metrics;

/// How often the dependencies are checked.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(5);
/// The longest one check waits for its answer.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the heartbeat may stay silent before the dispatcher is not live.
pub(crate) const STALE: Duration = Duration::from_secs(30);

/// What `/readyz` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Check {
    /// RabbitMQ answers on a connection of the check's own.
    Broker,
    /// Postgres answers through the dispatcher's pool.
    Postgres,
    /// The API server answers a list of Jobs (the `kubernetes` runtime only).
    KubernetesApi,
    /// The executor catalog was read and checked.
    Catalog,
    /// Reconciliation is done and the roles run.
    Roles,
}

impl Check {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Check::Broker => "broker",
            Check::Postgres => "postgres",
            Check::KubernetesApi => "kubernetes_api",
            Check::Catalog => "catalog",
            Check::Roles => "roles",
        }
    }
}

/// The dispatcher's health, as the probes see it.
pub(crate) struct Health {
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

struct State {
    /// Each check's last answer: passed, or why not.
    checks: BTreeMap<Check, Result<(), String>>,
    /// The checks that have passed at least once.
    passed: BTreeSet<Check>,
    /// Each loop by name: whether it still runs.
    loops: BTreeMap<&'static str, bool>,
    /// The loops are being dropped (start-up failed): their ends are not failures.
    closing: bool,
    beat: Instant,
}

impl Health {
    /// Nothing checked yet; `kubernetes_api` is checked only when `kube` is true.
    pub(crate) fn new(shutdown: CancellationToken, metrics: Arc<Metrics>, kube: bool) -> Health {
        let mut checks = BTreeMap::new();
        checks.insert(Check::Broker, Err("not connected yet".to_owned()));
        checks.insert(Check::Postgres, Err("not connected yet".to_owned()));
        if kube {
            checks.insert(Check::KubernetesApi, Err("not listed yet".to_owned()));
        }
        checks.insert(Check::Catalog, Err("not loaded yet".to_owned()));
        checks.insert(Check::Roles, Err("starting".to_owned()));
        for check in checks.keys() {
            metrics.ready_check(check.name(), false);
        }
        Health {
            shutdown,
            metrics,
            state: Mutex::new(State {
                checks,
                passed: BTreeSet::new(),
                loops: BTreeMap::new(),
                closing: false,
                beat: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the answer of `check`; a check that is not checked here is ignored.
    pub(crate) fn set(&self, check: Check, answer: Result<(), String>) {
        let mut state = self.lock();
        let Some(slot) = state.checks.get_mut(&check) else {
            return;
        };
        let was_ok = slot.is_ok();
        let ok = answer.is_ok();
        if let Err(why) = &answer
            && was_ok
        {
            warn!(check = check.name(), reason = %why, "readiness check failing");
        }
        *slot = answer;
        if ok && !was_ok && !state.passed.insert(check) {
            info!(check = check.name(), "readiness check passes again");
        }
        self.metrics.ready_check(check.name(), ok);
    }

    /// Marks `check` passed.
    pub(crate) fn ok(&self, check: Check) {
        self.set(check, Ok(()));
    }

    /// `/livez`: whether the dispatcher is live, and a body that says why.
    pub(crate) fn liveness(&self) -> (bool, String) {
        let state = self.lock();
        let silent = state.beat.elapsed();
        let stopped: Vec<&str> = state
            .loops
            .iter()
            .filter(|(_, running)| !**running)
            .map(|(name, _)| *name)
            .collect();
        let live = stopped.is_empty() && silent < STALE;
        let mut body = String::from(if live { "live\n" } else { "not live\n" });
        for (name, running) in &state.loops {
            let what = if *running { "running" } else { "stopped" };
            let _ = writeln!(body, "loop {name}: {what}");
        }
        let _ = writeln!(
            body,
            "heartbeat: {} ms ago (limit {} s)",
            silent.as_millis(),
            STALE.as_secs()
        );
        (live, body)
    }

    /// `/readyz`: whether the dispatcher is ready, and a body naming each check.
    pub(crate) fn readiness(&self) -> (bool, String) {
        let state = self.lock();
        let stopping = self.shutdown.is_cancelled();
        let ready = !stopping && state.checks.values().all(Result::is_ok);
        let mut body = String::from(match (ready, stopping) {
            (true, _) => "ready\n",
            (false, true) => "not ready: shutting down\n",
            (false, false) => "not ready\n",
        });
        for (check, answer) in &state.checks {
            let _ = match answer {
                Ok(()) => writeln!(body, "{}: ok", check.name()),
                Err(why) => writeln!(body, "{}: {why}", check.name()),
            };
        }
        (ready, body)
    }

    fn beat(&self) {
        self.lock().beat = Instant::now();
    }

    fn loop_started(&self, name: &'static str) {
        self.lock().loops.insert(name, true);
    }

    fn loop_ended(&self, name: &'static str) {
        let mut state = self.lock();
        if self.shutdown.is_cancelled() || state.closing {
            state.loops.remove(name);
            return;
        }
        state.loops.insert(name, false);
        error!(
            loop_name = name,
            "a loop of the dispatcher stopped before shutdown; /livez fails from now on, so that the dispatcher is restarted"
        );
    }
}

/// The loops of a running dispatcher: each spawned with a name, and counted as stopped by
/// `/livez` if it ends before shutdown.
pub(crate) struct Loops {
    set: JoinSet<()>,
    health: Arc<Health>,
}

impl Loops {
    pub(crate) fn new(health: Arc<Health>) -> Loops {
        Loops {
            set: JoinSet::new(),
            health,
        }
    }

    /// Spawns `work`, which must run until shutdown, as the loop `name`.
    pub(crate) fn spawn(
        &mut self,
        name: &'static str,
        work: impl Future<Output = ()> + Send + 'static,
    ) {
        self.health.loop_started(name);
        let alive = Alive {
            health: self.health.clone(),
            name,
        };
        self.set.spawn(async move {
            let _alive = alive;
            work.await;
        });
    }

    /// Waits until every loop has ended (after shutdown).
    pub(crate) async fn drain(&mut self) {
        while let Some(r) = self.set.join_next().await {
            if let Err(e) = r {
                warn!(error = %e, "a role ended abnormally");
            }
        }
    }
}

impl Drop for Loops {
    /// The loops are aborted (start-up failed): their ends say nothing of liveness.
    fn drop(&mut self) {
        self.health.lock().closing = true;
    }
}

/// Marks its loop ended when dropped: when the loop returns, panics or is aborted.
struct Alive {
    health: Arc<Health>,
    name: &'static str,
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.health.loop_ended(self.name);
    }
}

/// Wakes every second and says so, until shutdown: the proof `/livez` asks for that the
/// async runtime still runs timers.
pub(crate) async fn heartbeat(health: Arc<Health>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = health.shutdown.cancelled() => return,
            _ = tick.tick() => health.beat(),
        }
    }
}

/// What the dependency checks use.
pub(crate) struct Probes {
    pub(crate) amqp_url: SecretString,
    pub(crate) broker_timeout: Duration,
    pub(crate) store: Store,
    /// The API client and the namespace of the Jobs, on the `kubernetes` runtime.
    pub(crate) kube: Option<(kube::Client, String)>,
}

/// Checks the broker, Postgres and the API server every [`PROBE_EVERY`] until shutdown.
pub(crate) async fn probe(health: Arc<Health>, probes: Probes) {
    let mut broker = None;
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = health.shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let (b, p, k) = tokio::join!(
            probe_broker(&probes, &mut broker),
            probe_postgres(&probes.store),
            probe_api(probes.kube.as_ref()),
        );
        health.set(Check::Broker, b);
        health.set(Check::Postgres, p);
        if let Some(k) = k {
            health.set(Check::KubernetesApi, k);
        }
    }
    if let Some(conn) = broker {
        close(conn).await;
    }
}

/// Opens and closes a channel on the check's own connection, connecting first if needed.
async fn probe_broker(probes: &Probes, conn: &mut Option<Connection>) -> Result<(), String> {
    let timeout = probes.broker_timeout.min(PROBE_TIMEOUT);
    if !conn.as_ref().is_some_and(|c| c.status().connected()) {
        if let Some(old) = conn.take() {
            close(old).await;
        }
        let opened = amqp::connect(&probes.amqp_url, "gantry-dispatcher/health", timeout).await;
        *conn = Some(opened.map_err(|e| chain(&e))?);
    }
    let Some(c) = conn.as_ref() else {
        return Err("no connection".into());
    };
    let checked = async {
        let channel = timed("channel.open", timeout, c.create_channel()).await?;
        timed(
            "channel.close",
            timeout,
            channel.close(200, "health check".into()),
        )
        .await
    }
    .await;
    if let Err(e) = checked {
        if let Some(old) = conn.take() {
            close(old).await;
        }
        return Err(chain(&e));
    }
    Ok(())
}

async fn close(conn: Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(200, "bye".into())).await;
}

/// A read through the dispatcher's pool (of no rows).
async fn probe_postgres(store: &Store) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, store.executors(&[])).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(chain(&e)),
        Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

/// A list of at most one Job's metadata in the runtime's namespace; `None` when there is
/// no API server to check.
async fn probe_api(kube: Option<&(kube::Client, String)>) -> Option<Result<(), String>> {
    let (client, namespace) = kube?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let listed = tokio::time::timeout(
        PROBE_TIMEOUT,
        jobs.list_metadata(&ListParams::default().limit(1)),
    )
    .await;
    Some(match listed {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(chain(&e)),
        Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    })
}
