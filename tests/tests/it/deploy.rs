//! The manifests of `deploy/` pass the official Kubernetes schemas (`kubernetes-validate
//! --strict`, 1.28 and a current version) and keep what docs/kubernetes.md promises: the
//! Role's permissions, a hardened dispatcher, secrets only by reference, an example catalog
//! the dispatcher accepts, and no placeholder Secret applied by `kubectl apply -k`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use gantry_dispatcher::images::ImagePolicy;
use gantry_dispatcher::settings::KubernetesSection;
use gantry_shared::catalog::Catalog;
use gantry_shared::config::read_file;
use serde_json::Value;

const KUSTOMIZATION: &str = "kustomization.yaml";

fn deploy_dir() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests).join("deploy")
}

/// `kubernetes-validate --strict` of `files` for Kubernetes `version`: its report, or an
/// error with the report when a document fails. The program is GANTRY_KUBERNETES_VALIDATE,
/// else `kubernetes-validate` from PyPI on PATH (scripts/test.sh installs it).
fn kubernetes_validate(version: &str, files: &[PathBuf]) -> anyhow::Result<String> {
    let program = std::env::var("GANTRY_KUBERNETES_VALIDATE")
        .unwrap_or_else(|_| "kubernetes-validate".into());
    let out = Command::new(&program)
        .args(["--strict", "--no-warn", "-k", version])
        .args(files)
        .output()
        .with_context(|| format!("cannot run {program}; run scripts/test.sh, which installs it"))?;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "against {version}:\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(report)
}

/// `deploy/*.yaml` but the kustomization, by name.
fn manifest_files() -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(deploy_dir()).context("reading deploy/")? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".yaml") && name != KUSTOMIZATION {
            files.push(path);
        }
    }
    files.sort();
    anyhow::ensure!(!files.is_empty(), "deploy/ has no manifests");
    Ok(files)
}

/// One YAML document as JSON, read with the configuration's YAML reader (the file holds
/// exactly this document).
fn parse(text: &str, dir: &Path) -> anyhow::Result<Value> {
    let file = dir.join("document.yaml");
    std::fs::write(&file, text)?;
    Ok(read_file::<Value>(Some(&file))?)
}

/// Every document of every manifest, with its file's name.
fn documents() -> anyhow::Result<Vec<(String, Value)>> {
    let dir = tempfile::tempdir()?;
    let mut docs = Vec::new();
    for path in manifest_files()? {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(&path)?;
        let mut current = String::new();
        for line in text.lines().chain(["---"]) {
            if line.trim_end() == "---" {
                let doc = parse(&current, dir.path()).with_context(|| name.clone())?;
                if !doc.is_null() {
                    docs.push((name.clone(), doc));
                }
                current.clear();
            } else {
                current.push_str(line);
                current.push('\n');
            }
        }
    }
    Ok(docs)
}

/// The one document of `kind`.
fn the(docs: &[(String, Value)], kind: &str) -> anyhow::Result<Value> {
    let mut found = docs.iter().filter(|(_, d)| d["kind"] == kind);
    match (found.next(), found.next()) {
        (Some((_, doc)), None) => Ok(doc.clone()),
        (None, _) => bail!("no {kind} in deploy/"),
        (Some(_), Some(_)) => bail!("more than one {kind} in deploy/"),
    }
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// `(group, resource)` → verbs, of a Role's or ClusterRole's rules.
fn permissions(role: &Value) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut map: BTreeMap<_, BTreeSet<_>> = BTreeMap::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                map.entry((group.to_owned(), resource.to_owned()))
                    .or_default()
                    .extend(strings(&rule["verbs"]).into_iter().map(str::to_owned));
            }
        }
    }
    map
}

fn expected(rules: &[(&str, &str, &[&str])]) -> BTreeMap<(String, String), BTreeSet<String>> {
    rules
        .iter()
        .map(|(group, resource, verbs)| {
            let verbs = verbs.iter().map(|v| (*v).to_owned()).collect();
            (((*group).to_owned(), (*resource).to_owned()), verbs)
        })
        .collect()
}

/// The literal value of `container`'s environment variable `name`.
fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

#[test]
fn the_deploy_manifests_pass_the_official_schemas_for_kubernetes_1_28_and_current()
-> anyhow::Result<()> {
    let files = manifest_files()?;
    let count = documents()?.len();
    for version in ["1.28.0", "1.37.0"] {
        let report = kubernetes_validate(version, &files)?;
        assert_eq!(
            report.matches("passed").count(),
            count,
            "every document was checked against {version}: {report}"
        );
    }
    Ok(())
}

