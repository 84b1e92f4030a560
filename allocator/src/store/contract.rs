//! The store contract as one engine-agnostic test suite: each function
//! takes a fresh, empty store and checks one promise of [`Store`]. Every
//! engine runs all of them through [`store_contract!`] on a store of its own
//! (garage's `db` crate does the same), so an engine that passes them can
//! take the place of another.
//!
//! The functions stage writes as the writer does (each at the revision
//! after [`Store::revision`]) and take the revisions the engine gave them
//! from [`Store::flush`]: the staged ones when it answers `None` (sled
//! numbers each write), the batch's when it answers `Some(r)` (etcd numbers
//! each transaction, from wherever the database stands). They assume
//! nothing about where a new store's revisions start, only what both
//! numberings promise: a record reads back with the revision its write got,
//! later flushes get higher revisions, and the change history lists every
//! write by revision. Two writes of one address in one flush may be one
//! change or two, so the functions that count changes flush per write.

use std::{collections::BTreeMap, net::IpAddr};

use super::{Store, StoreError};
use crate::addresses::pool::{Family, to_int};
use crate::model::{Change, ChangeKind, Record};

/// Declares a module `contract` with one `#[test]` per contract function,
/// each on a fresh store.
///
/// `store_contract!(mk)`: `mk` is an expression (evaluated in the calling
/// module) giving `(guard, store)`; the guard (a temporary directory, a
/// server) lives as long as the test.
///
/// `store_contract!(skippable mk)`: `mk` is a function called with the
/// test's name that gives `Some((guard, store))`, or `None` when the engine
/// cannot run here (it says so, `SKIPPED ...`, and the test returns).
macro_rules! store_contract {
    (skippable $mk:expr) => {
        $crate::store::contract::store_contract!(@tests (|name: &str| ($mk)(name)));
    };
    ($mk:expr) => {
        $crate::store::contract::store_contract!(@tests (|_: &str| Some($mk)));
    };
    (@tests $mk:expr) => {
        $crate::store::contract::store_contract!(@each $mk;
            a_new_store_is_empty_and_flushing_nothing_changes_nothing,
            put_then_get_by_address_and_owner,
            the_latest_reads_see_staged_writes_and_the_others_see_them_once_flushed,
            delete_removes_record_and_owner_index,
            scans_are_ordered_by_address_ipv4_first,
            every_write_is_in_the_change_log_in_revision_order,
            revisions_increase_strictly_from_flush_to_flush,
            replaying_the_change_log_rebuilds_the_committed_allocations,
            a_release_and_a_new_allocation_of_its_address_in_one_flush_are_both_changes,
        );
    };
    (@each $mk:expr; $($name:ident),* $(,)?) => {
        mod contract {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    let test = concat!(module_path!(), "::", stringify!($name));
                    let Some((_guard, store)) = ($mk)(test) else {
                        return;
                    };
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

/// The revision the writer stages its next write at.
fn next_revision<S: Store>(store: &S) -> u64 {
    store.revision().expect("revision") + 1
}

/// Stages the allocation of `address` to `owner` as the writer does; the
/// revision it was staged at.
pub(crate) fn stage_put<S: Store>(store: &S, address: &str, owner: &str) -> u64 {
    let revision = next_revision(store);
    store
        .put(ip(address), &mk_record(owner, revision))
        .expect("put");
    revision
}

/// Stages the release of the allocation at `address` as the writer does,
/// with the record it decides on; the revision it was staged at.
pub(crate) fn stage_delete<S: Store>(store: &S, address: &str) -> u64 {
    let record = store
        .get_latest(ip(address))
        .expect("get")
        .unwrap_or_else(|| panic!("{address} is not allocated"));
    let revision = next_revision(store);
    store
        .delete(ip(address), &record, revision)
        .expect("delete");
    revision
}

/// Flushes the writes staged at `staged`: the revision each was committed
/// at, in the same order.
pub(crate) fn flush<S: Store>(store: &S, staged: &[u64]) -> Vec<u64> {
    match store.flush().expect("flush") {
        Some(batch) => vec![batch; staged.len()],
        None => staged.to_vec(),
    }
}

/// Allocates `address` to `owner` in a flush of its own: the record as
/// committed.
pub(crate) fn allocate<S: Store>(store: &S, address: &str, owner: &str) -> Record {
    let staged = stage_put(store, address, owner);
    mk_record(owner, flush(store, &[staged])[0])
}

/// Releases the allocation at `address` in a flush of its own: the revision
/// of the release.
pub(crate) fn release<S: Store>(store: &S, address: &str) -> u64 {
    let staged = stage_delete(store, address);
    flush(store, &[staged])[0]
}

/// Every committed allocation, by address.
fn committed<S: Store>(store: &S) -> Vec<(IpAddr, Record)> {
    store.scan_after(None).map(|r| r.expect("entry")).collect()
}

pub(crate) fn a_new_store_is_empty_and_flushing_nothing_changes_nothing<S: Store>(store: &S) {
    let revision = store.revision().expect("rev");
    if let Some(first) = store.first_change().expect("first") {
        assert!(
            first <= revision + 1,
            "the history starts at {first}, after the store's revision {revision}"
        );
    }
    assert_eq!(store.addresses().count(), 0);
    assert_eq!(store.scan_after(None).count(), 0);
    assert_eq!(store.scan(Family::V4, 0, u128::from(u32::MAX)).count(), 0);
    assert_eq!(store.changes(0, u64::MAX).count(), 0);
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), None);
    assert_eq!(store.get_latest(ip("10.0.0.1")).expect("get"), None);
    assert_eq!(store.owner_address("svc-a").expect("owner"), None);
    assert_eq!(store.owner_address_latest("svc-a").expect("owner"), None);
    assert_eq!(
        store.flush().expect("flushing nothing"),
        None,
        "nothing staged, no batch revision"
    );
    assert_eq!(store.revision().expect("rev"), revision);
    assert_eq!(store.changes(0, u64::MAX).count(), 0);
}

pub(crate) fn put_then_get_by_address_and_owner<S: Store>(store: &S) {
    let record = allocate(store, "10.0.0.1", "svc-a");
    assert_eq!(
        store.get(ip("10.0.0.1")).expect("get"),
        Some(record.clone())
    );
    assert_eq!(store.get_latest(ip("10.0.0.1")).expect("get"), Some(record));
    assert_eq!(
        store.owner_address("svc-a").expect("owner"),
        Some(ip("10.0.0.1"))
    );
    assert_eq!(
        store.owner_address_latest("svc-a").expect("owner"),
        Some(ip("10.0.0.1"))
    );
    assert_eq!(store.get(ip("10.0.0.2")).expect("get"), None);
    assert_eq!(store.owner_address("svc-b").expect("owner"), None);
}

pub(crate) fn the_latest_reads_see_staged_writes_and_the_others_see_them_once_flushed<S: Store>(
    store: &S,
) {
    let held = allocate(store, "10.0.0.1", "svc-a");
    let before = store.revision().expect("rev");
    let staged = [
        stage_put(store, "10.0.0.2", "svc-b"),
        stage_delete(store, "10.0.0.1"),
        // Written twice in the batch: allocated, then released again.
        stage_put(store, "10.0.0.3", "svc-c"),
        stage_delete(store, "10.0.0.3"),
    ];
    for (address, owner) in [("10.0.0.1", "svc-a"), ("10.0.0.3", "svc-c")] {
        assert_eq!(store.get_latest(ip(address)).expect("get"), None);
        assert_eq!(store.owner_address_latest(owner).expect("owner"), None);
    }
    assert_eq!(
        store.owner_address_latest("svc-b").expect("owner"),
        Some(ip("10.0.0.2"))
    );
    assert_eq!(
        store.get_latest(ip("10.0.0.2")).expect("get"),
        Some(mk_record("svc-b", staged[0]))
    );
    // Nothing is committed yet.
    assert_eq!(
        committed(store),
        vec![(ip("10.0.0.1"), held.clone())],
        "not applied"
    );
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), Some(held));
    assert_eq!(
        store.owner_address("svc-a").expect("owner"),
        Some(ip("10.0.0.1"))
    );
    assert_eq!(store.get(ip("10.0.0.2")).expect("get"), None);
    assert_eq!(store.owner_address("svc-b").expect("owner"), None);
    assert_eq!(store.changes(before, u64::MAX).count(), 0, "not applied");

    let got = flush(store, &staged);
    let put = mk_record("svc-b", got[0]);
    assert_eq!(committed(store), vec![(ip("10.0.0.2"), put.clone())]);
    assert_eq!(store.get(ip("10.0.0.2")).expect("get"), Some(put.clone()));
    assert_eq!(store.get_latest(ip("10.0.0.2")).expect("get"), Some(put));
    assert_eq!(
        store.owner_address("svc-b").expect("owner"),
        Some(ip("10.0.0.2"))
    );
    for (address, owner) in [("10.0.0.1", "svc-a"), ("10.0.0.3", "svc-c")] {
        assert_eq!(store.get(ip(address)).expect("get"), None);
        assert_eq!(store.owner_address(owner).expect("owner"), None);
    }
    assert!(store.revision().expect("rev") >= got[3]);
    let changes: Vec<(u64, ChangeKind, IpAddr)> = revisions(store, before, u64::MAX);
    for applied in [
        (got[0], ChangeKind::Allocated, ip("10.0.0.2")),
        (got[1], ChangeKind::Released, ip("10.0.0.1")),
    ] {
        assert!(changes.contains(&applied), "{applied:?} in {changes:?}");
    }
}

