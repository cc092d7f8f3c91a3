//! The API verbs on the store, independent of HTTP: decoding, defaulting, validation,
//! optimistic concurrency, status subresources, and deletion with garbage collection of
//! dependents (`metadata.ownerReferences`) by propagation policy.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::defaults;
use crate::kinds::{Kind, unknown_fields};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{ApiError, ApiResult, FieldError};
use crate::store::{Key, State, Store, now, str_at};
use crate::validate::{decode_quantities, validate, validate_update};

/// The query parameters of a request.
pub(crate) type Query = BTreeMap<String, String>;

/// A write's result: the object as stored (or as it would be, for a dry run) and the
/// `Warning` headers.
pub(crate) struct Written {
    pub(crate) object: Value,
    pub(crate) warnings: Vec<String>,
}

const JOB_DELETE_WARNING: &str = "child pods are preserved by default when jobs are deleted; set propagationPolicy=Background to remove them or set propagationPolicy=Orphan to suppress this warning";

/// Decodes a request body for `kind` as the API server does.
pub(crate) fn decode(kind: Kind, body: &[u8], query: &Query) -> ApiResult<(Value, Vec<String>)> {
    let raw: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })?;
    let shown = || {
        String::from_utf8_lossy(body)
            .chars()
            .take(200)
            .collect::<String>()
    };
    let Some(k) = raw["kind"].as_str().filter(|k| !k.is_empty()) else {
        return Err(ApiError::bad_request(format!(
            "Object 'Kind' is missing in '{}'",
            shown()
        )));
    };
    let Some(v) = raw["apiVersion"].as_str().filter(|v| !v.is_empty()) else {
        return Err(ApiError::bad_request(format!(
            "Object 'apiVersion' is missing in '{}'",
            shown()
        )));
    };
    if v != kind.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({v}) does not match the expected API version ({})",
            kind.api_version()
        )));
    }
    if k != kind.name() {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({})",
            kind.name()
        )));
    }
    let version = kind.api_version().rsplit('/').next().unwrap_or("v1");
    let object = kind.normalize(&raw).map_err(|e| {
        ApiError::bad_request(format!(
            "{k} in version \"{version}\" cannot be handled as a {k}: {e}"
        ))
    })?;
    let unknown = unknown_fields(&raw, &object);
    let warnings = match query.get("fieldValidation").map(String::as_str) {
        Some("Strict") if !unknown.is_empty() => {
            let list: Vec<String> = unknown
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            return Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                list.join(", ")
            )));
        }
        Some("Ignore") => Vec::new(),
        _ => unknown
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect(),
    };
    decode_quantities(kind, &object)?;
    Ok((object, warnings))
}

fn dry_run(query: &Query) -> bool {
    query.get("dryRun").is_some_and(|v| v == "All")
}

/// Five characters as the API server appends to a `generateName`.
pub(crate) fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4().as_bytes()[..5]
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// Creates an object from a request body.
pub(crate) fn create(
    store: &Store,
    kind: Kind,
    namespace: &str,
    body: &[u8],
    query: &Query,
) -> ApiResult<Written> {
    let (object, warnings) = decode(kind, body, query)?;
    let dry = dry_run(query);
    let object = store.write(|st| create_in(st, kind, namespace, object, dry))?;
    Ok(Written { object, warnings })
}

