//! The manifests of `deploy/` and `deploy/registry/` pass the official Kubernetes schemas
//! (`kubernetes-validate --strict`, 1.28 and a current version) and keep what
//! docs/kubernetes.md and docs/registry.md promise: the Role's permissions, a hardened
//! dispatcher and registry service, secrets only by reference, an example catalog the
//! dispatcher accepts, the dispatcher pointed at the registry service that only it may
//! reach, and no placeholder Secret applied by `kubectl apply -k`.

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

/// The registry service's kustomization, which deploy/'s lists.
fn registry_dir() -> PathBuf {
    deploy_dir().join("registry")
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
    manifest_files_in(&deploy_dir())
}

/// `dir/*.yaml` but the kustomization, by name.
fn manifest_files_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".yaml") && name != KUSTOMIZATION {
            files.push(path);
        }
    }
    files.sort();
    anyhow::ensure!(!files.is_empty(), "{} has no manifests", dir.display());
    Ok(files)
}

/// One YAML document as JSON, read with the configuration's YAML reader (the file holds
/// exactly this document).
fn parse(text: &str, dir: &Path) -> anyhow::Result<Value> {
    let file = dir.join("document.yaml");
    std::fs::write(&file, text)?;
    Ok(read_file::<Value>(Some(&file))?)
}

/// Every document of every manifest of deploy/, with its file's name.
fn documents() -> anyhow::Result<Vec<(String, Value)>> {
    documents_in(&deploy_dir())
}