pub(crate) fn delete_removes_record_and_owner_index<S: Store>(store: &S) {
    let put = allocate(store, "10.0.0.1", "svc-a");
    let released = release(store, "10.0.0.1");
    assert!(released > put.revision, "{released} after {}", put.revision);
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), None);
    assert_eq!(store.get_latest(ip("10.0.0.1")).expect("get"), None);
    assert_eq!(store.owner_address("svc-a").expect("owner"), None);
    assert_eq!(store.owner_address_latest("svc-a").expect("owner"), None);
    assert_eq!(store.addresses().count(), 0);
    assert!(store.revision().expect("rev") >= released);
    // Neither index keeps a trace: the owner may hold another address, and
    // the address may go to another owner.
    let moved = allocate(store, "10.0.0.2", "svc-a");
    let again = allocate(store, "10.0.0.1", "svc-b");
    assert_eq!(
        store.owner_address("svc-a").expect("owner"),
        Some(ip("10.0.0.2"))
    );
    assert_eq!(
        store.owner_address("svc-b").expect("owner"),
        Some(ip("10.0.0.1"))
    );
    assert_eq!(
        committed(store),
        vec![(ip("10.0.0.1"), again), (ip("10.0.0.2"), moved)]
    );
}

pub(crate) fn scans_are_ordered_by_address_ipv4_first<S: Store>(store: &S) {
    let written = [
        "fd00::1",
        "10.0.0.10",
        "10.0.0.9",
        "9.255.255.255",
        "10.0.1.0",
    ];
    let staged: Vec<u64> = written
        .iter()
        .enumerate()
        .map(|(i, a)| stage_put(store, a, &format!("o{i}")))
        .collect();
    flush(store, &staged);
    let all: Vec<IpAddr> = committed(store).into_iter().map(|(a, _)| a).collect();
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
    let v6: Vec<IpAddr> = store
        .scan(Family::V6, 0, u128::MAX)
        .map(|r| r.expect("entry").0)
        .collect();
    assert_eq!(v6, vec![ip("fd00::1")]);
    let addrs: Vec<IpAddr> = store.addresses().map(|r| r.expect("addr")).collect();
    assert_eq!(addrs, all);
}

