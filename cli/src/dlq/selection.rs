//! What a `gantry dlq` command acts on: a [`Selection`] of dead letters, matched the same
//! way against a message read from `<prefix>.dead` and against a row in Postgres, and the
//! points in time operators write on the command line.

use std::fmt;

use chrono::{DateTime, Utc};
use gantry_shared::dead_letter::Label;
use gantry_shared::store::DeadLetterFilter;

use crate::{Error, Result};

/// Which dead letters a replay or a purge takes. Every condition that is set must hold;
/// a selection with no condition at all is refused (see [`Selection::is_chosen`]), so a
/// forgotten flag never means "everything".
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Every dead letter (`--all`); the filter, if any, still narrows it.
    pub all: bool,
    /// Ids, reason kind, executor, task name, task id and dead-at window. Its
    /// `include_handled` is ignored: whatever is still in the queue is unhandled.
    pub filter: DeadLetterFilter,
}

impl Selection {
    /// Every dead letter in the queue.
    pub fn all() -> Selection {
        Selection {
            all: true,
            filter: DeadLetterFilter::default(),
        }
    }

    /// Only these dead letters.
    pub fn ids(ids: impl IntoIterator<Item = uuid::Uuid>) -> Selection {
        Selection {
            all: false,
            filter: DeadLetterFilter {
                ids: ids.into_iter().collect(),
                ..DeadLetterFilter::default()
            },
        }
    }

    /// The dead letters `filter` matches.
    pub fn filtered(filter: DeadLetterFilter) -> Selection {
        Selection { all: false, filter }
    }

    /// Whether anything was chosen: `--all`, ids, or at least one filter.
    pub fn is_chosen(&self) -> bool {
        self.all || has_condition(&self.filter)
    }

    /// Whether the dead letter read from a message is selected. The same conditions as
    /// [`gantry_shared::store::Store::find_dead_letters`] applies in SQL: equal reason
    /// kind, executor, task name and task id; `since <= dead_at < until`; id among `ids`.
    pub fn matches(&self, letter: &Label) -> bool {
        if !self.is_chosen() {
            return false;
        }
        let f = &self.filter;
        let same = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        same(&f.reason_kind, Some(letter.reason_kind()))
            && same(&f.executor, letter.executor.as_deref())
            && same(&f.task, letter.task.as_deref())
            && f.task_id.is_none_or(|t| letter.task_id == Some(t))
            && f.since.is_none_or(|since| letter.dead_at >= since)
            && f.until.is_none_or(|until| letter.dead_at < until)
            && (f.ids.is_empty() || f.ids.contains(&letter.id))
    }

    /// The same selection as a Postgres filter over dead letters not yet handled.
    pub fn to_filter(&self) -> DeadLetterFilter {
        DeadLetterFilter {
            include_handled: false,
            ..self.filter.clone()
        }
    }
}

/// `all dead letters`, `executor = echo, reason = expired`, … for messages.
impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.filter;
        let mut parts = Vec::new();
        match d.ids.len() {
            0 => {}
            1 => parts.push("1 id".into()),
            n => parts.push(format!("{n} ids")),
        }
        let mut put = |name: &str, v: Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{name} = {v}"));
            }
        };
        put("reason", d.reason_kind.clone());
        put("executor", d.executor.clone());
        put("task", d.task.clone());
        put("task id", d.task_id.map(|t| t.to_string()));
        put("dead since", d.since.map(|t| t.to_rfc3339()));
        put("dead before", d.until.map(|t| t.to_rfc3339()));
        match (self.all, parts.is_empty()) {
            (_, false) => f.write_str(&parts.join(", ")),
            (true, true) => f.write_str("all dead letters"),
            (false, true) => f.write_str("nothing"),
        }
    }
}

fn has_condition(f: &DeadLetterFilter) -> bool {
    !f.ids.is_empty()
        || f.reason_kind.is_some()
        || f.executor.is_some()
        || f.task.is_some()
        || f.task_id.is_some()
        || f.since.is_some()
        || f.until.is_some()
}

