//! The service: [`run`] reads the catalog, connects, declares the topology, reconciles,
//! starts the roles and the catalog's watch, and drains them when `shutdown` resolves.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::BackoffBuilder;
use gantry_shared::amqp::{self, Publisher, confirm_channel};
use gantry_shared::catalog::Catalog;
use gantry_shared::message::{JobName, TaskResult};
use gantry_shared::retry;
use gantry_shared::store::Store;
use gantry_shared::telemetry::chain;
use gantry_shared::topology::Topology;
use secrecy::ExposeSecret;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::runtime::kubernetes::runtime::KubeRuntime;
use crate::runtime::local::{LocalOptions, LocalRuntime};
use crate::settings::{Role, RuntimeKind, Settings};
use crate::{Error, Result, catalog, classes, dispatch, recorder};

/// What every part of the running dispatcher shares.
pub(crate) struct Ctx {
    pub(crate) settings: Settings,
    pub(crate) topology: Topology,
    pub(crate) store: Store,
    /// The dispatch loop's writes, committed in groups.
    pub(crate) lifecycle: Lifecycle,
    pub(crate) publisher: Publisher,
    pub(crate) runtime: Option<Runtime>,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: CancellationToken,
    /// The executor catalog in force; replaced whole on reload (see [`crate::catalog`]).
    pub(crate) catalog: watch::Sender<Arc<Catalog>>,
    following: Mutex<HashSet<JobName>>,
}

/// Removes a job from the followed set when its follower ends.
pub(crate) struct FollowGuard<'a> {
    ctx: &'a Ctx,
    name: JobName,
}

impl Drop for FollowGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.ctx.following.lock() {
            set.remove(&self.name);
        }
    }
}

impl Ctx {
    /// The executor catalog in force.
    pub(crate) fn catalog(&self) -> Arc<Catalog> {
        self.catalog.borrow().clone()
    }

    /// Whether a job is followed by this dispatcher.
    pub(crate) fn is_following(&self, name: &JobName) -> bool {
        self.following
            .lock()
            .map(|set| set.contains(name))
            .unwrap_or(false)
    }

    /// Claims the following of a job; `None` if something already follows it.
    pub(crate) fn follow_guard(&self, name: &JobName) -> Option<FollowGuard<'_>> {
        let mut set = self.following.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(name.clone()).then(|| FollowGuard {
            ctx: self,
            name: name.clone(),
        })
    }

    /// Runs a store operation, retrying transient failures (Postgres restarting) with
    /// backoff until it succeeds or shutdown is asked for.
    pub(crate) async fn persist<T, F, Fut>(&self, what: &'static str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = gantry_shared::Result<T>>,
    {
        let mut delays = retry::forever().build();
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    warn!(what, error = %chain(&e), ?delay, "Postgres write failed; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Err(Error::ShuttingDown),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Publishes a result to the results exchange, confirmed, retrying until shutdown.
    pub(crate) async fn publish_result(&self, result: &TaskResult) -> Result<()> {
        let (body, props) = result.to_amqp().map_err(gantry_shared::Error::from)?;
        let exchange = self.topology.results_exchange();
        let publishing =
            self.publisher
                .publish(&exchange, "result", &body, props, true, retry::forever());
        tokio::select! {
            r = publishing => Ok(r?),
            _ = self.shutdown.cancelled() => Err(Error::ShuttingDown),
        }
    }
}

/// Runs the dispatcher until `shutdown` resolves, then stops consuming, lets in-flight
/// hand-offs and record batches finish, and returns. Running jobs keep running; the next
/// start adopts them.
///
/// # Errors
/// Start-up failures: unreachable broker or database (after retries), a topology
/// conflict, an unusable state directory.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        info!("shutdown requested; draining");
        cancel.cancel();
    });
    let common = &settings.common;
    let topology = Topology::new(&common.prefix)?;
    info!(prefix = %common.prefix, amqp = %common.amqp_url_redacted(), roles = ?settings.dispatcher.roles, "starting dispatcher");
    let kube_runtime =
        settings.has_role(Role::Dispatch) && settings.dispatcher.runtime == RuntimeKind::Kubernetes;
    let client = if kube_runtime || settings.dispatcher.catalog_configmap.is_some() {
        Some(kube_client().await?)
    } else {
        None
    };
    let source = catalog::Source::of(&settings, client.as_ref())?;
    let initial = catalog::initial(&settings, &source, client.as_ref()).await?;
    info!(source = ?source, classes = ?initial.classes(), "executor catalog loaded");

    let startup = retry::for_at_most(Duration::from_secs(120));
    let conn = amqp::connect_with_retry(
        &common.amqp_url,
        "gantry-dispatcher/setup",
        common.broker_timeout,
        startup,
    )
    .await?;
    let channel = confirm_channel(&conn, common.broker_timeout).await?;
    topology
        .apply(&channel, &initial.classes(), &common.queues)
        .await?;
    let _ = conn.close(200, "topology applied".into()).await;

    let store = Store::connect(&common.database_url, common.db_pool_size, startup).await?;
    let publisher = Publisher::connect(
        &common.amqp_url,
        "gantry-dispatcher/publish",
        common.broker_timeout,
    )
    .await?;
    let runtime = if settings.has_role(Role::Dispatch) {
        Some(open_runtime(&settings, client.clone(), token.clone()).await?)
    } else {
        None
    };
    let metrics = Metrics::default();
    let ctx = Arc::new(Ctx {
        topology,
        lifecycle: Lifecycle::start(store.clone(), metrics.lifecycle.clone()),
        store,
        publisher,
        runtime,
        metrics,
        shutdown: token.clone(),
        catalog: watch::Sender::new(Arc::new(initial)),
        following: Mutex::new(HashSet::new()),
        settings,
    });

    let mut roles = tokio::task::JoinSet::new();
    if ctx.settings.has_role(Role::Record) {
        roles.spawn(recorder::run(ctx.clone(), recorder::Stream::Results));
        roles.spawn(recorder::run(ctx.clone(), recorder::Stream::DeadLetters));
    }
    let dispatching = ctx.settings.has_role(Role::Dispatch);
    let mut capacity = HashMap::new();
    if dispatching {
        capacity = ctx
            .catalog()
            .iter()
            .map(|(class, spec)| {
                (
                    class.clone(),
                    Arc::new(Semaphore::new(spec.max_active_jobs as usize)),
                )
            })
            .collect();
        dispatch::reconcile(&ctx, &capacity).await?;
        roles.spawn(dispatch::watch_cancellations(ctx.clone()));
    }
    roles.spawn(classes::supervise(ctx.clone(), capacity, dispatching));
    roles.spawn(catalog::watch(ctx.clone(), source, client));
    let housekeeping = ctx.clone();
    roles.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = housekeeping.shutdown.cancelled() => return,
                _ = tick.tick() => {
                    housekeeping.metrics.log("periodic");
                    if let Some(rt) = housekeeping.runtime.as_ref() { rt.sweep(); }
                }
            }
        }
    });
    info!("dispatcher ready");
    while let Some(r) = roles.join_next().await {
        if let Err(e) = r {
            warn!(error = %e, "a role ended abnormally");
        }
    }
    ctx.publisher.close().await;
    ctx.metrics.log("shutdown");
    info!("dispatcher stopped");
    Ok(())
}

