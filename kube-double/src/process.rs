//! Running a pod's first container as a local process. The kubelet resolves what a real one
//! would: the argv (`command` + `args`, or the image's entrypoint set with
//! `KubeDouble::set_image_entrypoint`), `$(VAR)` references, the environment (`value`,
//! `secretKeyRef`, `configMapKeyRef`, `fieldRef`, `envFrom`), and Secret, ConfigMap and
//! emptyDir volumes as files in a per-pod directory.
//!
//! The process runs on this host, not in a container, so paths inside the container do not
//! exist: in every argument, environment value and `workingDir`, a path under a volume's
//! `mountPath` or the container's `terminationMessagePath` is rewritten to the host
//! directory or file that stands for it (see [`rewrite_path`] for where a path is
//! recognised). A path the program only knows from its own code or config files is not. The environment is only the container's (plus
//! `PATH` from this host and `HOSTNAME`), as in a container.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use k8s_openapi::ByteString;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use crate::control::Msg;
use crate::kinds::Kind;
use crate::store::{Key, Store, str_at};

/// Why a container cannot start yet (its `waiting` state).
#[derive(Debug)]
pub(crate) struct Waiting {
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

/// A container ready to run.
pub(crate) struct Prepared {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    pub(crate) termination_log: PathBuf,
    pub(crate) fallback_to_logs: bool,
}

/// Resolves everything the first container needs, writing its volumes under `dir`.
pub(crate) fn prepare(
    store: &Store,
    pod: &Value,
    dir: &Path,
    pod_ip: &str,
    entrypoints: &HashMap<String, Vec<String>>,
) -> Result<Prepared, Waiting> {
    let ns = str_at(pod, "/metadata/namespace");
    let c = &pod["spec"]["containers"][0];
    let volumes = materialize_volumes(store, pod, &dir.join("volumes"))?;
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        if let Some(host) = volumes.get(str_at(m, "/name")) {
            let sub = str_at(m, "/subPath");
            let host = if sub.is_empty() {
                host.clone()
            } else {
                host.join(sub)
            };
            mounts.push((
                str_at(m, "/mountPath").trim_end_matches('/').to_owned(),
                host,
            ));
        }
    }
    let termination_log = dir.join("termination-log");
    let _ = std::fs::File::create(&termination_log);
    mounts.push((
        str_at(c, "/terminationMessagePath").to_owned(),
        termination_log.clone(),
    ));
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    let rewrite = |s: String| rewrite_path(&s, &mounts);

    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(name, _)| *name != k);
        env.push((k, v));
    };
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let prefix = str_at(from, "/prefix");
        for (kind, field) in [
            (Kind::Secret, "secretRef"),
            (Kind::ConfigMap, "configMapRef"),
        ] {
            let Some(r) = from.get(field) else { continue };
            match read_data(store, kind, ns, str_at(r, "/name")) {
                Some(data) => {
                    for (k, v) in data {
                        set(&mut env, format!("{prefix}{k}"), v);
                    }
                }
                None if r["optional"] == Value::Bool(true) => {}
                None => return Err(config_error(kind, str_at(r, "/name"))),
            }
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let name = str_at(e, "/name").to_owned();
        let lookup: BTreeMap<String, String> = env.iter().cloned().collect();
        let value = if let Some(from) = e.get("valueFrom") {
            match value_from(store, pod, ns, pod_ip, from)? {
                Some(v) => v,
                None => continue,
            }
        } else {
            expand(str_at(e, "/value"), &lookup)
        };
        set(&mut env, name, value);
    }
    let lookup: BTreeMap<String, String> = env.iter().cloned().collect();
    let env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k, rewrite(v))).collect();

    let strings = |field: &str| -> Vec<String> {
        c[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|s| expand(s, &lookup))
            .collect()
    };
    // Container paths in the pod's command and args are rewritten to the host; an image's
    // entrypoint is a host path already (given to the double), so it is left as it is.
    let command: Vec<String> = strings("command").into_iter().map(rewrite).collect();
    let mut argv = if command.is_empty() {
        let image = str_at(c, "/image");
        match entrypoints.get(image) {
            Some(entry) => entry.clone(),
            None => {
                return Err(Waiting {
                    reason: "ErrImagePull",
                    message: format!("no entrypoint known for image {image:?}"),
                });
            }
        }
    } else {
        command
    };
    argv.extend(strings("args").into_iter().map(rewrite));

    let working = str_at(c, "/workingDir");
    let cwd = Some(PathBuf::from(rewrite(working.to_owned())))
        .filter(|p| !working.is_empty() && p.is_dir())
        .unwrap_or_else(|| dir.to_path_buf());
    Ok(Prepared {
        argv,
        env,
        cwd,
        termination_log,
        fallback_to_logs: str_at(c, "/terminationMessagePolicy") == "FallbackToLogsOnError",
    })
}

