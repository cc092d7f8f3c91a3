//! Development mode: the newest `executor-<class>` image the cluster's nodes report in
//! `status.images`.
//!
//! Nodes are watched (one reflector over all nodes, started only in development mode), so a
//! lookup reads a cache: an image loaded onto a node (`kind load`, a local build) is seen
//! within the watch's latency, and no task costs a list of every node.
//!
//! A node's image entry has no date, so "newest" is by tag: among the entries with a name
//! whose last path part is `executor-<class>` (and, when `allowed_registries` is set, from
//! an allowed registry), the entry with the highest version tag wins (`1.10.0` over
//! `1.9.3`, `2.0.0` over `2.0.0-rc.1`); an entry without a version tag (`latest`, `dev`, only
//! a digest) ranks below every versioned one. Ties go to the name found on the most nodes,
//! then to the greater name, so every dispatcher chooses the same. Of the winning entry the
//! digest name (`…@sha256:…`) is used when the node reports one, else its tag name.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use gantry_shared::version::Version;

use super::reference::Reference;
use crate::{Error, Result};

/// A cache of every node, kept by a watch (restarted with backoff) until shutdown.
fn spawn_reflector(api: Api<Node>, shutdown: CancellationToken) -> Store<Node> {
    let (reader, writer) = reflector::store();
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                event = stream.next() => match event {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => warn!(error = %e, "the watch of nodes failed; it restarts with backoff"),
                    None => return,
                },
            }
        }
    });
    reader
}

/// The watch cache of the cluster's nodes.
pub(crate) struct NodeImages {
    nodes: Store<Node>,
}

impl NodeImages {
    /// Starts watching every node and waits for the first listing.
    ///
    /// # Errors
    /// The nodes cannot be listed within a minute (the dispatcher's service account needs
    /// `list` and `watch` on `nodes`, a cluster-scoped resource: a ClusterRole).
    pub(crate) async fn watch(client: Client, shutdown: CancellationToken) -> Result<NodeImages> {
        let nodes = spawn_reflector(Api::<Node>::all(client), shutdown);
        if tokio::time::timeout(Duration::from_secs(60), nodes.wait_until_ready())
            .await
            .is_err()
        {
            return Err(Error::CatalogSource {
                origin: "development mode".into(),
                message: "cannot list the cluster's nodes within a minute; the dispatcher needs list and watch on nodes (a ClusterRole)".into(),
            });
        }
        info!(
            nodes = nodes.state().len(),
            "development mode: watching the nodes' images"
        );
        Ok(NodeImages { nodes })
    }

    /// The newest `executor-<class>` image on the nodes that `allowed` accepts, and the
    /// newest one it refused (to name it in the error when nothing else is found).
    pub(crate) fn newest(
        &self,
        class: &str,
        allowed: impl Fn(&Reference) -> bool,
    ) -> (Option<String>, Option<String>) {
        let nodes = self.nodes.state();
        let all: Vec<Vec<Vec<String>>> = nodes.iter().map(node_images).collect();
        let accepted = newest(class, &all, &allowed);
        let refused = if accepted.is_none() {
            newest(class, &all, &|r: &Reference| !allowed(r))
        } else {
            None
        };
        (accepted, refused)
    }
}

