//! Reading what a registry serves about an image, without fetching anything: a manifest
//! (OCI or Docker v2), an index of per-platform manifests (OCI image index or Docker
//! manifest list), and an image config's labels.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::refusal::Reason;

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The `Accept` header of a manifest request: every kind read here.
pub(crate) const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// A manifest, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Manifest {
    /// One image: its config blob's digest.
    Image { config: String },
    /// One manifest per platform.
    Index(Vec<Platformed>),
}

/// A manifest of an index, with its platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Platformed {
    pub(crate) digest: String,
    pub(crate) os: String,
    pub(crate) architecture: String,
    pub(crate) variant: Option<String>,
}

impl Platformed {
    /// `linux/arm64/v8`.
    pub(crate) fn platform(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    media_type: Option<String>,
    config: Option<Descriptor>,
    manifests: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

/// Why a manifest cannot be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unreadable {
    /// A kind of manifest the service does not take: the image is refused.
    Refused(Reason),
    /// Not JSON of any manifest: the registry's answer is wrong.
    Malformed(String),
}

/// Reads a manifest served with `content_type` (the body's own `mediaType` when the header
/// is missing or generic).
pub(crate) fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Manifest, Unreadable> {
    let raw: Raw = serde_json::from_slice(body)
        .map_err(|e| Unreadable::Malformed(format!("not a manifest: {e}")))?;
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim())
        .filter(|c| c.starts_with("application/vnd."));
    let media_type = header
        .or(raw.media_type.as_deref())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            // OCI lets a manifest leave out its mediaType: tell by its fields.
            if raw.manifests.is_some() {
                OCI_INDEX
            } else {
                OCI_MANIFEST
            }
            .to_owned()
        });
    match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => match raw.config {
            Some(config) => Ok(Manifest::Image {
                config: config.digest,
            }),
            None => Err(Unreadable::Malformed(
                "an image manifest without config".into(),
            )),
        },
        OCI_INDEX | DOCKER_LIST => Ok(Manifest::Index(
            raw.manifests
                .unwrap_or_default()
                .into_iter()
                .filter_map(|d| {
                    let p = d.platform?;
                    Some(Platformed {
                        digest: d.digest,
                        os: p.os,
                        architecture: p.architecture,
                        variant: p.variant,
                    })
                })
                .collect(),
        )),
        other => Err(Unreadable::Refused(Reason::MediaType(other.to_owned()))),
    }
}

/// The manifest of an index whose labels stand for the image: linux/amd64 first, else the
/// first for linux. Attestations (`unknown/unknown`) are never it.
pub(crate) fn pick_platform(manifests: &[Platformed]) -> Option<&Platformed> {
    manifests
        .iter()
        .find(|m| m.os == "linux" && m.architecture == "amd64")
        .or_else(|| manifests.iter().find(|m| m.os == "linux"))
}

#[derive(Deserialize)]
struct ImageConfig {
    config: Option<ContainerConfig>,
}

#[derive(Deserialize)]
struct ContainerConfig {
    #[serde(rename = "Labels")]
    labels: Option<BTreeMap<String, String>>,
}

/// The labels of an image config blob (`config.Labels`); none is an empty map.
///
/// # Errors
/// The blob is not an image config.
pub(crate) fn labels(config_blob: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let config: ImageConfig =
        serde_json::from_slice(config_blob).map_err(|e| format!("not an image config: {e}"))?;
    Ok(config.config.and_then(|c| c.labels).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn image_manifests_are_told_by_header_by_body_or_by_their_fields() {
        let body =
            format!(r#"{{"schemaVersion":2,"config":{{"digest":"{D}","size":1}},"layers":[]}}"#);
        let image = Manifest::Image { config: D.into() };
        assert_eq!(parse(Some(OCI_MANIFEST), body.as_bytes()).unwrap(), image);
        assert_eq!(
            parse(Some("application/json"), body.as_bytes()).unwrap(),
            image
        );
        assert_eq!(parse(None, body.as_bytes()).unwrap(), image);
        let v1 = parse(
            Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
            body.as_bytes(),
        )
        .unwrap_err();
        assert!(matches!(v1, Unreadable::Refused(Reason::MediaType(_))));
        assert!(matches!(
            parse(None, b"<html>"),
            Err(Unreadable::Malformed(_))
        ));
    }

    #[test]
    fn an_index_gives_linux_amd64_first_and_never_an_attestation() {
        let entry = |os: &str, arch: &str, n: char| {
            format!(
                r#"{{"digest":"sha256:{}","size":1,"platform":{{"os":"{os}","architecture":"{arch}"}}}}"#,
                n.to_string().repeat(64)
            )
        };
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{},{},{}]}}"#,
            entry("unknown", "unknown", 'a'),
            entry("linux", "arm64", 'b'),
            entry("linux", "amd64", 'c')
        );
        let Manifest::Index(list) = parse(None, body.as_bytes()).unwrap() else {
            panic!("an index")
        };
        assert_eq!(pick_platform(&list).unwrap().platform(), "linux/amd64");
        assert_eq!(pick_platform(&list[..2]).unwrap().platform(), "linux/arm64");
        assert_eq!(pick_platform(&list[..1]), None);
    }

    #[test]
    fn labels_come_from_the_config_and_may_be_absent() {
        let l = labels(br#"{"architecture":"amd64","config":{"Labels":{"a":"1"}}}"#).unwrap();
        assert_eq!(l.get("a").map(String::as_str), Some("1"));
        assert!(labels(br#"{"config":{"Labels":null}}"#).unwrap().is_empty());
        assert!(labels(br#"{"architecture":"amd64"}"#).unwrap().is_empty());
        assert!(labels(b"[]").is_err());
    }
}
