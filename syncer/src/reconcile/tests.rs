//! Scenarios of the reconciler: each runs reconciles against the scripted
//! doubles of the Kubernetes API and the allocator, which expect every call
//! in order (method, path and the body's relevant parts; the allocator's
//! owner, address, pool) and answer it; an unexpected, missing or
//! out-of-order call fails the scenario.

use serde_json::{Value, json};
use tonic::Status;
use vipam::v1::{Allocation, ReleaseResponse};

use crate::{
    allocation::AllocError,
    desired::{ADDRESS_ANNOTATION, FINALIZER, Subject},
    error::Error,
    events::reason,
    fixtures::{
        MkService, mk_ip, mk_service,
        scenario::Scenario,
        script::{Expected, Script},
    },
    render::Entry,
};

const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

/// `shop/<name>` as first cached, at resourceVersion 1.
fn mk_cached(svc: MkService) -> k8s_openapi::api::core::v1::Service {
    svc.resource_version("1").build()
}

fn service_path(name: &str) -> String {
    format!("/api/v1/namespaces/shop/services/{name}")
}

fn finalizer_added(name: &str, written: MkService) -> Expected {
    let patch = json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
    ]);
    Expected::json_patch(&service_path(name), patch, written.build())
}

fn finalizer_removed(name: &str, written: MkService) -> Expected {
    let patch = json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ]);
    Expected::json_patch(&service_path(name), patch, written.build())
}

fn status_written(name: &str, ip: Option<&str>, written: MkService) -> Expected {
    let ingress = ip.map(|ip| json!([{"ip": ip}]));
    let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
    let path = format!("{}/status", service_path(name));
    Expected::merge_patch(&path, patch, written.build())
}

/// The Event on `shop/<name>`.
fn event(name: &str, type_: &str, reason: &str, action: &str, note: &str) -> Expected {
    let regarding = json!({"kind": "Service", "namespace": "shop", "name": name});
    let body = json!({"type": type_, "reason": reason, "action": action, "note": note, "regarding": regarding});
    Expected::create(EVENTS, body)
}

fn allocated_event(name: &str, note: &str) -> Expected {
    event(name, "Normal", reason::ALLOCATED, "Allocate", note)
}

fn failed_event(name: &str, note: &str) -> Expected {
    event(name, "Warning", reason::ALLOCATION_FAILED, "Allocate", note)
}

fn released_event(name: &str, ip: &str) -> Expected {
    let note = format!("released {ip}");
    event(name, "Normal", reason::RELEASED, "Release", &note)
}

fn mk_allocation(ip: &str, pool: &str) -> Allocation {
    Allocation {
        address: ip.into(),
        pool: pool.into(),
        ..Default::default()
    }
}

/// An Allocate for `shop/<name>` with the fields that matter in `request`.
fn allocate(name: &str, mut request: Value, answer: Result<Allocation, Status>) -> Expected {
    request["owner"] = json!(format!("service:shop/{name}"));
    Expected::Allocate(request, answer)
}

/// An Allocate that keeps the address `shop/<name>` has.
fn keep(name: &str, ip: &str) -> Expected {
    let request = json!({"address": ip, "pool": "", "adopt": true});
    allocate(name, request, Ok(mk_allocation(ip, "default")))
}

/// A Release of what `shop/<name>` holds, which was `ip`.
fn release(name: &str, ip: &str) -> Expected {
    let answer = ReleaseResponse {
        released: true,
        allocation: Some(mk_allocation(ip, "default")),
    };
    let request = json!({"owner": format!("service:shop/{name}"), "address": ""});
    Expected::Release(request, Ok(answer))
}

fn any_address() -> Value {
    json!({"address": "", "pool": "", "adopt": false})
}

fn web() -> MkService {
    mk_service("web")
}

fn db() -> MkService {
    mk_service("db")
}

/// A first address for the finalized `shop/web`: the allocation of
/// 10.0.0.1, then its status (written at resourceVersion 3), then its Event.
fn web_allocated() -> [Expected; 3] {
    let written = web().finalized().status("10.0.0.1").resource_version("3");
    let allocation = Ok(mk_allocation("10.0.0.1", "default"));
    [
        allocate("web", any_address(), allocation),
        status_written("web", Some("10.0.0.1"), written),
        allocated_event("web", "allocated 10.0.0.1 from pool default"),
    ]
}

/// `shop/web` with 10.0.0.1 in its status, asking for 10.0.0.9.
fn web_moving() -> MkService {
    web()
        .finalized()
        .status("10.0.0.1")
        .annotation(ADDRESS_ANNOTATION, "10.0.0.9")
}

fn web_key() -> (String, String) {
    ("shop".into(), "web".into())
}

#[tokio::test]
async fn a_new_service_gets_the_finalizer_then_adoption_an_address_its_status_and_an_event() {
    let db = db().finalized().status("10.0.0.2");
    let script = Script::of(
        [
            finalizer_added("web", web().finalized().resource_version("2")),
            keep("db", "10.0.0.2"),
        ]
        .into_iter()
        .chain(web_allocated()),
    );
    let s = Scenario::start(vec![mk_cached(web()), mk_cached(db)], script).await;
    s.reconcile("web").await.expect("reconciled");
    s.script.verify();
    let index = &s.ctx.state.index;
    assert_eq!(index.address(&web_key()), Some(mk_ip("10.0.0.1")));
    assert_eq!(s.ctx.metrics.managed.get(), 2, "web and the adopted db");
}

