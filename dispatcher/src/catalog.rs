//! The executor catalog in force, and its reloads.
//!
//! It comes from a file (`catalog`; the built-in catalog without one), reloaded on SIGHUP,
//! or from a ConfigMap (`catalog_configmap`, key [`CONFIGMAP_KEY`]), watched through the API
//! (a watch on that one object, not a poll) and reloaded on every change. A new version is
//! parsed and checked whole — shape, classes, and under the `kubernetes` runtime every
//! image against the image policy — before it replaces the old one in a single swap; a
//! version that fails is refused with its origin and reason (for YAML, the line and column),
//! counted in `catalog_refused`, and the previous catalog stays in force. A deleted
//! ConfigMap also leaves the catalog in force. What a reload changes for the consumers is
//! [`crate::classes`]'s business.

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::StreamExt;
use gantry_shared::catalog::Catalog;
use gantry_shared::telemetry::chain;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tracing::{debug, error, info, warn};

use crate::context::Ctx;
use crate::images::ImagePolicy;
use crate::settings::{RuntimeKind, Settings, configmap_ref};
use crate::{Error, Result};

/// The ConfigMap key holding the catalog YAML.
pub(crate) const CONFIGMAP_KEY: &str = "catalog.yaml";

/// Where the catalog comes from.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// A file (reloaded on SIGHUP), or the built-in catalog.
    File(Option<PathBuf>),
    ConfigMap {
        namespace: String,
        name: String,
    },
}

impl Source {
    /// Where `settings` say the catalog is; `client` gives the default namespace.
    pub(crate) fn of(settings: &Settings, client: Option<&Client>) -> Result<Source> {
        let Some(value) = &settings.dispatcher.catalog_configmap else {
            return Ok(Source::File(settings.dispatcher.catalog.clone()));
        };
        let (namespace, name) = configmap_ref(value).map_err(|message| Error::CatalogSource {
            origin: "dispatcher.catalog_configmap".into(),
            message,
        })?;
        let namespace = match (namespace, client) {
            (Some(ns), _) => ns.to_owned(),
            (None, Some(c)) => c.default_namespace().to_owned(),
            (None, None) => "default".to_owned(),
        };
        Ok(Source::ConfigMap {
            namespace,
            name: name.to_owned(),
        })
    }
}

/// Checks a parsed catalog beyond its shape: under the `kubernetes` runtime, its images.
///
/// # Errors
/// A class whose image the policy refuses.
pub(crate) fn check(settings: &Settings, catalog: &Catalog) -> Result<()> {
    if settings.dispatcher.runtime == RuntimeKind::Kubernetes {
        ImagePolicy::of(&settings.dispatcher.kubernetes).check_catalog(catalog)?;
    }
    Ok(())
}

/// The catalog to start with, read and checked.
///
/// # Errors
/// The ConfigMap cannot be read, does not exist or has no catalog key, or the catalog is
/// invalid.
pub(crate) async fn initial(
    settings: &Settings,
    source: &Source,
    client: Option<&Client>,
) -> Result<Catalog> {
    let catalog = match (source, &settings.catalog, client) {
        (Source::File(_), Some(catalog), _) => catalog.clone(),
        (Source::ConfigMap { namespace, name }, _, Some(client)) => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
            let map = api.get_opt(name).await.map_err(|source| Error::Kube {
                what: format!("read the catalog ConfigMap {namespace}/{name}"),
                source,
            })?;
            let Some(map) = map else {
                return Err(Error::CatalogSource {
                    origin: format!("ConfigMap {namespace}/{name}"),
                    message: format!(
                        "it does not exist; create it with the catalog under the key {CONFIGMAP_KEY} (kubectl -n {namespace} create configmap {name} --from-file={CONFIGMAP_KEY}=catalog.yaml)"
                    ),
                });
            };
            from_configmap(namespace, name, &map)?
        }
        _ => {
            return Err(Error::CatalogSource {
                origin: "dispatcher.catalog_configmap".into(),
                message: "no Kubernetes client to read it with".into(),
            });
        }
    };
    check(settings, &catalog)?;
    Ok(catalog)
}

