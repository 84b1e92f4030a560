//! One test per rule of the real API server this test server reproduces, driven over raw
//! HTTP so status codes, Status reasons and watch frames are asserted exactly as sent.

mod common;

use common::{cm, lb_service, mk_raw, mk_server};
use http::Method;
use serde_json::{Value, json};
use vipam_kube_api::Fault;

const CMS: &str = "/api/v1/namespaces/default/configmaps";
const SVCS: &str = "/api/v1/namespaces/default/services";
const MERGE: &str = "application/merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";
const SMP: &str = "application/strategic-merge-patch+json";
const APPLY: &str = "application/apply-patch+yaml";

fn rv(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .expect("resourceVersion")
        .parse()
        .expect("numeric resourceVersion")
}

#[tokio::test]
async fn resource_versions_come_from_one_global_counter() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let a = raw.post(CMS, cm("a", "default")).await;
    let s = raw.post(SVCS, lb_service("s", "default")).await;
    let b = raw.post(CMS, cm("b", "default")).await;
    assert_eq!((a.status, s.status, b.status), (201, 201, 201));
    assert_eq!(rv(&s.body), rv(&a.body) + 1);
    assert_eq!(rv(&b.body), rv(&s.body) + 1);
    assert_eq!(server.resource_version(), rv(&b.body));
}

#[tokio::test]
async fn the_server_sets_uid_and_creation_timestamp_and_no_generation_like_the_real_server() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let mut body = lb_service("s", "default");
    body["metadata"]["uid"] = json!("client-uid");
    body["metadata"]["creationTimestamp"] = json!("2000-01-01T00:00:00Z");
    body["metadata"]["generation"] = json!(7);
    let r = raw.post(SVCS, body).await;
    assert_eq!(r.status, 201);
    let meta = &r.body["metadata"];
    assert_ne!(meta["uid"], "client-uid");
    assert_eq!(meta["uid"].as_str().expect("uid").len(), 36);
    assert_ne!(meta["creationTimestamp"], "2000-01-01T00:00:00Z");
    // Services, ConfigMaps, Leases, Events and Namespaces have no metadata.generation on a real cluster.
    assert!(meta.get("generation").is_none());
    let mut update = r.body.clone();
    update["metadata"]["creationTimestamp"] = json!("2000-01-01T00:00:00Z");
    update["spec"]["ports"][0]["port"] = json!(81);
    let u = raw.put(&format!("{SVCS}/s"), update).await;
    assert_eq!(u.status, 200);
    assert_eq!(
        u.body["metadata"]["creationTimestamp"],
        meta["creationTimestamp"]
    );
    assert!(u.body["metadata"].get("generation").is_none());
}

#[tokio::test]
async fn generate_name_gets_a_random_suffix() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let body = json!({"metadata":{"generateName":"gen-"},"data":{}});
    let a = raw.post(CMS, body.clone()).await;
    let b = raw.post(CMS, body).await;
    let (na, nb) = (
        a.body["metadata"]["name"].as_str().expect("name"),
        b.body["metadata"]["name"].as_str().expect("name"),
    );
    assert!(na.starts_with("gen-") && na.len() == 9, "{na}");
    assert_ne!(na, nb);
    let none = raw.post(CMS, json!({"metadata":{}})).await;
    assert_eq!((none.status, none.reason()), (422, "Invalid"));
}

#[tokio::test]
async fn list_pages_with_limit_and_continue_at_one_resource_version() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    for n in 0..5 {
        server
            .seed(cm(&format!("c{n}"), "default"))
            .expect("seeded");
    }
    let first = raw.get(&format!("{CMS}?&limit=2")).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body["kind"], "ConfigMapList");
    assert_eq!(first.body["items"].as_array().expect("items").len(), 2);
    assert_eq!(first.body["metadata"]["remainingItemCount"], 3);
    assert!(
        first.body["items"][0].get("kind").is_none(),
        "list items carry no kind"
    );
    let list_rv = first.body["metadata"]["resourceVersion"].clone();
    // A change between pages does not show up: pages are read at the first page's resourceVersion.
    server.seed(cm("c0a", "default")).expect("seeded");
    let mut names: Vec<String> = Vec::new();
    let mut page = first;
    loop {
        names.extend(
            page.body["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|i| i["metadata"]["name"].as_str().expect("name").to_owned()),
        );
        let Some(token) = page.body["metadata"]["continue"]
            .as_str()
            .map(str::to_owned)
        else {
            break;
        };
        page = raw.get(&format!("{CMS}?limit=2&continue={token}")).await;
        assert_eq!(page.status, 200);
        assert_eq!(page.body["metadata"]["resourceVersion"], list_rv);
    }
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4"]);
}

