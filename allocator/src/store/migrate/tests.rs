use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use super::*;
use crate::{
    fixtures::{ip, mk_named_record, mk_pools, mk_sled},
    model::Change,
    store::{Engine, Observed, Scan, SledStore, Write},
};

/// The pools of these tests: both families in `a`.
const POOLS: [&str; 2] = ["a=10.1.0.0/24,fd00:a::/120", "b=10.2.0.0/24"];

fn ok(entries: &[(&str, Record)]) -> std::vec::IntoIter<Result<(IpAddr, Record), String>> {
    entries
        .iter()
        .map(|(a, r)| Ok((ip(a), r.clone())))
        .collect::<Vec<_>>()
        .into_iter()
}

fn mk_store() -> (tempfile::TempDir, Store) {
    let (dir, store) = mk_sled();
    (dir, store.into())
}

/// A source store holding `addresses`, the i-th for the owner `svc-i`.
fn mk_numbered_source(addresses: &[String]) -> (tempfile::TempDir, Store) {
    let owners: Vec<String> = (0..addresses.len()).map(|i| format!("svc-{i}")).collect();
    let entries: Vec<(&str, &str)> = addresses
        .iter()
        .zip(&owners)
        .map(|(a, o)| (a.as_str(), o.as_str()))
        .collect();
    mk_source(&entries)
}

/// A source holding `entries` (address, owner), written at revisions 1, 2, ...
fn mk_source(entries: &[(&str, &str)]) -> (tempfile::TempDir, Store) {
    let (dir, store) = mk_store();
    for (i, (address, owner)) in entries.iter().enumerate() {
        let record = Record {
            revision: i as u64 + 1,
            ..mk_named_record(
                owner,
                &format!("svc-{i}"),
                1_700_000_000_000_000_000 + i as u64,
            )
        };
        store
            .stage(Write::Allocate {
                address: ip(address),
                record,
            })
            .expect("put");
    }
    store.flush().expect("flush");
    (dir, store)
}

fn side<'a>(store: &'a Store, name: &'a str) -> Side<'a> {
    Side { store, name }
}

fn all(store: &Store) -> Vec<(IpAddr, Record)> {
    store.scan_after(None).map(|r| r.expect("entry")).collect()
}

#[test]
fn identical_scans_have_no_difference_whatever_their_revisions() {
    let a = [
        ("10.0.0.1", mk_named_record("o1", "x", 1)),
        ("fd00::1", mk_named_record("o2", "y", 2)),
    ];
    let mut b = a.clone();
    b[0].1.revision = 99;
    let (count, differences) = compare(ok(&a), ok(&b)).expect("compare");
    assert_eq!(count, 2);
    assert_eq!(differences, Differences::default());
}

#[test]
fn missing_extra_and_changed_allocations_are_each_named_in_address_order() {
    let source = [
        ("10.0.0.1", mk_named_record("o1", "x", 1)),
        ("10.0.0.2", mk_named_record("o2", "x", 2)),
        ("10.0.0.3", mk_named_record("o3", "x", 3)),
        ("10.0.0.4", mk_named_record("o4", "x", 4)),
        ("fd00::1", mk_named_record("o6", "x", 6)),
    ];
    let target = [
        ("10.0.0.1", mk_named_record("other", "x", 1)),
        ("10.0.0.3", mk_named_record("o3", "changed", 3)),
        ("10.0.0.4", mk_named_record("o4", "x", 40)),
        ("10.0.0.5", mk_named_record("o5", "x", 5)),
        ("fd00::1", mk_named_record("o6", "x", 6)),
    ];
    let (count, differences) = compare(ok(&source), ok(&target)).expect("compare");
    assert_eq!(count, 5);
    assert_eq!(
        differences.listed,
        vec![
            Difference::Changed {
                address: ip("10.0.0.1"),
                what: "owner"
            },
            Difference::Missing(ip("10.0.0.2")),
            Difference::Changed {
                address: ip("10.0.0.3"),
                what: "labels"
            },
            Difference::Changed {
                address: ip("10.0.0.4"),
                what: "creation time"
            },
            Difference::Extra(ip("10.0.0.5")),
        ]
    );
    assert_eq!(differences.count, 5);
}