#[test]
fn the_role_grants_exactly_the_permissions_the_docs_list() -> anyhow::Result<()> {
    let docs = documents()?;
    let role = the(&docs, "Role")?;
    assert_eq!(
        permissions(&role),
        expected(&[
            (
                "batch",
                "jobs",
                &["create", "get", "list", "watch", "delete"]
            ),
            ("", "pods", &["list", "watch"]),
            ("", "secrets", &["create"]),
            ("", "configmaps", &["get", "list", "watch"]),
        ])
    );
    let nodes = the(&docs, "ClusterRole")?;
    assert_eq!(
        permissions(&nodes),
        expected(&[("", "nodes", &["list", "watch"])]),
        "the development-mode ClusterRole reads nodes only"
    );
    let account = the(&docs, "Deployment")?["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .context("the Deployment names its service account")?
        .to_owned();
    for (binding, role) in [("RoleBinding", &role), ("ClusterRoleBinding", &nodes)] {
        let binding = the(&docs, binding)?;
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
        assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
        assert_eq!(binding["subjects"][0]["name"], account.as_str());
    }
    Ok(())
}

#[test]
fn the_dispatcher_runs_hardened_and_reads_its_secrets_by_reference() -> anyhow::Result<()> {
    let docs = documents()?;
    let deployment = the(&docs, "Deployment")?;
    assert_eq!(deployment["spec"]["replicas"], 1);
    let pod = &deployment["spec"]["template"];
    assert_ne!(
        pod["metadata"]["labels"]["app.kubernetes.io/managed-by"], "gantry",
        "the dispatcher would take its own pod for a Job's"
    );
    let pod = &pod["spec"];
    let secrets: BTreeSet<(String, String)> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "Secret")
        .flat_map(|(_, d)| {
            let name = d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let keys = d["stringData"].as_object().into_iter().flatten();
            keys.map(move |(key, _)| (name.clone(), key.clone()))
        })
        .collect();
    let containers = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten());
    for c in containers {
        let name = &c["name"];
        let sc = &c["securityContext"];
        let either = |key: &str| {
            if sc[key].is_null() {
                &pod["securityContext"][key]
            } else {
                &sc[key]
            }
        };
        assert_eq!(either("runAsNonRoot"), true, "{name}: runAsNonRoot");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{name}");
        assert!(
            sc["capabilities"]["add"].is_null(),
            "{name}: adds capabilities"
        );
        assert_eq!(either("seccompProfile")["type"], "RuntimeDefault", "{name}");
        for var in c["env"].as_array().into_iter().flatten() {
            let var_name = var["name"].as_str().unwrap_or_default();
            if !["URL", "PASSWORD", "SECRET"]
                .iter()
                .any(|s| var_name.to_uppercase().contains(s))
            {
                continue;
            }
            assert!(var["value"].is_null(), "{name}: {var_name} is inline");
            let secret = &var["valueFrom"]["secretKeyRef"];
            let reference = (
                secret["name"].as_str().unwrap_or_default().to_owned(),
                secret["key"].as_str().unwrap_or_default().to_owned(),
            );
            assert!(
                secrets.contains(&reference),
                "{name}: {var_name} refers to {reference:?}, which secret.example.yaml does not describe"
            );
        }
    }
    let kube = KubernetesSection::default();
    assert!(
        secrets.contains(&(kube.amqp_secret_name, kube.amqp_secret_key)),
        "the template describes the Secret the executors read: {secrets:?}"
    );
    Ok(())
}

#[test]
fn the_example_catalog_is_one_the_dispatcher_accepts() -> anyhow::Result<()> {
    let docs = documents()?;
    let container = the(&docs, "Deployment")?["spec"]["template"]["spec"]["containers"][0].clone();
    assert!(
        strings(&container["args"]).contains(&"--runtime=kubernetes"),
        "{container}"
    );
    let name = env_value(&container, "GANTRY_CATALOG_CONFIGMAP").context("a catalog ConfigMap")?;
    let configmap = the(&docs, "ConfigMap")?;
    assert_eq!(configmap["metadata"]["name"], name);
    let text = configmap["data"]["catalog.yaml"]
        .as_str()
        .context("the catalog is under the key catalog.yaml")?;
    let catalog = Catalog::parse(text, "deploy/catalog-configmap.yaml")?;
    let allowed = env_value(&container, "GANTRY_ALLOWED_REGISTRIES").unwrap_or_default();
    let policy = ImagePolicy {
        allowed_registries: allowed.split(',').map(|r| r.trim().to_owned()).collect(),
        dev_mode: false,
    };
    policy.check_catalog(&catalog)?;
    Ok(())
}

#[test]
fn kubectl_apply_k_applies_every_manifest_but_the_secret_template_and_dev_rbac()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let text = std::fs::read_to_string(deploy_dir().join(KUSTOMIZATION))?;
    let kustomization = parse(&text, dir.path())?;
    assert_eq!(kustomization["namespace"], "gantry");
    let listed: BTreeSet<&str> = strings(&kustomization["resources"]).into_iter().collect();
    let files = manifest_files()?;
    let names: BTreeSet<&str> = files
        .iter()
        .filter_map(|f| f.file_name()?.to_str())
        .collect();
    let left_out: Vec<_> = names.difference(&listed).copied().collect();
    assert_eq!(left_out, ["rbac-dev-nodes.yaml", "secret.example.yaml"]);
    let missing: Vec<_> = listed.difference(&names).collect();
    assert!(missing.is_empty(), "listed but absent: {missing:?}");
    Ok(())
}