#[tokio::test]
async fn a_continue_token_from_before_compaction_is_expired() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    for n in 0..3 {
        server
            .seed(cm(&format!("c{n}"), "default"))
            .expect("seeded");
    }
    let first = raw.get(&format!("{CMS}?limit=1")).await;
    let token = first.body["metadata"]["continue"]
        .as_str()
        .expect("continue")
        .to_owned();
    server.seed(cm("later", "default")).expect("seeded");
    server.compact();
    let r = raw.get(&format!("{CMS}?limit=1&continue={token}")).await;
    assert_eq!((r.status, r.reason()), (410, "Expired"));
    let bad = raw.get(&format!("{CMS}?limit=1&continue=garbage")).await;
    assert_eq!((bad.status, bad.reason()), (400, "BadRequest"));
}

#[tokio::test]
async fn label_selectors_support_every_operator() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    for (name, labels) in [
        ("a", json!({"app":"web","tier":"front"})),
        ("b", json!({"app":"db"})),
        ("c", json!({})),
    ] {
        let mut o = cm(name, "default");
        o["metadata"]["labels"] = labels;
        server.seed(o).expect("seeded");
    }
    for (sel, want) in [
        ("app%3Dweb", vec!["a"]),
        ("app%3D%3Dweb", vec!["a"]),
        ("app!%3Dweb", vec!["b", "c"]),
        ("app%20in%20(web,db)", vec!["a", "b"]),
        ("app%20notin%20(web)", vec!["b", "c"]),
        ("tier", vec!["a"]),
        ("!tier", vec!["b", "c"]),
    ] {
        let r = raw.get(&format!("{CMS}?labelSelector={sel}")).await;
        assert_eq!(r.status, 200, "{sel}");
        let names: Vec<&str> = r.body["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str())
            .collect();
        assert_eq!(names, want, "{sel}");
    }
    let bad = raw
        .get(&format!("{CMS}?labelSelector=app%20in%20web"))
        .await;
    assert_eq!((bad.status, bad.reason()), (400, "BadRequest"));
}

#[tokio::test]
async fn field_selectors_match_name_and_namespace_across_namespaces() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    server
        .seed(json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"other"}}))
        .expect("namespace");
    server.seed(cm("x", "default")).expect("seeded");
    server.seed(cm("x", "other")).expect("seeded");
    server.seed(cm("y", "other")).expect("seeded");
    let all = raw.get("/api/v1/configmaps").await;
    assert_eq!(all.body["items"].as_array().expect("items").len(), 3);
    let by_name = raw
        .get("/api/v1/configmaps?fieldSelector=metadata.name%3Dx")
        .await;
    assert_eq!(by_name.body["items"].as_array().expect("items").len(), 2);
    let by_ns = raw
        .get("/api/v1/configmaps?fieldSelector=metadata.namespace%3Dother,metadata.name!%3Dx")
        .await;
    let names: Vec<&str> = by_ns.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["y"]);
    let unsupported = raw.get(&format!("{CMS}?fieldSelector=data.k%3Dv")).await;
    assert_eq!(
        (unsupported.status, unsupported.reason()),
        (400, "BadRequest")
    );
}

#[tokio::test]
async fn a_missing_namespace_refuses_creates_with_404_and_lists_empty() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let r = raw
        .post("/api/v1/namespaces/nope/configmaps", cm("a", "nope"))
        .await;
    assert_eq!((r.status, r.reason()), (404, "NotFound"));
    assert_eq!(r.body["message"], "namespaces \"nope\" not found");
    let list = raw.get("/api/v1/namespaces/nope/configmaps").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.body["items"], json!([]));
    assert!(list.body["metadata"]["resourceVersion"].is_string());
}

