//! The test server driven by the real kube client and runtime: pagination, the watcher
//! with bookmarks and 410 recovery, every patch type, the finalizer helper, conflicts,
//! `get_opt`, the event recorder and kube-lease-manager.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event as RecorderEvent, EventType, Recorder, Reporter};
use kube::runtime::{controller::Action, finalizer, watcher};
use serde_json::json;

use common::{cm, lb_service, mk_server};

fn mk_cm(name: &str) -> ConfigMap {
    serde_json::from_value(cm(name, "default")).expect("config map")
}

#[tokio::test]
async fn kube_pages_through_a_list_with_a_small_limit() {
    let server = mk_server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client().expect("client"));
    for n in 0..7 {
        server
            .seed(cm(&format!("c{n}"), "default"))
            .expect("seeded");
    }
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(3);
    loop {
        let page = api.list(&lp).await.expect("page");
        names.extend(page.items.iter().filter_map(|c| c.metadata.name.clone()));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => lp = lp.continue_token(&token),
            _ => break,
        }
    }
    assert_eq!(names.len(), 7);
}

#[tokio::test]
async fn the_watcher_lists_more_than_500_objects_in_pages() {
    let server = mk_server().await;
    for n in 0..501 {
        server
            .seed(cm(&format!("c{n:03}"), "default"))
            .expect("seeded");
    }
    let api: Api<ConfigMap> = Api::default_namespaced(server.client().expect("client"));
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    let mut seen = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.try_next())
            .await
            .expect("event in time")
            .expect("no error")
        {
            Some(watcher::Event::InitApply(_)) => seen += 1,
            Some(watcher::Event::InitDone) => break,
            _ => {}
        }
    }
    assert_eq!(seen, 501);
    let lists: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| !r.is_watch())
        .map(|r| r.path.clone())
        .collect();
    assert!(lists.iter().any(|p| p.contains("limit=500")), "{lists:?}");
    assert!(lists.iter().any(|p| p.contains("continue=")), "{lists:?}");
}

async fn next_event(
    stream: &mut (
             impl futures::Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin
         ),
) -> watcher::Event<ConfigMap> {
    tokio::time::timeout(Duration::from_secs(10), stream.try_next())
        .await
        .expect("event in time")
        .expect("no error")
        .expect("stream open")
}

#[tokio::test]
async fn the_watcher_follows_bookmarks_and_relists_after_compaction() {
    let server = mk_server().await;
    let client = server.client().expect("client");
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    server.seed(cm("a", "default")).expect("seeded");
    let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
    while !matches!(next_event(&mut stream).await, watcher::Event::InitDone) {}

    // A write elsewhere moves the resourceVersion; only a bookmark tells the watcher about it.
    server.seed(lb_service("s", "default")).expect("seeded");
    let after_service = server.resource_version();
    assert!(
        tokio::time::timeout(Duration::from_millis(700), stream.try_next())
            .await
            .is_err(),
        "bookmarks are not events"
    );
    server.close_watches();
    server.seed(cm("b", "default")).expect("seeded");
    match next_event(&mut stream).await {
        watcher::Event::Apply(c) => assert_eq!(c.metadata.name.as_deref(), Some("b")),
        other => panic!("unexpected {other:?}"),
    }
    let rewatch = format!("resourceVersion={after_service}");
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.is_watch() && r.path.contains(&rewatch)),
        "the watcher resumed from the bookmark's resourceVersion"
    );

    // While the watcher is not polled, history is compacted past its resourceVersion.
    server.close_watches();
    server.seed(cm("c", "default")).expect("seeded");
    server.compact();
    server.clear_requests();
    let mut relisted = Vec::new();
    let mut expired = false;
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("event in time")
            .expect("stream open");
        match item {
            // The watcher reports the in-stream 410 once, then re-lists on the next poll.
            Err(watcher::Error::WatchError(s)) if s.code == 410 && s.reason == "Expired" => {
                expired = true
            }
            Err(other) => panic!("unexpected {other:?}"),
            Ok(watcher::Event::InitApply(c)) => relisted.extend(c.metadata.name),
            Ok(watcher::Event::InitDone) => break,
            Ok(_) => {}
        }
    }
    assert!(expired);
    assert_eq!(relisted, ["a", "b", "c"]);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| !r.is_watch() && r.method == http::Method::GET),
        "a re-list after 410"
    );
}

