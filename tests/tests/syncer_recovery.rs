//! The syncer's acceptance scenarios about recovery (issue 4): a wiped
//! allocator, the Go keepalived-cloud-provider's ConfigMap, an adopted
//! address outside every pool, two syncers and the Lease, and faults of the
//! Kubernetes API. Each runs the real binaries
//! against the Kubernetes API test server, or a real cluster when
//! `VIPAM_E2E_KUBECONFIG` names a kubeconfig (the fault tests need the test
//! server and say so when skipped).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::{Context as _, Result};
use http::Method;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Service};
use kube::{Api, api::PostParams};
use serde_json::json;
use vipam_e2e::syncer::{
    ADDRESS, CONFIG_MAP, FINALIZER, FORWARD_METHOD, Kube, LEASE, LEASE_DURATION, TIMEOUT,
    allocations, has_finalizer, mk_data, owner, quiet_period, status_ip, wait_until,
};
use vipam_kube_api::Fault;

const POOL_DEFAULT: &str = "default=10.20.30.0/29";

/// Every status IP each Service had, in order, from recorded versions
/// (repeats collapsed; `None` when it had none).
fn ip_history(versions: &[Service]) -> BTreeMap<String, Vec<Option<String>>> {
    let mut out: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for svc in versions {
        let name = svc.metadata.name.clone().unwrap_or_default();
        let ip = status_ip(svc);
        let history = out.entry(name).or_default();
        if history.last() != Some(&ip) {
            history.push(ip);
        }
    }
    out
}

