//! The syncer's cluster name (`--cluster-name`), with the real
//! `vipam-allocator` and `vipam-syncer` binaries against the Kubernetes API
//! test server, or a real cluster when `VIPAM_E2E_KUBECONFIG` names a
//! kubeconfig: owners and labels of a named cluster, the allocations of
//! other clusters and of the unnamed form left alone, and the move of every
//! address to its named owner when the name is turned on.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result};
use vipam::v1::AllocateRequest;
use vipam_e2e::{
    Allocator,
    syncer::{
        Kube, TIMEOUT, allocations, allocator_client, owner, quiet_period, status_ip, wait_until,
    },
};

const POOL_DEFAULT: &str = "default=10.20.30.0/29";

/// The owner of a Service of the cluster `cluster`.
fn named_owner(cluster: &str, namespace: &str, name: &str) -> String {
    format!("service:{cluster}/{namespace}/{name}")
}

/// Has `owner` hold `address`, as another syncer or an earlier one would.
async fn mk_held(allocator: &Allocator, owner: &str, address: &str) -> Result<()> {
    let held = allocator_client(allocator)?
        .allocate(AllocateRequest {
            owner: owner.into(),
            address: address.into(),
            ..Default::default()
        })
        .await?;
    assert_eq!(held.address, address, "{owner}");
    Ok(())
}