#[tokio::test]
async fn every_patch_type_works_through_api_patch() {
    let server = mk_server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client().expect("client"));
    api.create(&PostParams::default(), &mk_cm("a"))
        .await
        .expect("created");
    let pp = PatchParams::default();
    api.patch("a", &pp, &Patch::Merge(json!({"data":{"m":"1"}})))
        .await
        .expect("merge");
    let ops: json_patch::Patch =
        serde_json::from_value(json!([{"op":"add","path":"/data/j","value":"2"}])).expect("patch");
    api.patch("a", &pp, &Patch::Json::<()>(ops))
        .await
        .expect("json");
    api.patch(
        "a",
        &pp,
        &Patch::Strategic(json!({"data":{"s":"3","k":null}})),
    )
    .await
    .expect("strategic");
    let apply = PatchParams::apply("vipam-test").force();
    let out = api
        .patch("a", &apply, &Patch::Apply(json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"},"data":{"a":"4"}})))
        .await
        .expect("apply");
    let data = out.data.expect("data");
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(keys, ["a", "j", "m", "s"]);
}

#[tokio::test]
async fn the_finalizer_helper_adds_and_removes_its_finalizer_and_deletion_completes() {
    let server = mk_server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client().expect("client"));
    let created = api
        .create(&PostParams::default(), &mk_cm("a"))
        .await
        .expect("created");
    let name = "vipam.example.com/cleanup";
    let run = |obj: ConfigMap| {
        let api = api.clone();
        async move {
            finalizer(&api, name, Arc::new(obj), |event| async move {
                match event {
                    finalizer::Event::Apply(_) | finalizer::Event::Cleanup(_) => {
                        Ok::<_, std::convert::Infallible>(Action::await_change())
                    }
                }
            })
            .await
        }
    };
    run(created).await.expect("finalizer added");
    let marked = api.get("a").await.expect("present");
    assert_eq!(
        marked.metadata.finalizers.as_deref(),
        Some(&[name.to_owned()][..])
    );
    api.delete("a", &DeleteParams::default())
        .await
        .expect("delete accepted");
    let deleting = api.get("a").await.expect("still present while finalized");
    assert!(deleting.metadata.deletion_timestamp.is_some());
    run(deleting).await.expect("cleanup removes the finalizer");
    assert!(api.get_opt("a").await.expect("get_opt").is_none());
}

#[tokio::test]
async fn replace_with_a_stale_resource_version_is_a_conflict_and_get_opt_of_missing_is_none() {
    let server = mk_server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client().expect("client"));
    let first = api
        .create(&PostParams::default(), &mk_cm("a"))
        .await
        .expect("created");
    let mut fresh = first.clone();
    fresh.data = Some([("k".to_owned(), "new".to_owned())].into());
    api.replace("a", &PostParams::default(), &fresh)
        .await
        .expect("replaced");
    let err = api
        .replace("a", &PostParams::default(), &first)
        .await
        .expect_err("stale");
    match err {
        kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => panic!("unexpected {other:?}"),
    }
    assert!(api.get_opt("missing").await.expect("get_opt").is_none());
    let dup = api
        .create(&PostParams::default(), &mk_cm("a"))
        .await
        .expect_err("exists");
    assert!(
        matches!(dup, kube::Error::Api(ref s) if s.reason == "AlreadyExists"),
        "{dup:?}"
    );
}

#[tokio::test]
async fn the_event_recorder_posts_events_k8s_io_events_and_patches_a_series_on_repeat() {
    let server = mk_server().await;
    let client = server.client().expect("client");
    let svc: Api<Service> = Api::default_namespaced(client.clone());
    let created = svc
        .create(
            &PostParams::default(),
            &serde_json::from_value(lb_service("s", "default")).expect("service"),
        )
        .await
        .expect("created");
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        name: created.metadata.name.clone(),
        namespace: created.metadata.namespace.clone(),
        uid: created.metadata.uid.clone(),
        ..ObjectReference::default()
    };
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "vipam-syncer".into(),
            instance: Some("vipam-0".into()),
        },
    );
    let ev = RecorderEvent {
        type_: EventType::Normal,
        reason: "Allocated".into(),
        note: Some("192.0.2.1".into()),
        action: "Allocate".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.expect("published");
    recorder
        .publish(&ev, &reference)
        .await
        .expect("published again");
    let posts: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| {
            r.path
                .starts_with("/apis/events.k8s.io/v1/namespaces/default/events")
        })
        .collect();
    assert_eq!(posts[0].method, http::Method::POST);
    assert_eq!(posts[0].status, 201);
    assert_eq!(posts[1].method, http::Method::PATCH);
    assert_eq!(posts[1].status, 200);
    let events = server.list("events", Some("default"));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["message"], "192.0.2.1");
    assert_eq!(events[0]["series"]["count"], 2);
}

#[tokio::test]
async fn kube_lease_manager_elects_one_leader_and_hands_over_on_release() {
    let server = mk_server().await;
    let client = server.client().expect("client");
    let mk = |id: &str| {
        kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "vipam-syncer")
            .with_identity(id)
            .with_duration(5)
            .with_grace(2)
            .build()
    };
    let first = mk("one").await.expect("manager");
    let second = mk("two").await.expect("manager");
    assert!(
        tokio::time::timeout(Duration::from_secs(10), first.changed())
            .await
            .expect("in time")
            .expect("no error")
    );
    let lease: Api<Lease> = Api::default_namespaced(server.client().expect("client"));
    let held = lease.get("vipam-syncer").await.expect("lease");
    assert_eq!(
        held.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("one")
    );
    first.release().await.expect("released");
    assert!(
        tokio::time::timeout(Duration::from_secs(15), second.changed())
            .await
            .expect("in time")
            .expect("no error")
    );
    let held = lease.get("vipam-syncer").await.expect("lease");
    assert_eq!(
        held.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("two")
    );
    let applies = server
        .requests()
        .iter()
        .filter(|r| r.content_type.as_deref() == Some("application/apply-patch+yaml"))
        .count();
    assert!(
        applies >= 2,
        "both managers acquired with server-side apply"
    );
}

#[tokio::test]
async fn a_written_kubeconfig_configures_kube_rs() {
    let server = mk_server().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).expect("written");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("readable");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("valid");
    assert_eq!(config.default_namespace, "default");
    let client = kube::Client::try_from(config).expect("client");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert_eq!(
        names,
        ["default", "kube-node-lease", "kube-public", "kube-system"]
    );
}