#[tokio::test]
async fn watch_streams_changes_in_order_and_ends_at_timeout_seconds() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let start = raw.get(CMS).await.body["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_owned();
    let mut w = raw
        .watch(&format!(
            "{CMS}?&watch=true&resourceVersion={start}&timeoutSeconds=2"
        ))
        .await;
    assert_eq!(w.status, 200);
    let created = raw.post(CMS, cm("a", "default")).await;
    raw.patch(&format!("{CMS}/a"), MERGE, json!({"data":{"k":"w"}}))
        .await;
    raw.delete(&format!("{CMS}/a")).await;
    let types: Vec<(String, u64)> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let ev = w.next_change().await.expect("event");
            assert_eq!(ev["object"]["kind"], "ConfigMap", "watch frames carry kind");
            v.push((
                ev["type"].as_str().expect("type").to_owned(),
                rv(&ev["object"]),
            ));
        }
        v
    };
    let first = rv(&created.body);
    assert_eq!(
        types,
        [
            ("ADDED".to_owned(), first),
            ("MODIFIED".to_owned(), first + 1),
            ("DELETED".to_owned(), first + 2)
        ]
    );
    // timeoutSeconds=2: the stream ends by itself.
    while w.next().await.is_some() {}
}

#[tokio::test]
async fn watch_sends_bookmarks_only_when_allowed() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let current = server.resource_version();
    let mut w = raw
        .watch(&format!(
            "{CMS}?watch=1&allowWatchBookmarks=true&resourceVersion={current}"
        ))
        .await;
    let ev = w.next().await.expect("bookmark");
    assert_eq!(ev["type"], "BOOKMARK");
    assert_eq!(ev["object"]["kind"], "ConfigMap");
    assert_eq!(ev["object"]["apiVersion"], "v1");
    assert_eq!(
        ev["object"]["metadata"]["resourceVersion"],
        current.to_string()
    );
    let mut quiet = raw
        .watch(&format!(
            "{CMS}?watch=1&resourceVersion={current}&timeoutSeconds=1"
        ))
        .await;
    assert!(
        quiet.next().await.is_none(),
        "no bookmark without allowWatchBookmarks"
    );
}

#[tokio::test]
async fn watch_without_resource_version_starts_with_the_current_objects() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    server.seed(cm("a", "default")).expect("seeded");
    let mut w = raw.watch(&format!("{CMS}?watch=true")).await;
    let ev = w.next().await.expect("event");
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("a"))
    );
}

#[tokio::test]
async fn a_watch_from_compacted_history_gets_expired_inside_a_200_stream() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let old = server.resource_version();
    server.seed(cm("a", "default")).expect("seeded");
    server.compact();
    let mut w = raw
        .watch(&format!("{CMS}?watch=true&resourceVersion={old}"))
        .await;
    assert_eq!(w.status, 200);
    let ev = w.next().await.expect("error event");
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["kind"], "Status");
    assert_eq!(ev["object"]["reason"], "Expired");
    assert_eq!(ev["object"]["code"], 410);
    assert!(w.next().await.is_none());
}

#[tokio::test]
async fn a_watch_with_a_selector_sees_objects_enter_as_added_and_leave_as_deleted() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    server.seed(cm("a", "default")).expect("seeded");
    let rv0 = server.resource_version();
    let mut w = raw
        .watch(&format!(
            "{CMS}?watch=true&resourceVersion={rv0}&labelSelector=app%3Dweb"
        ))
        .await;
    raw.patch(
        &format!("{CMS}/a"),
        MERGE,
        json!({"metadata":{"labels":{"app":"web"}}}),
    )
    .await;
    raw.patch(
        &format!("{CMS}/a"),
        MERGE,
        json!({"metadata":{"labels":{"app":"db"}}}),
    )
    .await;
    assert_eq!(w.next_change().await.expect("event")["type"], "ADDED");
    assert_eq!(w.next_change().await.expect("event")["type"], "DELETED");
}

#[tokio::test]
async fn close_watches_ends_every_open_stream() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let mut w = raw
        .watch(&format!(
            "{CMS}?watch=true&resourceVersion={}",
            server.resource_version()
        ))
        .await;
    server.close_watches();
    assert!(w.next().await.is_none());
}

#[tokio::test]
async fn create_is_201_and_a_duplicate_is_409_already_exists() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    assert_eq!(raw.post(CMS, cm("a", "default")).await.status, 201);
    let dup = raw.post(CMS, cm("a", "default")).await;
    assert_eq!((dup.status, dup.reason()), (409, "AlreadyExists"));
    assert_eq!(dup.body["details"], json!({"name":"a","kind":"configmaps"}));
}

