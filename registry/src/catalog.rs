//! The catalog: per executor class, the accepted image pinned to its digest, what it can
//! do, who owns it, and when it was added and last validated; and how one refresh's
//! findings change it. What could not be read this time (a registry down, a repository
//! that failed) keeps its entry: only a registry's answer removes one.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::labels::Capabilities;

/// An image accepted for a class, as one refresh read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Image {
    /// `registry.example.com/ml/executor-vllm`.
    pub(crate) repository: String,
    pub(crate) tag: String,
    /// The manifest's digest, or the index's for a multi-platform image.
    pub(crate) digest: String,
    /// The platform whose labels were read, for an index.
    pub(crate) platform: Option<String>,
    pub(crate) capabilities: Capabilities,
    pub(crate) owner: String,
    /// The source it came from, as shown (no password).
    pub(crate) source: String,
}

/// One class of the catalog, as `GET /executors/{class}` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// `repository@digest`: what the dispatcher's Jobs run.
    pub image: String,
    pub capabilities: Capabilities,
    pub owner: String,
    pub tag: String,
    pub repository: String,
    pub digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    pub source: String,
    /// When this image became the class's.
    pub added_at: DateTime<Utc>,
    /// When a refresh last found it still the class's newest accepted image.
    pub validated_at: DateTime<Utc>,
}

impl Entry {
    fn of(image: &Image, added_at: DateTime<Utc>, validated_at: DateTime<Utc>) -> Entry {
        Entry {
            image: format!("{}@{}", image.repository, image.digest),
            capabilities: image.capabilities.clone(),
            owner: image.owner.clone(),
            tag: image.tag.clone(),
            repository: image.repository.clone(),
            digest: image.digest.clone(),
            platform: image.platform.clone(),
            source: image.source.clone(),
            added_at,
            validated_at,
        }
    }
}

/// Executor class → entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    entries: BTreeMap<String, Entry>,
}

