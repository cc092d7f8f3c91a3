//! Label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`) and
//! field selectors (`metadata.name=x`, and the few other fields each kind supports), parsed
//! and matched as the API server does; a malformed selector or an unsupported field is a 400.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::kinds::Kind;
use crate::status::{ApiError, ApiResult};

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty one matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub(crate) fn parse(s: &str) -> ApiResult<LabelSelector> {
        let bad = |why: &str| {
            ApiError::bad_request(format!(
                "unable to parse requirement: {why} (label selector {s:?})"
            ))
        };
        let mut reqs = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let req = if let Some(key) = part.strip_prefix('!') {
                Requirement::NotExists(checked_key(key.trim()).map_err(|e| bad(&e))?)
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(
                    checked_key(k.trim()).map_err(|e| bad(&e))?,
                    checked_value(v.trim()).map_err(|e| bad(&e))?,
                )
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(
                    checked_key(k.trim()).map_err(|e| bad(&e))?,
                    checked_value(v.trim()).map_err(|e| bad(&e))?,
                )
            } else if let Some((k, set)) = split_set(part, " notin ") {
                Requirement::NotIn(
                    checked_key(k).map_err(|e| bad(&e))?,
                    parse_set(set).map_err(|e| bad(&e))?,
                )
            } else if let Some((k, set)) = split_set(part, " in ") {
                Requirement::In(
                    checked_key(k).map_err(|e| bad(&e))?,
                    parse_set(set).map_err(|e| bad(&e))?,
                )
            } else {
                Requirement::Exists(checked_key(part).map_err(|e| bad(&e))?)
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, set) => labels.get(k).is_some_and(|v| set.contains(v)),
            Requirement::NotIn(k, set) => labels.get(k).is_none_or(|v| !set.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }

    /// Whether `object`'s `metadata.labels` match.
    pub(crate) fn matches_object(&self, object: &Value) -> bool {
        self.0.is_empty() || self.matches(&labels_of(object))
    }
}

/// The labels of an object.
pub(crate) fn labels_of(object: &Value) -> BTreeMap<String, String> {
    string_map(object.pointer("/metadata/labels"))
}

/// A JSON object of strings as a map (anything else is empty).
pub(crate) fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// Splits on commas outside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn split_set<'a>(part: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    let (k, rest) = part.split_once(op)?;
    Some((k.trim(), rest.trim()))
}

fn parse_set(s: &str) -> Result<Vec<String>, String> {
    let inner = s
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised set, found {s:?}"))?;
    inner.split(',').map(|v| checked_value(v.trim())).collect()
}

fn checked_key(k: &str) -> Result<String, String> {
    let errs = crate::names::qualified_name(k);
    if errs.is_empty() {
        Ok(k.to_owned())
    } else {
        Err(format!("invalid label key {k:?}: {}", errs.join("; ")))
    }
}

fn checked_value(v: &str) -> Result<String, String> {
    let errs = crate::names::label_value(v);
    if errs.is_empty() {
        Ok(v.to_owned())
    } else {
        Err(format!("invalid label value: {v:?}: {}", errs.join("; ")))
    }
}

/// A parsed field selector: `field=value` or `field!=value` terms.
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub(crate) fn parse(kind: Kind, s: &str) -> ApiResult<FieldSelector> {
        let mut terms = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                )));
            };
            if field_path(kind, field).is_none() {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            terms.push((field.to_owned(), equal, value.to_owned()));
        }
        Ok(FieldSelector(terms))
    }

    pub(crate) fn matches(&self, kind: Kind, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = field_path(kind, field)
                .and_then(|p| object.pointer(p))
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            (actual == *value) == *equal
        })
    }
}

/// The JSON pointer of a field a kind supports in field selectors.
fn field_path(kind: Kind, field: &str) -> Option<&'static str> {
    match field {
        "metadata.name" => return Some("/metadata/name"),
        "metadata.namespace" => return Some("/metadata/namespace"),
        _ => {}
    }
    match (kind, field) {
        (Kind::Pod, "spec.nodeName") => Some("/spec/nodeName"),
        (Kind::Pod, "spec.restartPolicy") => Some("/spec/restartPolicy"),
        (Kind::Pod, "spec.schedulerName") => Some("/spec/schedulerName"),
        (Kind::Pod, "spec.serviceAccountName") => Some("/spec/serviceAccountName"),
        (Kind::Pod, "status.phase") => Some("/status/phase"),
        (Kind::Pod, "status.podIP") => Some("/status/podIP"),
        (Kind::Pod, "status.nominatedNodeName") => Some("/status/nominatedNodeName"),
        (Kind::Job, "status.successful") => Some("/status/succeeded"),
        (Kind::Secret, "type") => Some("/type"),
        (Kind::Node, "spec.unschedulable") => Some("/spec/unschedulable"),
        (Kind::Namespace, "status.phase") => Some("/status/phase"),
        _ => None,
    }
}
