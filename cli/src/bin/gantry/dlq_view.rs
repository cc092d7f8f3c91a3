//! How `gantry dlq` prints: tables of dead letters, one dead letter in full, and the
//! summary of a replay or purge.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use gantry_cli::dlq::{Entry, Listing, Summary};
use gantry_producer::human_duration;
use gantry_shared::store::DeadLetterRecord;
use serde_json::Value;

use crate::view::{Block, pretty, timestamp};

/// Longest reason shown in a table cell; `gantry dlq show` prints it whole.
const REASON_WIDTH: usize = 72;

/// The warning `list` prints when the queue and Postgres disagree.
pub(crate) fn mismatch(queue: &str, depth: u32, unhandled: i64) -> String {
    format!(
        "{queue} holds {depth} message{}, but Postgres records {unhandled} dead letter{} not yet replayed or purged. \
         The recorder may not have caught up (is a dispatcher running?), a replay or purge may be running, or messages \
         were moved outside `gantry dlq` (e.g. in the management UI). Replay and purge act on what the queue holds.",
        plural(u64::from(depth)),
        plural(u64::try_from(unhandled).unwrap_or(0)),
    )
}

/// The page of `dlq list`: where the queue stands, then a table.
pub(crate) fn listing(listing: &Listing, queue: &str, depth: Option<u32>, all: bool) -> String {
    let mut text = String::new();
    if let Some(depth) = depth {
        let _ = writeln!(
            text,
            "{queue} holds {depth} message{} now",
            plural(u64::from(depth))
        );
    }
    let which = if all {
        "including those replayed or purged"
    } else {
        "not yet replayed or purged"
    };
    let _ = writeln!(
        text,
        "page {} of {}, {} matching ({which})",
        listing.page,
        listing.pages(),
        listing.total
    );
    if listing.dead_letters.is_empty() {
        if listing.total > 0 {
            let _ = writeln!(text, "no dead letters on this page");
        }
        return text;
    }
    text.push('\n');
    let mut header = vec![
        "id", "dead_at", "kind", "executor", "task", "task_id", "reason",
    ];
    if all {
        header.insert(6, "handled");
    }
    let rows: Vec<Vec<String>> = listing
        .dead_letters
        .iter()
        .map(|d| {
            let mut row = vec![
                d.id.to_string(),
                second(d.dead_at),
                d.reason_kind.clone(),
                dash(d.executor.as_deref()),
                dash(d.task.as_deref()),
                dash(d.task_id.map(|t| t.to_string()).as_deref()),
                truncate(&d.reason, REASON_WIDTH),
            ];
            if all {
                row.insert(6, handled(d));
            }
            row
        })
        .collect();
    text.push_str(&table(&header, &rows));
    if listing.page < listing.pages() {
        let _ = writeln!(text, "\nnext page: --page {}", listing.page + 1);
    }
    text
}

/// One dead letter in full, for `dlq show`.
pub(crate) fn record(d: &DeadLetterRecord) -> String {
    let mut block = Block::default();
    block.row("id", d.id.to_string());
    block.opt("message_id", d.message_id.as_deref());
    block.opt("task_id", d.task_id.map(|t| t.to_string()));
    block.opt("task", d.task.as_deref());
    block.opt("executor", d.executor.as_deref());
    block.row("reason_kind", d.reason_kind.as_str());
    block.row("reason", d.reason.as_str());
    block.row("dead_at", timestamp(d.dead_at));
    block.row("recorded_at", timestamp(d.recorded_at));
    block.opt(
        "replayed_at",
        d.replayed_at.map(|t| {
            format!(
                "{} ({} replay{})",
                timestamp(t),
                d.replay_count,
                plural(d.replay_count.max(0) as u64)
            )
        }),
    );
    block.opt("purged_at", d.purged_at.map(timestamp));
    let mut text = block.render();
    if let Some(deaths) = d
        .death
        .as_ref()
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
    {
        text.push_str("\nx-death (RabbitMQ's dead-letter history, newest first)\n");
        let rows: Vec<Vec<String>> = deaths.iter().map(death_row).collect();
        text.push_str(&indent(&table(
            &[
                "queue",
                "reason",
                "count",
                "time",
                "exchange",
                "routing_keys",
            ],
            &rows,
        )));
    }
    // `x-death` is the table above, when there is one.
    let shown_above = |k: &str| k == "x-death" && text.contains("\nx-death (");
    let headers: Vec<(&String, &Value)> = d
        .headers
        .as_object()
        .map(|h| h.iter().filter(|(k, _)| !shown_above(k)).collect())
        .unwrap_or_default();
    if !headers.is_empty() {
        text.push_str("\nheaders\n");
        let width = headers.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in headers {
            let value = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(text, "  {k:width$}  {value}");
        }
    }
    let (body, format) = body(&d.body);
    let _ = writeln!(
        text,
        "\nbody ({format}, {} bytes{})",
        d.body.len(),
        if d.body_truncated {
            ", truncated: only the first 64 KiB were recorded"
        } else {
            ""
        }
    );
    let shown = match &body {
        Value::String(s) => s.clone(),
        other => pretty(other),
    };
    text.push_str(&indent(&shown));
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// One dead letter as JSON: the record with its body decoded (`body_format` says how).
pub(crate) fn record_json(d: &DeadLetterRecord) -> Value {
    let mut v = serde_json::to_value(d).unwrap_or(Value::Null);
    let (body, format) = body(&d.body);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("body".into(), body);
        obj.insert("body_format".into(), Value::String(format.into()));
        obj.insert("body_bytes".into(), Value::from(d.body.len()));
    }
    v
}

