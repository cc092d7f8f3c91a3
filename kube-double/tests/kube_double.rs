//! The Kubernetes API double, driven through the real `kube::Client` as the `kubernetes`
//! runtime will drive it: the API server's answers, watches, the Job controller, the
//! kubelet running real processes, scripted outcomes and injected faults.

use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use gantry_kube_double::{FaultSpec, KubeDouble, Options, SCRIPT_KEY, Script};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

/// A Job running `command` in one container, `restartPolicy: Never`, `backoffLimit: 0`.
fn job(name: &str, command: &[&str]) -> Job {
    job_from(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "gantry"}},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "busybox:1.36", "command": command}],
            }},
        },
    }))
}

fn job_from(v: Value) -> Job {
    serde_json::from_value(v).expect("a valid Job")
}

/// A Job following a script, labelled with it.
fn scripted(name: &str, script: &Script) -> Job {
    let mut j = job(name, &["false"]);
    j.metadata
        .labels
        .get_or_insert_default()
        .insert(SCRIPT_KEY.into(), script.to_string());
    j
}

fn api_error(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn causes(status: &kube::core::Status) -> Vec<(String, String)> {
    status
        .details
        .as_ref()
        .map(|d| {
            d.causes
                .iter()
                .map(|c| (c.field.clone(), c.message.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn pod_status(pod: &Pod) -> Value {
    serde_json::to_value(pod.status.clone()).expect("a pod status serializes")
}

fn job_conditions(job: &Job) -> Vec<(String, String)> {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|c| (c.type_, c.reason.unwrap_or_default()))
        .collect()
}

fn jobs(d: &KubeDouble) -> Api<Job> {
    Api::default_namespaced(d.client())
}

/// Every pod event (type, phase, pod reason) until a DELETED one, from `rv` on.
async fn pod_events_until_deleted(d: &KubeDouble, rv: &str) -> Vec<(String, String, String)> {
    let pods: Api<Pod> = Api::default_namespaced(d.client());
    let mut stream = pods
        .watch(&WatchParams::default().timeout(10), rv)
        .await
        .expect("watching pods")
        .boxed();
    let mut seen = Vec::new();
    while let Some(ev) = stream.try_next().await.expect("a watch event") {
        let (ty, pod) = match ev {
            WatchEvent::Added(p) => ("ADDED", p),
            WatchEvent::Modified(p) => ("MODIFIED", p),
            WatchEvent::Deleted(p) => ("DELETED", p),
            _ => continue,
        };
        let s = pod_status(&pod);
        seen.push((
            ty.to_owned(),
            s["phase"].as_str().unwrap_or("").to_owned(),
            s["reason"].as_str().unwrap_or("").to_owned(),
        ));
        if ty == "DELETED" {
            break;
        }
    }
    seen
}

#[tokio::test]
async fn creating_a_job_returns_201_and_a_second_create_is_409_already_exists() {
    let d = KubeDouble::start().await;
    let api = jobs(&d);
    let created = api
        .create(&PostParams::default(), &scripted("x", &Script::Succeed))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, Some(1));
    assert_eq!(created.spec.as_ref().unwrap().backoff_limit, Some(0));
    let labels = created
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert_eq!(labels["job-name"], "x");
    assert_eq!(
        labels["batch.kubernetes.io/controller-uid"],
        *meta.uid.as_ref().unwrap()
    );

    let err = api_error(
        api.create(&PostParams::default(), &scripted("x", &Script::Succeed))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(err.message, "jobs.batch \"x\" already exists");
    let details = err.details.unwrap();
    assert_eq!(
        (
            details.name.as_str(),
            details.group.as_str(),
            details.kind.as_str()
        ),
        ("x", "batch", "jobs")
    );

    let posts: Vec<Option<u16>> = d
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.status)
        .collect();
    assert_eq!(posts, [Some(201), Some(409)]);
    let err = api_error(api.get("nope").await.unwrap_err());
    assert_eq!(
        (err.code, err.reason.as_str(), err.message.as_str()),
        (404, "NotFound", "jobs.batch \"nope\" not found")
    );
}

#[tokio::test]
async fn an_invalid_job_is_422_listing_every_cause() {
    let d = KubeDouble::start().await;
    let bad = job_from(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "Bad_Name", "labels": {"-bad-key": "ok", "tier": "not ok!"}},
        "spec": {"backoffLimit": -1, "template": {"spec": {"containers": []}}},
    }));
    let err = api_error(
        jobs(&d)
            .create(&PostParams::default(), &bad)
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    let fields: Vec<String> = causes(&err).into_iter().map(|(f, _)| f).collect();
    for f in [
        "metadata.name",
        "metadata.labels",
        "spec.backoffLimit",
        "spec.template.spec.containers",
        "spec.template.spec.restartPolicy",
    ] {
        assert!(
            fields.iter().any(|x| x == f),
            "no cause for {f} in {fields:?}"
        );
    }
    assert!(
        err.message
            .starts_with("Job.batch \"Bad_Name\" is invalid: ["),
        "{}",
        err.message
    );
    let restart = causes(&err)
        .into_iter()
        .find(|(f, _)| f == "spec.template.spec.restartPolicy")
        .unwrap();
    assert_eq!(
        restart.1,
        "Required value: valid values: \"OnFailure\", \"Never\""
    );

    let mut no_image = job("no-image", &["true"]);
    let pod = no_image
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap();
    pod.containers[0].image = None;
    pod.containers[0].name = "Main".into();
    pod.restart_policy = Some("Always".into());
    let err = api_error(
        jobs(&d)
            .create(&PostParams::default(), &no_image)
            .await
            .unwrap_err(),
    );
    let fields: Vec<String> = causes(&err).into_iter().map(|(f, _)| f).collect();
    assert!(
        fields.contains(&"spec.template.spec.containers[0].image".to_owned()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"spec.template.spec.containers[0].name".to_owned()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"spec.template.spec.restartPolicy".to_owned()),
        "{fields:?}"
    );

    // 64 characters: a valid object name, but not a valid job-name label value.
    let long = "a".repeat(64);
    let err = api_error(
        jobs(&d)
            .create(&PostParams::default(), &job(&long, &["true"]))
            .await
            .unwrap_err(),
    );
    // Once for `job-name` and once for `batch.kubernetes.io/job-name`.
    let label_cause = (
        "spec.template.labels".to_owned(),
        format!("Invalid value: \"{long}\": must be no more than 63 characters"),
    );
    assert_eq!(causes(&err), [label_cause.clone(), label_cause]);
    jobs(&d)
        .create(
            &PostParams::default(),
            &scripted(&"a".repeat(63), &Script::Succeed),
        )
        .await
        .unwrap();
    assert_eq!(d.jobs_created(), 1);
}

#[tokio::test]
async fn resources_are_validated_like_the_api_server() {
    let d = KubeDouble::start().await;
    let with_limits = |name: &str, limits: Value, mounts: Value| {
        job_from(json!({
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [{
                "name": "main", "image": "busybox", "command": ["true"],
                "resources": {"limits": limits}, "volumeMounts": mounts,
            }]}}},
        }))
    };
    let err = api_error(
        jobs(&d)
            .create(
                &PostParams::default(),
                &with_limits(
                    "gpu",
                    json!({"nvidia.com/gpu": "500m"}),
                    json!([{"name": "payload", "mountPath": "/task"}]),
                ),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 422);
    let c = causes(&err);
    assert!(
        c.contains(&(
            "spec.template.spec.containers[0].resources.limits[nvidia.com/gpu]".into(),
            "Invalid value: \"500m\": must be an integer".into()
        )),
        "{c:?}"
    );
    assert!(
        c.contains(&(
            "spec.template.spec.containers[0].volumeMounts[0].name".into(),
            "Not found: \"payload\"".into()
        )),
        "{c:?}"
    );

    // A quantity that does not parse fails decoding: 400, as from the API server.
    let err = api_error(
        jobs(&d)
            .create(
                &PostParams::default(),
                &with_limits("cpu", json!({"cpu": "lots"}), json!([])),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (400, "BadRequest"));
    assert!(
        err.message
            .contains("quantities must match the regular expression"),
        "{}",
        err.message
    );

    jobs(&d)
        .create(
            &PostParams::default(),
            &with_limits("ok", json!({"cpu": "500m", "memory": "2Gi"}), json!([])),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_secret_over_one_mebibyte_is_422_and_one_of_exactly_one_mebibyte_is_not() {
    let d = KubeDouble::start().await;
    let secrets: Api<Secret> = Api::default_namespaced(d.client());
    let secret = |name: &str, size: usize| -> Secret {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "stringData": {"payload.json": "x".repeat(size)},
        }))
        .unwrap()
    };
    let err = api_error(
        secrets
            .create(&PostParams::default(), &secret("big", 1024 * 1024 + 1))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        causes(&err),
        [(
            "data".to_owned(),
            "Too long: may not be more than 1048576 bytes".to_owned()
        )]
    );
    let stored = secrets
        .create(&PostParams::default(), &secret("fits", 1024 * 1024))
        .await
        .unwrap();
    assert_eq!(stored.type_.as_deref(), Some("Opaque"));
    assert!(
        stored.string_data.is_none(),
        "stringData is folded into data"
    );
    assert_eq!(
        d.get_secret("fits").unwrap().data.unwrap()["payload.json"]
            .0
            .len(),
        1024 * 1024
    );

    let bad_key: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "k"}, "stringData": {"no/slash": "x"}})).unwrap();
    let err = api_error(
        secrets
            .create(&PostParams::default(), &bad_key)
            .await
            .unwrap_err(),
    );
    assert_eq!(causes(&err)[0].0, "data[no/slash]");
}