pub(crate) fn every_write_is_in_the_change_log_in_revision_order<S: Store>(store: &S) {
    let a = allocate(store, "10.0.0.1", "svc-a");
    let b = allocate(store, "fd00::2", "svc-b");
    let released = release(store, "10.0.0.1");
    let (r1, r2, r3) = (a.revision, b.revision, released);
    assert!(r1 < r2 && r2 < r3, "{r1} {r2} {r3}");
    let change = |revision, kind, address: &str, record: &Record| Change {
        revision,
        kind,
        address: ip(address),
        record: record.clone(),
    };
    let all: Vec<Change> = store.changes(0, r3).map(|c| c.expect("change")).collect();
    assert_eq!(
        all,
        vec![
            change(r1, ChangeKind::Allocated, "10.0.0.1", &a),
            change(r2, ChangeKind::Allocated, "fd00::2", &b),
            // A release carries the allocation as it was.
            change(r3, ChangeKind::Released, "10.0.0.1", &a),
        ]
    );
    assert_eq!(
        store
            .changes(0, u64::MAX)
            .map(|c| c.expect("change"))
            .collect::<Vec<_>>(),
        all
    );
    assert_eq!(
        revisions(store, r1, r2),
        vec![(r2, ChangeKind::Allocated, ip("fd00::2"))]
    );
    assert_eq!(
        revisions(store, r1, r3 - 1),
        vec![(r2, ChangeKind::Allocated, ip("fd00::2"))],
        "up to the last, inclusive"
    );
    assert_eq!(revisions(store, r1 - 1, r1).len(), 1, "from after `after`");
    assert!(
        revisions(store, r3, u64::MAX).is_empty(),
        "nothing after r3"
    );
    assert!(revisions(store, r3, r1).is_empty(), "an empty range");
    let first = store.first_change().expect("first").expect("a history");
    assert!(first <= r1, "the history starts at {first}, after {r1}");
}