/// Parses the catalog in a ConfigMap.
fn from_configmap(namespace: &str, name: &str, map: &ConfigMap) -> Result<Catalog> {
    let version = map.metadata.resource_version.as_deref().unwrap_or("?");
    let origin =
        format!("ConfigMap {namespace}/{name} (resourceVersion {version}), key {CONFIGMAP_KEY}");
    let Some(text) = map.data.as_ref().and_then(|d| d.get(CONFIGMAP_KEY)) else {
        return Err(Error::CatalogSource {
            origin,
            message: format!("the key is missing; put the catalog YAML under data.{CONFIGMAP_KEY}"),
        });
    };
    Ok(Catalog::parse(text, &origin)?)
}

/// Follows the source until shutdown, swapping in each valid new version; `None` when
/// there is nothing to follow (the built-in catalog). SIGHUP is listened for before this
/// returns, so a signal sent once the dispatcher is ready reloads a catalog file instead of
/// ending the process.
pub(crate) fn watch(
    ctx: Arc<Ctx>,
    source: Source,
    client: Option<Client>,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let hangups = match &source {
        Source::File(Some(_)) => signal(SignalKind::hangup())
            .inspect_err(|e| warn!(error = %e, "cannot listen for SIGHUP; the catalog file is read at start only"))
            .ok(),
        _ => None,
    };
    let follows = matches!(
        (&source, &client, &hangups),
        (Source::ConfigMap { .. }, Some(_), _) | (Source::File(Some(_)), _, Some(_))
    );
    follows.then_some(async move {
        match (source, client, hangups) {
            (Source::ConfigMap { namespace, name }, Some(client), _) => {
                watch_configmap(&ctx, client, &namespace, &name).await;
            }
            (Source::File(Some(path)), _, Some(hangups)) => {
                reload_on_sighup(&ctx, &path, hangups).await;
            }
            _ => {}
        }
    })
}

async fn watch_configmap(ctx: &Ctx, client: Client, namespace: &str, name: &str) {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    info!(configmap = %format!("{namespace}/{name}"), "watching the executor catalog");
    loop {
        let event = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            Some(Ok(watcher::Event::Apply(map) | watcher::Event::InitApply(map))) => {
                offer(ctx, from_configmap(namespace, name, &map));
            }
            Some(Ok(watcher::Event::Delete(_))) => warn!(
                configmap = %format!("{namespace}/{name}"),
                "the catalog ConfigMap was deleted; the catalog in force stays until it is created again"
            ),
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                warn!(error = %e, "catalog ConfigMap watch failed; it restarts with backoff");
            }
            None => return,
        }
    }
}

async fn reload_on_sighup(
    ctx: &Ctx,
    path: &std::path::Path,
    mut hangups: tokio::signal::unix::Signal,
) {
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = hangups.recv() => {
                info!(path = %path.display(), "SIGHUP: reloading the executor catalog");
                offer(ctx, Catalog::load(Some(path)).map_err(Error::from));
            }
        }
    }
}

/// Swaps in `parsed` if it is valid and differs from the catalog in force.
fn offer(ctx: &Ctx, parsed: Result<Catalog>) {
    let checked = parsed.and_then(|c| check(&ctx.settings, &c).map(|()| c));
    let new = match checked {
        Ok(c) => c,
        Err(e) => {
            ctx.metrics.catalog_refused.inc();
            error!(error = %chain(&e), "executor catalog refused; the previous one stays in force");
            return;
        }
    };
    let old = ctx.catalog();
    if *old == new {
        debug!("executor catalog unchanged");
        return;
    }
    let names = |c: &Catalog| c.classes().into_iter().map(|c| c.to_string());
    let added: Vec<String> = names(&new)
        .filter(|c| !old.classes().iter().any(|o| o.as_str() == c))
        .collect();
    let removed: Vec<String> = names(&old)
        .filter(|c| !new.classes().iter().any(|n| n.as_str() == c))
        .collect();
    let changed: Vec<String> = new
        .iter()
        .filter(|(class, spec)| old.get(class).is_some_and(|o| o != *spec))
        .map(|(class, _)| class.to_string())
        .collect();
    ctx.catalog.send_replace(Arc::new(new));
    ctx.metrics.catalog_reloads.inc();
    info!(?added, ?removed, ?changed, "executor catalog reloaded");
}