#[test]
fn an_empty_target_misses_everything_and_an_empty_source_has_only_extras() {
    let some = [
        ("10.0.0.1", mk_named_record("o1", "x", 1)),
        ("fd00::1", mk_named_record("o2", "x", 2)),
    ];
    let (count, missing) = compare(ok(&some), ok(&[])).expect("compare");
    assert_eq!((count, missing.count), (2, 2));
    assert_eq!(missing.listed[1], Difference::Missing(ip("fd00::1")));
    let (count, extra) = compare(ok(&[]), ok(&some)).expect("compare");
    assert_eq!((count, extra.count), (0, 2));
    assert_eq!(extra.listed[0], Difference::Extra(ip("10.0.0.1")));
}

#[test]
fn a_failed_read_on_either_side_ends_the_comparison_with_its_error() {
    let good = [("10.0.0.1", mk_named_record("o1", "x", 1))];
    let failing = || {
        ok(&good).chain(std::iter::once(Err::<(IpAddr, Record), _>(
            "disk gone".to_string(),
        )))
    };
    assert_eq!(
        compare(failing(), ok(&good)).expect_err("source"),
        "disk gone"
    );
    assert_eq!(
        compare(ok(&good), failing()).expect_err("target"),
        "disk gone"
    );
}

#[test]
fn differences_list_the_first_ten_and_count_the_rest() {
    let mut differences = Differences::default();
    for i in 0..12u8 {
        differences.push(Difference::Missing(IpAddr::from([10, 0, 0, i])));
    }
    differences.push(Difference::OwnerIndex {
        owner: "o".into(),
        address: ip("10.0.0.1"),
        found: None,
    });
    let text = differences.to_string();
    assert!(
        text.starts_with("13 difference(s): 10.0.0.0 is missing; "),
        "{text}"
    );
    assert!(text.ends_with("10.0.0.9 is missing; and 3 more"), "{text}");
    assert_eq!(
        Difference::OwnerIndex {
            owner: "svc".into(),
            address: ip("10.0.0.1"),
            found: Some(ip("10.0.0.2")),
        }
        .to_string(),
        "owner svc holds 10.0.0.1 but its index names 10.0.0.2"
    );
}

#[test]
fn the_summary_counts_per_pool_and_family_and_outside_every_pool() {
    let pools = mk_pools(&POOLS);
    let mut summary = Summary::new(&pools);
    for a in [
        "10.1.0.1",
        "10.1.0.2",
        "fd00:a::1",
        "192.0.2.7",
        "2001:db8::1",
    ] {
        summary.add(&pools, ip(a));
    }
    assert_eq!(summary.total(), 5);
    assert_eq!(
        summary.lines(&pools),
        vec![
            "pool a: 3 (IPv4 2, IPv6 1)",
            "pool b: 0",
            "outside every pool: 2 (IPv4 1, IPv6 1)",
        ]
    );
}

#[test]
fn copy_keeps_every_allocation_with_owner_labels_and_creation_time() {
    let pools = mk_pools(&POOLS);
    let (_s, source) = mk_source(&[
        ("10.1.0.1", "svc-a"),
        ("10.2.0.9", "svc-b"),
        ("fd00:a::5", "svc-c"),
        ("192.0.2.7", "svc-outside"),
    ]);
    let (_t, target) = mk_store();
    let summary = copy(side(&source, "source"), side(&target, "target"), &pools).expect("copy");
    assert_eq!(summary.total(), 4);
    assert_eq!(
        summary.lines(&pools)[2],
        "outside every pool: 1 (IPv4 1)".to_string()
    );
    let copied = all(&target);
    let original = all(&source);
    assert_eq!(copied.len(), 4);
    for ((a, theirs), (b, ours)) in original.iter().zip(&copied) {
        assert_eq!(a, b);
        assert_eq!(
            (&theirs.owner, &theirs.labels, theirs.created_unix_nanos),
            (&ours.owner, &ours.labels, ours.created_unix_nanos)
        );
        assert_eq!(target.owner_address(&ours.owner).expect("owner"), Some(*b));
    }
    assert_eq!(
        verify(side(&source, "source"), side(&target, "target")).expect("verify"),
        4
    );
}