/// Creates a decoded object: the path every creation takes, the controllers' too.
pub(crate) fn create_in(
    st: &mut State,
    kind: Kind,
    namespace: &str,
    mut obj: Value,
    dry: bool,
) -> ApiResult<Value> {
    if kind.namespaced() {
        let body_ns = str_at(&obj, "/metadata/namespace");
        if !body_ns.is_empty() && body_ns != namespace {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        obj["metadata"]["namespace"] = json!(namespace);
    }
    if !str_at(&obj, "/metadata/resourceVersion").is_empty() {
        return Err(ApiError::internal(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    let generate = str_at(&obj, "/metadata/generateName").to_owned();
    if str_at(&obj, "/metadata/name").is_empty() && !generate.is_empty() {
        let base: String = generate.chars().take(58).collect();
        obj["metadata"]["name"] = json!(format!("{base}{}", random_suffix()));
    }
    let name = str_at(&obj, "/metadata/name").to_owned();
    let uid = uuid::Uuid::new_v4().to_string();
    let meta = &mut obj["metadata"];
    meta["uid"] = json!(uid);
    meta["creationTimestamp"] = json!(now());
    if let Some(m) = meta.as_object_mut() {
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
        m.remove("generation");
    }
    defaults::apply(kind, &mut obj);
    let mut errs = Vec::new();
    match kind {
        Kind::Job => {
            obj["metadata"]["generation"] = json!(1);
            obj["status"] = json!({});
            generate_job_selector(&mut obj, &uid, &name, &mut errs);
        }
        Kind::Pod => {
            let qos = qos_class(&obj["spec"]);
            obj["status"] = json!({"phase": "Pending", "qosClass": qos});
        }
        _ => {}
    }
    errs.extend(validate(kind, &obj));
    if !errs.is_empty() {
        return Err(ApiError::invalid(kind, &name, &errs));
    }
    if kind.namespaced() && st.get(&Key::new(Kind::Namespace, "", namespace)).is_none() {
        return Err(ApiError::namespace_not_found(namespace));
    }
    let key = Key::new(kind, namespace, &name);
    if st.get(&key).is_some() {
        return Err(ApiError::already_exists(kind, &name));
    }
    if dry {
        return Ok(obj);
    }
    Ok(st.insert(key, obj))
}

/// The selector and pod template labels the API server generates for a Job.
fn generate_job_selector(job: &mut Value, uid: &str, name: &str, errs: &mut Vec<FieldError>) {
    if job["spec"]["manualSelector"] == Value::Bool(true) {
        return;
    }
    if !job["spec"]["selector"].is_null() {
        errs.push(FieldError::invalid_raw(
            "spec.selector",
            job["spec"]["selector"].clone(),
            "`selector` will be auto-generated",
        ));
        return;
    }
    job["spec"]["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
    let template_meta = &mut job["spec"]["template"]["metadata"];
    if !template_meta.is_object() {
        *template_meta = json!({});
    }
    if !template_meta["labels"].is_object() {
        template_meta["labels"] = json!({});
    }
    let labels = &mut template_meta["labels"];
    labels["batch.kubernetes.io/controller-uid"] = json!(uid);
    labels["batch.kubernetes.io/job-name"] = json!(name);
    labels["controller-uid"] = json!(uid);
    labels["job-name"] = json!(name);
}

fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let has = |c: &Value, list: &str, r: &str| !c["resources"][list][r].is_null();
    if containers.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            has(c, "limits", r) && c["resources"]["limits"][r] == c["resources"]["requests"][r]
        })
    }) {
        "Guaranteed"
    } else if containers.iter().any(|c| {
        !c["resources"]["requests"]
            .as_object()
            .is_none_or(|m| m.is_empty())
            || !c["resources"]["limits"]
                .as_object()
                .is_none_or(|m| m.is_empty())
    }) {
        "Burstable"
    } else {
        "BestEffort"
    }
}

pub(crate) fn get(store: &Store, kind: Kind, namespace: &str, name: &str) -> ApiResult<Value> {
    store.read(|st| {
        st.get(&Key::new(kind, namespace, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))
    })
}