pub(crate) fn revisions_increase_strictly_from_flush_to_flush<S: Store>(store: &S) {
    let mut last = store.revision().expect("rev");
    let batches: [&[(&str, &str)]; 3] = [
        &[("10.0.0.1", "a"), ("10.0.0.2", "b")],
        &[("10.0.0.3", "c"), ("10.0.0.1", "")],
        &[("fd00::1", "d")],
    ];
    for batch in batches {
        let staged: Vec<u64> = batch
            .iter()
            .map(|&(address, owner)| match owner {
                "" => stage_delete(store, address),
                owner => stage_put(store, address, owner),
            })
            .collect();
        let got = flush(store, &staged);
        assert!(
            got.windows(2).all(|w| w[0] <= w[1]),
            "one flush's revisions never go back: {got:?}"
        );
        assert!(got[0] > last, "{got:?} after {last}");
        last = got[got.len() - 1];
        assert!(store.revision().expect("rev") >= last);
        for (&(address, owner), &revision) in batch.iter().zip(&got) {
            let read = store.get(ip(address)).expect("get");
            let expected = (!owner.is_empty()).then(|| mk_record(owner, revision));
            assert_eq!(read, expected, "{address} as its flush left it");
        }
    }
}

/// The committed allocations that replaying `changes` in order gives: an
/// allocation puts, a release removes (the very allocation it names).
fn replay(changes: Vec<Change>) -> Vec<(IpAddr, Record)> {
    let mut state = BTreeMap::new();
    for change in changes {
        match change.kind {
            ChangeKind::Allocated => {
                let old = state.insert(to_int(change.address), (change.address, change.record));
                assert_eq!(old, None, "allocated over an allocation");
            }
            ChangeKind::Released => {
                let old = state.remove(&to_int(change.address));
                assert_eq!(
                    old,
                    Some((change.address, change.record)),
                    "released what was not allocated"
                );
            }
        }
    }
    state.into_values().collect()
}