#[tokio::test]
async fn put_with_a_stale_resource_version_is_a_409_conflict_and_without_one_is_unconditional() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let first = raw.post(CMS, cm("a", "default")).await.body;
    let mut second = first.clone();
    second["data"]["k"] = json!("2");
    assert_eq!(raw.put(&format!("{CMS}/a"), second).await.status, 200);
    let mut stale = first.clone();
    stale["data"]["k"] = json!("3");
    let r = raw.put(&format!("{CMS}/a"), stale.clone()).await;
    assert_eq!((r.status, r.reason()), (409, "Conflict"));
    assert!(
        r.body["message"]
            .as_str()
            .expect("message")
            .contains("the object has been modified")
    );
    stale["metadata"]
        .as_object_mut()
        .expect("meta")
        .remove("resourceVersion");
    let r = raw.put(&format!("{CMS}/a"), stale).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        server
            .get("configmaps", Some("default"), "a")
            .expect("stored")["data"]["k"],
        "3"
    );
}

#[tokio::test]
async fn a_merge_patch_carrying_a_stale_resource_version_conflicts() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let first = raw.post(CMS, cm("a", "default")).await.body;
    raw.patch(&format!("{CMS}/a"), MERGE, json!({"data":{"k":"2"}}))
        .await;
    let r = raw.patch(&format!("{CMS}/a"), MERGE, json!({"metadata":{"resourceVersion": first["metadata"]["resourceVersion"]},"data":{"k":"3"}})).await;
    assert_eq!((r.status, r.reason()), (409, "Conflict"));
}

#[tokio::test]
async fn json_patch_adds_and_removes_finalizers_like_kube_runtime() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    raw.post(CMS, cm("a", "default")).await;
    let add = json!([{"op":"test","path":"/metadata/finalizers","value":null},{"op":"add","path":"/metadata/finalizers","value":["example.com/f"]}]);
    let r = raw
        .patch(&format!("{CMS}/a"), JSON_PATCH, add.clone())
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["metadata"]["finalizers"], json!(["example.com/f"]));
    let again = raw.patch(&format!("{CMS}/a"), JSON_PATCH, add).await;
    assert_eq!(
        (again.status, again.reason()),
        (422, "Invalid"),
        "the null test now fails"
    );
    let remove = json!([{"op":"test","path":"/metadata/finalizers/0","value":"example.com/f"},{"op":"remove","path":"/metadata/finalizers/0"}]);
    let r = raw.patch(&format!("{CMS}/a"), JSON_PATCH, remove).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body["metadata"].get("finalizers").is_none(),
        "an empty finalizer list is omitted, not []"
    );
}

