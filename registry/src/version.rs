//! Tags read as versions, and their order: the newest version tag of a repository is the
//! image a class gets. The order is the dispatcher's development mode's (its node images):
//! `1.10.0` > `1.9.3`, `v2` > `1.99`, a pre-release below its release, build metadata
//! ignored. Tags that are not versions (`latest`, `dev`, `main-3f2a1c`) and pre-releases
//! (`2.0.0-rc.1`) are never chosen: pushing one changes nothing that runs.

use gantry_shared::version::Version;

/// The release tags of `tags`, newest first (equal versions by tag text, so the order never
/// depends on the registry's), and the other tags (not versions, or pre-releases).
pub(crate) fn newest_first(tags: &[String]) -> (Vec<String>, Vec<String>) {
    let (mut versions, mut others) = (Vec::new(), Vec::new());
    for tag in tags {
        match Version::parse(tag) {
            Some(v) if v.is_release() => versions.push((v, tag.clone())),
            _ => others.push(tag.clone()),
        }
    }
    versions.sort_by(|(a, at), (b, bt)| b.cmp(a).then_with(|| bt.cmp(at)));
    (versions.into_iter().map(|(_, t)| t).collect(), others)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_sort_newest_first_and_the_others_are_set_aside() {
        let tags: Vec<String> = ["1.9.3", "latest", "1.10.0", "2.0.0-rc.1", "v1.10", "dev"]
            .map(str::to_owned)
            .to_vec();
        let (versions, others) = newest_first(&tags);
        assert_eq!(versions, ["v1.10", "1.10.0", "1.9.3"]);
        assert_eq!(others, ["latest", "2.0.0-rc.1", "dev"]);
    }
}
