//! The store contract as one engine-agnostic test suite: each function
//! takes a fresh, empty store and checks one promise of [`Store`]. Every
//! engine runs all of them through [`store_contract!`] on a store of its own
//! (garage's `db` crate does the same), so an engine that passes them can
//! take the place of another.

use std::{collections::BTreeMap, net::IpAddr};

use super::{Change, ChangeKind, Record, Store};
use crate::pool::to_int;

/// Declares a module `contract` with one `#[test]` per contract function,
/// each on a fresh store from `$mk`, an expression (evaluated in the calling
/// module) giving `(guard, store)`: the guard (a temporary directory, a
/// server) lives as long as the test.
macro_rules! store_contract {
    ($mk:expr) => {
        $crate::store::contract::store_contract!(@tests $mk;
            a_new_store_is_empty_at_revision_zero,
            put_then_get_by_address_and_owner,
            the_latest_reads_see_staged_writes_and_the_others_see_them_once_flushed,
            delete_removes_record_and_owner_index,
            scans_are_ordered_by_address_ipv4_first,
            every_write_is_in_the_change_log_in_revision_order,
        );
    };
    (@tests $mk:expr; $($name:ident),* $(,)?) => {
        mod contract {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    let (_guard, store) = $mk;
                    $crate::store::contract::$name(&store);
                }
            )*
        }
    };
}
pub(crate) use store_contract;

/// A record of `owner` written at `revision`, with one label.
pub(crate) fn mk_record(owner: &str, revision: u64) -> Record {
    Record {
        owner: owner.to_string(),
        labels: BTreeMap::from([("k".to_string(), "v".to_string())]),
        created_unix_nanos: 1_700_000_000_000_000_000,
        revision,
    }
}

/// An address from its text.
pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// Allocates 10.0.0.1 to `svc-a` (revision 1) and fd00::2 to `svc-b` (2),
/// releases 10.0.0.1 (3), and flushes.
pub(crate) fn write_three<S: Store>(store: &S) {
    store
        .put(ip("10.0.0.1"), &mk_record("svc-a", 1))
        .expect("put");
    store
        .put(ip("fd00::2"), &mk_record("svc-b", 2))
        .expect("put");
    store
        .delete(ip("10.0.0.1"), &mk_record("svc-a", 1), 3)
        .expect("delete");
    store.flush().expect("flush");
}

/// The changes after `after` up to `last` as (revision, kind, address).
pub(crate) fn revisions<S: Store>(
    store: &S,
    after: u64,
    last: u64,
) -> Vec<(u64, ChangeKind, IpAddr)> {
    store
        .changes(after, last)
        .map(|c| {
            let c = c.expect("change");
            (c.revision, c.kind, c.address)
        })
        .collect()
}

pub(crate) fn a_new_store_is_empty_at_revision_zero<S: Store>(store: &S) {
    assert_eq!(store.revision().expect("rev"), 0);
    assert_eq!(store.first_change().expect("first"), None);
    assert_eq!(store.addresses().count(), 0);
    assert_eq!(store.scan_after(None).count(), 0);
    assert_eq!(store.changes(0, u64::MAX).count(), 0);
    assert_eq!(store.get_latest(ip("10.0.0.1")).expect("get"), None);
    assert_eq!(store.owner_address_latest("svc-a").expect("owner"), None);
    store.flush().expect("flushing nothing");
    assert_eq!(store.revision().expect("rev"), 0);
}

pub(crate) fn put_then_get_by_address_and_owner<S: Store>(store: &S) {
    store
        .put(ip("10.0.0.1"), &mk_record("svc-a", 1))
        .expect("put");
    store.flush().expect("flush");
    assert_eq!(
        store.get(ip("10.0.0.1")).expect("get"),
        Some(mk_record("svc-a", 1))
    );
    assert_eq!(
        store.owner_address("svc-a").expect("owner"),
        Some(ip("10.0.0.1"))
    );
    assert_eq!(store.get(ip("10.0.0.2")).expect("get"), None);
    assert_eq!(store.owner_address("svc-b").expect("owner"), None);
    assert_eq!(store.revision().expect("rev"), 1);
}