fn mk_expected(pairs: &[(String, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(owner, address)| (owner.clone(), address.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_syncer_allocates_under_its_cluster_and_releases_only_its_own_orphans() -> Result<()>
{
    let kube = Kube::start("cluster-name").await?;
    let ns = kube.namespace.clone();
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    // Another cluster's Service of the same name, an unnamed owner of the
    // same name, and Services gone from every form: only this cluster's
    // own orphan is released.
    let others = [
        (named_owner("c2", &ns, "web"), "10.20.30.1"),
        (owner(&ns, "web"), "10.20.30.2"),
        (named_owner("c2", &ns, "gone"), "10.20.30.4"),
        (owner(&ns, "gone"), "10.20.30.5"),
        // The unnamed form of a Service in a namespace named like the cluster.
        (owner("c1", "gone"), "10.20.30.6"),
    ];
    for (owner, address) in &others {
        mk_held(&allocator, owner, address).await?;
    }
    mk_held(&allocator, &named_owner("c1", &ns, "gone"), "10.20.30.3").await?;

    let syncer = kube.syncer(&allocator, &["--cluster-name", "c1"])?;
    assert!(
        syncer
            .log()
            .contains("owners=service:c1/<namespace>/<name>"),
        "the owners are logged at start:\n{}",
        syncer.log()
    );
    wait_until(Duration::from_secs(10), "the first full sync", async || {
        Ok(syncer.log().contains("first full sync done").then_some(()))
    })
    .await?;
    let mut expected = mk_expected(&others);
    assert_eq!(allocations(&allocator).await?, expected);

    // The pool was full but for that orphan.
    let created = kube.create(kube.lb("web")).await?;
    let ip = kube.wait_ip("web").await?;
    assert_eq!(ip, "10.20.30.3");

    let held = allocator_client(&allocator)?
        .get_owner(&named_owner("c1", &ns, "web"))
        .await?
        .context("the Service's allocation under its cluster's owner")?;
    assert_eq!(held.address, ip);
    assert_eq!(held.labels.get("cluster").map(String::as_str), Some("c1"));
    assert_eq!(held.labels.get("namespace"), Some(&ns));
    assert_eq!(held.labels.get("name").map(String::as_str), Some("web"));
    assert_eq!(held.labels.get("uid"), created.metadata.uid.as_ref());
    expected.insert(named_owner("c1", &ns, "web"), "10.20.30.3".into());
    assert_eq!(allocations(&allocator).await?, expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_syncer_never_releases_the_allocations_of_named_clusters() -> Result<()> {
    let kube = Kube::start("unnamed-cluster").await?;
    let ns = kube.namespace.clone();
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    // Before, "service:c1/<ns>/gone" read as the Service c1/"<ns>/gone",
    // which does not exist, and was released.
    let named = [
        (named_owner("c1", &ns, "gone"), "10.20.30.1"),
        (named_owner("c1", &ns, "web"), "10.20.30.2"),
    ];
    for (owner, address) in &named {
        mk_held(&allocator, owner, address).await?;
    }
    let syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("web")).await?;
    assert_eq!(kube.wait_ip("web").await?, "10.20.30.3");
    wait_until(Duration::from_secs(10), "the first full sync", async || {
        Ok(syncer.log().contains("first full sync done").then_some(()))
    })
    .await?;
    let mut expected = mk_expected(&named);
    expected.insert(owner(&ns, "web"), "10.20.30.3".into());
    assert_eq!(allocations(&allocator).await?, expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_the_cluster_name_on_moves_every_address_to_its_named_owner() -> Result<()> {
    let kube = Kube::start("cluster-name-on").await?;
    let ns = kube.namespace.clone();
    let allocator = kube.allocator(&[POOL_DEFAULT])?;
    let mut syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("a")).await?;
    kube.create(kube.lb("b")).await?;
    let a = kube.wait_ip("a").await?;
    let b = kube.wait_ip("b").await?;
    let data = BTreeMap::from([
        (a.clone(), kube.entry("a", None)),
        (b.clone(), kube.entry("b", None)),
    ]);
    kube.wait_data(&data).await?;
    syncer.terminate(Duration::from_secs(10))?;

    let versions = kube.record_configmap();
    versions.wait_listed().await?;
    let services = kube.record_services();
    services.wait_listed().await?;
    let syncer = kube.syncer(&allocator, &["--cluster-name", "c1"])?;
    let expected = mk_expected(&[
        (named_owner("c1", &ns, "a"), a.as_str()),
        (named_owner("c1", &ns, "b"), b.as_str()),
    ]);
    wait_until(
        TIMEOUT,
        "every address is held by its Service's named owner, and only by it",
        async || Ok((allocations(&allocator).await? == expected).then_some(())),
    )
    .await?;
    let held = allocator_client(&allocator)?
        .get_owner(&named_owner("c1", &ns, "a"))
        .await?
        .context("a's allocation")?;
    assert_eq!(held.labels.get("cluster").map(String::as_str), Some("c1"));
    assert!(
        syncer.log().contains("moved the address"),
        "{}",
        syncer.log()
    );

    // Nothing a Service had went away, at any moment.
    syncer.wait_ready().await?;
    quiet_period().await;
    assert_eq!(kube.data().await?, data);
    for cm in versions.seen() {
        assert_eq!(cm.data.unwrap_or_default(), data, "a ConfigMap version");
    }
    for svc in services.seen() {
        let name = svc.metadata.name.clone().unwrap_or_default();
        let want = if name == "a" { &a } else { &b };
        assert_eq!(status_ip(&svc).as_ref(), Some(want), "{name}");
    }
    for name in ["a", "b"] {
        let failed: Vec<_> = kube
            .events(name)
            .await?
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("AllocationFailed"))
            .filter_map(|e| e.message)
            .collect();
        assert!(failed.is_empty(), "{name}: {failed:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_owner_the_pool_does_not_admit_moves_nothing_and_the_name_can_be_turned_off()
-> Result<()> {
    let kube = Kube::start("cluster-name-refused").await?;
    let ns = kube.namespace.clone();
    // The pool admits the namespace's unnamed owners only: the operator
    // has not added service:c1/<ns>/ to --pool-owners.
    let pool_owners = format!("default=service:{ns}/");
    let allocator = kube.allocator_with(&[POOL_DEFAULT], &["--pool-owners", &pool_owners])?;
    let mut syncer = kube.syncer(&allocator, &[])?;
    kube.create(kube.lb("a")).await?;
    let a = kube.wait_ip("a").await?;
    let data = BTreeMap::from([(a.clone(), kube.entry("a", None))]);
    kube.wait_data(&data).await?;
    syncer.terminate(Duration::from_secs(10))?;

    let mut named = kube.syncer(&allocator, &["--cluster-name", "c1"])?;
    let note = kube
        .wait_event(
            "a",
            "Warning",
            "AllocationFailed",
            &["not permitted", "service:c1/"],
        )
        .await?;
    println!("event: {note}");
    // Refused before anything was released: the unnamed owner keeps the
    // address, the status stays.
    let unnamed_only = mk_expected(&[(owner(&ns, "a"), a.as_str())]);
    assert_eq!(allocations(&allocator).await?, unnamed_only);
    assert_eq!(kube.ip("a").await?.as_ref(), Some(&a));
    named.terminate(Duration::from_secs(10))?;

    // Without the name again, everything is as it was.
    let _unnamed = kube.syncer(&allocator, &[])?;
    kube.wait_data(&data).await?;
    assert_eq!(allocations(&allocator).await?, unnamed_only);
    Ok(())
}