/// A list response. Items carry no `kind`/`apiVersion`, as from the API server.
pub(crate) fn list(
    store: &Store,
    kind: Kind,
    namespace: Option<&str>,
    query: &Query,
) -> ApiResult<Value> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(kind, query.get("fieldSelector").map_or("", String::as_str))?;
    let limit: usize = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => 0,
        Some(Ok(l)) => l,
        Some(Err(_)) => {
            return Err(ApiError::bad_request(
                "limit must be a non-negative integer",
            ));
        }
    };
    let from = query
        .get("continue")
        .map(|t| Continue::parse(t))
        .transpose()?;
    store.read(|st| {
        let selected = |o: &Value| labels.matches_object(o) && fields.matches(kind, o);
        let (rv, mut items): (u64, Vec<Value>) = match &from {
            None => (
                st.rv(),
                st.list(kind, namespace)
                    .filter(|o| selected(o))
                    .cloned()
                    .collect(),
            ),
            Some(c) => {
                let at = st
                    .list_at(kind, namespace, c.rv, (&c.namespace, &c.name))
                    .ok_or_else(|| {
                        ApiError::gone(
                            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                        )
                    })?;
                (c.rv, at.into_iter().filter(|o| selected(o)).collect())
            }
        };
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if limit > 0 && items.len() > limit {
            let rest = items.split_off(limit);
            if let Some(last) = items.last() {
                metadata["continue"] = json!(Continue::after(rv, last));
            }
            metadata["remainingItemCount"] = json!(rest.len());
        }
        for i in &mut items {
            if let Some(m) = i.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
        }
        Ok(json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": metadata,
            "items": items,
        }))
    })
}

/// Where the next page of a list starts: the list's resourceVersion (every page shows the
/// state at the first) and the last object served. Opaque to clients, like the API
/// server's; here `RV/NAMESPACE/NAME`.
struct Continue {
    rv: u64,
    namespace: String,
    name: String,
}

impl Continue {
    fn after(rv: u64, last: &Value) -> String {
        format!(
            "{rv}/{}/{}",
            str_at(last, "/metadata/namespace"),
            str_at(last, "/metadata/name")
        )
    }

    fn parse(token: &str) -> ApiResult<Continue> {
        let mut parts = token.splitn(3, '/');
        match (
            parts.next().and_then(|rv| rv.parse().ok()),
            parts.next(),
            parts.next(),
        ) {
            (Some(rv), Some(namespace), Some(name)) => Ok(Continue {
                rv,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }),
            _ => Err(ApiError::bad_request(format!(
                "continue key is not valid: {token:?}"
            ))),
        }
    }
}

/// PUT: replaces the object (or only its status).
pub(crate) fn replace(
    store: &Store,
    key: &Key,
    body: &[u8],
    status: bool,
    query: &Query,
) -> ApiResult<Written> {
    let (object, warnings) = decode(key.kind, body, query)?;
    let dry = dry_run(query);
    let object = store.write(|st| update_in(st, key, object, status, dry))?;
    Ok(Written { object, warnings })
}

/// PATCH: a JSON merge patch (strategic merge patches are treated as merge patches).
pub(crate) fn patch(
    store: &Store,
    key: &Key,
    body: &[u8],
    content_type: &str,
    status: bool,
    query: &Query,
) -> ApiResult<Written> {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    if ct != "application/merge-patch+json" && ct != "application/strategic-merge-patch+json" {
        return Err(ApiError::unsupported_media_type(ct));
    }
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    let dry = dry_run(query);
    store.write(|st| {
        let mut merged = st
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(key.kind, &key.name))?;
        let expected_rv = patch.pointer("/metadata/resourceVersion").cloned();
        merge_patch(&mut merged, &patch);
        if expected_rv.is_none()
            && let Some(m) = merged["metadata"].as_object_mut()
        {
            m.remove("resourceVersion");
        }
        let body = serde_json::to_vec(&merged).map_err(|e| ApiError::internal(e.to_string()))?;
        let (object, warnings) = decode(key.kind, &body, query)?;
        let object = update_in(st, key, object, status, dry)?;
        Ok(Written { object, warnings })
    })
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (k, v) in p {
        if v.is_null() {
            if let Some(t) = target.as_object_mut() {
                t.remove(k);
            }
        } else {
            merge_patch(&mut target[k.as_str()], v);
        }
    }
}

