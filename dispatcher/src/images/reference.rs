//! Image references as Kubernetes and the container runtimes write them
//! (`registry.example.com:5000/team/executor-echo:1.4.2@sha256:…`), and the version order of
//! their tags, without contacting anything.

use std::cmp::Ordering;

/// Docker Hub, where a name without a registry host lives.
const DEFAULT_REGISTRY: &str = "docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reference {
    /// `registry.example.com:5000`; `docker.io` when the name has no host.
    pub(crate) registry: String,
    /// `team/executor-echo`; `library/x` for a one-part Docker Hub name.
    pub(crate) path: String,
    pub(crate) tag: Option<String>,
    /// `sha256:…`, only when it is a well-formed digest.
    pub(crate) digest: Option<String>,
}

impl Reference {
    /// Parses a reference; `None` when it is empty, has an empty part, or carries a digest
    /// that is not `sha256:` + 64 or `sha512:` + 128 lowercase hex digits.
    pub(crate) fn parse(image: &str) -> Option<Reference> {
        let (name, digest) = match image.split_once('@') {
            Some((name, digest)) => (name, Some(valid_digest(digest)?)),
            None => (image, None),
        };
        // A colon after the last slash starts the tag; one before it is a registry port.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (
                &name[..last_slash + i],
                Some(name[last_slash + i + 1..].to_owned()),
            ),
            None => (name, None),
        };
        if name.is_empty() || tag.as_deref() == Some("") || name.split('/').any(str::is_empty) {
            return None;
        }
        let (registry, path) = match name.split_once('/') {
            Some((host, rest)) if host.contains(['.', ':']) || host == "localhost" => {
                (host.to_owned(), rest.to_owned())
            }
            Some(_) => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
            None => (DEFAULT_REGISTRY.to_owned(), format!("library/{name}")),
        };
        Some(Reference {
            registry,
            path,
            tag,
            digest,
        })
    }

    /// `registry/path`, the name without tag or digest.
    pub(crate) fn repository(&self) -> String {
        format!("{}/{}", self.registry, self.path)
    }

    /// The last part of the path (`executor-echo`).
    pub(crate) fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    /// Whether `registry` (`registry.example.com`, `ghcr.io/acme`) holds this image.
    pub(crate) fn is_from(&self, registry: &str) -> bool {
        let prefix = registry.trim_end_matches('/');
        let full = self.repository();
        full.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
    }
}

fn valid_digest(digest: &str) -> Option<String> {
    let (algorithm, hex) = digest.split_once(':')?;
    let len = match algorithm {
        "sha256" => 64,
        "sha512" => 128,
        _ => return None,
    };
    (hex.len() == len && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| digest.to_owned())
}

/// A tag read as a version: `1.4.2`, `v1.10`, `2.0.0-rc.1`. Numbers compare as numbers
/// (missing parts count as 0); a pre-release ranks below its release and pre-release
/// identifiers compare as in semantic versioning; build metadata (`+…`) is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Version {
    core: Vec<u64>,
    pre: Vec<String>,
}