async fn open_runtime(
    settings: &Settings,
    client: Option<kube::Client>,
    shutdown: CancellationToken,
) -> Result<Runtime> {
    match settings.dispatcher.runtime {
        RuntimeKind::Local => Ok(Runtime::Local(open_local(settings)?)),
        RuntimeKind::Kubernetes => {
            let client = match client {
                Some(c) => c,
                None => kube_client().await?,
            };
            let kube = &settings.dispatcher.kubernetes;
            let runtime =
                KubeRuntime::open(client, kube, &settings.common.prefix, shutdown).await?;
            Ok(Runtime::Kubernetes(Box::new(runtime)))
        }
    }
}

/// A Kubernetes client: the in-cluster configuration in a pod, else the kubeconfig.
async fn kube_client() -> Result<kube::Client> {
    kube::Client::try_default()
        .await
        .map_err(|source| Error::Kube {
            what: "configure the client (the dispatcher needs a kubeconfig or to run in a cluster)"
                .into(),
            source,
        })
}

fn open_local(settings: &Settings) -> Result<LocalRuntime> {
    let d = &settings.dispatcher;
    let executor_bin = d.executor_bin.clone().unwrap_or_else(default_executor_bin);
    let node = d.node_name.clone().unwrap_or_else(hostname);
    let common = &settings.common;
    let mut env = vec![
        (
            "GANTRY_AMQP_URL".to_owned(),
            common.amqp_url.expose_secret().to_owned(),
        ),
        ("GANTRY_PREFIX".to_owned(), common.prefix.clone()),
        (
            "GANTRY_BROKER_TIMEOUT".to_owned(),
            humantime::format_duration(common.broker_timeout).to_string(),
        ),
    ];
    if let Some(file) = &settings.config_file {
        env.push(("GANTRY_CONFIG".to_owned(), file.display().to_string()));
    }
    LocalRuntime::open(LocalOptions {
        state_dir: d.state_dir.clone(),
        executor_bin,
        node,
        env,
        deadline_grace: d.deadline_grace,
        kill_grace: d.kill_grace,
        retention: d.job_retention,
    })
}

/// `gantry-executor` beside this program, else on `PATH`.
fn default_executor_bin() -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("gantry-executor")));
    match beside {
        Some(p) if p.is_file() => p,
        _ => std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("gantry-executor"))
                    .find(|p| p.is_file())
            })
            .unwrap_or_else(|| PathBuf::from("gantry-executor")),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
