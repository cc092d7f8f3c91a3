//! The service: [`run`] opens the HTTP endpoint, reads the catalog, connects, declares the
//! topology, opens the runtime, starts the roles (record, dispatch) and what serves them all
//! (the catalog's watch, the task queues in step with it, the counters, the health checks),
//! and drains them when `shutdown` resolves. It wires things up and starts them; nothing it
//! starts imports it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::amqp::{self, Publisher, confirm_channel};
use gantry_shared::retry;
use gantry_shared::store::Store;
use gantry_shared::topology::Topology;
use secrecy::ExposeSecret;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::context::Ctx;
use crate::health::{self, Check, Health, Loops, Probes};
use crate::http::Endpoint;
use crate::metrics::Metrics;
use crate::runtime::kubernetes::runtime::KubeRuntime;
use crate::runtime::local::{LocalOptions, LocalRuntime};
use crate::settings::{Role, RuntimeKind, Settings};
use crate::{Error, Result, catalog, celery, dispatch, queues, recorder};

/// The name of the connection every publish of the dispatcher goes through.
const PUBLISHER: &str = "gantry-dispatcher/publish";

/// Runs the dispatcher until `shutdown` resolves, then stops consuming, lets in-flight
/// hand-offs and record batches finish, stops serving HTTP, and returns. Running jobs keep
/// running; the next start adopts them.
///
/// # Errors
/// Start-up failures: an HTTP address that cannot be bound, unreachable broker or database
/// (after retries), a topology conflict, an unusable state directory.
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
    let kube_runtime =
        settings.has_role(Role::Dispatch) && settings.dispatcher.runtime == RuntimeKind::Kubernetes;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(token.clone(), metrics.clone(), kube_runtime));
    // Serving from the start: the probes answer while the dispatcher connects.
    let server = match settings.dispatcher.http_addr.0 {
        Some(addr) => Some(
            Endpoint::bind(addr)
                .await?
                .serve(health.clone(), metrics.clone()),
        ),
        None => None,
    };
    let mut loops = Loops::new(health.clone());
    loops.spawn("heartbeat", health::heartbeat(health.clone()));
    info!(prefix = %common.prefix, amqp = %common.amqp_url_redacted(), roles = ?settings.dispatcher.roles, "starting dispatcher");
    let client = if kube_runtime || settings.dispatcher.catalog_configmap.is_some() {
        Some(kube_client().await?)
    } else {
        None
    };
    let source = catalog::Source::of(&settings, client.as_ref())?;
    let initial = catalog::initial(&settings, &source, client.as_ref()).await?;
    info!(source = ?source, classes = ?initial.classes(), "executor catalog loaded");
    health.ok(Check::Catalog);

    let startup = retry::for_at_most(Duration::from_secs(120));
    let conn = amqp::connect_with_retry(
        &common.amqp_url,
        "gantry-dispatcher/setup",
        common.broker_timeout,
        startup,
    )
    .await?;
    health.ok(Check::Broker);
    let channel = confirm_channel(&conn, common.broker_timeout).await?;
    topology
        .apply(&channel, &initial.classes(), &common.queues)
        .await?;
    let _ = conn.close(200, "topology applied".into()).await;

    let store = Store::connect(&common.database_url, common.db_pool_size, startup).await?;
    health.ok(Check::Postgres);
    let publisher = Publisher::connect(&common.amqp_url, PUBLISHER, common.broker_timeout).await?;
    metrics.consumer(PUBLISHER);
    let counted = metrics.clone();
    publisher.on_reconnect(move || counted.reconnected(PUBLISHER));
    let ctx = Arc::new(Ctx {
        topology,
        store,
        publisher,
        metrics,
        shutdown: token.clone(),
        in_service: watch::Sender::new(initial.classes()),
        catalog: watch::Sender::new(Arc::new(initial)),
        settings,
    });

    if ctx.settings.has_role(Role::Record) {
        let results = recorder::run(ctx.clone(), recorder::Stream::Results);
        loops.spawn("record/results", results);
        let dead_letters = recorder::run(ctx.clone(), recorder::Stream::DeadLetters);
        loops.spawn("record/dead_letters", dead_letters);
    }
    let mut api = None;
    if ctx.settings.has_role(Role::Dispatch) {
        match ctx.settings.dispatcher.runtime {
            RuntimeKind::Local => {
                dispatch::start(ctx.clone(), open_local(&ctx.settings)?, &mut loops).await?;
            }
            RuntimeKind::Kubernetes => {
                let client = match client.clone() {
                    Some(c) => c,
                    None => kube_client().await?,
                };
                let kube = &ctx.settings.dispatcher.kubernetes;
                let common = &ctx.settings.common;
                let calls = ctx.metrics.api.clone();
                let runtime =
                    KubeRuntime::open(client.clone(), kube, common, token.clone(), calls).await?;
                health.ok(Check::KubernetesApi);
                api = Some((client, runtime.namespace().to_owned()));
                dispatch::start(ctx.clone(), runtime, &mut loops).await?;
            }
        }
        if ctx.settings.dispatcher.celery.enabled {
            celery::start(ctx.clone(), &mut loops).await?;
        }
    }
    loops.spawn("queues", queues::keep_in_step(ctx.clone()));
    if let Some(watching) = catalog::watch(ctx.clone(), source, client) {
        loops.spawn("catalog", watching);
    }
    loops.spawn("counters", log_counters(ctx.clone()));
    let probes = Probes {
        amqp_url: ctx.settings.common.amqp_url.clone(),
        broker_timeout: ctx.settings.common.broker_timeout,
        store: ctx.store.clone(),
        kube: api,
    };
    loops.spawn("health", health::probe(health.clone(), probes));
    health.ok(Check::Roles);
    info!("dispatcher ready");
    loops.drain().await;
    ctx.publisher.close().await;
    ctx.metrics.log("shutdown");
    if let Some(server) = server {
        server.stop().await;
    }
    info!("dispatcher stopped");
    Ok(())
}

/// Logs the counters line every minute until shutdown.
async fn log_counters(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => ctx.metrics.log("periodic"),
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
    // The executors export their runs' spans where the dispatcher exports its own.
    if let Some(endpoint) = &common.otlp_endpoint {
        env.push(("GANTRY_OTLP_ENDPOINT".to_owned(), endpoint.clone()));
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