/// A point in time as operators write it: RFC 3339 (`2026-11-23T10:00:00Z`), or a
/// duration back from `now` (`90s`, `2h`, `7d`, `1h 30m`).
///
/// # Errors
/// [`Error::InvalidTime`] when it is neither.
pub fn parse_time(input: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>> {
    let text = input.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let ago = parse_age(text)?;
    Ok(now - ago)
}

/// A duration back from now (`7d`, `36h`), for `--older-than`.
///
/// # Errors
/// [`Error::InvalidTime`] when it is not a duration, or one too long to subtract.
pub fn parse_age(input: &str) -> Result<chrono::Duration> {
    let invalid = |reason: String| Error::InvalidTime {
        input: input.to_owned(),
        reason,
    };
    let d = humantime::parse_duration(input.trim()).map_err(|e| invalid(e.to_string()))?;
    chrono::Duration::from_std(d).map_err(|_| invalid("the duration is too long".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, FieldTable};
    use serde_json::json;

    fn letter(executor: &str, reason: &str, dead_at: i64) -> Label {
        let mut h = FieldTable::default();
        h.insert(
            "x-gantry-reason".into(),
            AMQPValue::LongString(reason.into()),
        );
        h.insert(
            "x-gantry-dead-at".into(),
            AMQPValue::Timestamp(dead_at as u64),
        );
        let body = json!({
            "task_id": "5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90",
            "task": "demo.echo",
            "executor": executor,
        });
        Label::read(
            &BasicProperties::default().with_headers(h),
            &serde_json::to_vec(&body).unwrap(),
        )
    }

    #[test]
    fn an_empty_selection_matches_nothing_and_all_matches_everything() {
        let d = letter("echo", "expired: ran out", 1_700_000_000);
        assert!(!Selection::default().is_chosen());
        assert!(!Selection::default().matches(&d));
        assert!(Selection::all().matches(&d));
        assert_eq!(Selection::default().to_string(), "nothing");
        assert_eq!(Selection::all().to_string(), "all dead letters");
    }

    #[test]
    fn every_condition_must_hold() {
        let d = letter("echo", "expired: ran out", 1_700_000_000);
        let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        let f = |edit: fn(&mut DeadLetterFilter)| {
            let mut filter = DeadLetterFilter::default();
            edit(&mut filter);
            Selection::filtered(filter)
        };
        assert!(f(|f| f.executor = Some("echo".into())).matches(&d));
        assert!(!f(|f| f.executor = Some("vllm".into())).matches(&d));
        assert!(f(|f| f.reason_kind = Some("expired".into())).matches(&d));
        assert!(!f(|f| f.reason_kind = Some("invalid".into())).matches(&d));
        assert!(f(|f| f.task = Some("demo.echo".into())).matches(&d));
        let mut window = DeadLetterFilter {
            since: Some(at(1_700_000_000)),
            until: Some(at(1_700_000_001)),
            ..DeadLetterFilter::default()
        };
        assert!(Selection::filtered(window.clone()).matches(&d));
        window.until = Some(at(1_700_000_000));
        assert!(
            !Selection::filtered(window).matches(&d),
            "until is exclusive"
        );
        assert!(Selection::ids([d.id]).matches(&d));
        assert!(!Selection::ids([uuid::Uuid::new_v4()]).matches(&d));
        let mut both = Selection::ids([d.id]);
        both.filter.executor = Some("vllm".into());
        assert!(!both.matches(&d));
        assert_eq!(
            f(|f| f.executor = Some("echo".into())).to_string(),
            "executor = echo"
        );
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_back_from_now() {
        let now: DateTime<Utc> = "2026-11-23T10:00:00Z".parse().unwrap();
        assert_eq!(
            parse_time("2h", now).unwrap(),
            "2026-11-23T08:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(
            parse_time("7d", now).unwrap(),
            "2026-11-16T10:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(
            parse_time("2026-11-20T01:02:03+01:00", now).unwrap(),
            "2026-11-20T00:02:03Z".parse::<DateTime<Utc>>().unwrap()
        );
        let e = parse_time("yesterday", now).unwrap_err().to_string();
        assert!(e.contains("RFC 3339"), "{e}");
    }
}
