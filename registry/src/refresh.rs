//! One refresh: every source's repositories `<namespace>/executor-<class>`, listed by the
//! registry (`/v2/_catalog`) or, when the settings name the classes, those classes' alone;
//! for each the newest release tag whose image is accepted, read from its manifest (or, for
//! an index, its linux/amd64 manifest) and its config's labels. Sources are read in order
//! and the first that has a class gives it. What was read about a digest is reused for `cache_ttl`
//! (digests do not change; this bounds the registry's load and how often a refusal is
//! logged), so a refresh that finds nothing new costs a listing, a tag list and a manifest
//! per class.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use gantry_shared::message::ExecutorClass;
use tokio::time::Instant;
use tracing::debug;

use crate::catalog::{Found, Image};
use crate::distribution::Client;
use crate::labels::{self, Capabilities};
use crate::manifest::{self, Manifest, Unreadable};
use crate::refusal::{Reason, Refusal};
use crate::settings::{Settings, Source};
use crate::version;
use crate::{Error, Result};

/// What one refresh found, refused, and could not read.
#[derive(Debug, Default)]
pub(crate) struct Pass {
    pub(crate) found: Found,
    pub(crate) refusals: Vec<Refusal>,
    /// What could not be read, as sentences.
    pub(crate) errors: Vec<String>,
}

/// What was read about one image digest.
#[derive(Debug, Clone)]
struct Inspected {
    capabilities: Capabilities,
    owner: String,
    platform: Option<String>,
}

type Verdict = Result<Inspected, Reason>;

/// What was read about each digest, kept for `cache_ttl`.
pub(crate) struct Verdicts {
    ttl: Duration,
    map: Mutex<HashMap<(String, String), (Instant, Verdict)>>,
}

impl Verdicts {
    pub(crate) fn new(ttl: Duration) -> Verdicts {
        Verdicts {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), (Instant, Verdict)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, repository: &str, digest: &str) -> Option<Verdict> {
        let map = self.lock();
        let (at, verdict) = map.get(&(repository.to_owned(), digest.to_owned()))?;
        (at.elapsed() < self.ttl).then(|| verdict.clone())
    }

    fn put(&self, repository: &str, digest: &str, verdict: Verdict) {
        self.lock().insert(
            (repository.to_owned(), digest.to_owned()),
            (Instant::now(), verdict),
        );
    }

    fn forget_expired(&self) {
        let ttl = self.ttl;
        self.lock().retain(|_, (at, _)| at.elapsed() < ttl);
    }
}

/// The outcome of one repository.
enum Outcome {
    Accepted(Image),
    /// No tag of it is accepted (each refusal is in the pass).
    None,
    /// The registry does not know it (a class named in the settings that this source does
    /// not have, or a repository deleted since the listing).
    Absent,
    /// It could not be read: its entry, if any, stays.
    Unsure(Error),
}

/// Reads every source once.
pub(crate) async fn pass(client: &Client, settings: &Settings, verdicts: &Verdicts) -> Pass {
    verdicts.forget_expired();
    let mut pass = Pass::default();
    // One listing per registry, whatever the number of its namespaces.
    let mut listings: HashMap<String, Option<Vec<String>>> = HashMap::new();
    let mut claimed: BTreeSet<String> = BTreeSet::new();
    for source in &settings.sources {
        let repos = if settings.classes.is_empty() {
            listed(client, source, &mut listings, &mut pass.errors).await
        } else {
            // Named: nothing is listed, so no other namespace is seen either. The registry
            // must answer, as a listing would have to, before its repositories count.
            match client.ping(source).await {
                Ok(()) => Some(
                    settings
                        .classes
                        .iter()
                        .map(|c| source.repository(c.as_str()))
                        .collect(),
                ),
                Err(e) => {
                    pass.errors
                        .push(format!("registry {}: {e}", source.base_url()));
                    None
                }
            }
        };
        let Some(repos) = repos else {
            pass.found.failed_sources.insert(source.to_string());
            continue;
        };
        for repo in &repos {
            let (namespace, name) = split(repo);
            let Some(class) = name.strip_prefix("executor-") else {
                continue;
            };
            if namespace != source.namespace {
                continue;
            }
            let full = format!("{}/{repo}", source.host);
            if let Err(e) = ExecutorClass::parse(class) {
                pass.refusals
                    .push(Refusal::new(full, Reason::BadClass(e.to_string())));
                continue;
            }
            if claimed.contains(class) {
                debug!(repository = %full, class, "shadowed by an earlier source");
                continue;
            }
            match repository(
                client,
                settings,
                verdicts,
                source,
                repo,
                class,
                &mut pass.refusals,
            )
            .await
            {
                Outcome::Accepted(image) => {
                    pass.found.listed.insert(class.to_owned());
                    claimed.insert(class.to_owned());
                    pass.found.images.insert(class.to_owned(), image);
                }
                Outcome::None => {
                    pass.found.listed.insert(class.to_owned());
                }
                Outcome::Absent => {
                    debug!(repository = %full, "no such repository in this source");
                }
                Outcome::Unsure(e) => {
                    pass.found.listed.insert(class.to_owned());
                    claimed.insert(class.to_owned());
                    pass.found.unsure.insert(class.to_owned());
                    pass.errors.push(format!("repository {full}: {e}"));
                }
            }
        }
    }
    refuse_other_namespaces(settings, &listings, &mut pass.refusals);
    pass
}