/// The body as JSON if it parses, else as (lossy) text.
fn body(bytes: &[u8]) -> (Value, &'static str) {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => (v, "json"),
        Err(_) => (
            Value::String(String::from_utf8_lossy(bytes).into_owned()),
            "text",
        ),
    }
}

fn death_row(d: &Value) -> Vec<String> {
    let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
    let time = d
        .get("time")
        .and_then(Value::as_i64)
        .and_then(|t| Utc.timestamp_opt(t, 0).single())
        .map_or_else(|| "-".to_owned(), second);
    let keys = d
        .get("routing-keys")
        .and_then(Value::as_array)
        .map(|k| {
            k.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    vec![
        s("queue"),
        s("reason"),
        d.get("count").map_or_else(|| "-".into(), Value::to_string),
        time,
        s("exchange"),
        keys,
    ]
}

/// The dead letters a pass selected, as a table; `replay` adds the attempt each starts.
pub(crate) fn entries(entries: &[Entry], replay: bool) -> String {
    let header: &[&str] = if replay {
        &["id", "task_id", "executor", "new_attempt", "reason"]
    } else {
        &["id", "task_id", "executor", "dead_at", "reason"]
    };
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.id.to_string(),
                dash(e.task_id.map(|t| t.to_string()).as_deref()),
                dash(e.executor.as_deref()),
                if replay {
                    dash(e.attempt.map(|a| a.to_string()).as_deref())
                } else {
                    second(e.dead_at)
                },
                truncate(&e.reason, REASON_WIDTH),
            ]
        })
        .collect();
    table(header, &rows)
}

/// What a replay or purge did, or in a dry run would do.
pub(crate) fn summary(s: &Summary) -> String {
    let replay = s.action == "replay";
    let (did, would) = if replay {
        ("replayed", "would replay")
    } else {
        ("purged", "would purge")
    };
    let mut text = String::new();
    if s.dry_run {
        if !s.done.is_empty() {
            text.push_str(&entries(&s.done, replay));
            text.push('\n');
        }
        let untouched = if replay {
            "nothing was published, acked or recorded"
        } else {
            "nothing was removed or recorded"
        };
        let _ = writeln!(
            text,
            "dry run: {would} {} of {} message{} in {}; {untouched}, and every message is back in the queue",
            s.done.len(),
            s.read,
            plural(s.read),
            s.queue
        );
    } else {
        // A rate means something over a second or more.
        let rate = if s.elapsed.as_secs() >= 1 {
            format!(" ({:.0}/s)", s.per_second())
        } else {
            String::new()
        };
        let _ = writeln!(
            text,
            "{did} {} of {} matching dead letter{} from {} in {}{rate}",
            s.done.len(),
            s.matched,
            plural(s.matched),
            s.queue,
            human_duration(s.elapsed),
        );
    }
    let label = if s.dry_run { would } else { did };
    let mut row = |name: &str, n: u64, note: String| {
        let _ = writeln!(text, "  {name:<12} {n:>7}{note}");
    };
    row(
        "read",
        s.read,
        format!("  of {} in the queue at the start", s.queue_depth),
    );
    row("matched", s.matched, String::new());
    row(label, s.done.len() as u64, String::new());
    row(
        "kept",
        s.kept,
        format!("  not matching: left in {} untouched", s.queue),
    );
    let still = if s.failed.is_empty() {
        String::new()
    } else {
        format!("  still in {}:", s.queue)
    };
    row("failed", s.failed.len() as u64, still);
    for f in &s.failed {
        let task = f
            .entry
            .task_id
            .map(|t| format!(" (task {t})"))
            .unwrap_or_default();
        let _ = writeln!(text, "    {}{task}: {}", f.entry.id, f.error);
    }
    if let Some(why) = &s.stopped {
        let _ = writeln!(
            text,
            "stopped early ({why}): what was not read is still in {}; run the same command again to go on",
            s.queue
        );
    }
    text
}