/// Replaces a stored object with `new`, as an update of the main resource or of `status`.
pub(crate) fn update_in(
    st: &mut State,
    key: &Key,
    mut new: Value,
    status: bool,
    dry: bool,
) -> ApiResult<Value> {
    let kind = key.kind;
    let old = st
        .get(key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(kind, &key.name))?;
    let name = str_at(&new, "/metadata/name");
    if !name.is_empty() && name != key.name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({})",
            key.name
        )));
    }
    let ns = str_at(&new, "/metadata/namespace");
    if kind.namespaced() && !ns.is_empty() && ns != key.namespace {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let rv = str_at(&new, "/metadata/resourceVersion");
    if !rv.is_empty() && rv != str_at(&old, "/metadata/resourceVersion") {
        return Err(ApiError::stale(kind, &key.name));
    }
    let uid = str_at(&new, "/metadata/uid");
    let old_uid = str_at(&old, "/metadata/uid");
    if !uid.is_empty() && uid != old_uid {
        return Err(ApiError::conflict(
            kind,
            &key.name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"
            ),
        ));
    }
    if status {
        if !kind.has_status() {
            return Err(ApiError::no_such_path());
        }
        let mut updated = old.clone();
        updated["status"] = new["status"].take();
        new = updated;
    } else {
        for f in [
            "uid",
            "creationTimestamp",
            "generation",
            "name",
            "namespace",
        ] {
            if !old["metadata"][f].is_null() {
                new["metadata"][f] = old["metadata"][f].clone();
            }
        }
        if kind.has_status() {
            new["status"] = old["status"].clone();
        }
        defaults::apply(kind, &mut new);
        let mut errs = validate(kind, &new);
        errs.extend(validate_update(kind, &new, &old));
        if !errs.is_empty() {
            return Err(ApiError::invalid(kind, &key.name, &errs));
        }
        if kind == Kind::Job && new["spec"] != old["spec"] {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(generation + 1);
        }
    }
    new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    if new == old || dry {
        // A no-op update writes nothing: no new resourceVersion, no watch event.
        return Ok(new);
    }
    Ok(st.replace(key.clone(), new))
}

/// How dependents are treated when their owner is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Propagation {
    Background,
    Foreground,
    Orphan,
}

/// DELETE of one object, with `DeleteOptions` from the body and the query.
pub(crate) fn delete(store: &Store, key: &Key, body: &[u8], query: &Query) -> ApiResult<Written> {
    let options: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
    };
    let (policy, warnings) = propagation(key.kind, &options, query)?;
    let dry = dry_run(query)
        || options["dryRun"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == "All"));
    store.write(|st| {
        let current = st
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(key.kind, &key.name))?;
        for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            let wanted = str_at(&options, &format!("/preconditions/{field}"));
            let actual = str_at(&current, &format!("/metadata/{field}"));
            if !wanted.is_empty() && wanted != actual {
                return Err(ApiError::conflict(
                    key.kind,
                    &key.name,
                    &format!("Precondition failed: {label} in precondition: {wanted}, {label} in object meta: {actual}"),
                ));
            }
        }
        if dry {
            return Ok(Written { object: current, warnings });
        }
        let object = delete_in(st, key, policy).unwrap_or(current);
        Ok(Written { object, warnings })
    })
}

fn propagation(
    kind: Kind,
    options: &Value,
    query: &Query,
) -> ApiResult<(Propagation, Vec<String>)> {
    let given = options["propagationPolicy"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| query.get("propagationPolicy").cloned());
    let orphan_dependents = options["orphanDependents"]
        .as_bool()
        .or_else(|| query.get("orphanDependents").map(|v| v == "true"));
    Ok(match (given.as_deref(), orphan_dependents) {
        (Some("Background"), _) => (Propagation::Background, vec![]),
        (Some("Foreground"), _) => (Propagation::Foreground, vec![]),
        (Some("Orphan"), _) => (Propagation::Orphan, vec![]),
        (Some(other), _) => {
            return Err(ApiError::invalid(
                kind,
                "",
                &[FieldError::not_supported(
                    "propagationPolicy",
                    other,
                    &["Foreground", "Background", "Orphan", "nil"],
                )],
            ));
        }
        (None, Some(true)) => (Propagation::Orphan, vec![]),
        (None, Some(false)) => (Propagation::Background, vec![]),
        // batch/v1 Jobs orphan their pods by default, with a warning.
        (None, None) if kind == Kind::Job => {
            (Propagation::Orphan, vec![JOB_DELETE_WARNING.to_owned()])
        }
        (None, None) => (Propagation::Background, vec![]),
    })
}

