//! The resource kinds the double serves: where they live in the URL space, how the API
//! server names them in messages, and decoding a request body the way the API server does
//! (through the typed schema, so unknown fields are dropped and wrong types are refused).

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret};
use serde_json::Value;

/// A kind of object the double stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Job,
    Pod,
    Secret,
    ConfigMap,
    Node,
    Namespace,
}

impl Kind {
    pub(crate) const ALL: [Kind; 6] = [
        Kind::Job,
        Kind::Pod,
        Kind::Secret,
        Kind::ConfigMap,
        Kind::Node,
        Kind::Namespace,
    ];

    /// The kind served at `group_version` (`v1`, `batch/v1`) under `plural`.
    pub(crate) fn from_path(group_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == group_version && k.plural() == plural)
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Job => "batch/v1",
            _ => "v1",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Job => "Job",
            Kind::Pod => "Pod",
            Kind::Secret => "Secret",
            Kind::ConfigMap => "ConfigMap",
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
        }
    }

    pub(crate) fn plural(self) -> &'static str {
        match self {
            Kind::Job => "jobs",
            Kind::Pod => "pods",
            Kind::Secret => "secrets",
            Kind::ConfigMap => "configmaps",
            Kind::Node => "nodes",
            Kind::Namespace => "namespaces",
        }
    }

    pub(crate) fn group(self) -> &'static str {
        match self {
            Kind::Job => "batch",
            _ => "",
        }
    }

    /// `jobs.batch`, `pods`: how the API server names the resource in its messages.
    pub(crate) fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            g => format!("{}.{g}", self.plural()),
        }
    }

    /// `Job.batch`, `Pod`: how validation messages name the kind.
    pub(crate) fn qualified_kind(self) -> String {
        match self.group() {
            "" => self.name().to_owned(),
            g => format!("{}.{g}", self.name()),
        }
    }

    pub(crate) fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::Namespace)
    }

    /// Whether `status` is a subresource (so the main resource ignores status writes).
    pub(crate) fn has_status(self) -> bool {
        matches!(self, Kind::Job | Kind::Pod | Kind::Node | Kind::Namespace)
    }

    /// Decodes `body` through the typed schema and back: what the API server keeps of it.
    pub(crate) fn normalize(self, body: &Value) -> Result<Value, serde_json::Error> {
        fn round<T>(v: &Value) -> Result<Value, serde_json::Error>
        where
            T: serde::de::DeserializeOwned + serde::Serialize,
        {
            serde_json::to_value(serde_json::from_value::<T>(v.clone())?)
        }
        match self {
            Kind::Job => round::<Job>(body),
            Kind::Pod => round::<Pod>(body),
            Kind::Secret => round::<Secret>(body),
            Kind::ConfigMap => round::<ConfigMap>(body),
            Kind::Node => round::<Node>(body),
            Kind::Namespace => round::<Namespace>(body),
        }
    }
}

/// The fields of `original` that decoding dropped (`spec.foo`), as the API server's
/// field validation reports them.
pub(crate) fn unknown_fields(original: &Value, kept: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk_unknown(original, kept, "", &mut out);
    out
}

fn walk_unknown(original: &Value, kept: &Value, path: &str, out: &mut Vec<String>) {
    match (original, kept) {
        (Value::Object(o), Value::Object(k)) => {
            for (key, value) in o {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match k.get(key) {
                    Some(kv) => walk_unknown(value, kv, &child, out),
                    None if !value.is_null() => out.push(child),
                    None => {}
                }
            }
        }
        (Value::Array(o), Value::Array(k)) => {
            for (i, (ov, kv)) in o.iter().zip(k).enumerate() {
                walk_unknown(ov, kv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}
