//! Two Kubernetes clusters sharing one pool: two allocator replicas on one
//! etcd (`--store etcd`, the same prefix and `--pool`) and, for each
//! cluster, its own API and a syncer with its own `--cluster-name` pointed
//! at its own replica. Each cluster's API is a Kubernetes API test server
//! (both have a namespace `e2e`, so the two clusters hold Services of the
//! same namespace and name), or, when `VIPAM_E2E_KUBECONFIG` names a real
//! cluster, a namespace and load-balancer class of its own there. Those
//! Services get different owners and different addresses even when all of
//! them arrive at once and the replicas race for free addresses;
//! deleting Services in one cluster releases their addresses and leaves the
//! other cluster alone.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use futures::future::try_join_all;
use kube::api::ListParams;
use vipam::v1::Allocation;
use vipam_e2e::{
    Allocator, allocator_metric,
    syncer::{Kube, Syncer, TIMEOUT, allocator_client, quiet_period, status_ip, wait_until},
};
use vipam_test_etcd::{Cluster, require};

/// The pool both replicas define: a /24 has 254 addresses, room for the 200
/// Services and spare.
const POOL: &str = "default=10.77.0.0/24";
/// The installation prefix both replicas share in etcd.
const PREFIX: &str = "/vipam-clusters/";
/// Services created in each cluster, with the same names in both.
const PER_CLUSTER: usize = 100;
/// Services deleted in the first cluster afterwards.
const DELETED: usize = 10;
/// How long the 200 Services may take to get their addresses.
const ALL_ADDRESSED: Duration = Duration::from_secs(60);

/// One cluster: its API, its allocator replica and its named syncer.
struct Side {
    // Dropped in this order: the syncer before the allocator and the API
    // it talks to.
    syncer: Syncer,
    allocator: Allocator,
    kube: Kube,
    name: &'static str,
}

impl Side {
    async fn start(name: &'static str, etcd: &str) -> Result<Side> {
        let kube = Kube::start(&format!("etcd-clusters-{name}")).await?;
        let allocator = kube.allocator_with(
            &[POOL],
            &[
                "--store",
                "etcd",
                "--etcd-endpoints",
                etcd,
                "--etcd-prefix",
                PREFIX,
            ],
        )?;
        let syncer = kube.syncer(&allocator, &["--cluster-name", name])?;
        Ok(Side {
            name,
            kube,
            allocator,
            syncer,
        })
    }

    /// The owner of this cluster's Service `service`.
    fn owner(&self, service: &str) -> String {
        format!("service:{}/{}/{service}", self.name, self.kube.namespace)
    }

    /// Deletes every Service of `names` at once.
    async fn delete_all(&self, names: &[String]) -> Result<()> {
        try_join_all(names.iter().map(|n| self.kube.delete(n))).await?;
        Ok(())
    }

    /// The status address of every Service of the test namespace that has
    /// one, by name.
    async fn addresses(&self) -> Result<BTreeMap<String, String>> {
        let list = self.kube.services().list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .filter_map(|s| Some((s.metadata.name.clone()?, status_ip(s)?)))
            .collect())
    }

    /// Waits until the Services of `names` all have a status address;
    /// returns them by name.
    async fn wait_addressed(
        &self,
        names: &[String],
        timeout: Duration,
    ) -> Result<BTreeMap<String, String>> {
        let mut seen = 0;
        wait_until(
            timeout,
            &format!("every Service of {} has an address", self.name),
            async || {
                let addresses = self.addresses().await?;
                seen = addresses.len();
                Ok(names
                    .iter()
                    .all(|n| addresses.contains_key(n))
                    .then_some(addresses))
            },
        )
        .await
        .with_context(|| format!("{}: {seen} of {} addressed", self.name, names.len()))
    }

    /// Prints how often its allocator's batches lost a race to the other
    /// replica, and how its Allocate calls were answered.
    async fn print_races(&self) -> Result<()> {
        let addr = self.allocator.addr;
        let allocate = async |code: &str| {
            let labels = ["method=\"Allocate\"", &format!("code=\"{code}\"")];
            allocator_metric(addr, "vipam_grpc_requests", &labels).await
        };
        println!(
            "{}: batches that lost a race {}, Allocate answered OK {}, UNAVAILABLE {}",
            self.name,
            allocator_metric(addr, "vipam_store_conflicts", &[]).await?,
            allocate("OK").await?,
            allocate("UNAVAILABLE").await?,
        );
        Ok(())
    }

    /// The ConfigMap data this cluster's Services with `addresses` render to.
    fn entries(&self, addresses: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        addresses
            .iter()
            .map(|(name, ip)| (ip.clone(), self.kube.entry(name, None)))
            .collect()
    }

    /// The allocations this cluster's Services with `addresses` hold, as
    /// owner → address.
    fn held(&self, addresses: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        addresses
            .iter()
            .map(|(name, ip)| (self.owner(name), ip.clone()))
            .collect()
    }
}

fn mk_names() -> Vec<String> {
    (0..PER_CLUSTER).map(|i| format!("web-{i}")).collect()
}

/// Every allocation of an allocator, as listed.
async fn list(allocator: &Allocator) -> Result<Vec<Allocation>> {
    Ok(allocator_client(allocator)?.list_all("", "").await?)
}

/// The listed allocations as owner → address; fails when an owner is listed
/// twice (it would hold two addresses).
fn by_owner(listed: &[Allocation]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in listed {
        if let Some(other) = out.insert(a.owner.clone(), a.address.clone()) {
            bail!("{} holds {other} and {}", a.owner, a.address);
        }
    }
    Ok(out)
}

