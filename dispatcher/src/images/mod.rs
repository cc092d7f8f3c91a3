//! Executor images: which image the Job of a task runs, and which images are refused.
//!
//! Resolution, first answer wins:
//!
//! 1. the executor registry service, when `executor_registry` is set and it knows the class
//!    (a 404 goes on to 2; a service that does not answer makes the task wait, it never
//!    falls back to an older source);
//! 2. the class's `image` in the catalog;
//! 3. in development mode, the newest `executor-<class>` image on the cluster's nodes.
//!
//! Whatever its source, an image must be pinned to a digest (unless in development mode)
//! and come from one of `allowed_registries` (when set). A refusal is permanent: the task
//! is dead-lettered with the reason; [`Error::RegistryUnavailable`] is transient: the task
//! goes back to its queue.
//!
//! - `reference`: parsing image references and ordering version tags.
//! - `nodes`: development mode's node watch and its choice of the newest image.
//! - `registry`: the registry service's client and cache.

mod nodes;
mod reference;
mod registry;

use gantry_shared::catalog::{Catalog, ExecutorSpec};
use gantry_shared::message::{ExecutorClass, Task};
use kube::Client;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use self::nodes::NodeImages;
use self::reference::Reference;
use self::registry::{Answer, RegistryClient, Timing};
use crate::settings::KubernetesSection;
use crate::{Error, Result};

pub(crate) use self::registry::check_url as check_registry_url;

/// Which images are accepted.
#[derive(Debug, Clone, Default)]
pub struct ImagePolicy {
    /// Registries images may come from; empty: any.
    pub allowed_registries: Vec<String>,
    /// Development mode: tag-only images are accepted.
    pub dev_mode: bool,
}

impl ImagePolicy {
    pub fn of(settings: &KubernetesSection) -> ImagePolicy {
        ImagePolicy {
            allowed_registries: settings.allowed_registries.clone(),
            dev_mode: settings.dev_mode,
        }
    }

    fn allows(&self, reference: &Reference) -> bool {
        self.allowed_registries.is_empty()
            || self.allowed_registries.iter().any(|r| reference.is_from(r))
    }

    /// Checks one image of `class`.
    ///
    /// # Errors
    /// The image is not a valid reference or not pinned to a digest (outside development
    /// mode), or its registry is not allowed.
    pub fn check(&self, class: &str, image: &str) -> Result<()> {
        let reference = Reference::parse(image);
        let not_pinned = || Error::ImageNotPinned {
            class: class.to_owned(),
            image: image.to_owned(),
            repository: reference
                .as_ref()
                .map_or_else(|| image.to_owned(), Reference::repository),
        };
        let Some(parsed) = &reference else {
            return Err(not_pinned());
        };
        if parsed.digest.is_none() && !self.dev_mode {
            return Err(not_pinned());
        }
        if !self.allows(parsed) {
            return Err(Error::RegistryNotAllowed {
                class: class.to_owned(),
                image: image.to_owned(),
                allowed: self.allowed_registries.join(", "),
            });
        }
        Ok(())
    }

    /// Checks every image a catalog names, so a catalog (at start or on reload) with one bad
    /// image is refused whole.
    ///
    /// # Errors
    /// The first class whose image [`ImagePolicy::check`] refuses.
    pub fn check_catalog(&self, catalog: &Catalog) -> Result<()> {
        for (class, spec) in catalog.iter() {
            if let Some(image) = &spec.image {
                self.check(class.as_str(), image)?;
            }
        }
        Ok(())
    }
}

/// The image of `class` from the catalog alone, checked: what `render-job` uses, offline.
///
/// # Errors
/// The class has no image in the catalog, or the policy refuses it.
pub fn catalog_image(
    class: &ExecutorClass,
    spec: &ExecutorSpec,
    policy: &ImagePolicy,
) -> Result<String> {
    let image = spec.image.clone().ok_or_else(|| Error::NoImage {
        class: class.to_string(),
        tried: "it has no image in the catalog; add `image:` (digest-pinned) to it (render-job reads only the catalog file, not the executor registry or the nodes)".into(),
    })?;
    policy.check(class.as_str(), &image)?;
    Ok(image)
}

/// Resolves the image of each task's class (see the module documentation).
pub(crate) struct Resolver {
    policy: ImagePolicy,
    registry: Option<RegistryClient>,
    nodes: Option<NodeImages>,
}

impl Resolver {
    /// Starts what `settings` asks for: the registry client (its cache filled from
    /// `GET /executors`) and, in development mode, the node watch.
    ///
    /// # Errors
    /// A bad registry URL, or nodes that cannot be listed in development mode.
    pub(crate) async fn open(
        settings: &KubernetesSection,
        client: &Client,
        shutdown: CancellationToken,
    ) -> Result<Resolver> {
        let registry = match &settings.executor_registry {
            Some(url) => {
                let registry = RegistryClient::new(
                    url,
                    Timing {
                        cache: settings.executor_registry_cache,
                        timeout: settings.executor_registry_timeout,
                        stale: settings.executor_registry_stale,
                    },
                )?;
                registry.prefetch().await;
                Some(registry)
            }
            None => None,
        };
        let nodes = if settings.dev_mode {
            Some(NodeImages::watch(client.clone(), shutdown).await?)
        } else {
            None
        };
        Ok(Resolver {
            policy: ImagePolicy::of(settings),
            registry,
            nodes,
        })
    }