#[tokio::test]
async fn strategic_merge_patch_deletes_with_null_and_merges_finalizers() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let lease = json!({"metadata":{"name":"l","finalizers":["example.com/a"]},"spec":{"holderIdentity":"me","leaseDurationSeconds":10}});
    let leases = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
    assert_eq!(raw.post(leases, lease).await.status, 201);
    let r = raw
        .patch(
            &format!("{leases}/l"),
            SMP,
            json!({"metadata":{"finalizers":["example.com/b"]},"spec":{"holderIdentity":null}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["spec"], json!({"leaseDurationSeconds":10}));
    assert_eq!(
        r.body["metadata"]["finalizers"],
        json!(["example.com/a", "example.com/b"])
    );
}

#[tokio::test]
async fn server_side_apply_needs_a_field_manager_and_conflicts_unless_forced() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let path = "/apis/coordination.k8s.io/v1/namespaces/default/leases/l";
    let cfg = |holder: &str| json!({"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"l"},"spec":{"holderIdentity":holder}});
    let no_manager = raw.patch(path, APPLY, cfg("a")).await;
    assert_eq!((no_manager.status, no_manager.reason()), (422, "Invalid"));
    let created = raw
        .patch(&format!("{path}?fieldManager=a"), APPLY, cfg("a"))
        .await;
    assert_eq!(created.status, 201, "apply creates a missing object");
    let conflict = raw
        .patch(&format!("{path}?fieldManager=b"), APPLY, cfg("b"))
        .await;
    assert_eq!((conflict.status, conflict.reason()), (409, "Conflict"));
    assert_eq!(
        conflict.body["details"]["causes"][0]["reason"],
        "FieldManagerConflict"
    );
    assert_eq!(
        conflict.body["details"]["causes"][0]["field"],
        ".spec.holderIdentity"
    );
    let forced = raw
        .patch(
            &format!("{path}?fieldManager=b&force=true"),
            APPLY,
            cfg("b"),
        )
        .await;
    assert_eq!(forced.status, 200);
    assert_eq!(forced.body["spec"]["holderIdentity"], "b");
    let managers: Vec<&str> = forced.body["metadata"]["managedFields"]
        .as_array()
        .expect("managed")
        .iter()
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert_eq!(managers, ["b"]);
    let forced_merge = raw
        .patch(&format!("{path}?force=true"), MERGE, json!({}))
        .await;
    assert_eq!(
        (forced_merge.status, forced_merge.reason()),
        (422, "Invalid"),
        "force is only for apply"
    );
}

#[tokio::test]
async fn non_apply_writes_own_fields_as_manager_unknown_so_a_later_apply_conflicts() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    raw.post(SVCS, lb_service("s", "default")).await;
    raw.patch(
        &format!("{SVCS}/s/status"),
        MERGE,
        json!({"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.1"}]}}}),
    )
    .await;
    let cfg = json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"s"},"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.2"}]}}});
    let r = raw
        .patch(
            &format!("{SVCS}/s/status?fieldManager=syncer"),
            APPLY,
            cfg.clone(),
        )
        .await;
    assert_eq!((r.status, r.reason()), (409, "Conflict"));
    assert!(
        r.body["message"]
            .as_str()
            .expect("message")
            .contains("conflict with \"unknown\""),
        "{}",
        r.body["message"]
    );
    let r = raw
        .patch(
            &format!("{SVCS}/s/status?fieldManager=syncer&force=true"),
            APPLY,
            cfg,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body["status"]["loadBalancer"]["ingress"],
        json!([{"ip":"192.0.2.2","ipMode":"VIP"}])
    );
}

#[tokio::test]
async fn an_unknown_patch_content_type_is_415() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    raw.post(CMS, cm("a", "default")).await;
    for ct in [
        "application/json",
        "text/plain",
        "application/apply-patch+cbor",
    ] {
        let r = raw.patch(&format!("{CMS}/a"), ct, json!({})).await;
        assert_eq!(
            (r.status, r.reason()),
            (415, "UnsupportedMediaType"),
            "{ct}"
        );
    }
    let proto = raw
        .send(
            Method::POST,
            CMS,
            Some("application/vnd.kubernetes.protobuf"),
            Some(cm("b", "default")),
        )
        .await;
    assert_eq!(proto.status, 415);
}

#[tokio::test]
async fn dry_run_all_answers_without_storing_and_other_values_are_refused() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let before = server.resource_version();
    let r = raw
        .post(&format!("{CMS}?dryRun=All"), cm("a", "default"))
        .await;
    assert_eq!(r.status, 201);
    assert!(server.get("cm", Some("default"), "a").is_none());
    assert_eq!(server.resource_version(), before);
    let bad = raw
        .post(&format!("{CMS}?dryRun=Yes"), cm("a", "default"))
        .await;
    assert_eq!((bad.status, bad.reason()), (422, "Invalid"));
}

#[tokio::test]
async fn service_writes_ignore_status_and_status_writes_change_only_status() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let mut svc = lb_service("s", "default");
    svc["status"] = json!({"loadBalancer":{"ingress":[{"ip":"192.0.2.9"}]}});
    let created = raw.post(SVCS, svc).await;
    assert_eq!(
        created.body["status"],
        json!({"loadBalancer":{}}),
        "status is reset on create"
    );
    let main = raw
        .patch(
            &format!("{SVCS}/s"),
            MERGE,
            json!({"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.9"}]}}}),
        )
        .await;
    assert_eq!(main.status, 200);
    assert_eq!(main.body["status"], json!({"loadBalancer":{}}));
    assert_eq!(
        rv(&main.body),
        rv(&created.body),
        "an ignored change is a no-op"
    );
    let status = raw
        .patch(
            &format!("{SVCS}/s/status"),
            MERGE,
            json!({"spec":{"ports":[{"port":9}]},"metadata":{"labels":{"x":"y"}},"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.9"}]}}}),
        )
        .await;
    assert_eq!(status.status, 200);
    assert_eq!(
        status.body["status"]["loadBalancer"]["ingress"][0]["ip"],
        "192.0.2.9"
    );
    assert_eq!(status.body["spec"]["ports"][0]["port"], 80);
    assert!(status.body["metadata"].get("labels").is_none());
}

