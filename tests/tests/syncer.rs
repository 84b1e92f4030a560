//! The syncer's acceptance scenarios (issue 4), each against the real
//! `vipam-allocator` and `vipam-syncer` binaries and the Kubernetes API test
//! server, or a real cluster when `VIPAM_E2E_KUBECONFIG` names a kubeconfig:
//! a new Service, forward methods (PROXY only in proxy-protocol mode, DR
//! port rewrites), requested addresses, refusals by the allocator, pools,
//! release, `loadBalancerClass`, restarts and the steady state, hand edits of
//! the ConfigMap, IPv6 and the size limit of the ConfigMap.
//!
//! Recovery from a lost allocator, adoption from the Go provider, two
//! syncers and API faults are in `syncer_recovery.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::{Context as _, Result};
use http::Method;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use serde_json::json;
use vipam::v1::AllocateRequest;
use vipam_e2e::{
    Allocator,
    syncer::{
        ADDRESS, CONFIG_MAP, FINALIZER, FORWARD_METHOD, Kube, Lb, POOL, TIMEOUT, allocations,
        allocator_client, has_finalizer, mk_data, owner, quiet_period, status_ip, wait_until,
    },
};
use vipam_kube_api::LoggedRequest;

const POOL_DEFAULT: &str = "default=10.20.30.0/29";

/// Whether a logged request is a write other than the Lease's renewals and
/// reads (the Lease is renewed every few seconds by design).
fn is_non_lease_write(r: &LoggedRequest) -> bool {
    r.is_write() && !r.path_only().starts_with("/apis/coordination.k8s.io/")
}

