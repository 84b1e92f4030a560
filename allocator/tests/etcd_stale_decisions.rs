//! The etcd engine against decisions made on a replica's copy that another
//! replica has since overtaken: two stores on one real etcd member, the
//! second's copy shown the first's commits, then handed writes decided on
//! what it held before. Each such flush must fail with a conflict and leave
//! the other replica's allocation as it was, never overwrite or remove it.
//!
//! The writer decides from its taken set and reads, while the follower may
//! already have applied another replica's commit to the copy; the store
//! must not compare with that newer state. And a decision that writes
//! nothing (an owner holds its address, a release finds nothing) read a
//! copy that may lag: its flush fails the same way when etcd holds
//! something else.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use vipam_allocator::{
    addresses::pool::{PoolDef, Pools},
    model::{Change, Record},
    store::{EtcdSettings, EtcdStore, Store, StoreError, Write},
};
use vipam_test_etcd::{Cluster, require};

/// How long a replica's copy may take to show another's commit.
const CATCH_UP: Duration = Duration::from_secs(5);

/// Two replicas sharing one etcd member. The runtime runs their followers;
/// the test calls the stores from its own thread, as the writer thread does.
struct Replicas {
    a: Store,
    b: Store,
    _runtime: tokio::runtime::Runtime,
    _etcd: Cluster,
}

