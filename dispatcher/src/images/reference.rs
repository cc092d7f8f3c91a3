//! Image references as Kubernetes and the container runtimes write them
//! (`registry.example.com:5000/team/executor-echo:1.4.2@sha256:…`), without contacting
//! anything. Their tags are read as versions by [`gantry_shared::version`].

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
}
