//! Pool agreement: replicas under one prefix must define every pool alike;
//! another prefix is another installation; a pool redefined in etcd while
//! a replica runs stops its writes.

use super::{Etcd, POOL, eventually};
use crate::{
    fixtures::{ip, mk_pools},
    store::{
        StoreError,
        contract::{allocate, stage_allocate},
        etcd::keys::{self, Keys},
    },
};

#[test]
fn a_replica_defining_a_pool_otherwise_is_refused_naming_the_pool() {
    let Some(etcd) = Etcd::start("a_replica_defining_a_pool_otherwise_is_refused_naming_the_pool")
    else {
        return;
    };
    let _first = etcd.open();
    let narrower = mk_pools(&["contract=10.0.0.0/17"]);
    let ours = keys::pool_definition(narrower.at(0));
    let theirs = keys::pool_definition(mk_pools(&[POOL]).at(0));
    match etcd.open_with(&etcd.settings(), narrower) {
        Err(StoreError::Refused(why)) => {
            assert!(why.starts_with("pool contract "), "{why}");
            assert!(why.contains(&format!("there \"{theirs}\"")), "{why}");
            assert!(why.contains(&format!("here \"{ours}\"")), "{why}");
        }
        other => panic!("opened with another definition: {other:?}"),
    }
    let err = etcd
        .open_with(&etcd.settings(), mk_pools(&["contract=10.0.0.0/17"]))
        .expect_err("refused");
    assert!(err.to_string().contains("pool contract"), "{err}");
}

#[test]
fn another_prefix_is_another_installation_with_pools_of_its_own() {
    let Some(etcd) = Etcd::start("another_prefix_is_another_installation_with_pools_of_its_own")
    else {
        return;
    };
    let first = etcd.open();
    let mut settings = etcd.settings();
    settings.prefix = format!("{}-other/", settings.prefix.trim_end_matches('/'));
    let other = etcd
        .open_with(&settings, mk_pools(&["contract=10.0.0.0/17"]))
        .expect("another prefix, another definition");
    let mine = allocate(&first, "10.0.0.1", "first");
    // Its own write is later than the first store's: its copy has gone past
    // it, and does not show it.
    let theirs = allocate(&other, "10.0.0.1", "other");
    assert!(theirs.revision > mine.revision);
    assert_eq!(other.get(ip("10.0.0.1")).expect("get"), Some(theirs));
    assert_eq!(other.owner_address("first").expect("owner"), None);
    let all: Vec<_> = other
        .changes(0, u64::MAX)
        .map(|c| c.expect("change").record.owner)
        .collect();
    assert_eq!(all, vec!["other".to_string()]);
    assert_eq!(first.get(ip("10.0.0.1")).expect("get"), Some(mine));
}

#[test]
fn replicas_with_the_same_prefix_and_definitions_share_the_allocations() {
    let Some(etcd) =
        Etcd::start("replicas_with_the_same_prefix_and_definitions_share_the_allocations")
    else {
        return;
    };
    let first = etcd.open();
    let second = etcd.open();
    let record = allocate(&first, "10.0.0.1", "a");
    eventually("the second replica sees the allocation", || {
        (second.get(ip("10.0.0.1")).expect("get") == Some(record.clone())).then_some(())
    });
    // Its transactions check the pool definition at the revision it agreed
    // with, and commit.
    let other = allocate(&second, "10.0.0.2", "b");
    eventually("the first replica sees the other allocation", || {
        (first.get(ip("10.0.0.2")).expect("get") == Some(other.clone())).then_some(())
    });
    assert_eq!(
        first.owner_address("b").expect("owner"),
        Some(ip("10.0.0.2"))
    );
}

#[test]
fn a_pool_redefined_in_etcd_stops_the_replicas_writes_and_reads() {
    let Some(etcd) = Etcd::start("a_pool_redefined_in_etcd_stops_the_replicas_writes_and_reads")
    else {
        return;
    };
    let store = etcd.open();
    allocate(&store, "10.0.0.1", "a");
    let key = Keys::new(&etcd.settings().prefix).pool("contract");
    let endpoints = etcd.settings().endpoints;
    etcd.block_on(async {
        let mut client = etcd_client::Client::connect(&endpoints, None)
            .await
            .expect("connect");
        client
            .put(
                key,
                "v4 covers 10.0.0.0-10.0.0.255 hands out 10.0.0.1-10.0.0.2",
                None,
            )
            .await
            .expect("redefine the pool");
    });
    let why = eventually("the store stopped", || match store.get(ip("10.0.0.1")) {
        Err(StoreError::Unavailable(why)) => Some(why),
        _ => None,
    });
    assert!(why.contains("pool contract was redefined"), "{why}");
    assert!(store.health().is_err());
    stage_allocate(&store, "10.0.0.2", "b");
    let err = store.flush().expect_err("a write after the redefinition");
    assert!(matches!(err, StoreError::Stopped(_)), "{err:?}");
    assert!(
        err.to_string().contains("pool contract was redefined"),
        "{err}"
    );
}