#[tokio::test]
async fn a_put_with_a_stale_resource_version_is_409_conflict() {
    let d = KubeDouble::start().await;
    let api = jobs(&d);
    let first = api
        .create(
            &PostParams::default(),
            &scripted("x", &Script::PendingForever),
        )
        .await
        .unwrap();
    let mut fresh = api.get("x").await.unwrap();
    fresh.metadata.annotations = Some([("note".to_owned(), "one".to_owned())].into());
    api.replace("x", &PostParams::default(), &fresh)
        .await
        .unwrap();

    let mut stale = first.clone();
    stale.metadata.annotations = Some([("note".to_owned(), "two".to_owned())].into());
    let err = api_error(
        api.replace("x", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    assert!(
        err.message.contains("the object has been modified"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn changing_a_jobs_template_is_422_field_is_immutable() {
    let d = KubeDouble::start().await;
    let api = jobs(&d);
    api.create(
        &PostParams::default(),
        &scripted("x", &Script::PendingForever),
    )
    .await
    .unwrap();
    let mut j = api.get("x").await.unwrap();
    j.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .image = Some("busybox:2".into());
    let err = api_error(
        api.replace("x", &PostParams::default(), &j)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 422);
    let c = causes(&err);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0].0, "spec.template");
    assert!(c[0].1.ends_with("field is immutable"), "{c:?}");

    // A status merge patch goes through; a no-op update writes nothing.
    let before = d.resource_version();
    let same = api.get("x").await.unwrap();
    api.replace("x", &PostParams::default(), &same)
        .await
        .unwrap();
    assert_eq!(d.resource_version(), before);
    let patched = api
        .patch_status(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": 0}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().ready, Some(0));
}

#[tokio::test]
async fn lists_filter_by_label_and_field_selectors() {
    let d = KubeDouble::start().await;
    let api = jobs(&d);
    for (name, tier) in [("a", Some("gpu")), ("b", Some("cpu")), ("c", None)] {
        let mut j = scripted(name, &Script::PendingForever);
        if let Some(t) = tier {
            j.metadata
                .labels
                .get_or_insert_default()
                .insert("tier".into(), t.into());
        }
        api.create(&PostParams::default(), &j).await.unwrap();
    }
    let names = |list: kube::core::ObjectList<Job>| -> Vec<String> {
        list.items
            .into_iter()
            .map(|j| j.metadata.name.unwrap())
            .collect()
    };
    for (selector, expected) in [
        ("tier=gpu", vec!["a"]),
        ("tier==gpu", vec!["a"]),
        ("tier!=gpu", vec!["b", "c"]),
        ("tier", vec!["a", "b"]),
        ("!tier", vec!["c"]),
        ("tier in (gpu,cpu)", vec!["a", "b"]),
        ("tier notin (gpu)", vec!["b", "c"]),
        ("tier,app.kubernetes.io/managed-by=gantry", vec!["a", "b"]),
    ] {
        assert_eq!(
            names(
                api.list(&ListParams::default().labels(selector))
                    .await
                    .unwrap()
            ),
            expected,
            "{selector}"
        );
    }
    assert_eq!(
        names(
            api.list(&ListParams::default().fields("metadata.name=b"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    let page = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let rest = api
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(page.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(names(rest), ["c"]);
    let err = api_error(
        api.list(&ListParams::default().fields("spec.nope=1"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (err.code, err.message.as_str()),
        (400, "field label not supported: spec.nope")
    );
}

#[tokio::test]
async fn every_page_of_a_list_shows_the_state_of_its_first_and_a_watch_from_it_sees_the_rest() {
    let d = KubeDouble::start().await;
    let api: Api<ConfigMap> = Api::namespaced(d.client(), d.namespace());
    let post = PostParams::default();
    let map = |name: &str, v: &str| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name}, "data": {"v": v}})).unwrap()
    };
    for name in ["a", "b", "c", "d"] {
        api.create(&post, &map(name, "1")).await.unwrap();
    }
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    let rv = first.metadata.resource_version.clone().unwrap();
    let token = first.metadata.continue_.clone().unwrap();
    let seen = |list: &kube::core::ObjectList<ConfigMap>| -> Vec<(String, String)> {
        list.items
            .iter()
            .map(|m| {
                (
                    m.metadata.name.clone().unwrap(),
                    m.data.as_ref().unwrap()["v"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(
        seen(&first),
        [("a".into(), "1".into()), ("b".into(), "1".into())]
    );

    // Between the pages: a change on the first page, one on the second, an object deleted
    // and one created where the second page reads.
    let patch = |v: &str| Patch::Merge(json!({"data": {"v": v}}));
    api.patch("a", &PatchParams::default(), &patch("2"))
        .await
        .unwrap();
    api.patch("d", &PatchParams::default(), &patch("2"))
        .await
        .unwrap();
    api.delete("c", &DeleteParams::default()).await.unwrap();
    api.create(&post, &map("bb", "1")).await.unwrap();

    let second = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(
        seen(&second),
        [("c".into(), "1".into()), ("d".into(), "1".into())]
    );
    assert_eq!(
        second.metadata.resource_version.as_deref(),
        Some(rv.as_str())
    );
    assert_eq!(second.metadata.continue_, None);

    // What the pages did not show, a watch from their resourceVersion does.
    let mut events = Box::pin(api.watch(&WatchParams::default(), &rv).await.unwrap());
    let mut changes = Vec::new();
    while changes.len() < 4 {
        let e = tokio::time::timeout(WAIT, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match e {
            WatchEvent::Added(m) => changes.push(("ADDED", m.metadata.name.unwrap())),
            WatchEvent::Modified(m) => changes.push(("MODIFIED", m.metadata.name.unwrap())),
            WatchEvent::Deleted(m) => changes.push(("DELETED", m.metadata.name.unwrap())),
            other => panic!("unexpected {other:?}"),
        }
    }
    let expected = [
        ("MODIFIED", "a"),
        ("MODIFIED", "d"),
        ("DELETED", "c"),
        ("ADDED", "bb"),
    ];
    assert_eq!(changes, expected.map(|(t, n)| (t, n.to_owned())));

    // Once those changes are forgotten, the token is too old: 410, as from the API server.
    d.compact();
    let err = api_error(
        api.list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (410, "Expired"));
    let err = api_error(
        api.list(&ListParams::default().continue_token("not-a-token"))
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 400);
}

#[tokio::test]
async fn a_watch_sees_added_modified_deleted_in_order() {
    let d = KubeDouble::start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(d.client());
    let rv = maps
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = maps
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    let cm: ConfigMap = serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "m"}, "data": {"k": "1"}})).unwrap();
    maps.create(&PostParams::default(), &cm).await.unwrap();
    maps.patch(
        "m",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await
    .unwrap();
    maps.delete("m", &DeleteParams::default()).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match stream.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(m) => seen.push(("ADDED", m.data.unwrap()["k"].clone())),
            WatchEvent::Modified(m) => seen.push(("MODIFIED", m.data.unwrap()["k"].clone())),
            WatchEvent::Deleted(m) => seen.push(("DELETED", m.data.unwrap()["k"].clone())),
            _ => {}
        }
    }
    assert_eq!(
        seen,
        [
            ("ADDED", "1".to_owned()),
            ("MODIFIED", "2".to_owned()),
            ("DELETED", "2".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_watch_from_a_forgotten_resource_version_gets_410_and_the_watcher_relists() {
    let d = KubeDouble::start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(d.client());
    let cm = |name: &str| -> ConfigMap {
        serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}),
        )
        .unwrap()
    };
    maps.create(&PostParams::default(), &cm("first"))
        .await
        .unwrap();
    d.compact();
    let mut stream = maps
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410 Gone, got {other:?}"),
    }

    let mut events = watcher(maps.clone(), watcher::Config::default()).boxed();
    let mut relists = 0;
    let mut gone = false;
    let start = Instant::now();
    while relists < 2 {
        assert!(start.elapsed() < WAIT, "the watcher did not re-list");
        match tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .unwrap()
        {
            Ok(watcher::Event::InitDone) => {
                relists += 1;
                if relists == 1 {
                    // The watcher's next watch starts late; meanwhile its resourceVersion is forgotten.
                    d.fail_next(
                        1,
                        FaultSpec::latency("GET", "/configmaps", Duration::from_millis(300)),
                    );
                    d.end_watches();
                    maps.create(&PostParams::default(), &cm("second"))
                        .await
                        .unwrap();
                    d.compact();
                }
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => gone = true,
            _ => {}
        }
    }
    assert!(gone, "the watcher saw 410 Gone before re-listing");
    let lists = d
        .requests()
        .iter()
        .filter(|r| {
            r.method == "GET" && r.path.ends_with("/configmaps") && !r.query.contains("watch=")
        })
        .count();
    assert_eq!(lists, 2);
}

#[tokio::test]
async fn a_job_whose_command_exits_0_completes_with_its_pod_succeeded_on_node_1() {
    let d = KubeDouble::start().await;
    jobs(&d)
        .create(
            &PostParams::default(),
            &job("hello", &["sh", "-c", "echo hi; exit 0"]),
        )
        .await
        .unwrap();
    let done = d
        .wait_for_job_condition("hello", "Complete", WAIT)
        .await
        .unwrap();
    let conditions: Vec<String> = job_conditions(&done).into_iter().map(|(t, _)| t).collect();
    assert_eq!(conditions, ["SuccessCriteriaMet", "Complete"]);
    let status = done.status.unwrap();
    assert_eq!(
        (status.succeeded, status.active, status.failed),
        (Some(1), Some(0), Some(0))
    );
    assert!(status.start_time.is_some() && status.completion_time.is_some());

    let pod = d
        .wait_for_pod_phase("hello", "Succeeded", WAIT)
        .await
        .unwrap();
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some("node-1")
    );
    assert!(pod.metadata.name.as_ref().unwrap().starts_with("hello-"));
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.controller), ("Job", Some(true)));
    let s = pod_status(&pod);
    assert_eq!(
        s["containerStatuses"][0]["state"]["terminated"]["exitCode"],
        0
    );
    assert_eq!(
        s["containerStatuses"][0]["state"]["terminated"]["reason"],
        "Completed"
    );
    assert_eq!(
        d.pod_log(pod.metadata.name.as_ref().unwrap()).unwrap(),
        "hi\n"
    );
    let pods: Api<Pod> = Api::default_namespaced(d.client());
    assert_eq!(
        pods.logs(pod.metadata.name.as_ref().unwrap(), &Default::default())
            .await
            .unwrap(),
        "hi\n"
    );
}

#[tokio::test]
async fn a_job_whose_command_exits_3_fails_with_backoff_limit_exceeded() {
    let d = KubeDouble::start().await;
    jobs(&d)
        .create(
            &PostParams::default(),
            &job("three", &["sh", "-c", "exit 3"]),
        )
        .await
        .unwrap();
    let failed = d
        .wait_for_job_condition("three", "Failed", WAIT)
        .await
        .unwrap();
    assert_eq!(
        job_conditions(&failed),
        [
            ("FailureTarget".into(), "BackoffLimitExceeded".into()),
            ("Failed".into(), "BackoffLimitExceeded".into())
        ]
    );
    assert_eq!(failed.status.unwrap().failed, Some(1));
    let pod = d.wait_for_pod_phase("three", "Failed", WAIT).await.unwrap();
    let t = &pod_status(&pod)["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(3), Some("Error"))
    );
}

#[tokio::test]
async fn the_termination_message_is_read_back_from_the_rewritten_path() {
    let d = KubeDouble::start().await;
    let script = "printf '{\"status\":\"published\"}' > /dev/termination-log; exit 1";
    jobs(&d)
        .create(&PostParams::default(), &job("msg", &["sh", "-c", script]))
        .await
        .unwrap();
    let pod = d.wait_for_pod_phase("msg", "Failed", WAIT).await.unwrap();
    let t = &pod_status(&pod)["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(t["message"], "{\"status\":\"published\"}");
}

#[tokio::test]
async fn active_deadline_exceeded_kills_the_process_and_fails_the_job() {
    let d = KubeDouble::start().await;
    let rv = d.resource_version().to_string();
    let mut j = job("slow", &["sh", "-c", "echo started; sleep 30"]);
    j.spec.as_mut().unwrap().active_deadline_seconds = Some(1);
    jobs(&d).create(&PostParams::default(), &j).await.unwrap();
    let pod = d.wait_for_pod_phase("slow", "Running", WAIT).await.unwrap();
    let name = pod.metadata.name.unwrap();
    d.wait_for("the process to start", WAIT, |d| {
        d.pod_log(&name).filter(|l| l.contains("started"))
    })
    .await
    .unwrap();
    assert!(d.pod_processes_alive(&name));

    let failed = d
        .wait_for_job_condition("slow", "Failed", WAIT)
        .await
        .unwrap();
    assert_eq!(
        job_conditions(&failed).last().unwrap().1,
        "DeadlineExceeded"
    );
    d.wait_for("the process to be gone", WAIT, |d| {
        (!d.pod_processes_alive(&name)).then_some(())
    })
    .await
    .unwrap();
    let events = pod_events_until_deleted(&d, &rv).await;
    assert!(
        events.contains(&(
            "MODIFIED".into(),
            "Failed".into(),
            "DeadlineExceeded".into()
        )),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap().0, "DELETED");
}

#[tokio::test]
async fn a_background_delete_removes_the_pods_and_the_owned_secret_and_kills_the_process() {
    let d = KubeDouble::start().await;
    let created = jobs(&d)
        .create(&PostParams::default(), &job("gc", &["sleep", "30"]))
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::default_namespaced(d.client());
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "gc-payload", "ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "Job", "name": "gc", "uid": created.metadata.uid.clone().unwrap(),
        }]},
        "stringData": {"task.json": "{}"},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let pod = d.wait_for_pod_phase("gc", "Running", WAIT).await.unwrap();
    let name = pod.metadata.name.unwrap();
    d.wait_for("the process to start", WAIT, |d| {
        d.pod_processes_alive(&name).then_some(())
    })
    .await
    .unwrap();

    jobs(&d)
        .delete("gc", &DeleteParams::background())
        .await
        .unwrap();
    assert!(d.job("gc").is_none());
    assert!(d.pods().is_empty(), "the pods go with their Job");
    assert!(
        d.get_secret("gc-payload").is_none(),
        "the owned Secret is collected"
    );
    d.wait_for("the process to be gone", WAIT, |d| {
        (!d.pod_processes_alive(&name)).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn deleting_a_job_without_a_policy_orphans_its_pods_as_the_api_server_does() {
    let d = KubeDouble::start().await;
    jobs(&d)
        .create(
            &PostParams::default(),
            &scripted("orphan", &Script::PendingForever),
        )
        .await
        .unwrap();
    d.wait_for("the pod", WAIT, |d| d.pods_of_job("orphan").pop())
        .await
        .unwrap();
    jobs(&d)
        .delete("orphan", &DeleteParams::default())
        .await
        .unwrap();
    let pods = d.pods();
    assert_eq!(pods.len(), 1, "the pod is orphaned, not deleted");
    assert!(
        pods[0].metadata.owner_references.is_none(),
        "and loses its owner reference"
    );
}

#[tokio::test]
async fn ttl_seconds_after_finished_deletes_the_finished_job_and_its_pods() {
    let d = KubeDouble::start().await;
    let mut j = job("ttl", &["true"]);
    j.spec.as_mut().unwrap().ttl_seconds_after_finished = Some(0);
    jobs(&d).create(&PostParams::default(), &j).await.unwrap();
    d.wait_for("the Job to be collected", WAIT, |d| {
        (d.jobs_created() == 1 && d.job("ttl").is_none() && d.pods().is_empty()).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_oom_script_ends_the_container_oomkilled_with_137() {
    let d = KubeDouble::start().await;
    jobs(&d)
        .create(&PostParams::default(), &scripted("oom", &Script::Oom))
        .await
        .unwrap();
    d.wait_for_job_condition("oom", "Failed", WAIT)
        .await
        .unwrap();
    let pod = d.wait_for_pod_phase("oom", "Failed", WAIT).await.unwrap();
    let t = &pod_status(&pod)["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(137), Some("OOMKilled"))
    );
}

#[tokio::test]
async fn the_image_pull_script_leaves_the_pod_pending_in_image_pull_backoff() {
    let d = KubeDouble::start().await;
    d.script_next(Script::ImagePull);
    jobs(&d)
        .create(&PostParams::default(), &job("pull", &["true"]))
        .await
        .unwrap();
    let pod = d
        .wait_for("ImagePullBackOff", WAIT, |d| {
            d.pods_of_job("pull").into_iter().find(|p| {
                pod_status(p)["containerStatuses"][0]["state"]["waiting"]["reason"]
                    == "ImagePullBackOff"
            })
        })
        .await
        .unwrap();
    assert_eq!(pod_status(&pod)["phase"], "Pending");
    let job = d.job("pull").unwrap();
    assert!(
        job_conditions(&job).is_empty(),
        "the Job itself never fails"
    );
    assert_eq!(job.status.unwrap().active, Some(1));
}

#[tokio::test]
async fn the_run_forever_script_keeps_the_pod_running_until_its_job_is_deleted() {
    let d = KubeDouble::start_with(Options {
        script: Some(Script::RunForever),
        ..Options::default()
    })
    .await;
    let before = Instant::now();
    jobs(&d)
        .create(&PostParams::default(), &job("long", &["false"]))
        .await
        .unwrap();
    let created = d.job_created_at("long").expect("the creation was recorded");
    assert!(created >= before && created <= Instant::now());
    d.wait_for_pod_phase("long", "Running", WAIT).await.unwrap();
    // Many script steps later, it still runs and its Job is still active.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pod = d.pods_of_job("long").pop().expect("its pod");
    assert_eq!(pod_status(&pod)["phase"], "Running");
    assert!(pod_status(&pod)["containerStatuses"][0]["state"]["running"].is_object());
    let job = d.job("long").unwrap();
    assert!(job_conditions(&job).is_empty());
    assert_eq!(job.status.unwrap().active, Some(1));
    assert_eq!(d.peak_active_jobs(), 1);

    let background = DeleteParams {
        propagation_policy: Some(kube::api::PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    jobs(&d).delete("long", &background).await.unwrap();
    d.wait_for("the pod to go", WAIT, |d| {
        d.pods_of_job("long").is_empty().then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_pending_forever_script_leaves_the_pod_unschedulable() {
    let d = KubeDouble::start().await;
    jobs(&d)
        .create(
            &PostParams::default(),
            &scripted("stuck", &Script::PendingForever),
        )
        .await
        .unwrap();
    let pod = d
        .wait_for("Unschedulable", WAIT, |d| {
            d.pods_of_job("stuck")
                .into_iter()
                .find(|p| pod_status(p)["conditions"][0]["reason"] == "Unschedulable")
        })
        .await
        .unwrap();
    let s = pod_status(&pod);
    assert_eq!(
        (
            s["phase"].as_str(),
            s["conditions"][0]["type"].as_str(),
            s["conditions"][0]["status"].as_str()
        ),
        (Some("Pending"), Some("PodScheduled"), Some("False"))
    );
    assert!(pod.spec.unwrap().node_name.is_none());
}

#[tokio::test]
async fn the_evict_script_fails_the_pod_evicted_with_a_disruption_target() {
    let d = KubeDouble::start().await;
    jobs(&d)
        .create(&PostParams::default(), &scripted("evict", &Script::Evict))
        .await
        .unwrap();
    let failed = d
        .wait_for_job_condition("evict", "Failed", WAIT)
        .await
        .unwrap();
    assert_eq!(
        job_conditions(&failed).last().unwrap().1,
        "BackoffLimitExceeded"
    );
    let pod = d.wait_for_pod_phase("evict", "Failed", WAIT).await.unwrap();
    let s = pod_status(&pod);
    assert_eq!(s["reason"], "Evicted");
    let disruption = s["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "DisruptionTarget")
        .unwrap();
    assert_eq!(
        (disruption["status"].as_str(), disruption["reason"].as_str()),
        (Some("True"), Some("TerminationByKubelet"))
    );
}

#[tokio::test]
async fn the_node_lost_script_fails_then_deletes_the_pod_and_fails_the_job() {
    let d = KubeDouble::start().await;
    let rv = d.resource_version().to_string();
    jobs(&d)
        .create(&PostParams::default(), &scripted("lost", &Script::NodeLost))
        .await
        .unwrap();
    let failed = d
        .wait_for_job_condition("lost", "Failed", WAIT)
        .await
        .unwrap();
    assert_eq!(failed.status.unwrap().failed, Some(1));
    let events = pod_events_until_deleted(&d, &rv).await;
    assert!(
        events.contains(&("MODIFIED".into(), "Failed".into(), "NodeLost".into())),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap().0, "DELETED");
}

#[tokio::test]
async fn a_500_fault_is_answered_once_then_the_create_succeeds() {
    let d = KubeDouble::start().await;
    d.fail_next(1, FaultSpec::internal_error("POST", "/jobs"));
    let api = jobs(&d);
    let err = api_error(
        api.create(&PostParams::default(), &scripted("x", &Script::Succeed))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (500, "InternalError"));
    api.create(&PostParams::default(), &scripted("x", &Script::Succeed))
        .await
        .unwrap();
    let writes: Vec<Option<u16>> = d
        .requests()
        .iter()
        .filter(|r| r.is_write())
        .map(|r| r.status)
        .collect();
    assert_eq!(writes, [Some(500), Some(201)]);
    assert_eq!(d.jobs_created(), 1);
}

#[tokio::test]
async fn a_429_carries_retry_after_and_kube_waits_that_long_before_retrying() {
    let d = KubeDouble::start().await;
    let body = serde_json::to_vec(&scripted("x", &Script::Succeed)).unwrap();
    let request = || {
        hyper::Request::post("/apis/batch/v1/namespaces/gantry-test/jobs")
            .header("content-type", "application/json")
            .body(kube::client::Body::from(body.clone()))
            .unwrap()
    };
    let mut config = d.config();
    config.default_retry = false;
    let raw = kube::Client::try_from(config).unwrap();
    d.fail_next(1, FaultSpec::too_many_requests("POST", "/jobs", 1));
    let response = raw.send(request()).await.unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "1");

    d.fail_next(1, FaultSpec::too_many_requests("POST", "/jobs", 1));
    let start = Instant::now();
    jobs(&d)
        .create(&PostParams::default(), &scripted("y", &Script::Succeed))
        .await
        .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "kube retried after {:?}",
        start.elapsed()
    );
    let writes: Vec<Option<u16>> = d
        .requests()
        .iter()
        .filter(|r| r.is_write())
        .map(|r| r.status)
        .collect();
    assert_eq!(writes, [Some(429), Some(429), Some(201)]);
}

#[tokio::test]
async fn a_dropped_connection_is_an_error_and_the_next_request_works() {
    let d = KubeDouble::start().await;
    d.fail_next(1, FaultSpec::drop_connection("POST", "/jobs"));
    let api = jobs(&d);
    let err = api
        .create(&PostParams::default(), &scripted("x", &Script::Succeed))
        .await
        .unwrap_err();
    assert!(
        !matches!(err, kube::Error::Api(_)),
        "no response, so no status: {err:?}"
    );
    assert!(d.job("x").is_none());
    api.create(&PostParams::default(), &scripted("x", &Script::Succeed))
        .await
        .unwrap();
    assert_eq!(
        d.requests()
            .iter()
            .filter(|r| r.is_write())
            .map(|r| r.status)
            .collect::<Vec<_>>(),
        [None, Some(201)]
    );
}

#[tokio::test]
async fn env_from_a_secret_key_ref_and_a_mounted_secret_file_reach_the_process() {
    let d = KubeDouble::start().await;
    let secrets: Api<Secret> = Api::default_namespaced(d.client());
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "payload"},
        "stringData": {"task.json": "{\"task\":1}", "token": "s3cret"},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let j = job_from(json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "env"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "volumes": [{"name": "payload", "secret": {"secretName": "payload", "items": [{"key": "task.json", "path": "task.json"}]}}],
            "containers": [{
                "name": "main", "image": "executor:dev",
                "args": ["$(TASK_FILE)"],
                "env": [
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "payload", "key": "token"}}},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "TASK_FILE", "value": "/var/run/gantry/task.json"},
                ],
                "volumeMounts": [{"name": "payload", "mountPath": "/var/run/gantry", "readOnly": true}],
            }],
        }}},
    }));
    d.set_image_entrypoint(
        "executor:dev",
        vec![
            "sh".into(),
            "-c".into(),
            "echo \"token=$TOKEN pod=$POD\"; cat \"$TASK_FILE\"; cat \"$0\"".into(),
        ],
    );
    jobs(&d).create(&PostParams::default(), &j).await.unwrap();
    d.wait_for_job_condition("env", "Complete", WAIT)
        .await
        .unwrap();
    let pod = d.pods_of_job("env").pop().unwrap();
    let name = pod.metadata.name.unwrap();
    assert_eq!(
        d.pod_log(&name).unwrap(),
        format!("token=s3cret pod={name}\n{{\"task\":1}}{{\"task\":1}}")
    );
}

#[tokio::test]
async fn a_pod_needing_a_gpu_waits_for_a_tainted_gpu_node_it_tolerates() {
    let d = KubeDouble::start_with(Options {
        pod_start_delay: Duration::from_millis(20),
        ..Options::default()
    })
    .await;
    let j = job_from(json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "gpu"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"gantry.dev/gpu": "a100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "main", "image": "busybox", "command": ["true"], "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        }}},
    }));
    jobs(&d).create(&PostParams::default(), &j).await.unwrap();
    let pending = d
        .wait_for("Unschedulable", WAIT, |d| {
            d.pods_of_job("gpu")
                .into_iter()
                .find(|p| pod_status(p)["conditions"][0]["reason"] == "Unschedulable")
        })
        .await
        .unwrap();
    let message = pod_status(&pending)["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.starts_with(
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
        ),
        "{message}"
    );

    d.add_node(
        "gpu-1",
        &[("gantry.dev/gpu", "a100")],
        vec!["registry.local/executor-vllm@sha256:abc".into()],
    );
    d.taint_node("gpu-1", "nvidia.com/gpu", "present", "NoSchedule");
    d.set_node_allocatable("gpu-1", "nvidia.com/gpu", "1");
    d.wait_for_job_condition("gpu", "Complete", WAIT)
        .await
        .unwrap();
    let pod = d.pods_of_job("gpu").pop().unwrap();
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("gpu-1"));
    let node = d
        .nodes()
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some("gpu-1"))
        .unwrap();
    assert_eq!(
        node.status.unwrap().images.unwrap()[0]
            .names
            .as_ref()
            .unwrap()[0],
        "registry.local/executor-vllm@sha256:abc"
    );
}