pub(crate) fn replaying_the_change_log_rebuilds_the_committed_allocations<S: Store>(store: &S) {
    let writes: [&[(&str, &str)]; 3] = [
        &[
            ("10.0.0.1", "a"),
            ("fd00::1", "b"),
            ("10.0.0.2", "c"),
            ("10.0.0.2", ""),
        ],
        &[("10.0.0.3", "c"), ("fd00::1", ""), ("10.0.0.4", "b")],
        &[("10.0.0.1", ""), ("fd00::1", "a")],
    ];
    for batch in writes {
        let staged: Vec<u64> = batch
            .iter()
            .map(|&(address, owner)| match owner {
                "" => stage_delete(store, address),
                owner => stage_put(store, address, owner),
            })
            .collect();
        flush(store, &staged);
    }
    let changes: Vec<Change> = store
        .changes(0, u64::MAX)
        .map(|c| c.expect("change"))
        .collect();
    assert!(
        changes.windows(2).all(|w| w[0].revision <= w[1].revision),
        "by revision: {changes:?}"
    );
    let state = committed(store);
    assert_eq!(state.len(), 3, "{state:?}");
    assert_eq!(replay(changes), state);
}

pub(crate) fn a_release_and_a_new_allocation_of_its_address_in_one_flush_are_both_changes<
    S: Store,
>(
    store: &S,
) {
    let old = allocate(store, "10.0.0.1", "a");
    let staged = [
        stage_delete(store, "10.0.0.1"),
        stage_put(store, "10.0.0.1", "b"),
    ];
    let got = flush(store, &staged);
    let new = mk_record("b", got[1]);
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), Some(new.clone()));
    assert_eq!(store.owner_address("a").expect("owner"), None);
    assert_eq!(
        store.owner_address("b").expect("owner"),
        Some(ip("10.0.0.1"))
    );
    let changes: Vec<Change> = store
        .changes(old.revision, u64::MAX)
        .map(|c| c.expect("change"))
        .collect();
    // A watcher of owner a learns that it lost the address.
    assert_eq!(
        changes,
        vec![
            Change {
                revision: got[0],
                kind: ChangeKind::Released,
                address: ip("10.0.0.1"),
                record: old,
            },
            Change {
                revision: got[1],
                kind: ChangeKind::Allocated,
                address: ip("10.0.0.1"),
                record: new,
            },
        ]
    );
}

/// A failed flush commits none of its writes and leaves none staged.
/// `fail` is called with the writes staged and must make the next flush
/// fail (another writer taking the staged address, the database going
/// away); `mend` is called after the failed flush and must make the store
/// readable again. Returns the error of the failed flush.
pub(crate) fn a_failed_flush_applies_nothing_and_keeps_nothing_staged<S: Store>(
    store: &S,
    fail: impl FnOnce(&S),
    mend: impl FnOnce(&S),
) -> StoreError {
    let kept = allocate(store, "10.0.0.1", "kept");
    stage_put(store, "10.0.0.2", "staged");
    stage_delete(store, "10.0.0.1");
    fail(store);
    let err = match store.flush() {
        Ok(r) => panic!("the flush did not fail (batch revision {r:?})"),
        Err(e) => e,
    };
    mend(store);
    assert_eq!(
        store.get(ip("10.0.0.1")).expect("get"),
        Some(kept.clone()),
        "the release was not applied"
    );
    assert_eq!(store.owner_address("staged").expect("owner"), None);
    // Nothing stays staged: the writer's reads show what is committed.
    assert_eq!(store.get_latest(ip("10.0.0.1")).expect("get"), Some(kept));
    assert_eq!(
        store.get_latest(ip("10.0.0.2")).expect("get"),
        store.get(ip("10.0.0.2")).expect("get")
    );
    assert_eq!(
        store.owner_address_latest("staged").expect("owner"),
        store.owner_address("staged").expect("owner")
    );
    let revision = store.revision().expect("rev");
    assert_eq!(
        store.flush().expect("flush"),
        None,
        "nothing was left staged"
    );
    assert_eq!(store.revision().expect("rev"), revision);
    err
}