#[tokio::test]
async fn a_service_moving_to_another_requested_address_asks_the_allocator_to_move_it() {
    let moved = web()
        .finalized()
        .status("10.0.0.9")
        .annotation(ADDRESS_ANNOTATION, "10.0.0.9")
        .resource_version("2");
    let script = Script::of([
        allocate(
            "web",
            json!({"address": "10.0.0.9", "adopt": false, "replace_held": true}),
            Ok(mk_allocation("10.0.0.9", "default")),
        ),
        status_written("web", Some("10.0.0.9"), moved),
        allocated_event("web", "allocated 10.0.0.9 from pool default"),
    ]);
    let s = Scenario::start(vec![mk_cached(web_moving())], script).await;
    s.reconcile("web").await.expect("reconciled");
    s.script.verify();
    assert_eq!(
        s.ctx.state.index.address(&web_key()),
        Some(mk_ip("10.0.0.9"))
    );
}

#[tokio::test]
async fn a_refused_move_leaves_the_service_its_address_and_says_why() {
    let held = "10.0.0.9 is held by service:shop/db";
    let script = Script::of([
        allocate(
            "web",
            json!({"address": "10.0.0.9", "replace_held": true}),
            Err(Status::already_exists(held)),
        ),
        failed_event("web", &format!("address held: {held}")),
    ]);
    let s = Scenario::start(vec![mk_cached(web_moving())], script).await;
    let error = s.reconcile("web").await.expect_err("a refused move");
    s.script.verify();
    assert!(
        matches!(error, Error::Alloc(AllocError::Held(_))),
        "{error}"
    );
}

#[tokio::test]
async fn a_full_pool_waits_until_another_service_releases_its_address() {
    let full = "pool \"default\" has no free address";
    let deleted = db().finalized().status("10.0.0.2").deleting();
    let script = Script::of([
        finalizer_added("web", web().finalized().resource_version("2")),
        allocate("web", any_address(), Err(Status::resource_exhausted(full))),
        failed_event("web", &format!("pool exhausted: {full}")),
        release("db", "10.0.0.2"),
        finalizer_removed("db", db().deleting().resource_version("2")),
        released_event("db", "10.0.0.2"),
    ]);
    let mut s = Scenario::start(vec![mk_cached(web()), mk_cached(deleted)], script).await;
    let error = s.reconcile("web").await.expect_err("a full pool");
    assert!(
        matches!(error, Error::Alloc(AllocError::Exhausted(_))),
        "{error}"
    );
    assert!(s.retriggered.try_recv().is_err(), "nothing released yet");
    s.reconcile("db").await.expect("cleaned up");
    assert_eq!(s.next_retriggered().await.name, "web");
    s.script.verify();
}

#[tokio::test]
async fn an_unreachable_allocator_requires_adoption_again_before_the_next_address() {
    let db = db().finalized().status("10.0.0.2");
    let down = "connection refused";
    let script = Script::of(
        [
            finalizer_added("web", web().finalized().resource_version("2")),
            keep("db", "10.0.0.2"),
            allocate("web", any_address(), Err(Status::unavailable(down))),
            failed_event("web", &format!("allocator unreachable: {down}")),
            // The next reconcile adopts every address again first.
            keep("db", "10.0.0.2"),
        ]
        .into_iter()
        .chain(web_allocated()),
    );
    let s = Scenario::start(vec![mk_cached(web()), mk_cached(db)], script).await;
    let error = s.reconcile("web").await.expect_err("the allocator is down");
    assert!(
        matches!(error, Error::Alloc(AllocError::Unreachable(_))),
        "{error}"
    );
    s.reconcile("web").await.expect("reconciled");
    s.script.verify();
}

#[tokio::test]
async fn a_deleted_service_is_released_and_loses_its_finalizer_once_the_configmap_dropped_it() {
    let deleted = web().finalized().status("10.0.0.1").deleting();
    let script = Script::of([
        release("web", "10.0.0.1"),
        finalizer_removed("web", web().deleting().resource_version("2")),
        released_event("web", "10.0.0.1"),
    ]);
    let s = Scenario::start(vec![mk_cached(deleted)], script).await;
    let entry = Entry::of(&Subject::of(&mk_cached(web())), None);
    s.ctx
        .state
        .index
        .upsert(web_key(), mk_ip("10.0.0.1"), entry);
    s.hold_configmap();
    let configmap = async {
        s.dropped("web").await;
        s.quiesce().await;
        assert_eq!(
            s.script.remaining(),
            2,
            "nothing after the release while the ConfigMap holds the entry: {:?}",
            s.script
        );
        s.publish();
    };
    let (cleaned, ()) = tokio::join!(s.reconcile("web"), configmap);
    cleaned.expect("cleaned up");
    s.script.verify();
}

#[tokio::test]
async fn a_service_that_stops_being_a_load_balancer_loses_its_status_then_its_finalizer() {
    let former = web().type_("ClusterIP").finalized().status("10.0.0.1");
    let cleared = web().type_("ClusterIP").finalized().resource_version("2");
    let script = Script::of([
        release("web", "10.0.0.1"),
        status_written("web", None, cleared),
        finalizer_removed("web", web().type_("ClusterIP").resource_version("3")),
        released_event("web", "10.0.0.1"),
    ]);
    let s = Scenario::start(vec![mk_cached(former)], script).await;
    s.reconcile("web").await.expect("cleaned up");
    s.script.verify();
    assert!(!s.ctx.state.is_cleaning("uid-web"), "the clean-up ended");
}