pub(crate) fn the_latest_reads_see_staged_writes_and_the_others_see_them_once_flushed<S: Store>(
    store: &S,
) {
    store
        .put(ip("10.0.0.1"), &mk_record("svc-a", 1))
        .expect("put");
    store
        .put(ip("10.0.0.2"), &mk_record("svc-b", 2))
        .expect("put");
    store
        .delete(ip("10.0.0.1"), &mk_record("svc-a", 1), 3)
        .expect("delete");
    assert_eq!(store.get_latest(ip("10.0.0.1")).expect("get"), None);
    assert_eq!(store.owner_address_latest("svc-a").expect("owner"), None);
    assert_eq!(
        store.owner_address_latest("svc-b").expect("owner"),
        Some(ip("10.0.0.2"))
    );
    assert_eq!(store.revision().expect("rev"), 3);
    assert_eq!(store.get(ip("10.0.0.2")).expect("get"), None, "not applied");
    assert_eq!(store.owner_address("svc-b").expect("owner"), None);
    assert_eq!(store.addresses().count(), 0, "nothing applied yet");
    assert_eq!(store.changes(0, 3).count(), 0, "nothing applied yet");

    store.flush().expect("flush");
    let addrs: Vec<IpAddr> = store.addresses().map(|r| r.expect("addr")).collect();
    assert_eq!(addrs, vec![ip("10.0.0.2")]);
    assert_eq!(store.changes(0, 3).count(), 3);
    assert_eq!(
        store.get(ip("10.0.0.2")).expect("get"),
        Some(mk_record("svc-b", 2))
    );
    assert_eq!(
        store.owner_address("svc-b").expect("owner"),
        Some(ip("10.0.0.2"))
    );
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), None);
    assert_eq!(store.revision().expect("rev"), 3);
}

pub(crate) fn delete_removes_record_and_owner_index<S: Store>(store: &S) {
    store
        .put(ip("10.0.0.1"), &mk_record("svc-a", 1))
        .expect("put");
    store.flush().expect("flush");
    store
        .delete(ip("10.0.0.1"), &mk_record("svc-a", 1), 2)
        .expect("delete");
    store.flush().expect("flush");
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), None);
    assert_eq!(store.owner_address("svc-a").expect("owner"), None);
    assert_eq!(store.revision().expect("rev"), 2);
}

pub(crate) fn scans_are_ordered_by_address_ipv4_first<S: Store>(store: &S) {
    for (i, a) in [
        "fd00::1",
        "10.0.0.10",
        "10.0.0.9",
        "9.255.255.255",
        "10.0.1.0",
    ]
    .iter()
    .enumerate()
    {
        store
            .put(ip(a), &mk_record(&format!("o{i}"), i as u64 + 1))
            .expect("put");
    }
    store.flush().expect("flush");
    let all: Vec<IpAddr> = store
        .scan_after(None)
        .map(|r| r.expect("entry").0)
        .collect();
    assert_eq!(
        all,
        vec![
            ip("9.255.255.255"),
            ip("10.0.0.9"),
            ip("10.0.0.10"),
            ip("10.0.1.0"),
            ip("fd00::1")
        ]
    );
    let after: Vec<IpAddr> = store
        .scan_after(Some(ip("10.0.0.10")))
        .map(|r| r.expect("entry").0)
        .collect();
    assert_eq!(after, vec![ip("10.0.1.0"), ip("fd00::1")]);
    let (f, first) = to_int(ip("10.0.0.0"));
    let (_, last) = to_int(ip("10.0.0.255"));
    let ranged: Vec<IpAddr> = store
        .scan(f, first, last)
        .map(|r| r.expect("entry").0)
        .collect();
    assert_eq!(ranged, vec![ip("10.0.0.9"), ip("10.0.0.10")]);
    let addrs: Vec<IpAddr> = store.addresses().map(|r| r.expect("addr")).collect();
    assert_eq!(addrs, all);
}

pub(crate) fn every_write_is_in_the_change_log_in_revision_order<S: Store>(store: &S) {
    write_three(store);
    let all: Vec<Change> = store.changes(0, 3).map(|c| c.expect("change")).collect();
    assert_eq!(
        all,
        vec![
            Change {
                revision: 1,
                kind: ChangeKind::Allocated,
                address: ip("10.0.0.1"),
                record: mk_record("svc-a", 1),
            },
            Change {
                revision: 2,
                kind: ChangeKind::Allocated,
                address: ip("fd00::2"),
                record: mk_record("svc-b", 2),
            },
            Change {
                revision: 3,
                kind: ChangeKind::Released,
                address: ip("10.0.0.1"),
                record: mk_record("svc-a", 1),
            },
        ]
    );
    assert_eq!(
        revisions(store, 1, 2),
        vec![(2, ChangeKind::Allocated, ip("fd00::2"))]
    );
    assert!(revisions(store, 3, 3).is_empty(), "nothing after the last");
    assert!(revisions(store, 3, 1).is_empty(), "an empty range");
    assert_eq!(store.first_change().expect("first"), Some(1));
}