impl Version {
    /// `None` for tags that are not versions (`latest`, `dev`, `main-3f2a1c`).
    pub(crate) fn parse(tag: &str) -> Option<Version> {
        let tag = tag.strip_prefix('v').unwrap_or(tag);
        let tag = tag.split_once('+').map_or(tag, |(t, _)| t);
        let (core, pre) = match tag.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (tag, None),
        };
        let core: Vec<u64> = core
            .split('.')
            .map(|p| {
                (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| p.parse().ok())
                    .flatten()
            })
            .collect::<Option<_>>()?;
        if core.is_empty() || core.len() > 4 {
            return None;
        }
        let pre = match pre {
            Some(p) if p.is_empty() || p.split('.').any(str::is_empty) => return None,
            Some(p) => p.split('.').map(str::to_owned).collect(),
            None => Vec::new(),
        };
        Some(Version { core, pre })
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let len = self.core.len().max(other.core.len());
        let part = |v: &Version, i: usize| v.core.get(i).copied().unwrap_or(0);
        (0..len)
            .map(|i| part(self, i).cmp(&part(other, i)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => pre_cmp(&self.pre, &other.pre),
            })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Semantic versioning's pre-release order: numeric identifiers by value and below
/// alphanumeric ones, which compare as text; a shorter list ranks lower.
fn pre_cmp(a: &[String], b: &[String]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        let order = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            (Ok(_), Err(_)) => Ordering::Less,
            (Err(_), Ok(_)) => Ordering::Greater,
            (Err(_), Err(_)) => x.cmp(y),
        };
        if order.is_ne() {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn references_parse_with_registry_port_tag_and_digest() {
        let r = Reference::parse(&format!(
            "registry.example.com:5000/team/executor-echo:1.4@{D}"
        ))
        .unwrap();
        assert_eq!(r.registry, "registry.example.com:5000");
        assert_eq!(r.path, "team/executor-echo");
        assert_eq!(r.name(), "executor-echo");
        assert_eq!(r.tag.as_deref(), Some("1.4"));
        assert_eq!(r.digest.as_deref(), Some(D));
        let port_only = Reference::parse("localhost:5000/executor-echo").unwrap();
        assert_eq!(port_only.registry, "localhost:5000");
        assert_eq!(port_only.tag, None);
        let hub = Reference::parse("executor-echo:dev").unwrap();
        assert_eq!(hub.repository(), "docker.io/library/executor-echo");
        assert_eq!(
            Reference::parse("acme/executor-echo").unwrap().repository(),
            "docker.io/acme/executor-echo"
        );
    }

    #[test]
    fn malformed_references_and_digests_do_not_parse() {
        assert!(Reference::parse("").is_none());
        assert!(Reference::parse("reg.example/x:").is_none());
        assert!(Reference::parse("reg.example//x").is_none());
        assert!(
            Reference::parse("reg.example/x@sha256:abc").is_none(),
            "short"
        );
        assert!(
            Reference::parse(&format!("reg.example/x@{}", D.to_uppercase())).is_none(),
            "upper case"
        );
        assert!(Reference::parse(&format!("reg.example/x@md5:{}", &D[7..])).is_none());
    }

    #[test]
    fn a_registry_holds_an_image_only_up_to_a_path_boundary() {
        let r = Reference::parse(&format!("ghcr.io/acme/executor-echo@{D}")).unwrap();
        assert!(r.is_from("ghcr.io"));
        assert!(r.is_from("ghcr.io/"));
        assert!(r.is_from("ghcr.io/acme"));
        assert!(!r.is_from("ghcr.i"));
        assert!(!r.is_from("ghcr.io/ac"));
        assert!(
            Reference::parse("executor-echo:1")
                .unwrap()
                .is_from("docker.io")
        );
    }

    #[test]
    fn versions_order_numerically_with_pre_releases_first() {
        let v = |s: &str| Version::parse(s).unwrap();
        assert!(v("1.10.0") > v("1.9.3"));
        assert!(v("v2") > v("1.99"));
        assert_eq!(v("1.4").cmp(&v("1.4.0")), Ordering::Equal);
        assert!(v("2.0.0") > v("2.0.0-rc.2"));
        assert!(v("2.0.0-rc.10") > v("2.0.0-rc.2"));
        assert!(v("2.0.0-rc.1") > v("2.0.0-beta"));
        assert!(v("1.0.0-alpha.1") > v("1.0.0-alpha"));
        assert_eq!(v("1.2.3+build.7").cmp(&v("1.2.3")), Ordering::Equal);
        for not_a_version in ["latest", "dev", "main-3f2a1c", "1.x", "", "1..2", "1.2-"] {
            assert!(Version::parse(not_a_version).is_none(), "{not_a_version}");
        }
    }
}