#[tokio::test]
async fn the_double_counts_jobs_created_and_the_peak_of_active_jobs() {
    let d = KubeDouble::start().await;
    let api = jobs(&d);
    for name in ["a", "b", "c"] {
        api.create(
            &PostParams::default(),
            &scripted(name, &Script::PendingForever),
        )
        .await
        .unwrap();
    }
    api.delete("a", &DeleteParams::background()).await.unwrap();
    api.create(&PostParams::default(), &scripted("d", &Script::Succeed))
        .await
        .unwrap();
    d.wait_for_job_condition("d", "Complete", WAIT)
        .await
        .unwrap();
    assert_eq!((d.jobs_created(), d.peak_active_jobs()), (4, 3));
}

#[tokio::test]
async fn bodies_that_do_not_match_their_path_are_400_and_unknown_kinds_404() {
    let d = KubeDouble::start().await;
    let client = d.client();
    let send = |path: &str, body: Value| {
        hyper::Request::post(path.to_owned())
            .header("content-type", "application/json")
            .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    };
    let pod_as_job = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
    let r = client
        .send(send(
            "/apis/batch/v1/namespaces/gantry-test/jobs",
            pod_as_job,
        ))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = client
        .send(send(
            "/apis/batch/v1/namespaces/gantry-test/cronjobs",
            json!({}),
        ))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "m"}});
    let r = client
        .send(send("/api/v1/namespaces/elsewhere/configmaps", cm))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404, "the namespace does not exist");
}