/// The names of each image entry of a node.
fn node_images(node: &Arc<Node>) -> Vec<Vec<String>> {
    node.status
        .as_ref()
        .and_then(|s| s.images.as_ref())
        .map(|images| {
            images
                .iter()
                .map(|i| i.names.clone().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

/// The chosen name of the newest `executor-<class>` entry among `nodes` (each a list of
/// image entries, each a list of names), considering only names `allowed` accepts.
pub(crate) fn newest(
    class: &str,
    nodes: &[Vec<Vec<String>>],
    allowed: &dyn Fn(&Reference) -> bool,
) -> Option<String> {
    let wanted = format!("executor-{class}");
    // Chosen name → (its version, on how many nodes).
    let mut found: BTreeMap<String, (Option<Version>, usize)> = BTreeMap::new();
    for node in nodes {
        let mut on_this_node: Vec<(String, Option<Version>)> = Vec::new();
        for entry in node {
            let refs: Vec<(&String, Reference)> = entry
                .iter()
                .filter_map(|n| Some((n, Reference::parse(n)?)))
                .filter(|(_, r)| r.name() == wanted && allowed(r))
                .collect();
            let version = refs
                .iter()
                .filter_map(|(_, r)| r.tag.as_deref().and_then(Version::parse))
                .max();
            let by_digest = refs.iter().find(|(_, r)| r.digest.is_some());
            let by_tag = refs.iter().max_by(|(_, a), (_, b)| {
                let v = |r: &Reference| r.tag.as_deref().and_then(Version::parse);
                v(a).cmp(&v(b))
            });
            if let Some((name, _)) = by_digest.or(by_tag) {
                on_this_node.push(((*name).clone(), version));
            }
        }
        on_this_node.sort();
        on_this_node.dedup();
        for (name, version) in on_this_node {
            let slot = found.entry(name).or_insert((version.clone(), 0));
            slot.0 = slot.0.clone().max(version);
            slot.1 += 1;
        }
    }
    found
        .into_iter()
        .max_by(|(a_name, (a_v, a_n)), (b_name, (b_v, b_n))| {
            a_v.cmp(b_v)
                .then(a_n.cmp(b_n))
                .then_with(|| a_name.cmp(b_name))
        })
        .map(|(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> String {
        format!("sha256:{}", format!("{n:x}").repeat(64))
    }

    fn entry(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    const REPO: &str = "registry.example.com/team/executor-echo";

    #[test]
    fn the_highest_version_wins_and_its_digest_name_is_used() {
        let d1 = format!("{REPO}@{}", digest(1));
        let d2 = format!("{REPO}@{}", digest(2));
        let nodes = vec![
            vec![
                entry(&[&d1, &format!("{REPO}:1.9.3")]),
                entry(&["registry.example.com/team/executor-echo-extra:9.0.0"]),
                entry(&["registry.example.com/team/executor-embed:5.0.0"]),
            ],
            vec![
                entry(&[&d2, &format!("{REPO}:1.10.0")]),
                entry(&[&format!("{REPO}:latest")]),
            ],
        ];
        assert_eq!(newest("echo", &nodes, &|_| true), Some(d2));
    }

    #[test]
    fn an_entry_without_a_digest_name_is_used_by_its_highest_tag() {
        let nodes = vec![vec![entry(&[
            &format!("{REPO}:1.4.2"),
            &format!("{REPO}:1.4"),
            &format!("{REPO}:stable"),
        ])]];
        assert_eq!(
            newest("echo", &nodes, &|_| true),
            Some(format!("{REPO}:1.4.2"))
        );
    }

    #[test]
    fn unversioned_images_rank_below_versioned_ones_and_ties_go_to_the_most_nodes() {
        let dev_a = format!("{REPO}@{}", digest(3));
        let dev_b = format!("{REPO}@{}", digest(4));
        let nodes = vec![
            vec![entry(&[&dev_a, &format!("{REPO}:dev")])],
            vec![entry(&[&dev_a, &format!("{REPO}:dev")])],
            vec![entry(&[&dev_b, &format!("{REPO}:dev")])],
        ];
        assert_eq!(newest("echo", &nodes, &|_| true), Some(dev_a.clone()));
        let mut with_version = nodes.clone();
        with_version.push(vec![entry(&[&format!("{REPO}:0.0.1")])]);
        assert_eq!(
            newest("echo", &with_version, &|_| true),
            Some(format!("{REPO}:0.0.1"))
        );
    }

    #[test]
    fn only_allowed_names_are_considered() {
        let nodes = vec![vec![
            entry(&["docker.io/someone/executor-echo:9.9.9"]),
            entry(&[&format!("{REPO}:1.0.0")]),
        ]];
        let allowed = |r: &Reference| r.is_from("registry.example.com");
        assert_eq!(
            newest("echo", &nodes, &allowed),
            Some(format!("{REPO}:1.0.0"))
        );
        assert_eq!(newest("other", &nodes, &allowed), None);
        assert_eq!(newest("echo", &[], &allowed), None);
    }
}