fn mk_replicas() -> Replicas {
    let etcd = Cluster::start(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let settings = EtcdSettings {
        history: 1000,
        ..EtcdSettings::plain(etcd.endpoints(), "/vipam-stale/")
    };
    let def: PoolDef = "default=10.0.0.0/24".parse().expect("pool");
    let pools = Arc::new(Pools::new(vec![def], None).expect("pools"));
    let open = || {
        runtime
            .block_on(EtcdStore::open(&settings, pools.clone()))
            .expect("open the etcd store")
            .into()
    };
    let (a, b) = (open(), open());
    Replicas {
        a,
        b,
        _runtime: runtime,
        _etcd: etcd,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn mk_record(owner: &str, created: u64) -> Record {
    Record {
        owner: owner.into(),
        labels: BTreeMap::new(),
        created_unix_nanos: created,
        revision: 0,
    }
}

/// Polls until `store`'s copy holds an allocation of `owner` at `at`
/// (`None`: nothing there); returns it.
fn wait_holds(store: &Store, at: IpAddr, owner: Option<&str>) -> Option<Record> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let record = store.get(at).expect("read the copy");
        if record.as_ref().map(|r| r.owner.as_str()) == owner {
            return record;
        }
        assert!(
            Instant::now() < deadline,
            "the copy shows {record:?} at {at}, not {owner:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stages the allocation `record` at `at`.
fn put(store: &Store, at: IpAddr, record: &Record) {
    store.stage(Write::allocate(at, record)).expect("stage");
}

/// Stages the release of the allocation `record` at `at`.
fn delete(store: &Store, at: IpAddr, record: &Record) {
    store.stage(Write::release(at, record)).expect("stage");
}

fn commit_put(store: &Store, at: IpAddr, record: &Record) {
    put(store, at, record);
    store.flush().expect("commit");
}

fn assert_conflict(result: Result<Vec<Change>, StoreError>) {
    assert!(
        matches!(result, Err(StoreError::Conflict { .. })),
        "expected a conflict, got {result:?}"
    );
}

#[test]
fn an_allocation_at_an_address_another_replica_took_since_conflicts() {
    if require("an_allocation_at_an_address_another_replica_took_since_conflicts").is_none() {
        return;
    }
    let r = mk_replicas();
    let at = ip("10.0.0.1");
    commit_put(&r.a, at, &mk_record("x", 1));
    wait_holds(&r.b, at, Some("x"));

    // b's writer still saw the address free.
    put(&r.b, at, &mk_record("y", 2));
    assert_conflict(r.b.flush());
    assert_eq!(
        r.b.get(at).expect("read").map(|r| r.owner),
        Some("x".into())
    );
    assert_eq!(r.b.owner_address("y").expect("read"), None);
    assert_eq!(r.a.owner_address("x").expect("read"), Some(at));
}

#[test]
fn an_allocation_for_an_owner_another_replica_served_since_conflicts() {
    if require("an_allocation_for_an_owner_another_replica_served_since_conflicts").is_none() {
        return;
    }
    let r = mk_replicas();
    let (first, second) = (ip("10.0.0.1"), ip("10.0.0.2"));
    commit_put(&r.a, first, &mk_record("x", 1));
    wait_holds(&r.b, first, Some("x"));

    // b's writer still saw the owner holding nothing.
    put(&r.b, second, &mk_record("x", 2));
    assert_conflict(r.b.flush());
    assert_eq!(r.b.get(second).expect("read"), None);
    assert_eq!(r.b.owner_address("x").expect("read"), Some(first));
}

#[test]
fn a_release_of_an_allocation_replaced_since_by_another_replica_conflicts() {
    if require("a_release_of_an_allocation_replaced_since_by_another_replica_conflicts").is_none() {
        return;
    }
    let r = mk_replicas();
    let at = ip("10.0.0.1");
    commit_put(&r.a, at, &mk_record("x", 1));
    let seen = wait_holds(&r.b, at, Some("x")).expect("x's allocation");

    let held = wait_holds(&r.a, at, Some("x")).expect("x's allocation");
    delete(&r.a, at, &held);
    r.a.flush().expect("commit");
    commit_put(&r.a, at, &mk_record("z", 3));
    wait_holds(&r.b, at, Some("z"));

    // b's writer decided to release x's allocation, which is gone.
    delete(&r.b, at, &seen);
    assert_conflict(r.b.flush());
    assert_eq!(
        r.b.get(at).expect("read").map(|r| r.owner),
        Some("z".into())
    );
    assert_eq!(r.b.owner_address("z").expect("read"), Some(at));
}

#[test]
fn a_release_and_a_new_allocation_of_its_address_in_one_flush_commit() {
    if require("a_release_and_a_new_allocation_of_its_address_in_one_flush_commit").is_none() {
        return;
    }
    let r = mk_replicas();
    let at = ip("10.0.0.1");
    commit_put(&r.a, at, &mk_record("x", 1));
    let held = wait_holds(&r.b, at, Some("x")).expect("x's allocation");

    delete(&r.b, at, &held);
    put(&r.b, at, &mk_record("y", 2));
    r.b.flush().expect("commit");
    wait_holds(&r.a, at, Some("y"));
    assert_eq!(r.a.owner_address("x").expect("read"), None);
    assert_eq!(r.a.owner_address("y").expect("read"), Some(at));
}

#[test]
fn a_release_that_found_nothing_on_a_copy_behind_conflicts() {
    if require("a_release_that_found_nothing_on_a_copy_behind_conflicts").is_none() {
        return;
    }
    let r = mk_replicas();
    let at = ip("10.0.0.1");
    // b's writer reads that x holds nothing, and would answer so.
    assert_eq!(r.b.owner_for_decision("x").expect("read"), None);
    commit_put(&r.a, at, &mk_record("x", 1));
    assert_conflict(r.b.flush());
    wait_holds(&r.b, at, Some("x"));
    assert_eq!(r.b.owner_for_decision("x").expect("read"), Some(at));
    assert_eq!(r.b.flush().expect("nothing changed since"), Vec::new());
}

#[test]
fn an_owner_seen_holding_an_address_released_since_conflicts() {
    if require("an_owner_seen_holding_an_address_released_since_conflicts").is_none() {
        return;
    }
    let r = mk_replicas();
    let at = ip("10.0.0.1");
    commit_put(&r.a, at, &mk_record("x", 1));
    wait_holds(&r.b, at, Some("x"));
    // b's writer reads that x holds the address, and would answer it.
    assert_eq!(r.b.owner_for_decision("x").expect("read"), Some(at));
    assert!(r.b.record_for_decision(at).expect("read").is_some());

    let held = wait_holds(&r.a, at, Some("x")).expect("x's allocation");
    delete(&r.a, at, &held);
    r.a.flush().expect("commit");
    assert_conflict(r.b.flush());
    wait_holds(&r.b, at, None);
    assert_eq!(r.b.owner_for_decision("x").expect("read"), None);
}