#[tokio::test]
async fn a_no_op_write_keeps_the_resource_version_and_sends_no_event() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let created = raw.post(CMS, cm("a", "default")).await.body;
    let mut w = raw
        .watch(&format!(
            "{CMS}?watch=true&resourceVersion={}&timeoutSeconds=1",
            rv(&created)
        ))
        .await;
    let same = raw
        .patch(&format!("{CMS}/a"), MERGE, json!({"data":{"k":"v"}}))
        .await;
    assert_eq!(rv(&same.body), rv(&created));
    assert!(w.next_change().await.is_none());
}

#[tokio::test]
async fn delete_with_finalizers_marks_the_object_and_removes_it_with_the_last_finalizer() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let mut svc = lb_service("s", "default");
    svc["metadata"]["finalizers"] = json!(["service.kubernetes.io/load-balancer-cleanup"]);
    let created = raw.post(SVCS, svc).await.body;
    let mut w = raw
        .watch(&format!(
            "{SVCS}?watch=true&resourceVersion={}",
            rv(&created)
        ))
        .await;
    let d = raw.delete(&format!("{SVCS}/s")).await;
    assert_eq!(d.status, 200);
    assert!(
        d.body["metadata"]["deletionTimestamp"].is_string(),
        "the object is returned, marked"
    );
    let ev = w.next_change().await.expect("event");
    assert_eq!(ev["type"], "MODIFIED");
    assert!(ev["object"]["metadata"]["deletionTimestamp"].is_string());
    assert!(server.get("svc", Some("default"), "s").is_some());
    let added = raw.patch(&format!("{SVCS}/s"), MERGE, json!({"metadata":{"finalizers":["service.kubernetes.io/load-balancer-cleanup","example.com/more"]}})).await;
    assert_eq!((added.status, added.reason()), (422, "Invalid"));
    assert_eq!(
        added.body["details"]["causes"][0]["reason"],
        "FieldValueForbidden"
    );
    let removed = raw
        .patch(
            &format!("{SVCS}/s"),
            MERGE,
            json!({"metadata":{"finalizers":null}}),
        )
        .await;
    assert_eq!(removed.status, 200);
    assert_eq!(w.next_change().await.expect("event")["type"], "DELETED");
    assert!(server.get("svc", Some("default"), "s").is_none());
}

#[tokio::test]
async fn deleting_an_object_without_finalizers_answers_a_success_status() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let created = raw.post(SVCS, lb_service("s", "default")).await.body;
    let d = raw.delete(&format!("{SVCS}/s")).await;
    assert_eq!(d.status, 200);
    assert_eq!(d.body["kind"], "Status");
    assert_eq!(d.body["status"], "Success");
    assert_eq!(d.body["details"]["uid"], created["metadata"]["uid"]);
    let again = raw.delete(&format!("{SVCS}/s")).await;
    assert_eq!((again.status, again.reason()), (404, "NotFound"));
    assert_eq!(again.body["message"], "services \"s\" not found");
}

#[tokio::test]
async fn config_map_keys_must_be_config_keys() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let r = raw
        .post(
            CMS,
            json!({"metadata":{"name":"a"},"data":{"192.0.2.1":"ns/s","2001:db8::1":"ns/t"}}),
        )
        .await;
    assert_eq!((r.status, r.reason()), (422, "Invalid"));
    assert_eq!(r.body["details"]["kind"], "ConfigMap");
    assert_eq!(r.body["details"]["causes"][0]["field"], "data[2001:db8::1]");
    assert_eq!(
        r.body["details"]["causes"][0]["reason"],
        "FieldValueInvalid"
    );
}

#[tokio::test]
async fn a_config_map_over_one_mebibyte_is_too_long() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let big = "x".repeat(1_048_577);
    let r = raw
        .post(CMS, json!({"metadata":{"name":"a"},"data":{"k":big}}))
        .await;
    assert_eq!((r.status, r.reason()), (422, "Invalid"));
    assert!(
        r.body["message"]
            .as_str()
            .expect("message")
            .ends_with("Too long: must have at most 1048576 bytes"),
        "{}",
        r.body["message"]
    );
}

