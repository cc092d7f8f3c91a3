//! What the API server fills in on create before validating: the defaults a client reads
//! back (`backoffLimit: 6`, `restartPolicy: Always`, `terminationMessagePath`, Secret
//! `type: Opaque`, `stringData` folded into `data`, ...).

use serde_json::{Map, Value, json};

use crate::kinds::Kind;

pub(crate) fn apply(kind: Kind, obj: &mut Value) {
    match kind {
        Kind::Job => job(obj),
        Kind::Pod => pod(obj),
        Kind::Secret => secret(obj),
        Kind::Namespace => {
            let name = obj["metadata"]["name"].clone();
            labels(obj)
                .entry("kubernetes.io/metadata.name")
                .or_insert(name);
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        Kind::ConfigMap | Kind::Node => {}
    }
}

fn labels(obj: &mut Value) -> &mut Map<String, Value> {
    let meta = &mut obj["metadata"];
    if !meta["labels"].is_object() {
        meta["labels"] = json!({});
    }
    meta["labels"]
        .as_object_mut()
        .expect("labels were just made an object")
}

fn or_insert(obj: &mut Value, key: &str, value: Value) {
    if obj.get(key).is_none_or(Value::is_null)
        && let Some(map) = obj.as_object_mut()
    {
        map.insert(key.to_owned(), value);
    }
}

fn job(obj: &mut Value) {
    let spec = &mut obj["spec"];
    if !spec.is_object() {
        *spec = json!({});
    }
    or_insert(spec, "parallelism", json!(1));
    or_insert(spec, "completions", json!(1));
    or_insert(spec, "backoffLimit", json!(6));
    or_insert(spec, "completionMode", json!("NonIndexed"));
    or_insert(spec, "suspend", json!(false));
    or_insert(spec, "podReplacementPolicy", json!("TerminatingOrFailed"));
    let template = &mut spec["template"];
    if !template.is_object() {
        *template = json!({});
    }
    if !template["spec"].is_object() {
        template["spec"] = json!({});
    }
    pod_spec(&mut template["spec"]);
}

fn pod(obj: &mut Value) {
    if !obj["spec"].is_object() {
        obj["spec"] = json!({});
    }
    pod_spec(&mut obj["spec"]);
    let spec = &mut obj["spec"];
    // The DefaultTolerationSeconds admission plugin.
    let mut tolerations = spec["tolerations"].as_array().cloned().unwrap_or_default();
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        if !tolerations.iter().any(|t| t["key"] == key) {
            tolerations.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
        }
    }
    spec["tolerations"] = Value::Array(tolerations);
    // Requests default to limits.
    for c in containers_mut(spec) {
        let limits = c.pointer("/resources/limits").cloned();
        if let Some(Value::Object(limits)) = limits {
            let requests = &mut c["resources"]["requests"];
            if !requests.is_object() {
                *requests = json!({});
            }
            for (k, v) in limits {
                or_insert(requests, &k, v);
            }
        }
    }
}

fn containers_mut(spec: &mut Value) -> impl Iterator<Item = &mut Value> {
    let spec = spec.as_object_mut();
    spec.into_iter()
        .flat_map(|s| s.iter_mut())
        .filter(|(k, _)| *k == "containers" || *k == "initContainers")
        .filter_map(|(_, v)| v.as_array_mut())
        .flatten()
}

fn pod_spec(spec: &mut Value) {
    or_insert(spec, "restartPolicy", json!("Always"));
    or_insert(spec, "dnsPolicy", json!("ClusterFirst"));
    or_insert(spec, "schedulerName", json!("default-scheduler"));
    or_insert(spec, "terminationGracePeriodSeconds", json!(30));
    or_insert(spec, "securityContext", json!({}));
    or_insert(spec, "enableServiceLinks", json!(true));
    or_insert(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
    or_insert(spec, "priority", json!(0));
    if let Some(volumes) = spec["volumes"].as_array_mut() {
        for v in volumes {
            if let Some(secret) = v.get_mut("secret") {
                or_insert(secret, "defaultMode", json!(420));
            }
            if let Some(cm) = v.get_mut("configMap") {
                or_insert(cm, "defaultMode", json!(420));
            }
        }
    }
    for c in containers_mut(spec) {
        or_insert(c, "terminationMessagePath", json!("/dev/termination-log"));
        or_insert(c, "terminationMessagePolicy", json!("File"));
        or_insert(c, "resources", json!({}));
        let image = c["image"].as_str().unwrap_or("");
        let last = image.rsplit('/').next().unwrap_or("");
        let policy = if image.contains('@') || last.contains(':') && !last.ends_with(":latest") {
            "IfNotPresent"
        } else {
            "Always"
        };
        or_insert(c, "imagePullPolicy", json!(policy));
    }
}

fn secret(obj: &mut Value) {
    or_insert(obj, "type", json!("Opaque"));
    let Some(string_data) = obj
        .as_object_mut()
        .and_then(|o| o.remove("stringData"))
        .and_then(|v| v.as_object().cloned())
    else {
        return;
    };
    if !obj["data"].is_object() {
        obj["data"] = json!({});
    }
    for (k, v) in string_data {
        let bytes = v.as_str().unwrap_or("").as_bytes().to_vec();
        let encoded =
            serde_json::to_value(k8s_openapi::ByteString(bytes)).expect("bytes always serialize");
        obj["data"][k] = encoded;
    }
}