/// Waits until `allocator` lists exactly `expected` (a replica's copy
/// follows etcd's watch, so it may lag a write made through the other).
async fn wait_listed(allocator: &Allocator, expected: &BTreeMap<String, String>) -> Result<()> {
    let mut last = BTreeMap::new();
    wait_until(
        TIMEOUT,
        "the allocator lists what is expected",
        async || {
            last = by_owner(&list(allocator).await?)?;
            Ok((&last == expected).then_some(()))
        },
    )
    .await
    .with_context(|| {
        let missing: Vec<_> = expected
            .iter()
            .filter(|e| !last.contains_key(e.0))
            .collect();
        let extra: Vec<_> = last
            .iter()
            .filter(|e| !expected.contains_key(e.0))
            .collect();
        format!("missing {missing:?}, unexpected {extra:?}")
    })
}

/// Whether `ip` is an address the pool hands out: in 10.77.0.0/24, neither
/// its network nor its broadcast address.
fn in_pool(ip: &str) -> bool {
    ip.parse::<Ipv4Addr>().is_ok_and(|ip| {
        let [a, b, c, d] = ip.octets();
        (a, b, c) == (10, 77, 0) && d != 0 && d != 255
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_sharing_a_pool_get_distinct_owners_and_addresses_and_release_only_their_own()
-> Result<()> {
    const TEST: &str =
        "two_clusters_sharing_a_pool_get_distinct_owners_and_addresses_and_release_only_their_own";
    if require(TEST).is_none() {
        return Ok(());
    }
    let etcd = Cluster::start(1);
    let endpoint = etcd.endpoint(0);
    let east = Side::start("east", &endpoint).await?;
    let west = Side::start("west", &endpoint).await?;
    east.syncer.wait_ready().await?;
    west.syncer.wait_ready().await?;
    let names = mk_names();

    let started = Instant::now();
    // Every Service at once, the two clusters' interleaved.
    try_join_all(
        names
            .iter()
            .flat_map(|n| [&east, &west].map(|side| side.kube.create(side.kube.lb(n)))),
    )
    .await?;
    let (east_ips, west_ips) = tokio::try_join!(
        east.wait_addressed(&names, ALL_ADDRESSED),
        west.wait_addressed(&names, ALL_ADDRESSED),
    )?;
    println!(
        "{} Services addressed in {:?}",
        2 * PER_CLUSTER,
        started.elapsed()
    );
    east.print_races().await?;
    west.print_races().await?;
    let all: Vec<&String> = east_ips.values().chain(west_ips.values()).collect();
    let distinct: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(distinct.len(), 2 * PER_CLUSTER, "one address per Service");
    let outside: Vec<_> = all.iter().filter(|ip| !in_pool(ip)).collect();
    assert!(outside.is_empty(), "outside the pool: {outside:?}");

    east.kube.wait_data(&east.entries(&east_ips)).await?;
    west.kube.wait_data(&west.entries(&west_ips)).await?;
    // Both replicas list every Service under its own cluster's owner: a
    // name of both clusters has two owners, each holding one address.
    let mut held = east.held(&east_ips);
    held.extend(west.held(&west_ips));
    for side in [&east, &west] {
        wait_listed(&side.allocator, &held).await?;
        for a in list(&side.allocator).await? {
            assert_eq!(a.pool, "default", "{a:?}");
            let cluster = a
                .owner
                .strip_prefix("service:")
                .and_then(|o| o.split('/').next());
            assert_eq!(
                a.labels.get("cluster").map(String::as_str),
                cluster,
                "{a:?}"
            );
        }
    }

    deleting_in_one_cluster_releases_its_addresses_only(&east, &west, &names, held).await
}

/// Deletes some of `east`'s Services: their addresses are released (no
/// replica lists them), `east`'s ConfigMap drops them, and nothing of
/// `west` changes.
async fn deleting_in_one_cluster_releases_its_addresses_only(
    east: &Side,
    west: &Side,
    names: &[String],
    mut held: BTreeMap<String, String>,
) -> Result<()> {
    let west_ips = west.addresses().await?;
    let west_data = west.kube.data().await?;
    // Spread over the names, so the released addresses are not one block.
    let gone: Vec<String> = names
        .iter()
        .step_by(PER_CLUSTER / DELETED)
        .cloned()
        .collect();
    ensure!(gone.len() == DELETED, "{gone:?}");
    let released: BTreeSet<String> = gone
        .iter()
        .filter_map(|n| held.remove(&east.owner(n)))
        .collect();
    ensure!(released.len() == DELETED, "{released:?}");

    east.delete_all(&gone).await?;
    for name in &gone {
        east.kube.wait_gone(name).await?;
    }
    for side in [east, west] {
        wait_listed(&side.allocator, &held).await?;
    }
    let east_ips = east.addresses().await?;
    assert_eq!(east_ips.len(), PER_CLUSTER - DELETED);
    east.kube.wait_data(&east.entries(&east_ips)).await?;
    let kept: BTreeSet<&String> = east_ips.values().collect();
    assert!(
        released.iter().all(|ip| !kept.contains(ip)),
        "a released address is still a Service's"
    );

    // The other cluster's syncer resyncs in the meantime and changes nothing.
    quiet_period().await;
    assert_eq!(west.addresses().await?, west_ips);
    assert_eq!(west.kube.data().await?, west_data);
    for side in [east, west] {
        assert_eq!(by_owner(&list(&side.allocator).await?)?, held);
    }
    Ok(())
}