#[tokio::test]
async fn a_load_balancer_ingress_ip_must_be_an_ip() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    raw.post(SVCS, lb_service("s", "default")).await;
    let r = raw
        .patch(
            &format!("{SVCS}/s/status"),
            MERGE,
            json!({"status":{"loadBalancer":{"ingress":[{"ip":"not-an-ip"}]}}}),
        )
        .await;
    assert_eq!((r.status, r.reason()), (422, "Invalid"));
    assert_eq!(
        r.body["details"]["causes"][0]["field"],
        "status.loadBalancer.ingress[0].ip"
    );
    let ok = raw
        .patch(
            &format!("{SVCS}/s/status"),
            MERGE,
            json!({"status":{"loadBalancer":{"ingress":[{"ip":"2001:db8::7"}]}}}),
        )
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.body["status"]["loadBalancer"]["ingress"][0]["ipMode"], "VIP",
        "the real server defaults ipMode"
    );
}

#[tokio::test]
async fn load_balancer_class_cannot_change_once_set() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let mut svc = lb_service("s", "default");
    svc["spec"]["loadBalancerClass"] = json!("example.com/a");
    raw.post(SVCS, svc).await;
    let r = raw
        .patch(
            &format!("{SVCS}/s"),
            MERGE,
            json!({"spec":{"loadBalancerClass":"example.com/b"}}),
        )
        .await;
    assert_eq!((r.status, r.reason()), (422, "Invalid"));
    assert_eq!(
        r.body["details"]["causes"][0]["field"],
        "spec.loadBalancerClass"
    );
    assert!(
        r.body["message"]
            .as_str()
            .expect("message")
            .contains("may not change once set")
    );
}

#[tokio::test]
async fn events_posted_as_events_k8s_io_are_core_events_too() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    let ev = json!({
        "apiVersion":"events.k8s.io/v1","kind":"Event","metadata":{"name":"s.1"},
        "eventTime":"2024-01-01T00:00:00.000000Z","reportingController":"vipam","reportingInstance":"vipam-0",
        "action":"Allocate","reason":"Allocated","type":"Normal","note":"192.0.2.1",
        "regarding":{"kind":"Service","name":"s","namespace":"default"}
    });
    let r = raw
        .post("/apis/events.k8s.io/v1/namespaces/default/events", ev)
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let core = raw.get("/api/v1/namespaces/default/events/s.1").await;
    assert_eq!(core.body["message"], "192.0.2.1");
    assert_eq!(core.body["involvedObject"]["name"], "s");
    assert_eq!(core.body["reportingComponent"], "vipam");
    let missing = raw
        .post(
            "/apis/events.k8s.io/v1/namespaces/default/events",
            json!({"metadata":{"name":"x"}}),
        )
        .await;
    assert_eq!((missing.status, missing.reason()), (422, "Invalid"));
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_content() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    server
        .seed(json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"gone"}}))
        .expect("namespace");
    server.seed(cm("a", "gone")).expect("seeded");
    let d = raw.delete("/api/v1/namespaces/gone").await;
    assert_eq!(d.status, 200);
    assert!(server.get("cm", Some("gone"), "a").is_none());
    assert!(server.get("ns", None, "gone").is_none());
}

#[tokio::test]
async fn unimplemented_requests_fail_loudly() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    raw.post(CMS, cm("a", "default")).await;
    let cases = [
        (
            raw.get("/api/v1/namespaces/default/pods").await,
            404,
            "NotFound",
        ),
        (raw.get("/apis/apps/v1").await, 404, "NotFound"),
        (raw.get("/nothing/here").await, 404, "NotFound"),
        (
            raw.send(Method::DELETE, CMS, None, None).await,
            405,
            "MethodNotAllowed",
        ),
        (
            raw.post(&format!("{CMS}/a"), cm("a", "default")).await,
            405,
            "MethodNotAllowed",
        ),
        (
            raw.post("/api/v1/configmaps", cm("a", "default")).await,
            405,
            "MethodNotAllowed",
        ),
        (
            raw.send(
                Method::DELETE,
                &format!("{CMS}/a"),
                Some("application/json"),
                Some(json!({"propagationPolicy":"Foreground"})),
            )
            .await,
            400,
            "BadRequest",
        ),
        (raw.get(&format!("{CMS}/a/status")).await, 404, "NotFound"),
        (
            raw.send(
                Method::PATCH,
                &format!("{CMS}/a"),
                Some("application/vnd.kubernetes.protobuf"),
                None,
            )
            .await,
            415,
            "UnsupportedMediaType",
        ),
        (
            raw.post(&format!("{CMS}?fieldValidation=Loose"), cm("b", "default"))
                .await,
            422,
            "Invalid",
        ),
        (
            raw.post(
                &format!("{CMS}?fieldValidation=Strict"),
                json!({"metadata":{"name":"b"},"bogus":1}),
            )
            .await,
            400,
            "BadRequest",
        ),
    ];
    for (n, (reply, code, reason)) in cases.iter().enumerate() {
        assert_eq!(
            (reply.status, reply.reason()),
            (*code, *reason),
            "case {n}: {}",
            reply.body
        );
        assert_eq!(reply.body["kind"], "Status", "case {n}");
    }
    let watch = raw.send(Method::GET, CMS, None, None).await;
    assert_eq!(watch.status, 200);
}