#[test]
fn copied_allocations_take_revisions_after_the_sources_last() {
    let (_s, source) = mk_source(&[("10.1.0.1", "svc-a"), ("10.1.0.2", "svc-b")]);
    // A release, so the source's revision is ahead of its allocations.
    let record = source.get(ip("10.1.0.2")).expect("get").expect("held");
    source
        .stage(Write::Release {
            address: ip("10.1.0.2"),
            record,
        })
        .expect("delete");
    source.flush().expect("flush");
    let (_t, target) = mk_store();
    copy(
        side(&source, "source"),
        side(&target, "target"),
        &mk_pools(&POOLS),
    )
    .expect("copy");
    assert_eq!(target.revision().expect("revision"), 4);
    let changes: Vec<Change> = target
        .changes(0, u64::MAX)
        .map(|c| c.expect("change"))
        .collect();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].revision, 4);
}

#[test]
fn a_target_that_holds_allocations_is_refused_with_their_number() {
    let (_s, source) = mk_source(&[("10.1.0.1", "svc-a")]);
    let (_t, target) = mk_source(&[("10.1.0.7", "svc-x"), ("10.1.0.8", "svc-y")]);
    let err = copy(
        side(&source, "source"),
        side(&target, "the sled store in /data"),
        &mk_pools(&POOLS),
    )
    .expect_err("refused");
    assert_eq!(
        err.to_string(),
        "the target, the sled store in /data, is not empty: it holds 2 allocation(s); migrate copies only into a store that holds none"
    );
    assert_eq!(all(&target).len(), 2, "nothing written");
}

#[test]
fn verify_names_what_the_target_lacks_or_holds_otherwise() {
    let (_s, source) = mk_source(&[("10.1.0.1", "svc-a"), ("10.1.0.2", "svc-b")]);
    let (_t, target) = mk_source(&[("10.1.0.1", "svc-a"), ("10.1.0.3", "svc-c")]);
    let err =
        verify(side(&source, "the source"), side(&target, "the target")).expect_err("differs");
    assert_eq!(
        err.to_string(),
        "the target does not hold exactly the allocations of the source: 2 difference(s): 10.1.0.2 is missing; 10.1.0.3 is there but not in the source"
    );
}

#[test]
fn copy_commits_at_most_max_batch_allocations_at_once() {
    let addresses: Vec<String> = (1..=7).map(|i| format!("10.1.0.{i}")).collect();
    let (_s, source) = mk_numbered_source(&addresses);
    let (_t, inner) = mk_sled();
    let counts = Arc::new(Counts::default());
    let target = Store::new(Batched {
        inner,
        max: 3,
        counts: counts.clone(),
    });
    let summary = copy(
        side(&source, "source"),
        side(&target, "target"),
        &mk_pools(&POOLS),
    )
    .expect("copy");
    assert_eq!(summary.total(), 7);
    assert_eq!(counts.largest.load(Ordering::Relaxed), 3);
    assert_eq!(counts.flushes.load(Ordering::Relaxed), 3, "3 + 3 + 1");
    assert_eq!(all(&target).len(), 7);
}