/// Starts the process in its own process group, its output going to `log`; its exit is
/// reported to the loop. Returns the process group id.
pub(crate) fn spawn(
    prepared: &Prepared,
    log: &Path,
    pod_uid: String,
    tx: UnboundedSender<Msg>,
) -> std::io::Result<i32> {
    let out = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)?;
    let mut cmd = tokio::process::Command::new(&prepared.argv[0]);
    cmd.args(&prepared.argv[1..])
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        )
        .envs(prepared.env.iter().cloned())
        .current_dir(&prepared.cwd)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0);
    let mut child = cmd.spawn()?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or_else(|| std::io::Error::other("the process has no id"))?;
    tokio::spawn(async move {
        let code = match child.wait().await {
            Ok(status) => status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(9)),
            Err(_) => 255,
        };
        let _ = tx.send(Msg::Exited { pod_uid, code });
    });
    Ok(pgid)
}

/// `s` with every path under a mount replaced by its host path. A mount path counts where
/// it starts a word (at the start, or after whitespace, `=`, `:`, a quote, `<`, `>` or `(`)
/// and ends one (at the end, or before `/`, whitespace, a quote, `;`, `:`, `)`, `&` or `|`),
/// so `--task=/var/run/gantry/task.json` and `sh -c '... > /dev/termination-log'` are
/// rewritten too.
pub(crate) fn rewrite_path(s: &str, mounts: &[(String, PathBuf)]) -> String {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    'scan: while let Some(ch) = s[i..].chars().next() {
        let starts_word = i == 0
            || matches!(
                bytes[i - 1],
                b' ' | b'\t' | b'\n' | b'=' | b':' | b'"' | b'\'' | b'<' | b'>' | b'('
            );
        if ch == '/' && starts_word {
            for (path, host) in mounts {
                let end = i + path.len();
                let ends_word = end == s.len()
                    || matches!(
                        bytes.get(end),
                        Some(
                            b'/' | b' '
                                | b'\t'
                                | b'\n'
                                | b'"'
                                | b'\''
                                | b';'
                                | b':'
                                | b')'
                                | b'&'
                                | b'|'
                        )
                    );
                if !path.is_empty() && s[i..].starts_with(path.as_str()) && ends_word {
                    out.push_str(&host.display().to_string());
                    i = end;
                    continue 'scan;
                }
            }
        }
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// `$(VAR)` expansion as the kubelet does it: defined names are replaced, `$$` is a `$`,
/// anything else is left as written.
pub(crate) fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn config_error(kind: Kind, name: &str) -> Waiting {
    Waiting {
        reason: "CreateContainerConfigError",
        message: format!("{} \"{name}\" not found", kind.name().to_lowercase()),
    }
}

/// A Secret's (decoded) or ConfigMap's data.
fn read_data(store: &Store, kind: Kind, ns: &str, name: &str) -> Option<BTreeMap<String, String>> {
    let bytes = read_bytes(store, kind, ns, name)?;
    Some(
        bytes
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect(),
    )
}

fn read_bytes(
    store: &Store,
    kind: Kind,
    ns: &str,
    name: &str,
) -> Option<BTreeMap<String, Vec<u8>>> {
    let obj = store.read(|st| st.get(&Key::new(kind, ns, name)).cloned())?;
    let mut out = BTreeMap::new();
    let decoded = |v: &Value| {
        serde_json::from_value::<ByteString>(v.clone())
            .map(|b| b.0)
            .unwrap_or_default()
    };
    for (k, v) in obj["data"].as_object().into_iter().flatten() {
        let bytes = if kind == Kind::Secret {
            decoded(v)
        } else {
            v.as_str().unwrap_or("").as_bytes().to_vec()
        };
        out.insert(k.clone(), bytes);
    }
    for (k, v) in obj["binaryData"].as_object().into_iter().flatten() {
        out.insert(k.clone(), decoded(v));
    }
    Some(out)
}

/// An env var's `valueFrom`; `None` for an optional reference that is missing.
fn value_from(
    store: &Store,
    pod: &Value,
    ns: &str,
    pod_ip: &str,
    from: &Value,
) -> Result<Option<String>, Waiting> {
    for (kind, field) in [
        (Kind::Secret, "secretKeyRef"),
        (Kind::ConfigMap, "configMapKeyRef"),
    ] {
        let Some(r) = from.get(field) else { continue };
        let (name, key) = (str_at(r, "/name"), str_at(r, "/key"));
        let optional = r["optional"] == Value::Bool(true);
        return match read_data(store, kind, ns, name) {
            Some(data) => match data.get(key) {
                Some(v) => Ok(Some(v.clone())),
                None if optional => Ok(None),
                None => Err(Waiting {
                    reason: "CreateContainerConfigError",
                    message: format!("couldn't find key {key} in {} {ns}/{name}", kind.name()),
                }),
            },
            None if optional => Ok(None),
            None => Err(config_error(kind, name)),
        };
    }
    if let Some(r) = from.get("fieldRef") {
        let path = str_at(r, "/fieldPath");
        let bracketed = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|p| p.strip_suffix("']"))
                .map(str::to_owned)
        };
        let v = match path {
            "metadata.name" => str_at(pod, "/metadata/name").to_owned(),
            "metadata.namespace" => ns.to_owned(),
            "metadata.uid" => str_at(pod, "/metadata/uid").to_owned(),
            "spec.nodeName" => str_at(pod, "/spec/nodeName").to_owned(),
            "spec.serviceAccountName" => str_at(pod, "/spec/serviceAccountName").to_owned(),
            "status.podIP" => pod_ip.to_owned(),
            "status.hostIP" => "10.0.0.1".to_owned(),
            _ => {
                if let Some(k) = bracketed("metadata.labels['") {
                    str_at(
                        &pod["metadata"]["labels"],
                        &format!("/{}", k.replace('/', "~1")),
                    )
                    .to_owned()
                } else if let Some(k) = bracketed("metadata.annotations['") {
                    str_at(
                        &pod["metadata"]["annotations"],
                        &format!("/{}", k.replace('/', "~1")),
                    )
                    .to_owned()
                } else {
                    String::new()
                }
            }
        };
        return Ok(Some(v));
    }
    if let Some(r) = from.get("resourceFieldRef") {
        let c = &pod["spec"]["containers"][0]["resources"];
        let v = match str_at(r, "/resource").split_once('.') {
            Some((list, res)) => c[format!("{list}s")][res]
                .as_str()
                .unwrap_or("0")
                .to_owned(),
            None => "0".to_owned(),
        };
        return Ok(Some(v));
    }
    Ok(Some(String::new()))
}

