//! Validation as the API server does it after defaulting: every problem of an object is
//! collected (the 422 lists them all), with the API server's field paths and wording.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::kinds::Kind;
use crate::names::{
    QUANTITY_FORMAT, canonical_quantity, config_key, dns1123_label, dns1123_subdomain,
    env_var_name, is_extended_resource, label_value, parse_quantity, qualified_name,
};
use crate::status::{ApiError, FieldError};
use crate::store::str_at;

/// Annotations may total at most this many bytes.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;
/// A Secret's (or ConfigMap's) data may total at most this many bytes.
pub const MAX_SECRET_BYTES: usize = 1024 * 1024;

type Errors = Vec<FieldError>;

/// Every problem with a new (or updated) object.
pub(crate) fn validate(kind: Kind, obj: &Value) -> Errors {
    let mut errs = Errors::new();
    metadata(kind, obj, &mut errs);
    match kind {
        Kind::Job => job(obj, &mut errs),
        Kind::Pod => {
            pod_spec(&obj["spec"], "spec", &mut errs);
            let policy = str_at(obj, "/spec/restartPolicy");
            if !["Always", "OnFailure", "Never"].contains(&policy) {
                errs.push(FieldError::not_supported(
                    "spec.restartPolicy",
                    policy,
                    &["Always", "OnFailure", "Never"],
                ));
            }
        }
        Kind::Secret => data_map(obj, "data", true, &mut errs),
        Kind::ConfigMap => data_map(obj, "data", false, &mut errs),
        Kind::Node | Kind::Namespace => {}
    }
    errs
}

/// The problems of an update that validation of the new object alone does not see.
pub(crate) fn validate_update(kind: Kind, new: &Value, old: &Value) -> Errors {
    let mut errs = Errors::new();
    let immutable = |errs: &mut Errors, pointer: &str, field: &str| {
        if new.pointer(pointer) != old.pointer(pointer) {
            let shown = new.pointer(pointer).cloned().unwrap_or(Value::Null);
            errs.push(FieldError::invalid_raw(field, shown, "field is immutable"));
        }
    };
    match kind {
        Kind::Job => {
            immutable(&mut errs, "/spec/completions", "spec.completions");
            immutable(&mut errs, "/spec/selector", "spec.selector");
            immutable(&mut errs, "/spec/template", "spec.template");
            immutable(&mut errs, "/spec/completionMode", "spec.completionMode");
        }
        Kind::Pod => {
            let strip = |spec: &Value| {
                let mut s = spec.clone();
                for list in ["containers", "initContainers"] {
                    if let Some(cs) = s.get_mut(list).and_then(Value::as_array_mut) {
                        for c in cs {
                            c["image"] = Value::Null;
                        }
                    }
                }
                for f in [
                    "activeDeadlineSeconds",
                    "tolerations",
                    "terminationGracePeriodSeconds",
                ] {
                    s[f] = Value::Null;
                }
                s
            };
            if strip(&new["spec"]) != strip(&old["spec"]) {
                errs.push(FieldError::forbidden(
                    "spec",
                    "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
                ));
            }
        }
        Kind::Secret | Kind::ConfigMap => {
            if old["immutable"] == Value::Bool(true) {
                for f in ["data", "binaryData", "immutable"] {
                    if new.get(f) != old.get(f) {
                        errs.push(FieldError::forbidden(
                            f,
                            "field is immutable when `immutable` is set",
                        ));
                    }
                }
            }
            if kind == Kind::Secret {
                immutable(&mut errs, "/type", "type");
            }
        }
        Kind::Node | Kind::Namespace => {}
    }
    errs
}