/// Every document of every manifest of `manifests`, with its file's name.
fn documents_in(manifests: &Path) -> anyhow::Result<Vec<(String, Value)>> {
    let dir = tempfile::tempdir()?;
    let mut docs = Vec::new();
    for path in manifest_files_in(manifests)? {
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
        (None, _) => bail!("no {kind} in its directory"),
        (Some(_), Some(_)) => bail!("more than one {kind} in its directory"),
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
    let mut files = manifest_files()?;
    files.extend(manifest_files_in(&registry_dir())?);
    let count = documents()?.len() + documents_in(&registry_dir())?.len();
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

/// The `(name, key)` of every Secret the documents describe.
fn secret_keys(docs: &[(String, Value)]) -> BTreeSet<(String, String)> {
    docs.iter()
        .filter(|(_, d)| d["kind"] == "Secret")
        .flat_map(|(_, d)| {
            let name = d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let keys = d["stringData"].as_object().into_iter().flatten();
            keys.map(move |(key, _)| (name.clone(), key.clone()))
        })
        .collect()
}

/// Every container of `deployment`'s pod runs hardened, and reads its URLs, passwords and
/// secrets from the Secrets in `secrets`, never inline.
fn assert_hardened(deployment: &Value, secrets: &BTreeSet<(String, String)>) {
    let pod = &deployment["spec"]["template"]["spec"];
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
}

#[test]
fn the_dispatcher_runs_hardened_and_reads_its_secrets_by_reference() -> anyhow::Result<()> {
    let docs = documents()?;
    let deployment = the(&docs, "Deployment")?;
    assert_ne!(
        deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "gantry",
        "the dispatcher would take its own pod for a Job's"
    );
    let secrets = secret_keys(&docs);
    assert_hardened(&deployment, &secrets);
    let kube = KubernetesSection::default();
    assert!(
        secrets.contains(&(kube.amqp_secret_name, kube.amqp_secret_key)),
        "the template describes the Secret the executors read: {secrets:?}"
    );
    Ok(())
}

#[test]
fn two_dispatchers_roll_one_at_a_time_and_a_disruption_leaves_one() -> anyhow::Result<()> {
    let docs = documents()?;
    let deployment = the(&docs, "Deployment")?;
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(
        spec["strategy"]["rollingUpdate"],
        serde_json::json!({"maxSurge": 1, "maxUnavailable": 0}),
        "a new dispatcher is ready before an old one stops"
    );
    let grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    let drain = gantry_shared::config::Config::default()
        .broker_timeout
        .as_secs();
    assert!(grace >= 2 * drain, "SIGTERM's drain fits in {grace}s");
    let budget = the(&docs, "PodDisruptionBudget")?;
    assert_eq!(budget["spec"]["minAvailable"], 1);
    assert!(
        selects(
            &budget["spec"]["selector"]["matchLabels"],
            &spec["template"]["metadata"]["labels"]
        ),
        "the budget covers the dispatcher's pods"
    );
    Ok(())
}

/// `labels` has every pair of `selector`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
}

#[test]
fn the_dispatcher_asks_the_registry_service_that_only_it_may_reach() -> anyhow::Result<()> {
    let docs = documents()?;
    let dispatcher = the(&docs, "Deployment")?;
    let dispatcher_labels = &dispatcher["spec"]["template"]["metadata"]["labels"];
    let container = &dispatcher["spec"]["template"]["spec"]["containers"][0];
    let registry_docs = documents_in(&registry_dir())?;
    let registry = the(&registry_docs, "Deployment")?;
    assert_eq!(
        registry["spec"]["replicas"], 1,
        "each replica would poll on its own"
    );
    assert_hardened(&registry, &secret_keys(&registry_docs));
    let pod_labels = &registry["spec"]["template"]["metadata"]["labels"];
    let served = &registry["spec"]["template"]["spec"]["containers"][0];
    let port = served["ports"][0].clone();
    assert_eq!(port["name"], "http");
    let listen = env_value(served, "GANTRY_REGISTRY_LISTEN").context("GANTRY_REGISTRY_LISTEN")?;
    assert_eq!(
        Some(listen.rsplit(':').next().unwrap_or_default()),
        port["containerPort"]
            .as_u64()
            .map(|p| p.to_string())
            .as_deref(),
        "the container port is the one it listens on"
    );
    assert_eq!(served["readinessProbe"]["httpGet"]["path"], "/health");

    // The address the dispatcher is given is the Service's, which selects the registry.
    let service = the(&registry_docs, "Service")?;
    assert!(
        selects(&service["spec"]["selector"], pod_labels),
        "{service}"
    );
    assert!(!selects(&service["spec"]["selector"], dispatcher_labels));
    let service_port = &service["spec"]["ports"][0];
    assert_eq!(service_port["targetPort"], "http");
    let address = format!(
        "http://{}:{}",
        service["metadata"]["name"].as_str().unwrap_or_default(),
        service_port["port"]
    );
    assert_eq!(
        env_value(container, "GANTRY_EXECUTOR_REGISTRY"),
        Some(address.as_str()),
        "the dispatcher asks the registry Service"
    );

    // Every registry the service watches is one the dispatcher allows its images from.
    let allowed: BTreeSet<&str> = env_value(container, "GANTRY_ALLOWED_REGISTRIES")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .collect();
    let sources =
        env_value(served, "GANTRY_REGISTRY_SOURCES").context("GANTRY_REGISTRY_SOURCES")?;
    for source in sources.split(',') {
        let source = gantry_registry::Source::parse(source.trim()).map_err(anyhow::Error::msg)?;
        assert!(
            allowed.contains(source.host.as_str()),
            "{} is watched but not in the dispatcher's GANTRY_ALLOWED_REGISTRIES {allowed:?}",
            source.host
        );
    }

    // Ingress to the registry's pods only from the dispatcher's pods, only on its port.
    let policy = the(&registry_docs, "NetworkPolicy")?;
    let spec = &policy["spec"];
    assert!(
        selects(&spec["podSelector"]["matchLabels"], pod_labels),
        "{policy}"
    );
    assert_eq!(strings(&spec["policyTypes"]), ["Ingress"]);
    let rules = spec["ingress"].as_array().context("ingress rules")?;
    assert_eq!(rules.len(), 1, "one rule: {policy}");
    let from = rules[0]["from"]
        .as_array()
        .context("a `from`: no rule admits everyone")?;
    assert_eq!(from.len(), 1, "{policy}");
    let peer = from[0].as_object().context("a peer")?;
    assert_eq!(
        peer.keys().collect::<Vec<_>>(),
        ["podSelector"],
        "pods of this namespace only, no namespaceSelector or ipBlock: {policy}"
    );
    let admitted = &from[0]["podSelector"]["matchLabels"];
    assert!(
        selects(admitted, dispatcher_labels),
        "the dispatcher is admitted"
    );
    assert!(
        !selects(admitted, pod_labels),
        "the registry's own pods are not"
    );
    assert!(
        !selects(
            admitted,
            &serde_json::json!({"app.kubernetes.io/part-of": "gantry"})
        ),
        "not every Gantry pod"
    );
    let ports = rules[0]["ports"].as_array().context("ports")?;
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["port"], port["containerPort"]);
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

/// What `dir/kustomization.yaml` lists: its files and its directories (`name/`), each of
/// which must exist.
fn kustomization(dir: &Path) -> anyhow::Result<(Value, BTreeSet<String>, BTreeSet<String>)> {
    let temp = tempfile::tempdir()?;
    let text = std::fs::read_to_string(dir.join(KUSTOMIZATION))?;
    let kustomization = parse(&text, temp.path())?;
    let (mut files, mut dirs) = (BTreeSet::new(), BTreeSet::new());
    for listed in strings(&kustomization["resources"]) {
        match listed.strip_suffix('/') {
            Some(sub) => {
                anyhow::ensure!(
                    dir.join(sub).join(KUSTOMIZATION).is_file(),
                    "{listed} is listed but has no {KUSTOMIZATION}"
                );
                dirs.insert(sub.to_owned());
            }
            None => {
                anyhow::ensure!(dir.join(listed).is_file(), "listed but absent: {listed}");
                files.insert(listed.to_owned());
            }
        }
    }
    Ok((kustomization, files, dirs))
}

/// The manifests of `dir` that its kustomization leaves out.
fn left_out(dir: &Path, listed: &BTreeSet<String>) -> anyhow::Result<Vec<String>> {
    Ok(manifest_files_in(dir)?
        .iter()
        .filter_map(|f| f.file_name()?.to_str())
        .filter(|name| !listed.contains(*name))
        .map(str::to_owned)
        .collect())
}

#[test]
fn kubectl_apply_k_applies_every_manifest_but_the_secret_template_and_dev_rbac()
-> anyhow::Result<()> {
    let (top, files, dirs) = kustomization(&deploy_dir())?;
    assert_eq!(top["namespace"], "gantry");
    assert_eq!(
        left_out(&deploy_dir(), &files)?,
        ["rbac-dev-nodes.yaml", "secret.example.yaml"]
    );
    assert_eq!(
        dirs.into_iter().collect::<Vec<_>>(),
        ["registry"],
        "the registry service is applied with the dispatcher, which asks it"
    );

    let (registry, files, dirs) = kustomization(&registry_dir())?;
    assert_eq!(registry["namespace"], "gantry");
    assert!(dirs.is_empty());
    assert_eq!(left_out(&registry_dir(), &files)?, ["secret.example.yaml"]);
    Ok(())
}
