//! Image tags read as versions, and their order, as the dispatcher's development mode (the
//! node images it picks) and the executor registry service (the newest release tag of a
//! repository) both rank them.

use std::cmp::Ordering;

/// A tag read as a version: `1.4.2`, `v1.10`, `2.0.0-rc.1`. Numbers compare as numbers
/// (missing parts count as 0); a pre-release ranks below its release and pre-release
/// identifiers compare as in semantic versioning; build metadata (`+…`) is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    core: Vec<u64>,
    pre: Vec<String>,
}

impl Version {
    /// `None` for tags that are not versions (`latest`, `dev`, `main-3f2a1c`).
    pub fn parse(tag: &str) -> Option<Version> {
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

    /// Whether it is a release (no pre-release part).
    pub fn is_release(&self) -> bool {
        self.pre.is_empty()
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