/// Deletes an object now and handles its dependents; returns its last state.
pub(crate) fn delete_in(st: &mut State, key: &Key, policy: Propagation) -> Option<Value> {
    let uid = str_at(st.get(key)?, "/metadata/uid").to_owned();
    if policy == Propagation::Foreground {
        collect_garbage(st, &uid, Propagation::Foreground);
    }
    if key.kind == Kind::Namespace {
        let inside: Vec<Key> = Kind::ALL
            .iter()
            .flat_map(|k| {
                st.list(*k, Some(&key.name))
                    .map(|o| Key::of(*k, o))
                    .collect::<Vec<_>>()
            })
            .filter(|k| k.kind.namespaced())
            .collect();
        for k in inside {
            delete_in(st, &k, Propagation::Background);
        }
    }
    let last = st.remove(key)?;
    match policy {
        Propagation::Background => collect_garbage(st, &uid, Propagation::Background),
        Propagation::Orphan => {
            for dep in dependents(st, &uid) {
                strip_owner(st, &dep, &uid);
            }
        }
        Propagation::Foreground => {}
    }
    Some(last)
}

/// The objects naming `owner_uid` in their `ownerReferences`.
fn dependents(st: &State, owner_uid: &str) -> Vec<Key> {
    Kind::ALL
        .iter()
        .flat_map(|k| {
            st.list(*k, None)
                .filter(|o| owner_uids(o).iter().any(|u| u == owner_uid))
                .map(|o| Key::of(*k, o))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn owner_uids(o: &Value) -> Vec<String> {
    o["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| str_at(r, "/uid").to_owned())
        .collect()
}

/// Deletes the dependents of a deleted owner that have no other existing owner; the
/// others lose their reference to it.
fn collect_garbage(st: &mut State, owner_uid: &str, policy: Propagation) {
    for dep in dependents(st, owner_uid) {
        let Some(obj) = st.get(&dep) else { continue };
        let other_owner_alive = owner_uids(obj)
            .iter()
            .any(|u| u != owner_uid && st.by_uid(u).is_some());
        if other_owner_alive {
            strip_owner(st, &dep, owner_uid);
        } else {
            delete_in(st, &dep, policy);
        }
    }
}

fn strip_owner(st: &mut State, key: &Key, owner_uid: &str) {
    let Some(mut obj) = st.get(key).cloned() else {
        return;
    };
    if let Some(refs) = obj["metadata"]["ownerReferences"].as_array_mut() {
        refs.retain(|r| str_at(r, "/uid") != owner_uid);
        if refs.is_empty()
            && let Some(m) = obj["metadata"].as_object_mut()
        {
            m.remove("ownerReferences");
        }
    }
    st.replace(key.clone(), obj);
}

/// DELETE of a collection: every object the selectors match; answers with their list.
pub(crate) fn delete_collection(
    store: &Store,
    kind: Kind,
    namespace: Option<&str>,
    body: &[u8],
    query: &Query,
) -> ApiResult<Written> {
    let listed = list(store, kind, namespace, query)?;
    let mut deleted = Vec::new();
    let mut warnings = Vec::new();
    for item in listed["items"].as_array().into_iter().flatten() {
        let key = Key::new(
            kind,
            str_at(item, "/metadata/namespace"),
            str_at(item, "/metadata/name"),
        );
        match delete(store, &key, body, query) {
            Ok(w) => {
                deleted.push(w.object);
                warnings.extend(w.warnings);
            }
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    warnings.dedup();
    let rv = store.read(State::rv);
    Ok(Written {
        object: json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": deleted,
        }),
        warnings,
    })
}