#[tokio::test]
async fn strict_patches_metadata_lists_streaming_lists_bookmarks_and_collection_deletes_behave() {
    let d = KubeDouble::start_with(Options {
        bookmark_interval: Duration::from_millis(50),
        ..Options::default()
    })
    .await;
    let maps: Api<ConfigMap> = Api::default_namespaced(d.client());
    for tier in ["a", "b"] {
        let cm: ConfigMap = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"generateName": "cfg-", "labels": {"tier": tier}},
        }))
        .unwrap();
        let created = maps.create(&PostParams::default(), &cm).await.unwrap();
        assert_eq!(created.metadata.name.unwrap().len(), "cfg-".len() + 5);
    }
    let name = maps.list(&ListParams::default()).await.unwrap().items[0]
        .metadata
        .name
        .clone()
        .unwrap();

    let unknown = Patch::Merge(json!({"spec": {"replicas": 1}}));
    let err = api_error(
        maps.patch(&name, &PatchParams::default().validation_strict(), &unknown)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (err.code, err.message.as_str()),
        (400, "strict decoding error: unknown field \"spec\"")
    );
    let json_patch =
        hyper::Request::patch(format!("/api/v1/namespaces/gantry-test/configmaps/{name}"))
            .header("content-type", "application/json-patch+json")
            .body(kube::client::Body::from(b"[]".to_vec()))
            .unwrap();
    assert_eq!(
        d.client().send(json_patch).await.unwrap().status().as_u16(),
        415
    );

    let metadata = maps.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(metadata.items.len(), 2);
    assert!(metadata.items.iter().all(|m| m.metadata.labels.is_some()));

    let mut streaming = watcher(maps.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut initial = 0;
    loop {
        match tokio::time::timeout(WAIT, streaming.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::InitApply(_) => initial += 1,
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(initial, 2);

    let rv = d.resource_version().to_string();
    let mut stream = maps
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Bookmark(b)) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected a bookmark, got {other:?}"),
    }

    let deleted = maps
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("tier=a"),
        )
        .await
        .unwrap();
    assert_eq!(deleted.left().map(|l| l.items.len()), Some(1));
    assert_eq!(
        maps.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test]