/// Asserts that no Service's IP ever changed: each had no IP, then one, and
/// (only if `released` names it) none again.
fn assert_no_ip_changed(versions: &[Service], released: &[&str]) {
    for (name, history) in ip_history(versions) {
        let ips: Vec<_> = history.iter().flatten().collect();
        let distinct: BTreeSet<_> = ips.iter().collect();
        assert!(distinct.len() <= 1, "{name}: {history:?}");
        if !released.contains(&name.as_str()) {
            // Once set, never cleared.
            let first = history.iter().position(Option::is_some);
            assert!(
                first.is_none_or(|i| history[i..].iter().all(Option::is_some)),
                "{name}: {history:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_allocator_is_rebuilt_from_service_status_and_no_ip_changes() -> Result<()> {
    let kube = Kube::start("wiped").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let versions = kube.record_services();
    versions.wait_listed().await?;
    let _syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("a").annotation(ADDRESS, "10.20.30.3"))
        .await?;
    assert_eq!(kube.wait_ip("a").await?, "10.20.30.3");
    kube.create(kube.lb("b")).await?;
    assert_eq!(kube.wait_ip("b").await?, "10.20.30.1");
    kube.create(kube.lb("c").annotation(FORWARD_METHOD, "DR"))
        .await?;
    assert_eq!(kube.wait_ip("c").await?, "10.20.30.2");
    let before = mk_data(&[
        ("10.20.30.1", kube.entry("b", None)),
        ("10.20.30.2", kube.entry("c", Some("DR"))),
        ("10.20.30.3", kube.entry("a", None)),
    ]);
    kube.wait_data(&before).await?;

    // The allocator goes away with its data; a Service is created meanwhile.
    let mut allocator = allocator;
    allocator.kill()?;
    std::fs::remove_dir_all(kube.allocator_dir())?;
    kube.create(kube.lb("d")).await?;
    // Nothing is cleared while it is down: not while the syncer's calls
    // retry (the client retries an unreachable allocator for 30 s), nor once
    // they fail and the Services are told so.
    quiet_period().await;
    let unreachable = wait_until(
        Duration::from_secs(60),
        "a Service is told that the allocator is unreachable",
        async || {
            for name in ["a", "b", "c", "d"] {
                for e in kube.events(name).await? {
                    let message = e.message.unwrap_or_default();
                    if e.reason.as_deref() == Some("AllocationFailed")
                        && message.contains("unreachable")
                    {
                        return Ok(Some(format!("{name}: {message}")));
                    }
                }
            }
            Ok(None)
        },
    )
    .await?;
    println!("event: {unreachable}");
    quiet_period().await;
    for (name, ip) in [
        ("a", "10.20.30.3"),
        ("b", "10.20.30.1"),
        ("c", "10.20.30.2"),
    ] {
        let svc = kube.service(name).await?.context("service")?;
        assert_eq!(status_ip(&svc).as_deref(), Some(ip), "{name}");
        assert!(has_finalizer(&svc), "{name}");
    }
    assert_eq!(kube.ip("d").await?, None);
    assert_eq!(kube.data().await?, before);

    // Back with an empty database: every address is adopted again, and the
    // new Service gets one no other Service has.
    let allocator = allocator.restart()?;
    assert!(allocations(&allocator).await?.len() <= 1);
    let d = kube.wait_ip("d").await?;
    assert_eq!(d, "10.20.30.4");
    let ns = kube.namespace.clone();
    let expected_allocations = BTreeMap::from([
        (owner(&ns, "a"), "10.20.30.3".to_string()),
        (owner(&ns, "b"), "10.20.30.1".to_string()),
        (owner(&ns, "c"), "10.20.30.2".to_string()),
        (owner(&ns, "d"), "10.20.30.4".to_string()),
    ]);
    wait_until(
        TIMEOUT,
        "the allocator holds every Service's address",
        async || Ok((allocations(&allocator).await? == expected_allocations).then_some(())),
    )
    .await?;
    let mut after = before.clone();
    after.insert("10.20.30.4".into(), kube.entry("d", None));
    kube.wait_data(&after).await?;
    assert_no_ip_changed(&versions.seen(), &[]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocator_wiped_and_back_at_once_never_hands_out_an_ip_a_service_has() -> Result<()> {
    let kube = Kube::start("wiped-quickly").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let versions = kube.record_services();
    versions.wait_listed().await?;
    let _syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("a")).await?;
    assert_eq!(kube.wait_ip("a").await?, "10.20.30.1");
    kube.create(kube.lb("b")).await?;
    assert_eq!(kube.wait_ip("b").await?, "10.20.30.2");

    // Back with an empty database before the syncer notices it was gone:
    // the lowest free address is a's again as far as the allocator knows.
    let mut allocator = allocator;
    allocator.kill()?;
    std::fs::remove_dir_all(kube.allocator_dir())?;
    let allocator = allocator.restart()?;
    kube.create(kube.lb("c")).await?;
    assert_eq!(kube.wait_ip("c").await?, "10.20.30.3");
    let ns = kube.namespace.clone();
    let expected = BTreeMap::from([
        (owner(&ns, "a"), "10.20.30.1".to_string()),
        (owner(&ns, "b"), "10.20.30.2".to_string()),
        (owner(&ns, "c"), "10.20.30.3".to_string()),
    ]);
    wait_until(
        TIMEOUT,
        "the allocator holds every Service's address",
        async || Ok((allocations(&allocator).await? == expected).then_some(())),
    )
    .await?;
    kube.wait_data(&mk_data(&[
        ("10.20.30.1", kube.entry("a", None)),
        ("10.20.30.2", kube.entry("b", None)),
        ("10.20.30.3", kube.entry("c", None)),
    ]))
    .await?;
    assert_no_ip_changed(&versions.seen(), &[]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_providers_configmap_is_adopted_in_both_formats() -> Result<()> {
    let kube = Kube::start("go-provider").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let ns = kube.namespace.clone();
    let a = kube
        .create(kube.lb("a").annotation(FORWARD_METHOD, "NAT"))
        .await?;
    let b = kube.create(kube.lb("b")).await?;
    let c = kube.create(kube.lb("c")).await?;
    kube.create(kube.lb("d")).await?;
    let uid = |s: &Service| s.metadata.uid.clone().unwrap_or_default();
    // Full entries name the Service; older ones only {uid, ip}. c is known
    // only from an old entry of the annotation.
    let state = json!({"services": [
        {"uid": uid(&a), "ip": "10.20.30.5", "serviceNamespace": ns, "serviceName": "a", "forwardMethod": "NAT"},
        {"uid": uid(&b), "ip": "10.20.30.6"},
        {"uid": uid(&c), "ip": "10.20.30.4"},
    ]});
    let cm = serde_json::from_value(json!({
        "metadata": {
            "name": CONFIG_MAP,
            "namespace": kube.system_namespace,
            "annotations": {"k8s.co/cloud-provider-config": state.to_string()},
        },
        "data": {
            "10.20.30.5": kube.entry("a", Some("NAT")),
            "10.20.30.6": kube.entry("b", None),
        },
    }))?;
    kube.configmaps()
        .create(&PostParams::default(), &cm)
        .await
        .context("create the Go provider's ConfigMap")?;

    let _syncer = kube.syncer(&allocator, &[])?;
    assert_eq!(kube.wait_ip("a").await?, "10.20.30.5");
    assert_eq!(kube.wait_ip("b").await?, "10.20.30.6");
    assert_eq!(kube.wait_ip("c").await?, "10.20.30.4");
    // A Service new to both gets the lowest address nobody had.
    assert_eq!(kube.wait_ip("d").await?, "10.20.30.1");
    kube.wait_data(&mk_data(&[
        ("10.20.30.1", kube.entry("d", None)),
        ("10.20.30.4", kube.entry("c", None)),
        ("10.20.30.5", kube.entry("a", Some("NAT"))),
        ("10.20.30.6", kube.entry("b", None)),
    ]))
    .await?;
    kube.wait_event("a", "Normal", "Allocated", &["adopted", "10.20.30.5"])
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_address_outside_every_pool_is_kept_with_one_warning() -> Result<()> {
    let kube = Kube::start("outside-pools").await?;
    // Addresses another implementation gave before: one outside the pools.
    kube.create(kube.lb("kept").finalizer(FINALIZER)).await?;
    kube.set_status_ip("kept", "192.168.77.7").await?;
    kube.create(kube.lb("inside").finalizer(FINALIZER)).await?;
    kube.set_status_ip("inside", "10.20.30.3").await?;
    let versions = kube.record_services();
    versions.wait_listed().await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let _syncer = kube.syncer(&allocator, &[])?;
    let note = kube
        .wait_event("kept", "Warning", "OutsidePools", &["192.168.77.7"])
        .await?;
    println!("event: {note}");
    let data = mk_data(&[
        ("10.20.30.3", kube.entry("inside", None)),
        ("192.168.77.7", kube.entry("kept", None)),
    ]);
    kube.wait_data(&data).await?;
    let held = allocations(&allocator).await?;
    assert_eq!(
        held.get(&owner(&kube.namespace, "kept"))
            .map(String::as_str),
        Some("192.168.77.7")
    );
    // Several resyncs later: still kept, still warned only once.
    quiet_period().await;
    assert_eq!(kube.ip("kept").await?.as_deref(), Some("192.168.77.7"));
    assert_eq!(kube.data().await?, data);
    for (name, warnings) in [("kept", 1), ("inside", 0)] {
        let events = kube.events(name).await?;
        let outside: Vec<_> = events
            .iter()
            .filter(|e| e.reason.as_deref() == Some("OutsidePools"))
            .collect();
        assert_eq!(outside.len(), warnings, "{name}: {outside:#?}");
    }
    assert_no_ip_changed(&versions.seen(), &[]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes_and_another_takes_over_when_it_is_killed() -> Result<()> {
    let kube = Kube::start("two-syncers").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let one = kube.syncer(&allocator, &[])?;
    let two = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("a")).await?;
    let a = kube.wait_ip("a").await?;
    kube.wait_data(&mk_data(&[(&a, kube.entry("a", None))]))
        .await?;

    let (mut leader, follower) = wait_until(TIMEOUT, "one syncer is ready", async || {
        Ok(match (one.is_ready().await, two.is_ready().await) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        })
    })
    .await
    .map(|first| if first { (one, two) } else { (two, one) })?;
    let leases: Api<Lease> = Api::namespaced(kube.client.clone(), &kube.system_namespace);
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity);
    assert_eq!(
        holder(leases.get(LEASE).await?).as_deref(),
        Some(leader.identity.as_str())
    );
    // The follower has done nothing.
    assert!(!follower.is_ready().await);
    assert_eq!(follower.metric("vipam_syncer_leader").await?, 0.0);
    assert_eq!(follower.metric("vipam_syncer_reconciles").await?, 0.0);
    assert_eq!(follower.metric("vipam_syncer_configmap_writes").await?, 0.0);
    assert_eq!(follower.metric("vipam_syncer_events").await?, 0.0);
    assert!(!follower.log().contains("leading"), "{}", follower.log());
    assert!(leader.metric("vipam_syncer_configmap_writes").await? >= 1.0);

    leader.kill()?;
    kube.create(kube.lb("b")).await?;
    let started = tokio::time::Instant::now();
    wait_until(TIMEOUT, "the other syncer takes over", async || {
        Ok(follower.is_ready().await.then_some(()))
    })
    .await?;
    println!(
        "took over {:?} after the kill (lease {LEASE_DURATION:?})",
        started.elapsed()
    );
    let b = kube.wait_ip("b").await?;
    assert_eq!(kube.ip("a").await?, Some(a.clone()));
    assert_ne!(a, b);
    kube.wait_data(&mk_data(&[
        (&a, kube.entry("a", None)),
        (&b, kube.entry("b", None)),
    ]))
    .await?;
    assert_eq!(
        holder(leases.get(LEASE).await?).as_deref(),
        Some(follower.identity.as_str())
    );
    assert!(follower.metric("vipam_syncer_configmap_writes").await? >= 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_and_server_errors_on_writes_end_in_the_same_state_and_change_no_ip() -> Result<()>
{
    let kube = Kube::start("write-faults").await?;
    let Some(server) = kube.server_or_skip(
        "conflicts_and_server_errors_on_writes_end_in_the_same_state_and_change_no_ip",
        "needs fault injection",
    ) else {
        return Ok(());
    };
    let ns = kube.namespace.clone();
    let system = kube.system_namespace.clone();
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let versions = kube.record_services();
    versions.wait_listed().await?;
    // Every kind of write the syncer makes fails at first: the finalizer
    // patch, the status patch, the ConfigMap create and update, the Events;
    // and its first list of Services.
    for fault in [
        Fault::status(500)
            .method(Method::GET)
            .path("/api/v1/services")
            .times(2),
        Fault::status(409)
            .method(Method::PATCH)
            .path(format!("/api/v1/namespaces/{ns}/services/*")),
        Fault::status(500)
            .method(Method::PATCH)
            .path(format!("/api/v1/namespaces/{ns}/services/*")),
        Fault::status(409)
            .method(Method::PATCH)
            .path(format!("/api/v1/namespaces/{ns}/services/*/status")),
        Fault::status(503)
            .method(Method::PATCH)
            .path(format!("/api/v1/namespaces/{ns}/services/*/status")),
        Fault::status(500)
            .method(Method::POST)
            .path(format!("/api/v1/namespaces/{system}/configmaps")),
        Fault::status(409)
            .method(Method::PUT)
            .path(format!(
                "/api/v1/namespaces/{system}/configmaps/{CONFIG_MAP}"
            ))
            .times(2),
        Fault::status(500).method(Method::PUT).path(format!(
            "/api/v1/namespaces/{system}/configmaps/{CONFIG_MAP}"
        )),
        Fault::status(500)
            .method(Method::POST)
            .path(format!("/apis/events.k8s.io/v1/namespaces/{ns}/events")),
    ] {
        server.fail_next(fault);
    }
    let _syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("a").annotation(FORWARD_METHOD, "DR"))
        .await?;
    assert_eq!(kube.wait_ip("a").await?, "10.20.30.1");
    kube.create(kube.lb("b").annotation(ADDRESS, "10.20.30.5"))
        .await?;
    kube.create(kube.lb("c")).await?;
    assert_eq!(kube.wait_ip("b").await?, "10.20.30.5");
    assert_eq!(kube.wait_ip("c").await?, "10.20.30.2");
    kube.wait_data(&mk_data(&[
        ("10.20.30.1", kube.entry("a", Some("DR"))),
        ("10.20.30.2", kube.entry("c", None)),
        ("10.20.30.5", kube.entry("b", None)),
    ]))
    .await?;
    // The clean-up meets faults too: the ConfigMap update and the finalizer
    // removal fail once each.
    server.fail_next(Fault::status(409).method(Method::PUT).path(format!(
        "/api/v1/namespaces/{system}/configmaps/{CONFIG_MAP}"
    )));
    server.fail_next(
        Fault::status(500)
            .method(Method::PATCH)
            .path(format!("/api/v1/namespaces/{ns}/services/c")),
    );
    kube.delete("c").await?;
    kube.wait_gone("c").await?;
    // And a Service that stops being a LoadBalancer, whose status clear and
    // finalizer removal fail once each, after its address is released.
    kube.create(kube.lb("d")).await?;
    assert_eq!(kube.wait_ip("d").await?, "10.20.30.2");
    server.fail_next(
        Fault::status(500)
            .method(Method::PATCH)
            .path(format!("/api/v1/namespaces/{ns}/services/d/status")),
    );
    kube.patch("d", json!({"spec": {"type": "ClusterIP"}}))
        .await?;
    // (Added after the test's own patch of d, which it would match; the
    // syncer removes the finalizer only after the failed status clear is
    // retried.)
    server.fail_next(
        Fault::status(500)
            .method(Method::PATCH)
            .path(format!("/api/v1/namespaces/{ns}/services/d")),
    );
    wait_until(
        Duration::from_secs(30),
        "d has neither the finalizer nor an ingress IP",
        async || {
            let svc = kube.service("d").await?.context("d is gone")?;
            Ok((!has_finalizer(&svc) && status_ip(&svc).is_none()).then_some(()))
        },
    )
    .await?;

    // The same state as without faults.
    kube.wait_data(&mk_data(&[
        ("10.20.30.1", kube.entry("a", Some("DR"))),
        ("10.20.30.5", kube.entry("b", None)),
    ]))
    .await?;
    assert_eq!(
        allocations(&allocator).await?,
        BTreeMap::from([
            (owner(&ns, "a"), "10.20.30.1".to_string()),
            (owner(&ns, "b"), "10.20.30.5".to_string()),
        ])
    );
    for name in ["a", "b"] {
        let svc = kube.service(name).await?.context("service")?;
        assert!(has_finalizer(&svc), "{name}");
    }
    let injected: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| [409, 500, 503].contains(&r.status))
        .map(|r| (r.path_only().to_string(), r.method, r.status))
        .collect();
    println!("failed requests: {injected:#?}");
    assert!(injected.len() >= 10, "{injected:#?}");
    // Each address was published (a reconcile that reads its Service from
    // the cache before its own status write arrives may write the same
    // status again) and never changed: the recording watch saw every
    // version of every Service, as no watch was dropped in this test.
    for name in ["a", "b", "c", "d"] {
        let path = format!("/api/v1/namespaces/{ns}/services/{name}/status");
        assert!(
            server
                .requests()
                .iter()
                .any(|r| r.method == Method::PATCH && r.path_only() == path && r.status == 200),
            "{name}"
        );
    }
    assert_no_ip_changed(&versions.seen(), &["c", "d"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_and_expired_resource_versions_end_in_the_same_state_and_change_no_ip()
-> Result<()> {
    let kube = Kube::start("watch-faults").await?;
    let Some(server) = kube.server_or_skip(
        "dropped_watches_and_expired_resource_versions_end_in_the_same_state_and_change_no_ip",
        "needs fault injection",
    ) else {
        return Ok(());
    };
    let ns = kube.namespace.clone();
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let versions = kube.record_services();
    versions.wait_listed().await?;
    // The method PROXY below is written only in proxy-protocol mode.
    let mut syncer = kube.syncer(&allocator, &["--proxy-protocol-mode"])?;
    kube.create(kube.lb("a")).await?;
    assert_eq!(kube.wait_ip("a").await?, "10.20.30.1");
    kube.create(kube.lb("b")).await?;
    assert_eq!(kube.wait_ip("b").await?, "10.20.30.2");

    // Watches dropped, history gone (410 on the next watch), and the lists
    // that follow fail at first.
    let break_watches = || {
        server.fail_next(
            Fault::status(500)
                .method(Method::GET)
                .path("/api/v1/services")
                .times(2),
        );
        server.compact();
        server.close_watches();
    };
    break_watches();
    kube.create(kube.lb("c")).await?;
    assert_eq!(kube.wait_ip("c").await?, "10.20.30.3");
    break_watches();
    kube.delete("b").await?;
    kube.wait_gone("b").await?;
    break_watches();
    kube.patch(
        "a",
        json!({"metadata": {"annotations": {FORWARD_METHOD: "proxy"}}}),
    )
    .await?;
    // A hand edit while the ConfigMap's watch is down.
    server.compact();
    server.close_watches();
    let mut cm = kube.configmaps().get(CONFIG_MAP).await?;
    cm.data
        .get_or_insert_default()
        .insert("10.99.0.1".into(), "x/y".into());
    kube.configmaps()
        .replace(CONFIG_MAP, &PostParams::default(), &cm)
        .await?;

    kube.wait_data(&mk_data(&[
        ("10.20.30.1", kube.entry("a", Some("PROXY"))),
        ("10.20.30.3", kube.entry("c", None)),
    ]))
    .await?;
    assert_eq!(
        allocations(&allocator).await?,
        BTreeMap::from([
            (owner(&ns, "a"), "10.20.30.1".to_string()),
            (owner(&ns, "c"), "10.20.30.3".to_string()),
        ])
    );
    assert_eq!(kube.ip("a").await?.as_deref(), Some("10.20.30.1"));
    assert_eq!(kube.ip("c").await?.as_deref(), Some("10.20.30.3"));
    assert!(syncer.is_running(), "the syncer stopped:\n{}", syncer.log());
    // The recording watch is dropped too and lists again, so it may miss a
    // version that lived only between; every version it saw is checked, and
    // the final addresses above are exact.
    assert_no_ip_changed(&versions.seen(), &["b"]);
    Ok(())
}