/// Writes the pod's volumes under `root`; returns each volume's host directory.
fn materialize_volumes(
    store: &Store,
    pod: &Value,
    root: &Path,
) -> Result<HashMap<String, PathBuf>, Waiting> {
    let ns = str_at(pod, "/metadata/namespace");
    let mut out = HashMap::new();
    for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = str_at(v, "/name");
        let dir = root.join(name);
        let io = |e: std::io::Error| Waiting {
            reason: "ContainerCreating",
            message: format!("MountVolume.SetUp failed for volume {name:?} : {e}"),
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        for (kind, field, name_field) in [
            (Kind::Secret, "secret", "secretName"),
            (Kind::ConfigMap, "configMap", "name"),
        ] {
            let Some(src) = v.get(field) else { continue };
            let obj_name = str_at(src, &format!("/{name_field}"));
            let Some(data) = read_bytes(store, kind, ns, obj_name) else {
                if src["optional"] == Value::Bool(true) {
                    continue;
                }
                return Err(Waiting {
                    reason: "ContainerCreating",
                    message: format!(
                        "MountVolume.SetUp failed for volume {name:?} : {} \"{obj_name}\" not found",
                        kind.name().to_lowercase()
                    ),
                });
            };
            let default_mode = src["defaultMode"].as_u64().unwrap_or(0o644) as u32;
            let items: Vec<(String, String, u32)> = match src["items"].as_array() {
                Some(items) => items
                    .iter()
                    .map(|i| {
                        let mode = i["mode"].as_u64().map_or(default_mode, |m| m as u32);
                        (
                            str_at(i, "/key").to_owned(),
                            str_at(i, "/path").to_owned(),
                            mode,
                        )
                    })
                    .collect(),
                None => data
                    .keys()
                    .map(|k| (k.clone(), k.clone(), default_mode))
                    .collect(),
            };
            for (key, path, mode) in items {
                let Some(bytes) = data.get(&key) else {
                    return Err(Waiting {
                        reason: "ContainerCreating",
                        message: format!(
                            "MountVolume.SetUp failed for volume {name:?} : configmap references non-existent config key: {key}"
                        ),
                    });
                };
                let file = dir.join(&path);
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
                std::fs::write(&file, bytes).map_err(io)?;
                let _ =
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode | 0o400));
            }
        }
        out.insert(name.to_owned(), dir);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_rewritten_where_they_start_and_end_a_word() {
        let mounts = vec![
            (
                "/var/run/gantry".to_owned(),
                PathBuf::from("/tmp/p/volumes/payload"),
            ),
            (
                "/dev/termination-log".to_owned(),
                PathBuf::from("/tmp/p/termination-log"),
            ),
        ];
        let r = |s: &str| rewrite_path(s, &mounts);
        assert_eq!(
            r("/var/run/gantry/task.json"),
            "/tmp/p/volumes/payload/task.json"
        );
        assert_eq!(
            r("--task=/var/run/gantry/task.json"),
            "--task=/tmp/p/volumes/payload/task.json"
        );
        assert_eq!(
            r("echo x > /dev/termination-log; exit 1"),
            "echo x > /tmp/p/termination-log; exit 1"
        );
        assert_eq!(r("/var/run/gantry-other/x"), "/var/run/gantry-other/x");
        assert_eq!(r("/opt/var/run/gantry"), "/opt/var/run/gantry");
    }

    #[test]
    fn variable_references_expand_like_the_kubelet() {
        let vars: BTreeMap<String, String> = [("A".to_owned(), "1".to_owned())].into();
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &vars), "1-$(B)-$(A)-$");
    }
}