async fn an_object_whose_owner_does_not_exist_is_garbage_collected() {
    let d = KubeDouble::start().await;
    let secrets: Api<Secret> = Api::default_namespaced(d.client());
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "stray", "ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "Job", "name": "gone", "uid": "00000000-0000-0000-0000-000000000000",
        }]},
        "stringData": {"task.json": "{}"},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    d.wait_for("the stray Secret to be collected", WAIT, |d| {
        d.get_secret("stray").is_none().then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_pod_waits_for_its_secret_created_after_the_job_then_runs() {
    let d = KubeDouble::start().await;
    let j = job_from(json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "late"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "volumes": [{"name": "payload", "secret": {"secretName": "late-payload"}}],
            "containers": [{
                "name": "main", "image": "busybox", "command": ["cat", "/task/task.json"],
                "volumeMounts": [{"name": "payload", "mountPath": "/task"}],
            }],
        }}},
    }));
    let created = jobs(&d).create(&PostParams::default(), &j).await.unwrap();
    let waiting = d
        .wait_for("the pod to wait for its Secret", WAIT, |d| {
            d.pods_of_job("late").into_iter().find(|p| {
                pod_status(p)["containerStatuses"][0]["state"]["waiting"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("secret \"late-payload\" not found"))
            })
        })
        .await
        .unwrap();
    assert_eq!(pod_status(&waiting)["phase"], "Pending");

    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "late-payload", "ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "Job", "name": "late", "uid": created.metadata.uid.unwrap(),
        }]},
        "stringData": {"task.json": "{\"late\":true}"},
    }))
    .unwrap();
    Api::<Secret>::default_namespaced(d.client())
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    d.wait_for_job_condition("late", "Complete", WAIT)
        .await
        .unwrap();
    assert_eq!(
        d.pod_log(&waiting.metadata.name.unwrap()).unwrap(),
        "{\"late\":true}"
    );
}