/// Quantities that do not parse fail decoding (400), before validation.
pub(crate) fn decode_quantities(kind: Kind, obj: &Value) -> Result<(), ApiError> {
    let Some((spec, _)) = pod_spec_of(kind, obj) else {
        return Ok(());
    };
    for c in containers(spec) {
        for list in ["limits", "requests"] {
            for (_, q) in c["resources"][list].as_object().into_iter().flatten() {
                if q.as_str().and_then(parse_quantity).is_none() {
                    return Err(ApiError::bad_request(format!(
                        "{} in version \"{}\" cannot be handled as a {}: {QUANTITY_FORMAT}",
                        kind.name(),
                        kind.api_version().rsplit('/').next().unwrap_or("v1"),
                        kind.name()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The pod spec inside an object, with its field path.
pub(crate) fn pod_spec_of(kind: Kind, obj: &Value) -> Option<(&Value, &'static str)> {
    match kind {
        Kind::Job => Some((&obj["spec"]["template"]["spec"], "spec.template.spec")),
        Kind::Pod => Some((&obj["spec"], "spec")),
        _ => None,
    }
}

fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .filter_map(|k| spec[k].as_array())
        .flatten()
}

fn metadata(kind: Kind, obj: &Value, errs: &mut Errors) {
    let name = str_at(obj, "/metadata/name");
    if name.is_empty() {
        errs.push(FieldError::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else {
        let problems = if kind == Kind::Namespace {
            dns1123_label(name)
        } else {
            dns1123_subdomain(name)
        };
        for m in problems {
            errs.push(FieldError::invalid("metadata.name", name, m));
        }
    }
    labels(&obj["metadata"]["labels"], "metadata.labels", errs);
    annotations(
        &obj["metadata"]["annotations"],
        "metadata.annotations",
        errs,
    );
    let owners = obj["metadata"]["ownerReferences"].as_array();
    let mut controllers = 0;
    for (i, o) in owners.into_iter().flatten().enumerate() {
        for f in ["apiVersion", "kind", "name", "uid"] {
            if str_at(o, &format!("/{f}")).is_empty() {
                errs.push(FieldError::required(
                    format!("metadata.ownerReferences[{i}].{f}"),
                    "",
                ));
            }
        }
        if o["controller"] == Value::Bool(true) {
            controllers += 1;
        }
    }
    if controllers > 1 {
        errs.push(FieldError::invalid_raw(
            "metadata.ownerReferences",
            "[...]",
            "Only one reference can have Controller set to true",
        ));
    }
}

fn labels(map: &Value, field: &str, errs: &mut Errors) {
    for (k, v) in map.as_object().into_iter().flatten() {
        for m in qualified_name(k) {
            errs.push(FieldError::invalid(field, k, m));
        }
        let v = v.as_str().unwrap_or("");
        for m in label_value(v) {
            errs.push(FieldError::invalid(field, v, m));
        }
    }
}

fn annotations(map: &Value, field: &str, errs: &mut Errors) {
    let mut total = 0;
    for (k, v) in map.as_object().into_iter().flatten() {
        for m in qualified_name(&k.to_lowercase()) {
            errs.push(FieldError::invalid(field, k, m));
        }
        total += k.len() + v.as_str().map_or(0, str::len);
    }
    if total > MAX_ANNOTATIONS_BYTES {
        errs.push(FieldError::too_long(field, MAX_ANNOTATIONS_BYTES));
    }
}

/// Secret `data` (base64) or ConfigMap `data` + `binaryData`: keys and total size.
fn data_map(obj: &Value, field: &str, base64: bool, errs: &mut Errors) {
    let mut total = 0;
    let mut seen = BTreeSet::new();
    for f in [field, "binaryData"] {
        for (k, v) in obj[f].as_object().into_iter().flatten() {
            for m in config_key(k) {
                errs.push(FieldError::invalid(format!("{f}[{k}]"), k, m));
            }
            if !seen.insert(k.clone()) {
                errs.push(FieldError::invalid(
                    format!("{f}[{k}]"),
                    k,
                    "duplicate of key present in data",
                ));
            }
            let s = v.as_str().unwrap_or("");
            total += if base64 || f == "binaryData" {
                let pad = s.bytes().rev().take_while(|&b| b == b'=').count();
                (s.len() / 4) * 3 - pad.min(2)
            } else {
                s.len()
            };
        }
    }
    if total > MAX_SECRET_BYTES {
        errs.push(FieldError::too_long(field, MAX_SECRET_BYTES));
    }
}

fn non_negative(obj: &Value, pointer: &str, field: &str, errs: &mut Errors) {
    if let Some(n) = obj.pointer(pointer).and_then(Value::as_i64)
        && n < 0
    {
        errs.push(FieldError::invalid_raw(
            field,
            n,
            "must be greater than or equal to 0",
        ));
    }
}

fn job(obj: &Value, errs: &mut Errors) {
    for (p, f) in [
        ("/spec/parallelism", "spec.parallelism"),
        ("/spec/completions", "spec.completions"),
        ("/spec/activeDeadlineSeconds", "spec.activeDeadlineSeconds"),
        ("/spec/backoffLimit", "spec.backoffLimit"),
        (
            "/spec/ttlSecondsAfterFinished",
            "spec.ttlSecondsAfterFinished",
        ),
    ] {
        non_negative(obj, p, f, errs);
    }
    let mode = str_at(obj, "/spec/completionMode");
    if !["NonIndexed", "Indexed"].contains(&mode) {
        errs.push(FieldError::not_supported(
            "spec.completionMode",
            mode,
            &["NonIndexed", "Indexed"],
        ));
    }
    let template_labels = &obj["spec"]["template"]["metadata"]["labels"];
    labels(template_labels, "spec.template.labels", errs);
    annotations(
        &obj["spec"]["template"]["metadata"]["annotations"],
        "spec.template.annotations",
        errs,
    );
    let selector = &obj["spec"]["selector"]["matchLabels"];
    let tl = template_labels.as_object();
    let selected = selector
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| tl.and_then(|t| t.get(k)) == Some(v));
    if !selected {
        errs.push(FieldError::invalid_raw(
            "spec.template.metadata.labels",
            template_labels,
            "`selector` does not match template `labels`",
        ));
    }
    pod_spec(&obj["spec"]["template"]["spec"], "spec.template.spec", errs);
    let policy = str_at(obj, "/spec/template/spec/restartPolicy");
    if policy.is_empty() || policy == "Always" {
        errs.push(FieldError::required(
            "spec.template.spec.restartPolicy",
            "valid values: \"OnFailure\", \"Never\"",
        ));
    } else if !["OnFailure", "Never"].contains(&policy) {
        errs.push(FieldError::not_supported(
            "spec.template.spec.restartPolicy",
            policy,
            &["OnFailure", "Never"],
        ));
    }
}

fn pod_spec(spec: &Value, at: &str, errs: &mut Errors) {
    // Volumes.
    let mut volumes = BTreeSet::new();
    for (i, v) in spec["volumes"].as_array().into_iter().flatten().enumerate() {
        let f = format!("{at}.volumes[{i}]");
        let name = str_at(v, "/name");
        if name.is_empty() {
            errs.push(FieldError::required(format!("{f}.name"), ""));
        } else {
            for m in dns1123_label(name) {
                errs.push(FieldError::invalid(format!("{f}.name"), name, m));
            }
            if !volumes.insert(name.to_owned()) {
                errs.push(FieldError::duplicate(format!("{f}.name"), name));
            }
        }
        let sources: Vec<&String> = v
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
            .filter(|k| *k != "name")
            .collect();
        match sources.as_slice() {
            [] => errs.push(FieldError::required(
                f.clone(),
                "must specify a volume type",
            )),
            [_] => {}
            [_, second, ..] => errs.push(FieldError::forbidden(
                format!("{f}.{second}"),
                "may not specify more than 1 volume type",
            )),
        }
        if v.get("secret").is_some() && str_at(v, "/secret/secretName").is_empty() {
            errs.push(FieldError::required(format!("{f}.secret.secretName"), ""));
        }
        if v.get("configMap").is_some() && str_at(v, "/configMap/name").is_empty() {
            errs.push(FieldError::required(format!("{f}.configMap.name"), ""));
        }
    }
    // Containers.
    let list = spec["containers"].as_array();
    if list.is_none_or(Vec::is_empty) {
        errs.push(FieldError::required(format!("{at}.containers"), ""));
    }
    let mut names = BTreeSet::new();
    for which in ["initContainers", "containers"] {
        for (i, c) in spec[which].as_array().into_iter().flatten().enumerate() {
            container(c, &format!("{at}.{which}[{i}]"), &volumes, &mut names, errs);
        }
    }
    // Scheduling.
    labels(&spec["nodeSelector"], &format!("{at}.nodeSelector"), errs);
    for (i, t) in spec["tolerations"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let f = format!("{at}.tolerations[{i}]");
        let op = str_at(t, "/operator");
        if !["", "Exists", "Equal"].contains(&op) {
            errs.push(FieldError::not_supported(
                format!("{f}.operator"),
                op,
                &["Equal", "Exists"],
            ));
        }
        let key = str_at(t, "/key");
        if key.is_empty() && op != "Exists" {
            errs.push(FieldError::invalid(format!("{f}.operator"), op, "operator must be Exists when `key` is empty, which means \"match all values and all keys\""));
        }
        if !key.is_empty() {
            for m in qualified_name(key) {
                errs.push(FieldError::invalid(format!("{f}.key"), key, m));
            }
        }
        if op == "Exists" && !str_at(t, "/value").is_empty() {
            errs.push(FieldError::invalid(
                format!("{f}.operator"),
                str_at(t, "/value"),
                "value must be empty when `operator` is 'Exists'",
            ));
        }
        let effect = str_at(t, "/effect");
        if !["", "NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&effect) {
            errs.push(FieldError::not_supported(
                format!("{f}.effect"),
                effect,
                &["NoSchedule", "PreferNoSchedule", "NoExecute"],
            ));
        }
    }
    if let Some(n) = spec["activeDeadlineSeconds"].as_i64()
        && n < 1
    {
        errs.push(FieldError::invalid_raw(
            format!("{at}.activeDeadlineSeconds"),
            n,
            "must be between 1 and 2147483647, inclusive",
        ));
    }
    let sa = str_at(spec, "/serviceAccountName");
    if !sa.is_empty() {
        for m in dns1123_subdomain(sa) {
            errs.push(FieldError::invalid(
                format!("{at}.serviceAccountName"),
                sa,
                m,
            ));
        }
    }
}

fn container(
    c: &Value,
    f: &str,
    volumes: &BTreeSet<String>,
    names: &mut BTreeSet<String>,
    errs: &mut Errors,
) {
    let name = str_at(c, "/name");
    if name.is_empty() {
        errs.push(FieldError::required(format!("{f}.name"), ""));
    } else {
        for m in dns1123_label(name) {
            errs.push(FieldError::invalid(format!("{f}.name"), name, m));
        }
        if !names.insert(name.to_owned()) {
            errs.push(FieldError::duplicate(format!("{f}.name"), name));
        }
    }
    if str_at(c, "/image").trim().is_empty() {
        errs.push(FieldError::required(format!("{f}.image"), ""));
    }
    let pull = str_at(c, "/imagePullPolicy");
    if !["Always", "IfNotPresent", "Never"].contains(&pull) {
        errs.push(FieldError::not_supported(
            format!("{f}.imagePullPolicy"),
            pull,
            &["Always", "IfNotPresent", "Never"],
        ));
    }
    let tmp = str_at(c, "/terminationMessagePolicy");
    if !["File", "FallbackToLogsOnError"].contains(&tmp) {
        errs.push(FieldError::not_supported(
            format!("{f}.terminationMessagePolicy"),
            tmp,
            &["File", "FallbackToLogsOnError"],
        ));
    }
    for (i, e) in c["env"].as_array().into_iter().flatten().enumerate() {
        let ef = format!("{f}.env[{i}]");
        let n = str_at(e, "/name");
        if n.is_empty() {
            errs.push(FieldError::required(format!("{ef}.name"), ""));
        }
        for m in env_var_name(n).into_iter().filter(|_| !n.is_empty()) {
            errs.push(FieldError::invalid(format!("{ef}.name"), n, m));
        }
        if let Some(from) = e["valueFrom"].as_object() {
            if from.len() != 1 {
                errs.push(FieldError::invalid(
                    format!("{ef}.valueFrom"),
                    "",
                    "may not have more than one field specified at a time",
                ));
            }
            if e.get("value")
                .is_some_and(|v| v.as_str().is_some_and(|s| !s.is_empty()))
            {
                errs.push(FieldError::invalid(
                    format!("{ef}.valueFrom"),
                    "",
                    "may not be specified when `value` is not empty",
                ));
            }
            for (src, keyed) in [
                ("secretKeyRef", true),
                ("configMapKeyRef", true),
                ("fieldRef", false),
            ] {
                let Some(r) = from.get(src) else { continue };
                if keyed {
                    for part in ["name", "key"] {
                        if str_at(r, &format!("/{part}")).is_empty() {
                            errs.push(FieldError::required(
                                format!("{ef}.valueFrom.{src}.{part}"),
                                "",
                            ));
                        }
                    }
                } else if str_at(r, "/fieldPath").is_empty() {
                    errs.push(FieldError::required(
                        format!("{ef}.valueFrom.fieldRef.fieldPath"),
                        "",
                    ));
                }
            }
        }
    }
    let mut paths = BTreeSet::new();
    for (i, m) in c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let mf = format!("{f}.volumeMounts[{i}]");
        let vn = str_at(m, "/name");
        if vn.is_empty() {
            errs.push(FieldError::required(format!("{mf}.name"), ""));
        } else if !volumes.contains(vn) {
            errs.push(FieldError::not_found(format!("{mf}.name"), vn));
        }
        let path = str_at(m, "/mountPath");
        if path.is_empty() {
            errs.push(FieldError::required(format!("{mf}.mountPath"), ""));
        } else if !paths.insert(path.to_owned()) {
            errs.push(FieldError::invalid(
                format!("{mf}.mountPath"),
                path,
                "must be unique",
            ));
        }
    }
    resources(&c["resources"], &format!("{f}.resources"), errs);
}

fn quantities(list: &Value) -> BTreeMap<String, f64> {
    list.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str().and_then(parse_quantity)?)))
        .collect()
}

fn resources(r: &Value, f: &str, errs: &mut Errors) {
    let limits = quantities(&r["limits"]);
    let requests = quantities(&r["requests"]);
    for (list, map) in [("limits", &limits), ("requests", &requests)] {
        for (name, &q) in map {
            let qf = format!("{f}.{list}[{name}]");
            let shown = canonical_quantity(q);
            if !(name.contains('/')
                || ["cpu", "memory", "ephemeral-storage"].contains(&name.as_str())
                || name.starts_with("hugepages-"))
            {
                errs.push(FieldError::invalid(
                    &qf,
                    name,
                    "must be a standard resource type or fully qualified",
                ));
            }
            if q < 0.0 {
                errs.push(FieldError::invalid(
                    &qf,
                    &shown,
                    "must be greater than or equal to 0",
                ));
            }
            if is_extended_resource(name) && q.fract() != 0.0 {
                errs.push(FieldError::invalid(&qf, &shown, "must be an integer"));
            }
        }
    }
    for (name, &req) in &requests {
        let limit = limits.get(name);
        if is_extended_resource(name) {
            match limit {
                None => errs.push(FieldError::forbidden(
                    format!("{f}.limits"),
                    "Limit must be set for non overcommitable resources",
                )),
                Some(&l) if l != req => errs.push(FieldError::invalid(
                    format!("{f}.requests[{name}]"),
                    &canonical_quantity(req),
                    format!("must be equal to {name} limit of {}", canonical_quantity(l)),
                )),
                Some(_) => {}
            }
        } else if let Some(&l) = limit
            && req > l
        {
            errs.push(FieldError::invalid(
                format!("{f}.requests[{name}]"),
                &canonical_quantity(req),
                format!(
                    "must be less than or equal to {name} limit of {}",
                    canonical_quantity(l)
                ),
            ));
        }
    }
}