#[test]
fn a_copy_into_etcd_commits_in_transactions_etcd_accepts_and_reads_back() {
    use crate::store::{EtcdSettings, EtcdStore};
    if vipam_test_etcd::require(
        "a_copy_into_etcd_commits_in_transactions_etcd_accepts_and_reads_back",
    )
    .is_none()
    {
        return;
    }
    let cluster = vipam_test_etcd::Cluster::start(1);
    let pools = mk_pools(&POOLS);
    // More than one transaction's worth, in both families and both pools.
    let addresses: Vec<String> = (1..=150)
        .map(|i| format!("10.1.0.{i}"))
        .chain((1..=60).map(|i| format!("10.2.0.{i}")))
        .chain((1..=40).map(|i| format!("fd00:a::{i:x}")))
        .collect();
    let (_s, source) = mk_numbered_source(&addresses);
    let settings = EtcdSettings {
        history: 1,
        ..EtcdSettings::plain(cluster.endpoints(), "/vipam/")
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let open = || -> Store {
        rt.block_on(EtcdStore::open(&settings, pools.clone()))
            .expect("open etcd")
            .into()
    };
    let target = open();
    assert!(target.max_batch() < 250, "{}", target.max_batch());
    let summary = copy(side(&source, "sled"), side(&target, "etcd"), &pools).expect("copy");
    assert_eq!(
        summary.lines(&pools),
        vec![
            "pool a: 190 (IPv4 150, IPv6 40)",
            "pool b: 60 (IPv4 60)",
            "outside every pool: 0"
        ]
    );
    let reopened = open();
    assert_eq!(
        verify(side(&source, "sled"), side(&reopened, "etcd")).expect("verify"),
        250
    );
}

/// What [`Batched`] counts.
#[derive(Default)]
struct Counts {
    staged: AtomicUsize,
    largest: AtomicUsize,
    flushes: AtomicUsize,
}

/// A store that commits at most `max` writes per flush and counts them.
struct Batched {
    inner: SledStore,
    max: usize,
    counts: Arc<Counts>,
}

impl Engine for Batched {
    fn get(&self, ip: IpAddr) -> crate::store::Result<Option<Record>> {
        self.inner.get(ip)
    }
    fn owner_address(&self, owner: &str) -> crate::store::Result<Option<IpAddr>> {
        self.inner.owner_address(owner)
    }
    fn record_for_decision(&self, ip: IpAddr) -> crate::store::Result<Option<Record>> {
        self.inner.record_for_decision(ip)
    }
    fn owner_for_decision(&self, owner: &str) -> crate::store::Result<Option<IpAddr>> {
        self.inner.owner_for_decision(owner)
    }
    fn revision(&self) -> crate::store::Result<u64> {
        self.inner.revision()
    }
    fn stage(&self, write: Write) -> crate::store::Result<()> {
        let staged = self.counts.staged.fetch_add(1, Ordering::Relaxed) + 1;
        assert!(
            staged <= self.max,
            "{staged} writes staged, at most {}",
            self.max
        );
        self.inner.stage(write)
    }
    fn flush(&self) -> crate::store::Result<Vec<Change>> {
        let staged = self.counts.staged.swap(0, Ordering::Relaxed);
        self.counts.largest.fetch_max(staged, Ordering::Relaxed);
        self.counts.flushes.fetch_add(1, Ordering::Relaxed);
        self.inner.flush()
    }
    fn observed(&self) -> crate::store::Result<Observed> {
        self.inner.observed()
    }
    fn on_observed(&self, wake: Box<dyn Fn() + Send + Sync>) {
        self.inner.on_observed(wake);
    }
    fn catch_up(&self, revision: u64, limit: Duration) -> crate::store::Result<u64> {
        self.inner.catch_up(revision, limit)
    }
    fn number_after(&self, revision: u64) {
        self.inner.number_after(revision);
    }
    fn max_batch(&self) -> usize {
        self.max
    }
    fn health(&self) -> Result<(), String> {
        self.inner.health()
    }
    fn background(&self) -> Option<crate::store::Background> {
        self.inner.background()
    }
    fn scan(&self, family: Family, first: u128, last: u128) -> Scan<(IpAddr, Record)> {
        self.inner.scan(family, first, last)
    }
    fn scan_after(&self, after: Option<IpAddr>) -> Scan<(IpAddr, Record)> {
        self.inner.scan_after(after)
    }
    fn addresses(&self) -> Scan<IpAddr> {
        self.inner.addresses()
    }
    fn changes(&self, after: u64, last: u64) -> Scan<Change> {
        self.inner.changes(after, last)
    }
    fn first_change(&self) -> crate::store::Result<Option<u64>> {
        self.inner.first_change()
    }
}