#[tokio::test]
async fn a_container_without_command_runs_its_images_entrypoint_or_fails_to_pull() {
    let d = KubeDouble::start().await;
    let mut j = job("entry", &[]);
    let container = &mut j
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0];
    container.command = None;
    container.args = Some(vec!["from-args".into()]);
    container.image = Some("executor-echo:dev".into());
    d.set_image_entrypoint("executor-echo:dev", vec!["echo".into()]);
    jobs(&d).create(&PostParams::default(), &j).await.unwrap();
    d.wait_for_job_condition("entry", "Complete", WAIT)
        .await
        .unwrap();
    let pod = d.pods_of_job("entry").pop().unwrap();
    assert_eq!(
        d.pod_log(&pod.metadata.name.unwrap()).unwrap(),
        "from-args\n"
    );

    j.metadata.name = Some("unknown".into());
    j.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .image = Some("nowhere:1".into());
    jobs(&d).create(&PostParams::default(), &j).await.unwrap();
    d.wait_for("ErrImagePull then ImagePullBackOff", WAIT, |d| {
        d.pods_of_job("unknown").into_iter().find(|p| {
            pod_status(p)["containerStatuses"][0]["state"]["waiting"]["reason"]
                == "ImagePullBackOff"
        })
    })
    .await
    .unwrap();
}