#[tokio::test]
async fn discovery_describes_exactly_the_served_resources() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    assert_eq!(raw.get("/api").await.body["versions"], json!(["v1"]));
    let groups = raw.get("/apis").await.body;
    let names: Vec<&str> = groups["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert_eq!(names, ["events.k8s.io", "coordination.k8s.io"]);
    let leases = raw.get("/apis/coordination.k8s.io/v1").await.body;
    assert_eq!(leases["resources"][0]["name"], "leases");
    assert_eq!(raw.get("/version").await.body["major"], "1");
    assert_eq!(raw.get("/openapi/v2").await.status, 404);
}

#[tokio::test]
async fn injected_faults_answer_with_a_status_body_and_retry_after() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    server.fail_next(
        Fault::status(429)
            .method(Method::GET)
            .path("/api/v1/namespaces/*/configmaps")
            .retry_after(2),
    );
    server.fail_next(
        Fault::status(500)
            .method(Method::POST)
            .path("/api/**")
            .times(2),
    );
    let r = raw.get(CMS).await;
    assert_eq!((r.status, r.reason()), (429, "TooManyRequests"));
    assert_eq!(
        r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("2")
    );
    assert_eq!(r.body["details"]["retryAfterSeconds"], 2);
    assert_eq!(raw.get(CMS).await.status, 200, "the fault is used up");
    for _ in 0..2 {
        let r = raw.post(CMS, cm("a", "default")).await;
        assert_eq!((r.status, r.reason()), (500, "InternalError"));
    }
    assert!(
        server.get("cm", Some("default"), "a").is_none(),
        "a failed request changes nothing"
    );
    assert_eq!(raw.post(CMS, cm("a", "default")).await.status, 201);
    for (code, reason) in [(409, "Conflict"), (503, "ServiceUnavailable")] {
        server.fail_next(Fault::status(code));
        let r = raw.get(CMS).await;
        assert_eq!((r.status, r.reason()), (code, reason));
    }
}

#[tokio::test]
async fn latency_delays_every_request() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    server.set_latency(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    raw.get(CMS).await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    server.clear_faults();
}

#[tokio::test]
async fn the_request_log_records_method_path_content_type_and_status() {
    let server = mk_server().await;
    let raw = mk_raw(&server);
    server.clear_requests();
    raw.post(CMS, cm("a", "default")).await;
    raw.patch(
        &format!("{CMS}/a?fieldManager=x"),
        MERGE,
        json!({"data":{"k":"2"}}),
    )
    .await;
    raw.get(&format!("{CMS}?&limit=500")).await;
    let log = server.take_requests();
    let summary: Vec<(String, String, Option<String>, u16)> = log
        .iter()
        .map(|r| {
            (
                r.method.to_string(),
                r.path.clone(),
                r.content_type.clone(),
                r.status,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "POST".to_owned(),
                CMS.to_owned(),
                Some("application/json".to_owned()),
                201
            ),
            (
                "PATCH".to_owned(),
                format!("{CMS}/a?fieldManager=x"),
                Some(MERGE.to_owned()),
                200
            ),
            ("GET".to_owned(), format!("{CMS}?&limit=500"), None, 200),
        ]
    );
    assert_eq!(log.iter().filter(|r| r.is_write()).count(), 2);
    assert!(server.requests().is_empty());
}