    /// The spec of the task's class with the image its Job runs.
    ///
    /// # Errors
    /// [`Error::RegistryUnavailable`] (transient), or a permanent refusal: no image, an image
    /// not pinned or not allowed, a task the image does not handle.
    pub(crate) async fn resolve(&self, task: &Task, spec: &ExecutorSpec) -> Result<ExecutorSpec> {
        let class = task.executor.as_str();
        let mut tried = Vec::new();
        let mut image = None;
        if let Some(registry) = &self.registry {
            match registry.lookup(&task.executor).await? {
                Answer::Found(entry) => {
                    if let Some(tasks) = &entry.capabilities.tasks
                        && !tasks.iter().any(|t| t == task.name.as_str())
                    {
                        return Err(Error::TaskNotSupported {
                            class: class.to_owned(),
                            image: entry.image,
                            task: task.name.to_string(),
                            tasks: tasks.join(", "),
                        });
                    }
                    image = Some(("executor registry", entry.image));
                }
                Answer::Unknown => tried.push(format!(
                    "the executor registry {} does not know it (404)",
                    registry.url()
                )),
            }
        }
        if image.is_none() {
            match &spec.image {
                Some(i) => image = Some(("catalog", i.clone())),
                None => tried.push("the catalog gives it no `image:`".into()),
            }
        }
        if image.is_none() {
            match &self.nodes {
                Some(nodes) => match nodes.newest(class, |r| self.policy.allows(r)) {
                    (Some(i), _) => image = Some(("nodes", i)),
                    (None, Some(refused)) => {
                        return Err(Error::RegistryNotAllowed {
                            class: class.to_owned(),
                            image: refused,
                            allowed: self.policy.allowed_registries.join(", "),
                        });
                    }
                    (None, None) => tried.push(format!(
                        "no node reports an executor-{class} image in status.images"
                    )),
                },
                None => tried.push("development mode (node images) is off".into()),
            }
        }
        let Some((source, image)) = image else {
            return Err(Error::NoImage {
                class: class.to_owned(),
                tried: format!(
                    "{}; register it in the executor registry or add `image:` (digest-pinned) to the class in the catalog",
                    tried.join(", ")
                ),
            });
        };
        self.policy.check(class, &image)?;
        debug!(executor = class, %image, source, "executor image resolved");
        Ok(ExecutorSpec {
            image: Some(image),
            ..spec.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn policy(allowed: &[&str], dev_mode: bool) -> ImagePolicy {
        ImagePolicy {
            allowed_registries: allowed.iter().map(|s| s.to_string()).collect(),
            dev_mode,
        }
    }

    #[test]
    fn outside_development_mode_an_image_must_be_pinned_to_a_digest() {
        let strict = policy(&[], false);
        assert!(
            strict
                .check("echo", &format!("reg.example/executor-echo@{D}"))
                .is_ok()
        );
        assert!(
            strict
                .check("echo", &format!("reg.example/executor-echo:1.2@{D}"))
                .is_ok()
        );
        let refused = strict
            .check("echo", "reg.example/executor-echo:1.2")
            .unwrap_err()
            .to_string();
        assert!(refused.contains("executor class echo"), "{refused}");
        assert!(
            refused.contains("reg.example/executor-echo@sha256:<digest>"),
            "{refused}"
        );
        assert!(
            strict
                .check("echo", "reg.example/executor-echo@sha256:12")
                .is_err()
        );
        assert!(
            policy(&[], true)
                .check("echo", "reg.example/executor-echo:1.2")
                .is_ok()
        );
    }

    #[test]
    fn images_from_registries_outside_the_allowlist_are_refused() {
        let image = format!("reg.example/executor-vllm@{D}");
        assert!(
            policy(&["reg.example"], false)
                .check("vllm", &image)
                .is_ok()
        );
        assert!(
            policy(&["reg.example/"], false)
                .check("vllm", &image)
                .is_ok()
        );
        let refused = policy(&["ghcr.io/acme"], false)
            .check("vllm", &image)
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("not from an allowed registry (ghcr.io/acme)"),
            "{refused}"
        );
        assert!(
            policy(&["reg.ex"], false).check("vllm", &image).is_err(),
            "a prefix of a host is not its registry"
        );
    }

    #[test]
    fn a_catalog_with_one_bad_image_is_refused_naming_its_class() {
        let catalog = Catalog::parse(
            &format!("executors:\n  good: {{ engine: {{ kind: echo }}, image: \"r.example/executor-good@{D}\" }}\n  bad: {{ engine: {{ kind: echo }}, image: \"r.example/executor-bad:2\" }}\n  none: {{ engine: {{ kind: echo }} }}\n"),
            "t",
        )
        .unwrap();
        let refused = policy(&[], false)
            .check_catalog(&catalog)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("executor class bad"), "{refused}");
        assert!(policy(&[], true).check_catalog(&catalog).is_ok());
    }
}
