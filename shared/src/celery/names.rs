//! Which executor class runs a Celery task: the class whose `celery.tasks` (exact names, or
//! patterns with `*` wildcards) claim its name.

use super::class::CeleryClass;
use crate::catalog::Catalog;
use crate::message::ExecutorClass;

/// The class that claims the Celery task `name`, with its Celery settings. An exact name
/// wins over a pattern; among patterns the longest wins, and among equally long ones the
/// class that sorts first.
pub fn claim<'a>(catalog: &'a Catalog, name: &str) -> Option<(&'a ExecutorClass, &'a CeleryClass)> {
    let mut best: Option<(usize, &ExecutorClass, &CeleryClass)> = None;
    for (class, spec) in catalog.iter() {
        let Some(celery) = spec.celery.as_ref() else {
            continue;
        };
        for pattern in &celery.tasks {
            if !matches(pattern, name) {
                continue;
            }
            // Exact names rank above every pattern.
            let rank = if pattern.contains('*') {
                pattern.len()
            } else {
                usize::MAX
            };
            if best.is_none_or(|(r, _, _)| rank > r) {
                best = Some((rank, class, celery));
            }
        }
    }
    best.map(|(_, class, celery)| (class, celery))
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
fn matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let pieces: Vec<&str> = parts.collect();
    let Some((last, middle)) = pieces.split_last() else {
        return rest.is_empty();
    };
    for piece in middle {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn patterns_match_with_wildcards() {
        assert!(matches("media.thumbnail", "media.thumbnail"));
        assert!(!matches("media.thumbnail", "media.thumbnails"));
        assert!(matches("media.*", "media.thumbnail"));
        assert!(matches("*", "anything"));
        assert!(matches("a.*.c", "a.b.c"));
        assert!(!matches("a.*.c", "a.b.d"));
        assert!(matches("*.echo", "proj.echo"));
        assert!(!matches("ab*ba", "aba"));
    }

    #[test]
    fn an_exact_name_beats_a_pattern_and_a_longer_pattern_beats_a_shorter_one() {
        let catalog = Catalog::parse(
            "executors:\n  any:\n    engine: { kind: echo }\n    celery: { tasks: [\"*\"] }\n  media:\n    engine: { kind: echo }\n    celery: { tasks: [\"media.*\"], ttl: 5m }\n  thumb:\n    engine: { kind: echo }\n    celery: { tasks: [media.thumbnail] }\n  plain:\n    engine: { kind: echo }\n",
            "t",
        )
        .unwrap();
        let class = |name: &str| claim(&catalog, name).map(|(c, _)| c.to_string());
        assert_eq!(class("media.thumbnail").as_deref(), Some("thumb"));
        assert_eq!(class("media.resize").as_deref(), Some("media"));
        assert_eq!(class("other").as_deref(), Some("any"));
        let (_, media) = claim(&catalog, "media.resize").unwrap();
        assert_eq!(media.ttl, Duration::from_secs(300));
        let none = Catalog::parse(
            "executors:\n  a:\n    engine: { kind: echo }\n    celery: { tasks: [x] }\n",
            "t",
        )
        .unwrap();
        assert!(claim(&none, "y").is_none());
        assert!(
            Catalog::parse(
                "executors:\n  a:\n    engine: { kind: echo }\n    celery: { tasks: [] }\n",
                "t"
            )
            .unwrap_err()
            .to_string()
            .contains("celery.tasks")
        );
    }
}