impl Catalog {
    pub fn get(&self, class: &str) -> Option<&Entry> {
        self.entries.get(class)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A change of the catalog, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Added {
        class: String,
        entry: Entry,
    },
    Changed {
        class: String,
        previous: Box<Entry>,
        entry: Entry,
    },
    Removed {
        class: String,
        previous: Entry,
        reason: &'static str,
    },
}

/// What one refresh found.
#[derive(Debug, Default)]
pub(crate) struct Found {
    /// Class → its newest accepted image.
    pub(crate) images: BTreeMap<String, Image>,
    /// Classes whose repository was listed (whether or not an image of it was accepted).
    pub(crate) listed: BTreeSet<String>,
    /// Classes whose repository could not be read this time.
    pub(crate) unsure: BTreeSet<String>,
    /// Sources (as shown) whose registry could not be listed this time.
    pub(crate) failed_sources: BTreeSet<String>,
}

/// The catalog after a refresh, and what changed.
pub(crate) fn merge(
    previous: &Catalog,
    found: &Found,
    now: DateTime<Utc>,
) -> (Catalog, Vec<Change>) {
    let mut next = BTreeMap::new();
    // What this refresh could not read stays as it was, unvalidated.
    for (class, entry) in &previous.entries {
        if found.unsure.contains(class) || found.failed_sources.contains(&entry.source) {
            next.insert(class.clone(), entry.clone());
        }
    }
    let mut changes = Vec::new();
    for (class, image) in &found.images {
        if next.contains_key(class) {
            continue;
        }
        let entry = match previous.entries.get(class) {
            Some(prev) if prev.image == format!("{}@{}", image.repository, image.digest) => {
                Entry::of(image, prev.added_at, now)
            }
            Some(prev) => {
                let entry = Entry::of(image, now, now);
                changes.push(Change::Changed {
                    class: class.clone(),
                    previous: Box::new(prev.clone()),
                    entry: entry.clone(),
                });
                entry
            }
            None => {
                let entry = Entry::of(image, now, now);
                changes.push(Change::Added {
                    class: class.clone(),
                    entry: entry.clone(),
                });
                entry
            }
        };
        next.insert(class.clone(), entry);
    }
    for (class, prev) in &previous.entries {
        if !next.contains_key(class) {
            changes.push(Change::Removed {
                class: class.clone(),
                previous: prev.clone(),
                reason: if found.listed.contains(class) {
                    "no tag of its repository is accepted any more (see the refusals)"
                } else {
                    "its repository is no longer in any source"
                },
            });
        }
    }
    (Catalog { entries: next }, changes)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn image(tag: &str, n: char, source: &str) -> Image {
        Image {
            repository: "reg:5000/team/executor-echo".into(),
            tag: tag.into(),
            digest: format!("sha256:{}", n.to_string().repeat(64)),
            platform: None,
            capabilities: Capabilities {
                tasks: vec!["k8s.echo".into()],
                gpus: 0,
                model: None,
            },
            owner: "team".into(),
            source: source.into(),
        }
    }

    fn found(images: &[(&str, Image)]) -> Found {
        Found {
            images: images
                .iter()
                .map(|(c, i)| ((*c).to_owned(), i.clone()))
                .collect(),
            listed: images.iter().map(|(c, _)| (*c).to_owned()).collect(),
            ..Found::default()
        }
    }

    #[test]
    fn an_image_is_added_then_kept_then_replaced_with_its_times() {
        let (t1, t2, t3) = (
            Utc.timestamp_opt(1, 0).unwrap(),
            Utc.timestamp_opt(2, 0).unwrap(),
            Utc.timestamp_opt(3, 0).unwrap(),
        );
        let (c1, changes) = merge(
            &Catalog::default(),
            &found(&[("echo", image("1.0", 'a', "s"))]),
            t1,
        );
        assert!(matches!(&changes[..], [Change::Added { class, .. }] if class == "echo"));
        let (c2, changes) = merge(&c1, &found(&[("echo", image("1.0", 'a', "s"))]), t2);
        assert!(changes.is_empty());
        let e = c2.get("echo").unwrap();
        assert_eq!((e.added_at, e.validated_at), (t1, t2));
        let (c3, changes) = merge(&c2, &found(&[("echo", image("1.1", 'b', "s"))]), t3);
        assert!(
            matches!(&changes[..], [Change::Changed { previous, entry, .. }]
            if previous.tag == "1.0" && entry.tag == "1.1")
        );
        assert_eq!(c3.get("echo").unwrap().added_at, t3);
        assert!(c3.get("echo").unwrap().image.ends_with(&"b".repeat(64)));
    }

    #[test]
    fn what_a_refresh_could_not_read_stays_and_only_an_answer_removes() {
        let t = Utc.timestamp_opt(1, 0).unwrap();
        let (c1, _) = merge(
            &Catalog::default(),
            &found(&[("echo", image("1.0", 'a', "s"))]),
            t,
        );

        let down = Found {
            failed_sources: ["s".to_owned()].into(),
            ..Found::default()
        };
        let (kept, changes) = merge(&c1, &down, t);
        assert!(changes.is_empty());
        assert_eq!(kept, c1);

        let unsure = Found {
            unsure: ["echo".to_owned()].into(),
            ..Found::default()
        };
        assert_eq!(merge(&c1, &unsure, t).0, c1);

        let refused = Found {
            listed: ["echo".to_owned()].into(),
            ..Found::default()
        };
        let (empty, changes) = merge(&c1, &refused, t);
        assert!(empty.is_empty());
        assert!(
            matches!(&changes[..], [Change::Removed { reason, .. }] if reason.contains("accepted"))
        );
        let (_, changes) = merge(&c1, &Found::default(), t);
        assert!(
            matches!(&changes[..], [Change::Removed { reason, .. }] if reason.contains("no longer"))
        );
    }
}
