//! Why an image is not in the catalog. A refusal is not an error of the service: it is
//! logged (once per `cache_ttl`) and written to the audit log with its reason, listed under
//! `refused` in `GET /executors`, and the class keeps the newest image that is accepted.

use std::fmt;

use serde::Serialize;

/// An image, or a repository, kept out of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// `registry.example.com/ml/executor-vllm`.
    pub repository: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The reason as a sentence.
    #[serde(serialize_with = "as_text")]
    pub reason: Reason,
    /// The reason's label: `namespace_not_allowed`, `missing_label`, ….
    pub kind: &'static str,
}

impl Refusal {
    pub(crate) fn new(repository: String, reason: Reason) -> Refusal {
        Refusal {
            repository,
            tag: None,
            digest: None,
            kind: reason.label(),
            reason,
        }
    }

    pub(crate) fn of_image(repository: &str, tag: &str, digest: &str, reason: Reason) -> Refusal {
        Refusal {
            tag: Some(tag.to_owned()),
            digest: Some(digest.to_owned()),
            ..Refusal::new(repository.to_owned(), reason)
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

fn as_text<S: serde::Serializer>(reason: &Reason, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(reason)
}

/// What is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `executor-*` in a namespace no source allows.
    NamespaceNotAllowed { allowed: Vec<String> },
    /// `executor-<class>` whose class is not a valid executor class name.
    BadClass(String),
    /// No tag of the repository is a release version.
    NoVersionTag { tags: Vec<String> },
    /// A required label is absent or empty.
    MissingLabel(&'static str),
    /// A label's value cannot be read.
    BadLabel {
        label: &'static str,
        value: String,
        expected: String,
    },
    /// `dev.gantry.executor.class` names another class than the repository does.
    OtherClass { label: String },
    /// A manifest or index of a kind the service does not read.
    MediaType(String),
    /// An index without a manifest for Linux.
    NoPlatform,
}

impl Reason {
    /// The label of the reason in logs, the audit log and `refused` listings.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::NamespaceNotAllowed { .. } => "namespace_not_allowed",
            Reason::BadClass(_) => "bad_class",
            Reason::NoVersionTag { .. } => "no_version_tag",
            Reason::MissingLabel(_) => "missing_label",
            Reason::BadLabel { .. } => "bad_label",
            Reason::OtherClass { .. } => "other_class",
            Reason::MediaType(_) => "media_type",
            Reason::NoPlatform => "no_platform",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NamespaceNotAllowed { allowed } => write!(
                f,
                "outside the allowlist: its namespace is not one of the sources ({}); push it to one of them or add a source",
                allowed.join(", ")
            ),
            Reason::BadClass(message) => write!(f, "not an executor class: {message}"),
            Reason::NoVersionTag { tags } => write!(
                f,
                "no release version tag (like 1.4.2) among its tags [{}]; tags that are not versions and pre-releases are never chosen",
                tags.join(", ")
            ),
            Reason::MissingLabel(label) => write!(
                f,
                "it has no label {label}; build it with `LABEL {label}=…` (docs/registry.md lists the labels)"
            ),
            Reason::BadLabel {
                label,
                value,
                expected,
            } => write!(f, "label {label}={value:?}: {expected}"),
            Reason::OtherClass { label } => write!(
                f,
                "its label dev.gantry.executor.class says {label:?}, not the class its repository names; push it to executor-{label}"
            ),
            Reason::MediaType(media_type) => write!(
                f,
                "its manifest is a {media_type:?}, not an OCI or Docker v2 image manifest or index"
            ),
            Reason::NoPlatform => write!(f, "its index has no manifest for linux"),
        }
    }
}