fn position(log: &[LoggedRequest], what: impl Fn(&LoggedRequest) -> bool) -> Option<usize> {
    log.iter().position(what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_load_balancer_gets_the_finalizer_the_lowest_free_ip_its_entry_and_an_event()
-> Result<()> {
    let kube = Kube::start("new-lb").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    // Another tool holds the lowest address; the Service gets the next one.
    let taken = allocator_client(&allocator)?
        .allocate(AllocateRequest {
            owner: "other-tool".into(),
            ..Default::default()
        })
        .await?;
    assert_eq!(taken.address, "10.20.30.1");
    let syncer = kube.syncer(&allocator, &[])?;
    let created = kube.create(kube.lb("web")).await?;

    let ip = kube.wait_ip("web").await?;
    assert_eq!(ip, "10.20.30.2");
    let svc = kube.service("web").await?.context("web")?;
    assert!(has_finalizer(&svc), "{:?}", svc.metadata.finalizers);
    kube.wait_data(&mk_data(&[(&ip, kube.entry("web", None))]))
        .await?;
    let note = kube
        .wait_event("web", "Normal", "Allocated", &[&ip, "default"])
        .await?;
    println!("event: {note}");
    assert!(
        kube.events("web").await?.iter().any(|e| {
            e.reason.as_deref() == Some("Allocated")
                && e.reporting_component.as_deref() == Some("vipam-syncer")
        }),
        "the Event names its reporter"
    );

    // The allocator holds it for the Service, with its names and uid.
    let held = allocator_client(&allocator)?
        .get_owner(&owner(&kube.namespace, "web"))
        .await?
        .context("the Service's allocation")?;
    assert_eq!(held.address, ip);
    assert_eq!(held.labels.get("namespace"), Some(&kube.namespace));
    assert_eq!(held.labels.get("name").map(String::as_str), Some("web"));
    assert_eq!(held.labels.get("uid"), created.metadata.uid.as_ref());

    // The clean-up after the first full sync releases only the syncer's own
    // owners: the other tool keeps its address.
    wait_until(Duration::from_secs(10), "the first full sync", async || {
        Ok(syncer.log().contains("first full sync done").then_some(()))
    })
    .await?;
    let other = allocator_client(&allocator)?
        .get_owner("other-tool")
        .await?;
    assert_eq!(
        other.map(|a| a.address).as_deref(),
        Some("10.20.30.1"),
        "the syncer released another tool's address"
    );

    // The finalizer was in place before the address was published.
    if let Some(server) = kube.server_or_skip("request order", "needs the request log") {
        let log = server.requests();
        let path = format!("/api/v1/namespaces/{}/services/web", kube.namespace);
        let finalizer = position(&log, |r| {
            r.method == Method::PATCH && r.path_only() == path && r.status == 200
        });
        let status = position(&log, |r| {
            r.method == Method::PATCH
                && r.path_only() == format!("{path}/status")
                && r.status == 200
        });
        assert!(
            finalizer.is_some() && finalizer < status,
            "finalizer patch at {finalizer:?}, status patch at {status:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_new_services_gets_one_finalizer_write_and_one_status_write_each() -> Result<()>
{
    // The next reconcile of a Service must start from what the last one
    // wrote, not from a cached copy from before, or it writes it again.
    const N: usize = 150;
    let kube = Kube::start("burst").await?;
    let allocator = kube.allocator(&["default=10.21.0.0/24"])?;
    let syncer = kube.syncer(&allocator, &[])?;
    syncer.wait_ready().await?;
    if let Some(server) = kube.server() {
        server.take_requests();
    }
    let names: Vec<String> = (0..N).map(|i| format!("burst-{i:03}")).collect();
    for name in &names {
        kube.create(kube.lb(name)).await?;
    }
    wait_until(TIMEOUT, "every Service has an IP", async || {
        for name in &names {
            if kube.ip(name).await?.is_none() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;
    let mut expected = BTreeMap::new();
    for name in &names {
        let ip = kube.ip(name).await?.context("an IP")?;
        expected.insert(ip, kube.entry(name, None));
    }
    kube.wait_data(&expected).await?;
    let Some(server) = kube.server_or_skip("counting writes", "needs the request log") else {
        return Ok(());
    };
    let log = server.take_requests();
    let prefix = format!("/api/v1/namespaces/{}/services/", kube.namespace);
    let count = |status: bool| {
        log.iter()
            .filter(|r| {
                r.is_write()
                    && r.path_only().starts_with(&prefix)
                    && r.path_only().ends_with("/status") == status
            })
            .count()
    };
    assert_eq!(count(false), N, "finalizer writes");
    assert_eq!(count(true), N, "status writes");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forward_method_given_at_create_is_in_the_first_configmap_write() -> Result<()> {
    let kube = Kube::start("method-at-create").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let versions = kube.record_configmap();
    versions.wait_listed().await?;
    // One Service exists before the syncer starts, one is created while it runs.
    kube.create(kube.lb("early").annotation(FORWARD_METHOD, "dr"))
        .await?;
    // PROXY is written only when kube-keepalived-vip runs in proxy-protocol mode.
    let _syncer = kube.syncer(&allocator, &["--proxy-protocol-mode"])?;
    kube.wait_data(&mk_data(&[("10.20.30.1", kube.entry("early", Some("DR")))]))
        .await?;
    kube.create(kube.lb("late").annotation(FORWARD_METHOD, "Proxy"))
        .await?;
    kube.wait_data(&mk_data(&[
        ("10.20.30.1", kube.entry("early", Some("DR"))),
        ("10.20.30.2", kube.entry("late", Some("PROXY"))),
    ]))
    .await?;

    // Every version ever written: an entry never appeared without its method.
    // (The writer may create the ConfigMap empty before the first Service is
    // in; what matters is that no entry is ever written without its method.)
    let seen = versions.seen();
    let first = seen
        .iter()
        .find_map(|cm| cm.data.as_ref()?.get("10.20.30.1").cloned())
        .context("no ConfigMap version with early's entry recorded")?;
    assert_eq!(first, kube.entry("early", Some("DR")), "{seen:#?}");
    for cm in &seen {
        for value in cm.data.iter().flat_map(|d| d.values()) {
            assert!(
                [
                    kube.entry("early", Some("DR")),
                    kube.entry("late", Some("PROXY"))
                ]
                .contains(value),
                "a written entry {value:?} lacks its forward method; versions: {seen:#?}"
            );
        }
    }
    if let Some(server) = kube.server_or_skip("first write is a create", "needs the request log") {
        let writes: Vec<_> = server
            .requests()
            .into_iter()
            .filter(|r| r.is_write() && r.path_only().contains("/configmaps"))
            .collect();
        assert_eq!(
            writes.first().map(|r| (&r.method, r.status)),
            Some((&Method::POST, 201)),
            "{writes:#?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_method_change_updates_the_entry_and_keeps_the_ip() -> Result<()> {
    let kube = Kube::start("method-change").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let _syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("web").annotation(FORWARD_METHOD, "NAT"))
        .await?;
    let ip = kube.wait_ip("web").await?;
    kube.wait_data(&mk_data(&[(&ip, kube.entry("web", Some("NAT")))]))
        .await?;

    kube.patch(
        "web",
        json!({"metadata": {"annotations": {FORWARD_METHOD: "dr"}}}),
    )
    .await?;
    kube.wait_data(&mk_data(&[(&ip, kube.entry("web", Some("DR")))]))
        .await?;
    assert_eq!(kube.ip("web").await?.as_deref(), Some(ip.as_str()));

    // Without the annotation (and no default) the entry has no method.
    kube.patch(
        "web",
        json!({"metadata": {"annotations": {FORWARD_METHOD: null}}}),
    )
    .await?;
    kube.wait_data(&mk_data(&[(&ip, kube.entry("web", None))]))
        .await?;
    assert_eq!(kube.ip("web").await?.as_deref(), Some(ip.as_str()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_forward_method_warns_and_the_default_method_applies() -> Result<()> {
    let kube = Kube::start("method-default").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let _syncer = kube.syncer_with_env(
        &allocator,
        &[],
        &[("KEEPALIVED_DEFAULT_FORWARD_METHOD", "nat")],
    )?;
    kube.create(kube.lb("plain")).await?;
    kube.create(kube.lb("bad").annotation(FORWARD_METHOD, "tunnel"))
        .await?;
    kube.create(kube.lb("direct").annotation(FORWARD_METHOD, "DR"))
        .await?;
    let note = kube
        .wait_event("bad", "Warning", "InvalidAnnotation", &["tunnel", "NAT"])
        .await?;
    println!("event: {note}");
    let plain = kube.wait_ip("plain").await?;
    let bad = kube.wait_ip("bad").await?;
    let direct = kube.wait_ip("direct").await?;
    kube.wait_data(&mk_data(&[
        (&plain, kube.entry("plain", Some("NAT"))),
        (&bad, kube.entry("bad", Some("NAT"))),
        (&direct, kube.entry("direct", Some("DR"))),
    ]))
    .await?;
    for name in ["plain", "direct"] {
        let warnings: Vec<_> = kube
            .events(name)
            .await?
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .collect();
        assert!(warnings.is_empty(), "{name}: {warnings:#?}");
    }
    Ok(())
}

/// The number of Events of this reason about a Service.
async fn count_events(kube: &Kube, name: &str, reason: &str) -> Result<usize> {
    Ok(kube
        .events(name)
        .await?
        .iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_without_the_proxy_protocol_mode_warns_once_and_the_default_method_applies()
-> Result<()> {
    let kube = Kube::start("proxy-refused").await?;
    kube.create(kube.lb("proxied").annotation(FORWARD_METHOD, "PROXY"))
        .await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let _syncer = kube.syncer(&allocator, &["--default-forward-method", "nat"])?;
    let note = kube
        .wait_event(
            "proxied",
            "Warning",
            "InvalidAnnotation",
            &[
                FORWARD_METHOD,
                "\"PROXY\"",
                "proxy-protocol mode",
                "--proxy-protocol-mode",
                "VIPAM_PROXY_PROTOCOL_MODE",
                "NAT",
            ],
        )
        .await?;
    println!("event: {note}");
    let data = wait_entries(&kube, &[("proxied", "NAT")]).await?;
    quiet_period().await;
    assert_eq!(
        count_events(&kube, "proxied", "InvalidAnnotation").await?,
        1
    );
    assert_eq!(kube.data().await?, data, "PROXY is never written");
    Ok(())
}

/// Waits until each Service has an address and the ConfigMap holds exactly
/// their entries, each with its forward method; the data.
async fn wait_entries(kube: &Kube, services: &[(&str, &str)]) -> Result<BTreeMap<String, String>> {
    let mut data = BTreeMap::new();
    for (name, method) in services {
        data.insert(kube.wait_ip(name).await?, kube.entry(name, Some(method)));
    }
    kube.wait_data(&data).await?;
    Ok(data)
}

/// Runs `vipam-syncer --check` with only these environment variables (and
/// PATH); its exit code and stderr.
fn check_syncer(envs: &[(&str, &str)]) -> Result<(Option<i32>, String)> {
    let out = std::process::Command::new(vipam_e2e::binary("vipam-syncer")?)
        .arg("--check")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(envs.iter().copied())
        .output()
        .context("running vipam-syncer --check")?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn a_default_proxy_method_is_refused_at_start_unless_in_proxy_protocol_mode() -> Result<()> {
    let (code, stderr) = check_syncer(&[("KEEPALIVED_DEFAULT_FORWARD_METHOD", "proxy")])?;
    assert_eq!(code, Some(2), "{stderr}");
    for word in [
        "KEEPALIVED_DEFAULT_FORWARD_METHOD",
        "\"PROXY\"",
        "--proxy-protocol-mode",
        "VIPAM_PROXY_PROTOCOL_MODE",
    ] {
        assert!(stderr.contains(word), "{word:?} not in {stderr}");
    }
    let (code, stderr) = check_syncer(&[
        ("KEEPALIVED_DEFAULT_FORWARD_METHOD", "proxy"),
        ("VIPAM_PROXY_PROTOCOL_MODE", "true"),
    ])?;
    assert_eq!(code, Some(0), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dr_with_a_port_rewrite_warns_once_naming_the_ports_and_still_gets_its_address_and_entry()
-> Result<()> {
    let kube = Kube::start("dr-rewrite").await?;
    let ports = |target: i32| {
        json!({"spec": {"ports": [
            {"name": "http", "port": 80, "targetPort": target},
            {"name": "dns", "port": 53, "targetPort": 53},
        ]}})
    };
    for (name, method, target) in [
        ("rewritten", "DR", 8080),
        ("same", "DR", 80),
        ("nat", "NAT", 8080),
    ] {
        kube.create(kube.lb(name).annotation(FORWARD_METHOD, method))
            .await?;
        kube.patch(name, ports(target)).await?;
    }
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let _syncer = kube.syncer(&allocator, &[])?;
    let note = kube
        .wait_event(
            "rewritten",
            "Warning",
            "PortRewrite",
            &["port 80 (http) with targetPort 8080", "DR", "virtual port"],
        )
        .await?;
    println!("event: {note}");
    assert!(!note.contains("port 53"), "{note}");
    wait_entries(
        &kube,
        &[("rewritten", "DR"), ("same", "DR"), ("nat", "NAT")],
    )
    .await?;
    quiet_period().await;
    assert_eq!(count_events(&kube, "rewritten", "PortRewrite").await?, 1);
    for name in ["same", "nat"] {
        assert_eq!(count_events(&kube, name, "PortRewrite").await?, 0, "{name}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_gives_one_warning_with_the_allocators_reason_and_changes_nothing_else()
-> Result<()> {
    let kube = Kube::start("refused").await?;
    kube.create(kube.lb("plain")).await?;
    let allocator = kube.allocator(&[POOL_DEFAULT, "dmz=10.40.0.0/30"])?;
    let _syncer = kube.syncer(&allocator, &[])?;
    let plain = kube.wait_ip("plain").await?;
    let only_plain = mk_data(&[(&plain, kube.entry("plain", None))]);
    kube.wait_data(&only_plain).await?;
    let before = allocations(&allocator).await?;

    // INVALID_ARGUMENT, and FAILED_PRECONDITION twice: the network address
    // of the pool, and an address outside the pool named.
    let refused = [
        (
            "unspecified",
            kube.lb("unspecified").load_balancer_ip("0.0.0.0"),
            "0.0.0.0",
        ),
        (
            "network",
            kube.lb("network").annotation(ADDRESS, "10.20.30.0"),
            "10.20.30.0",
        ),
        (
            "elsewhere",
            kube.lb("elsewhere")
                .annotation(ADDRESS, "10.20.30.5")
                .annotation(POOL, "dmz"),
            "10.20.30.5",
        ),
    ];
    for (_, lb, _) in &refused {
        kube.create(lb.clone()).await?;
    }
    for (name, _, address) in &refused {
        let note = kube
            .wait_event(name, "Warning", "AllocationFailed", &[address])
            .await?;
        println!("{name}: {note}");
    }
    quiet_period().await;
    for (name, _, _) in &refused {
        assert_eq!(kube.ip(name).await?, None, "{name}");
        assert_eq!(
            count_events(&kube, name, "AllocationFailed").await?,
            1,
            "{name}"
        );
    }
    assert_eq!(kube.data().await?, only_plain);
    assert_eq!(kube.ip("plain").await?.as_deref(), Some(plain.as_str()));
    assert_eq!(allocations(&allocator).await?, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_move_keeps_the_address_held_before_and_hands_it_to_nobody_else() -> Result<()> {
    let kube = Kube::start("refused-move").await?;
    kube.create(kube.lb("mover").annotation(ADDRESS, "10.20.30.1"))
        .await?;
    kube.create(kube.lb("holder").annotation(ADDRESS, "10.20.30.2"))
        .await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let _syncer = kube.syncer(&allocator, &[])?;
    for (name, ip) in [("mover", "10.20.30.1"), ("holder", "10.20.30.2")] {
        assert_eq!(kube.wait_ip(name).await?, ip, "{name}");
    }
    // The move to an address another Service holds is refused.
    kube.patch(
        "mover",
        json!({"metadata": {"annotations": {ADDRESS: "10.20.30.2"}}}),
    )
    .await?;
    let holder = format!("{}/holder", kube.namespace);
    kube.wait_event(
        "mover",
        "Warning",
        "AllocationFailed",
        &["10.20.30.2", &holder],
    )
    .await?;
    // A new Service gets the lowest free address: not the one mover keeps.
    kube.create(kube.lb("fresh")).await?;
    assert_eq!(kube.wait_ip("fresh").await?, "10.20.30.3");
    quiet_period().await;
    let expected = [
        ("mover", "10.20.30.1"),
        ("holder", "10.20.30.2"),
        ("fresh", "10.20.30.3"),
    ];
    let held = allocations(&allocator).await?;
    for (name, ip) in expected {
        assert_eq!(kube.ip(name).await?.as_deref(), Some(ip), "{name}");
        assert_eq!(
            held.get(&owner(&kube.namespace, name)).map(String::as_str),
            Some(ip),
            "{name} in the allocator: {held:#?}"
        );
    }
    let entries: Vec<_> = expected
        .iter()
        .map(|(name, ip)| (*ip, kube.entry(name, None)))
        .collect();
    assert_eq!(kube.data().await?, mk_data(&entries));
    assert_eq!(count_events(&kube, "mover", "AllocationFailed").await?, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_addresses_inside_and_outside_the_pool_are_honoured() -> Result<()> {
    let kube = Kube::start("requested").await?;
    let allocator = kube.allocator_with(
        &[POOL_DEFAULT],
        &["--allow-outside-pools", "192.168.0.0/16"],
    )?;
    let _syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("inside").annotation(ADDRESS, "10.20.30.5"))
        .await?;
    kube.create(kube.lb("outside").load_balancer_ip("192.168.77.7"))
        .await?;
    kube.create(kube.lb("plain")).await?;
    assert_eq!(kube.wait_ip("inside").await?, "10.20.30.5");
    assert_eq!(kube.wait_ip("outside").await?, "192.168.77.7");
    assert_eq!(kube.wait_ip("plain").await?, "10.20.30.1");
    kube.wait_data(&mk_data(&[
        ("10.20.30.1", kube.entry("plain", None)),
        ("10.20.30.5", kube.entry("inside", None)),
        ("192.168.77.7", kube.entry("outside", None)),
    ]))
    .await?;
    let outside = allocator_client(&allocator)?
        .get_owner(&owner(&kube.namespace, "outside"))
        .await?
        .context("allocation of outside")?;
    assert_eq!(outside.pool, "", "recorded outside every pool");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_held_by_another_service_gives_a_warning_naming_the_holder_and_no_status()
-> Result<()> {
    let kube = Kube::start("held").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let _syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("first").annotation(ADDRESS, "10.20.30.5"))
        .await?;
    assert_eq!(kube.wait_ip("first").await?, "10.20.30.5");
    kube.create(kube.lb("second").load_balancer_ip("10.20.30.5"))
        .await?;
    let holder = format!("{}/first", kube.namespace);
    let note = kube
        .wait_event(
            "second",
            "Warning",
            "AllocationFailed",
            &["10.20.30.5", &holder],
        )
        .await?;
    println!("event: {note}");
    quiet_period().await;
    assert_eq!(kube.ip("second").await?, None);
    assert_eq!(kube.ip("first").await?.as_deref(), Some("10.20.30.5"));
    assert_eq!(
        kube.data().await?,
        mk_data(&[("10.20.30.5", kube.entry("first", None))])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_annotation_selects_a_pool_and_an_unknown_pool_is_reported() -> Result<()> {
    let kube = Kube::start("pools").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT, "dmz=10.40.0.0/30"])?;
    let _syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("web").annotation(POOL, "dmz")).await?;
    kube.create(kube.lb("plain")).await?;
    kube.create(kube.lb("lost").annotation(POOL, "nowhere"))
        .await?;
    assert_eq!(kube.wait_ip("web").await?, "10.40.0.1");
    assert_eq!(kube.wait_ip("plain").await?, "10.20.30.1");
    kube.wait_event("lost", "Warning", "AllocationFailed", &["nowhere"])
        .await?;
    kube.wait_data(&mk_data(&[
        ("10.20.30.1", kube.entry("plain", None)),
        ("10.40.0.1", kube.entry("web", None)),
    ]))
    .await?;
    assert_eq!(kube.ip("lost").await?, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_gives_an_event_naming_it_and_a_release_gives_the_waiting_service_an_ip()
-> Result<()> {
    let kube = Kube::start("full-pool").await?;
    // dmz has two usable addresses, 10.40.0.1 and 10.40.0.2.
    let allocator = kube.allocator(&[POOL_DEFAULT, "dmz=10.40.0.0/30"])?;
    // A long resync, so that only the release can wake the waiting Service in
    // time (the retry after an exhausted pool is 30 s away).
    let _syncer = kube.syncer(&allocator, &["--resync", "10m"])?;
    kube.create(kube.lb("a").annotation(POOL, "dmz")).await?;
    assert_eq!(kube.wait_ip("a").await?, "10.40.0.1");
    kube.create(kube.lb("b").annotation(POOL, "dmz")).await?;
    assert_eq!(kube.wait_ip("b").await?, "10.40.0.2");
    kube.create(kube.lb("c").annotation(POOL, "dmz")).await?;
    let note = kube
        .wait_event("c", "Warning", "AllocationFailed", &["dmz"])
        .await?;
    println!("event: {note}");
    assert_eq!(kube.ip("c").await?, None);

    kube.delete("a").await?;
    let started = tokio::time::Instant::now();
    let ip = wait_until(
        std::time::Duration::from_secs(10),
        "c gets the released address",
        async || kube.ip("c").await,
    )
    .await?;
    println!("c got {ip} {:?} after the delete", started.elapsed());
    assert_eq!(ip, "10.40.0.1");
    kube.wait_data(&mk_data(&[
        ("10.40.0.1", kube.entry("c", None)),
        ("10.40.0.2", kube.entry("b", None)),
    ]))
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_asking_for_a_pool_of_another_namespace_gets_no_address_status_or_entry()
-> Result<()> {
    let kube = Kube::start("pool-owners").await?;
    // The pool team-a admits only the Services of the namespace team-a; this
    // test's Services live in another namespace.
    let allocator = kube.allocator_with(
        &[POOL_DEFAULT, "team-a=10.40.0.0/30"],
        &["--pool-owners", "team-a=service:team-a/"],
    )?;
    let _syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("foreign").annotation(POOL, "team-a"))
        .await?;
    kube.create(kube.lb("plain")).await?;
    let note = kube
        .wait_event("foreign", "Warning", "AllocationFailed", &["team-a"])
        .await?;
    assert!(note.starts_with("not permitted: "), "{note}");
    assert_eq!(kube.wait_ip("plain").await?, "10.20.30.1");
    kube.wait_data(&mk_data(&[("10.20.30.1", kube.entry("plain", None))]))
        .await?;
    assert_eq!(kube.ip("foreign").await?, None);
    assert_eq!(
        allocator_client(&allocator)?
            .get_owner(&owner(&kube.namespace, "foreign"))
            .await?,
        None
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_service_releases_its_ip_removes_its_entry_then_its_finalizer() -> Result<()> {
    let kube = Kube::start("delete").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let _syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("web")).await?;
    let ip = kube.wait_ip("web").await?;
    kube.create(kube.lb("other")).await?;
    let other = kube.wait_ip("other").await?;
    kube.wait_data(&mk_data(&[
        (&ip, kube.entry("web", None)),
        (&other, kube.entry("other", None)),
    ]))
    .await?;
    if let Some(server) = kube.server() {
        server.clear_requests();
    }

    kube.delete("web").await?;
    kube.wait_gone("web").await?;
    let held = allocations(&allocator).await?;
    assert!(
        !held.contains_key(&owner(&kube.namespace, "web")) && !held.values().any(|a| *a == ip),
        "{held:?}"
    );
    assert_eq!(
        kube.data().await?,
        mk_data(&[(&other, kube.entry("other", None))])
    );
    kube.wait_event("web", "Normal", "Released", &[&ip]).await?;

    if let Some(server) = kube.server_or_skip("write order", "needs the request log") {
        let log = server.requests();
        let cm = position(&log, |r| {
            r.method == Method::PUT && r.path_only().ends_with(CONFIG_MAP) && r.status == 200
        });
        let finalizer = position(&log, |r| {
            r.method == Method::PATCH
                && r.path_only() == format!("/api/v1/namespaces/{}/services/web", kube.namespace)
                && r.status == 200
        });
        assert!(
            cm.is_some() && cm < finalizer,
            "ConfigMap write at {cm:?}, finalizer removal at {finalizer:?}: {log:#?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_type_away_from_load_balancer_releases_and_clears_the_status() -> Result<()> {
    let kube = Kube::start("type-change").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let _syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("web")).await?;
    let ip = kube.wait_ip("web").await?;
    kube.wait_data(&mk_data(&[(&ip, kube.entry("web", None))]))
        .await?;
    if let Some(server) = kube.server() {
        server.clear_requests();
    }

    kube.patch("web", json!({"spec": {"type": "ClusterIP"}}))
        .await?;
    wait_until(
        TIMEOUT,
        "web has neither the finalizer nor an ingress IP",
        async || {
            let svc = kube.service("web").await?.context("web is gone")?;
            Ok((!has_finalizer(&svc) && status_ip(&svc).is_none()).then_some(()))
        },
    )
    .await?;
    assert!(allocations(&allocator).await?.is_empty());
    assert_eq!(kube.data().await?, BTreeMap::new());

    if let Some(server) = kube.server_or_skip("write order", "needs the request log") {
        let log = server.requests();
        let path = format!("/api/v1/namespaces/{}/services/web", kube.namespace);
        let cm = position(&log, |r| {
            r.method == Method::PUT && r.path_only().ends_with(CONFIG_MAP) && r.status == 200
        });
        let status = position(&log, |r| {
            r.method == Method::PATCH
                && r.path_only() == format!("{path}/status")
                && r.status == 200
        });
        let finalizer = position(&log, |r| {
            r.method == Method::PATCH && r.path_only() == path && r.status == 200
                // the test's own type change is a merge patch
                && r.content_type.as_deref() == Some("application/json-patch+json")
        });
        assert!(
            cm.is_some() && cm < status && status < finalizer,
            "ConfigMap write at {cm:?}, status cleared at {status:?}, finalizer removed at {finalizer:?}: {log:#?}"
        );
    }
    Ok(())
}

/// Creates a Service as another load-balancer implementation would have
/// handled it: with the same standard finalizer and an ingress IP.
async fn mk_foreign(kube: &Kube, lb: Lb, name: &str, ip: &str) -> Result<()> {
    kube.create(lb.finalizer(FINALIZER)).await?;
    kube.set_status_ip(name, ip).await
}

/// Asserts that a Service still has the finalizer and IP another
/// implementation gave it, and that the syncer holds nothing for it.
async fn assert_untouched(kube: &Kube, allocator: &Allocator, name: &str, ip: &str) -> Result<()> {
    let svc = kube.service(name).await?.context("service")?;
    assert!(has_finalizer(&svc), "{name}: {svc:?}");
    assert_eq!(status_ip(&svc).as_deref(), Some(ip), "{name}");
    assert!(
        !allocations(allocator)
            .await?
            .contains_key(&owner(&kube.namespace, name)),
        "{name}"
    );
    let ours: Vec<_> = kube
        .events(name)
        .await?
        .into_iter()
        .filter(|e| e.reporting_component.as_deref() == Some("vipam-syncer"))
        .collect();
    assert!(ours.is_empty(), "{name}: {ours:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_class_flag_only_services_without_a_class_are_handled() -> Result<()> {
    let kube = Kube::start("no-class").await?;
    if kube.class.is_some() {
        println!(
            "SKIPPED against a real cluster: a syncer without --load-balancer-class would \
             handle every class-less LoadBalancer Service of the cluster"
        );
        return Ok(());
    }
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    kube.create(kube.lb("plain")).await?;
    kube.create(kube.lb("classed").class(Some("example.com/other")))
        .await?;
    // What other implementations handle, with the same finalizer: a
    // LoadBalancer of another class, and a former LoadBalancer.
    mk_foreign(
        &kube,
        kube.lb("other").class(Some("example.com/other")),
        "other",
        "192.0.2.10",
    )
    .await?;
    mk_foreign(
        &kube,
        kube.lb("former").type_("ClusterIP"),
        "former",
        "192.0.2.11",
    )
    .await?;
    let _syncer = kube.syncer(&allocator, &[])?;
    let ip = kube.wait_ip("plain").await?;
    kube.wait_data(&mk_data(&[(&ip, kube.entry("plain", None))]))
        .await?;
    quiet_period().await;
    let classed = kube.service("classed").await?.context("classed")?;
    assert!(!has_finalizer(&classed), "{classed:?}");
    assert_eq!(status_ip(&classed), None);
    assert!(kube.events("classed").await?.is_empty());
    assert_untouched(&kube, &allocator, "other", "192.0.2.10").await?;
    assert_untouched(&kube, &allocator, "former", "192.0.2.11").await?;
    assert_eq!(
        allocations(&allocator)
            .await?
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        vec![owner(&kube.namespace, "plain")]
    );
    assert_eq!(
        kube.data().await?,
        mk_data(&[(&ip, kube.entry("plain", None))])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_class_flag_only_services_of_that_class_are_handled() -> Result<()> {
    let kube = Kube::start("class").await?;
    let class = kube
        .class
        .clone()
        .unwrap_or_else(|| "vipam.io/keepalived".to_string());
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    kube.create(kube.lb("mine").class(Some(&class))).await?;
    kube.create(kube.lb("classed").class(Some("example.com/other")))
        .await?;
    // Handled by other implementations, with the same finalizer.
    mk_foreign(&kube, kube.lb("plain").class(None), "plain", "192.0.2.10").await?;
    mk_foreign(
        &kube,
        kube.lb("other").class(Some("example.com/other")),
        "other",
        "192.0.2.11",
    )
    .await?;
    let _syncer = kube.syncer(&allocator, &["--load-balancer-class", &class])?;
    let ip = kube.wait_ip("mine").await?;
    kube.wait_data(&mk_data(&[(&ip, kube.entry("mine", None))]))
        .await?;
    quiet_period().await;
    assert_eq!(
        allocations(&allocator)
            .await?
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        vec![owner(&kube.namespace, "mine")]
    );
    assert_eq!(
        kube.data().await?,
        mk_data(&[(&ip, kube.entry("mine", None))])
    );
    let classed = kube.service("classed").await?.context("classed")?;
    assert!(!has_finalizer(&classed), "{classed:?}");
    assert_eq!(status_ip(&classed), None);
    assert_untouched(&kube, &allocator, "other", "192.0.2.11").await?;
    // On a real cluster, a cloud controller may handle the class-less one.
    if kube.server().is_some() {
        assert_untouched(&kube, &allocator, "plain", "192.0.2.10").await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_syncer_changes_no_ip_and_a_steady_state_makes_no_writes() -> Result<()> {
    let kube = Kube::start("steady").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT, "dmz=10.40.0.0/31"])?;
    let syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("a")).await?;
    kube.create(kube.lb("b").annotation(FORWARD_METHOD, "DR"))
        .await?;
    kube.create(kube.lb("c").annotation(ADDRESS, "10.20.30.5"))
        .await?;
    // Services with warnings and failures are part of the steady state too:
    // an invalid forward method (with an invalid pool name), and a Service
    // waiting for a full pool.
    kube.create(
        kube.lb("bad")
            .annotation(FORWARD_METHOD, "tunnel")
            .annotation(POOL, "Not_A_Pool"),
    )
    .await?;
    let mut ips = BTreeMap::new();
    for name in ["dmz1", "dmz2"] {
        kube.create(kube.lb(name).annotation(POOL, "dmz")).await?;
        ips.insert(name, kube.wait_ip(name).await?);
    }
    kube.create(kube.lb("dmz3").annotation(POOL, "dmz")).await?;
    for name in ["a", "b", "c"] {
        ips.insert(name, kube.wait_ip(name).await?);
    }
    kube.wait_event("bad", "Warning", "InvalidAnnotation", &["Not_A_Pool"])
        .await?;
    kube.wait_event("dmz3", "Warning", "AllocationFailed", &["dmz"])
        .await?;
    let data: BTreeMap<String, String> = ips
        .iter()
        .map(|(name, ip)| {
            let method = (*name == "b").then_some("DR");
            (ip.clone(), kube.entry(name, method))
        })
        .collect();
    kube.wait_data(&data).await?;

    let check_no_writes = async |when: &str| -> Result<()> {
        let Some(server) = kube.server_or_skip(when, "needs the request log") else {
            return Ok(());
        };
        server.clear_requests();
        quiet_period().await;
        // Lease renewals are writes to coordination.k8s.io leases, made on
        // purpose every few seconds; every other write counts.
        let writes: Vec<_> = server
            .requests()
            .into_iter()
            .filter(is_non_lease_write)
            .collect();
        assert!(writes.is_empty(), "{when}: {writes:#?}");
        Ok(())
    };
    check_no_writes("steady state").await?;

    let mut syncer = syncer;
    syncer.terminate(std::time::Duration::from_secs(10))?;
    let syncer = syncer.restart()?;
    syncer.wait_ready().await?;
    // The new process publishes the warnings once; let it settle.
    quiet_period().await;
    for (name, ip) in &ips {
        assert_eq!(kube.ip(name).await?.as_ref(), Some(ip), "{name}");
    }
    assert_eq!(kube.ip("dmz3").await?, None);
    assert_eq!(kube.data().await?, data);
    check_no_writes("steady state after a restart").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edit_of_the_configmap_is_reverted_and_a_deleted_one_is_recreated() -> Result<()> {
    let kube = Kube::start("hand-edit").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    // The method PROXY below is written only in proxy-protocol mode.
    let _syncer = kube.syncer(&allocator, &["--proxy-protocol-mode"])?;
    kube.create(kube.lb("a")).await?;
    kube.create(kube.lb("b").annotation(FORWARD_METHOD, "proxy"))
        .await?;
    let a = kube.wait_ip("a").await?;
    let b = kube.wait_ip("b").await?;
    let expected = mk_data(&[
        (&a, kube.entry("a", None)),
        (&b, kube.entry("b", Some("PROXY"))),
    ]);
    kube.wait_data(&expected).await?;

    let mut cm = kube
        .configmaps()
        .get(CONFIG_MAP)
        .await
        .context("get ConfigMap")?;
    cm.data = Some(mk_data(&[
        (&a, kube.entry("a", Some("DR"))),
        ("10.99.0.1", format!("{}/ghost", kube.namespace)),
    ]));
    kube.configmaps()
        .replace(CONFIG_MAP, &PostParams::default(), &cm)
        .await
        .context("hand edit")?;
    kube.wait_data(&expected).await?;

    kube.configmaps()
        .delete(CONFIG_MAP, &Default::default())
        .await
        .context("delete ConfigMap")?;
    kube.wait_data(&expected).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_service_gets_a_warning_and_no_broken_write() -> Result<()> {
    let kube = Kube::start("ipv6").await?;
    let allocator = kube.allocator(&[POOL_DEFAULT, "v6=fd00:20::/120"])?;
    let _syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("v4")).await?;
    kube.create(kube.lb("v6").annotation(POOL, "v6")).await?;
    kube.create(kube.lb("asked").annotation(ADDRESS, "fd00:20::10"))
        .await?;
    let v4 = kube.wait_ip("v4").await?;
    let note = kube
        .wait_event("v6", "Warning", "IPv6NotSupported", &["v6"])
        .await?;
    println!("event: {note}");
    kube.wait_event("asked", "Warning", "IPv6NotSupported", &["fd00:20::10"])
        .await?;
    quiet_period().await;
    assert_eq!(kube.ip("v6").await?, None);
    assert_eq!(kube.ip("asked").await?, None);
    assert_eq!(
        kube.data().await?,
        mk_data(&[(&v4, kube.entry("v4", None))])
    );
    // Nothing is held for an address that cannot be announced.
    assert_eq!(
        allocations(&allocator)
            .await?
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([owner(&kube.namespace, "v4")])
    );

    // Moved to an IPv4 pool, it gets an address.
    kube.patch(
        "v6",
        json!({"metadata": {"annotations": {POOL: "default"}}}),
    )
    .await?;
    let moved = kube.wait_ip("v6").await?;
    assert!(moved.starts_with("10.20.30."), "{moved}");
    kube.wait_data(&mk_data(&[
        (&v4, kube.entry("v4", None)),
        (&moved, kube.entry("v6", None)),
    ]))
    .await?;

    if let Some(server) = kube.server_or_skip("no rejected write", "needs the request log") {
        let rejected: Vec<_> = server
            .requests()
            .into_iter()
            .filter(|r| r.is_write() && r.status == 422)
            .collect();
        assert!(rejected.is_empty(), "{rejected:#?}");
    }
    Ok(())
}

/// A ConfigMap in the keepalived ConfigMap's place holding `blob` bytes of
/// binaryData, which count against the 1 MiB limit like its data.
fn mk_configmap_with_blob(kube: &Kube, blob: usize) -> Result<ConfigMap> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": CONFIG_MAP, "namespace": kube.system_namespace},
        "binaryData": {"blob": base64_zeros(blob)},
    }))?)
}

/// The base64 text of `n` zero bytes.
fn base64_zeros(n: usize) -> String {
    let mut s = "AAAA".repeat(n / 3);
    match n % 3 {
        1 => s.push_str("AA=="),
        2 => s.push_str("AAA="),
        _ => {}
    }
    s
}

/// The size of the ConfigMap as JSON, without its managedFields (which the
/// API server maintains and which do not count against the limit).
fn json_bytes(cm: &ConfigMap) -> Result<usize> {
    let mut cm = cm.clone();
    cm.metadata.managed_fields = None;
    Ok(serde_json::to_vec(&cm)?.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_over_the_size_limit_gives_an_event_and_no_rejected_write() -> Result<()> {
    const LIMIT: usize = 1_048_576;
    let kube = Kube::start("too-large").await?;
    // Addresses of one length, so that every entry takes the same room.
    let allocator = kube.allocator(&["default=10.20.30.100-10.20.30.199"])?;
    // The ConfigMap already holds nearly 1 MiB (binaryData counts against the
    // limit like data), so that the entries of a few Services would take it
    // over: the API server would refuse that write.
    kube.configmaps()
        .create(
            &PostParams::default(),
            &mk_configmap_with_blob(&kube, LIMIT - 200)?,
        )
        .await
        .context("create the ConfigMap")?;
    let _syncer = kube.syncer(&allocator, &[])?;
    let names: Vec<String> = (0..12).map(|i| format!("service-number-{i:02}")).collect();
    for name in &names {
        kube.create(kube.lb(name)).await?;
    }
    for name in &names {
        kube.wait_ip(name).await?;
    }
    let system = kube.system_namespace.clone();
    let note = kube
        .wait_event_in(
            &system,
            CONFIG_MAP,
            "Warning",
            "ConfigMapTooLarge",
            &["1048576"],
        )
        .await?;
    println!("event: {note}");
    let cm = kube.configmap().await?.context("ConfigMap")?;
    assert!(
        cm.data.as_ref().is_none_or(|d| d.len() < names.len()),
        "{:?}",
        cm.data
    );

    // Room for about four entries: those are written, the rest reported.
    let entry = "10.20.30.100".len() + kube.entry("service-number-00", None).len() + 6;
    let mut cm = cm;
    cm.binary_data = mk_configmap_with_blob(&kube, 3)?.binary_data;
    // As the syncer counts it: with its data (empty so far).
    let base = json_bytes(&ConfigMap {
        data: Some(BTreeMap::new()),
        ..cm.clone()
    })?;
    cm.binary_data =
        mk_configmap_with_blob(&kube, 3 + (LIMIT - base - entry * 9 / 2) / 4 * 3)?.binary_data;
    println!("ConfigMap of {} bytes", json_bytes(&cm)?);
    kube.configmaps()
        .replace(CONFIG_MAP, &PostParams::default(), &cm)
        .await
        .context("shrink the blob")?;
    let written = wait_until(TIMEOUT, "some entries are written", async || {
        let data = kube.data().await?;
        Ok((!data.is_empty()).then_some(data))
    })
    .await?;
    println!("{} of {} entries fit", written.len(), names.len());
    assert!(written.len() < names.len(), "{written:?}");
    let cm = kube.configmap().await?.context("ConfigMap")?;
    assert!(json_bytes(&cm)? <= LIMIT);

    // Deleting a Service whose entry is written removes the entry (so the
    // Service can go), and one that was left out takes its room.
    let gone = written
        .values()
        .next()
        .and_then(|v| v.rsplit('/').next())
        .context("an entry")?
        .to_string();
    kube.delete(&gone).await?;
    kube.wait_gone(&gone).await?;
    wait_until(
        TIMEOUT,
        "the deleted Service's entry is gone and another one is in",
        async || {
            let data = kube.data().await?;
            let suffix = format!("/{gone}");
            Ok(
                (!data.values().any(|v| v.ends_with(&suffix)) && data.len() == written.len())
                    .then_some(()),
            )
        },
    )
    .await?;

    // Without the blob every entry fits.
    let mut cm = kube.configmap().await?.context("ConfigMap")?;
    cm.binary_data = None;
    kube.configmaps()
        .replace(CONFIG_MAP, &PostParams::default(), &cm)
        .await
        .context("drop the blob")?;
    let mut expected = BTreeMap::new();
    for name in names.iter().filter(|n| **n != gone) {
        expected.insert(kube.ip(name).await?.context("ip")?, kube.entry(name, None));
    }
    kube.wait_data(&expected).await?;

    if let Some(server) = kube.server_or_skip("no rejected write", "needs the request log") {
        let rejected: Vec<_> = server
            .requests()
            .into_iter()
            .filter(|r| r.is_write() && r.status == 422)
            .collect();
        assert!(rejected.is_empty(), "{rejected:#?}");
    }
    Ok(())
}