/// Columns padded to their widest cell, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:w$}  ");
            }
        }
        let _ = writeln!(text, "{}", out.trim_end());
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    text
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let cut: String = s.chars().take(width - 1).collect();
    format!("{cut}…")
}

fn dash(s: Option<&str>) -> String {
    s.unwrap_or("-").to_owned()
}

fn handled(d: &DeadLetterRecord) -> String {
    match (d.replayed_at, d.purged_at) {
        (_, Some(_)) => "purged".into(),
        (Some(_), None) => "replayed".into(),
        (None, None) => "-".into(),
    }
}

/// RFC 3339 in UTC to the second: what a table has room for.
fn second(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> DeadLetterRecord {
        let at: DateTime<Utc> = "2026-11-23T10:00:00Z".parse().unwrap();
        DeadLetterRecord {
            id: "0f8e4c2a-5d1b-4e7f-9a3c-6b2d8e1f4a70".parse().unwrap(),
            message_id: Some("5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90".into()),
            task_id: Some("5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90".parse().unwrap()),
            task: Some("demo.echo".into()),
            executor: Some("echo".into()),
            reason: "expired: the task's TTL ran out while it waited in gantry.tasks.echo".into(),
            reason_kind: "expired".into(),
            death: Some(json!([{
                "queue": "gantry.tasks.echo", "reason": "expired", "count": 1,
                "time": 1_795_428_000, "exchange": "gantry.tasks", "routing-keys": ["echo"]
            }])),
            headers: json!({"x-gantry-attempt": 1}),
            body: br#"{"task_id":"5b0e7a64-3d8c-4f0e-9a51-8f4e2c1d7b90","attempt":1}"#.to_vec(),
            body_truncated: false,
            dead_at: at,
            recorded_at: at,
            replayed_at: None,
            replay_count: 0,
            purged_at: None,
        }
    }

    #[test]
    fn show_prints_the_death_history_headers_and_pretty_body() {
        let text = super::record(&record());
        assert!(text.starts_with("id               0f8e4c2a-"), "{text}");
        assert!(text.contains("\nx-death"), "{text}");
        assert!(
            text.contains("gantry.tasks.echo  expired  1      2026-11-23T10:00:00Z"),
            "{text}"
        );
        assert!(text.contains("  x-gantry-attempt  1\n"), "{text}");
        assert!(
            text.contains("body (json, 62 bytes)\n  {\n    \"attempt\": 1,"),
            "{text}"
        );
        let v = record_json(&record());
        assert_eq!(v["body"]["attempt"], 1);
        assert_eq!(v["body_format"], "json");
        let mut text_body = record();
        text_body.body = b"not json".to_vec();
        text_body.body_truncated = true;
        let text = super::record(&text_body);
        assert!(text.contains("body (text, 8 bytes, truncated"), "{text}");
        assert!(text.ends_with("  not json\n"), "{text}");
    }

    #[test]
    fn tables_align_and_reasons_are_cut() {
        let t = table(&["a", "bb"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "a    bb\nxxx  y\n");
        assert_eq!(truncate("abcdef", 4), "abc…");
        let listing = Listing {
            total: 120,
            page: 1,
            limit: 50,
            dead_letters: vec![record()],
        };
        let text = listing_text(&listing);
        assert!(text.contains("page 1 of 3, 120 matching"), "{text}");
        assert!(text.contains("next page: --page 2"), "{text}");
    }

    fn listing_text(l: &Listing) -> String {
        super::listing(l, "gantry.dead", Some(120), false)
    }
}