/// The repositories of the source's registry, listed once per refresh whatever the number
/// of its namespaces; `None` when it could not be listed (the error is recorded).
async fn listed(
    client: &Client,
    source: &Source,
    listings: &mut HashMap<String, Option<Vec<String>>>,
    errors: &mut Vec<String>,
) -> Option<Vec<String>> {
    let key = registry_key(source);
    if !listings.contains_key(&key) {
        let listed = match client.repositories(source).await {
            Ok(mut repos) => {
                repos.sort();
                Some(repos)
            }
            Err(e) => {
                errors.push(format!("registry {}: {e}", source.base_url()));
                None
            }
        };
        listings.insert(key.clone(), listed);
    }
    listings.get(&key).cloned().flatten()
}

/// Sources that share a registry (and its credentials) share its listing.
fn registry_key(source: &Source) -> String {
    format!(
        "{} {}",
        source.base_url(),
        source.username.as_deref().unwrap_or_default()
    )
}

/// `("ml/llm", "executor-x")` of `ml/llm/executor-x`; the namespace of a root repository is
/// empty.
fn split(repo: &str) -> (&str, &str) {
    repo.rsplit_once('/').unwrap_or(("", repo))
}

/// Executor repositories of a watched registry in a namespace no source allows.
fn refuse_other_namespaces(
    settings: &Settings,
    listings: &HashMap<String, Option<Vec<String>>>,
    refusals: &mut Vec<Refusal>,
) {
    for (key, repos) in listings {
        let sources: Vec<&Source> = settings
            .sources
            .iter()
            .filter(|s| registry_key(s) == *key)
            .collect();
        let Some(first) = sources.first() else {
            continue;
        };
        for repo in repos.iter().flatten() {
            let (namespace, name) = split(repo);
            if name.starts_with("executor-") && !sources.iter().any(|s| s.namespace == namespace) {
                refusals.push(Refusal::new(
                    format!("{}/{repo}", first.host),
                    Reason::NamespaceNotAllowed {
                        allowed: sources.iter().map(|s| s.to_string()).collect(),
                    },
                ));
            }
        }
    }
}

/// The newest accepted image of one repository.
async fn repository(
    client: &Client,
    settings: &Settings,
    verdicts: &Verdicts,
    source: &Source,
    repo: &str,
    class: &str,
    refusals: &mut Vec<Refusal>,
) -> Outcome {
    let full = format!("{}/{repo}", source.host);
    let tags = match client.tags(source, repo).await {
        Ok(Some(tags)) => tags,
        Ok(None) => return Outcome::Absent,
        Err(e) => return Outcome::Unsure(e),
    };
    let (releases, others) = version::newest_first(&tags);
    if releases.is_empty() {
        refusals.push(Refusal::new(full, Reason::NoVersionTag { tags: others }));
        return Outcome::None;
    }
    for tag in releases.iter().take(settings.max_tags) {
        let fetched = match client.manifest(source, repo, tag).await {
            Ok(f) => f,
            Err(e) => return Outcome::Unsure(e),
        };
        let verdict = match verdicts.get(&full, &fetched.digest) {
            Some(v) => v,
            None => match inspect(client, source, repo, class, &fetched).await {
                Ok(v) => {
                    verdicts.put(&full, &fetched.digest, v.clone());
                    v
                }
                Err(e) => return Outcome::Unsure(e),
            },
        };
        match verdict {
            Ok(inspected) => {
                return Outcome::Accepted(Image {
                    repository: full,
                    tag: tag.clone(),
                    digest: fetched.digest,
                    platform: inspected.platform,
                    capabilities: inspected.capabilities,
                    owner: inspected.owner,
                    source: source.to_string(),
                });
            }
            Err(reason) => refusals.push(Refusal::of_image(&full, tag, &fetched.digest, reason)),
        }
    }
    Outcome::None
}

/// Reads the labels of an image (of its linux/amd64 manifest, for an index) and checks
/// them.
///
/// # Errors
/// Something could not be fetched or is not what the API promises; a refusal is `Ok(Err)`.
async fn inspect(
    client: &Client,
    source: &Source,
    repo: &str,
    class: &str,
    fetched: &crate::distribution::Fetched,
) -> Result<Verdict> {
    let malformed = |message: String| Error::Malformed {
        url: format!(
            "{}/v2/{repo}/manifests/{}",
            source.base_url(),
            fetched.digest
        ),
        message,
    };
    let read = |content_type: Option<&str>, body: &[u8]| match manifest::parse(content_type, body) {
        Ok(m) => Ok(Ok(m)),
        Err(Unreadable::Refused(reason)) => Ok(Err(reason)),
        Err(Unreadable::Malformed(message)) => Err(malformed(message)),
    };
    let (config, platform) = match read(fetched.content_type.as_deref(), &fetched.body)? {
        Err(reason) => return Ok(Err(reason)),
        Ok(Manifest::Image { config }) => (config, None),
        Ok(Manifest::Index(manifests)) => {
            let Some(chosen) = manifest::pick_platform(&manifests) else {
                return Ok(Err(Reason::NoPlatform));
            };
            let inner = client.manifest(source, repo, &chosen.digest).await?;
            match read(inner.content_type.as_deref(), &inner.body)? {
                Err(reason) => return Ok(Err(reason)),
                Ok(Manifest::Image { config }) => (config, Some(chosen.platform())),
                Ok(Manifest::Index(_)) => {
                    return Ok(Err(Reason::MediaType("an index inside an index".into())));
                }
            }
        }
    };
    let blob = client.blob(source, repo, &config).await?;
    let labels = manifest::labels(&blob).map_err(malformed)?;
    Ok(
        labels::read(class, &labels).map(|(capabilities, owner)| Inspected {
            capabilities,
            owner,
            platform,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_split_into_namespace_and_name() {
        assert_eq!(split("ml/llm/executor-x"), ("ml/llm", "executor-x"));
        assert_eq!(split("executor-x"), ("", "executor-x"));
    }
}
