//! The store contract as one engine-agnostic test suite: each function
//! takes a fresh, empty [`Store`] and checks one promise of the contract
//! (see the module documentation of [`crate::store`]). Every engine runs all
//! of them through [`store_contract!`] on a store of its own (garage's `db`
//! crate does the same), so an engine that passes them can take the place of
//! another.
//!
//! The functions stage writes as the writer does (each address at most once
//! per flush) and take the revisions the store gave them from what
//! [`Store::flush`] returns. They assume nothing about where a new store's
//! revisions start or how far apart they are, only what every engine
//! promises: each change has its own, they grow, and an allocation reads
//! back with the revision of its change.

use std::{collections::BTreeMap, net::IpAddr};

use super::{Store, StoreError, Write};
use crate::{
    addresses::pool::{Family, to_int},
    fixtures::{ip, mk_labelled_record},
    model::{Change, ChangeKind, Record},
};

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
            a_new_store_is_empty_and_a_flush_of_nothing_changes_nothing,
            a_flush_commits_each_write_as_a_change_of_its_own_revision,
            decision_reads_see_staged_writes_and_committed_reads_see_them_once_flushed,
            a_release_frees_the_address_and_the_owner,
            scans_are_ordered_by_address_ipv4_first,
            the_history_lists_every_change_by_revision_within_bounds,
            resuming_the_history_after_any_change_gives_exactly_the_later_ones,
            replaying_the_history_rebuilds_the_committed_allocations,
            a_writer_observes_none_of_its_own_changes,
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
                    let store: $crate::store::Store = store.into();
                    $crate::store::contract::$name(&store);
                }
            )*
        }
    };
}
pub(crate) use store_contract;

/// The changes after `after` up to `last` as (revision, kind, address).
pub(crate) fn revisions(store: &Store, after: u64, last: u64) -> Vec<(u64, ChangeKind, IpAddr)> {
    store
        .changes(after, last)
        .map(|c| {
            let c = c.expect("change");
            (c.revision, c.kind, c.address)
        })
        .collect()
}

/// Stages the allocation of `address` to `owner`, as the writer does.
pub(crate) fn stage_allocate(store: &Store, address: &str, owner: &str) {
    store
        .stage(Write::Allocate {
            address: ip(address),
            record: mk_labelled_record(owner, 0),
        })
        .expect("stage an allocation");
}

/// Stages the release of the allocation at `address`, with the record the
/// writer decides on.
pub(crate) fn stage_release(store: &Store, address: &str) {
    let record = store
        .record_for_decision(ip(address))
        .expect("read")
        .unwrap_or_else(|| panic!("{address} is not allocated"));
    store
        .stage(Write::Release {
            address: ip(address),
            record,
        })
        .expect("stage a release");
}

/// Flushes: the changes, which must be in strictly increasing revision
/// order.
pub(crate) fn flush(store: &Store) -> Vec<Change> {
    let changes = store.flush().expect("flush");
    assert!(
        changes.windows(2).all(|w| w[0].revision < w[1].revision),
        "each change has its own revision, in order: {changes:?}"
    );
    changes
}

/// Allocates `address` to `owner` in a flush of its own: the record as
/// committed.
pub(crate) fn allocate(store: &Store, address: &str, owner: &str) -> Record {
    stage_allocate(store, address, owner);
    match flush(store).as_slice() {
        [change] if change.kind == ChangeKind::Allocated => change.record.clone(),
        other => panic!("one allocation, not {other:?}"),
    }
}

/// Releases the allocation at `address` in a flush of its own: the
/// revision of the release.
pub(crate) fn release(store: &Store, address: &str) -> u64 {
    stage_release(store, address);
    match flush(store).as_slice() {
        [change] if change.kind == ChangeKind::Released => change.revision,
        other => panic!("one release, not {other:?}"),
    }
}

/// Every committed allocation, by address.
fn committed(store: &Store) -> Vec<(IpAddr, Record)> {
    store.scan_after(None).map(|r| r.expect("entry")).collect()
}

/// Every change the history holds.
fn history(store: &Store) -> Vec<Change> {
    store
        .changes(0, u64::MAX)
        .map(|c| c.expect("change"))
        .collect()
}

pub(crate) fn a_new_store_is_empty_and_a_flush_of_nothing_changes_nothing(store: &Store) {
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
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), None);
    assert_eq!(
        store.record_for_decision(ip("10.0.0.1")).expect("get"),
        None
    );
    assert_eq!(store.owner_address("svc-a").expect("owner"), None);
    assert_eq!(store.owner_for_decision("svc-a").expect("owner"), None);
    assert_eq!(flush(store), Vec::new(), "nothing staged, no change");
    assert_eq!(store.revision().expect("rev"), revision);
    assert!(history(store).is_empty());
}

pub(crate) fn a_flush_commits_each_write_as_a_change_of_its_own_revision(store: &Store) {
    let held = allocate(store, "10.0.0.1", "svc-a");
    let before = store.revision().expect("rev");
    assert!(before >= held.revision);
    stage_allocate(store, "fd00::3", "svc-c");
    stage_release(store, "10.0.0.1");
    stage_allocate(store, "10.0.0.2", "svc-b");
    let changes = flush(store);
    assert!(changes[0].revision > before, "{changes:?} after {before}");
    let mut written: Vec<(ChangeKind, IpAddr, &str)> = changes
        .iter()
        .map(|c| (c.kind, c.address, c.record.owner.as_str()))
        .collect();
    written.sort_by_key(|(_, address, _)| to_int(*address));
    assert_eq!(
        written,
        vec![
            (ChangeKind::Released, ip("10.0.0.1"), "svc-a"),
            (ChangeKind::Allocated, ip("10.0.0.2"), "svc-b"),
            (ChangeKind::Allocated, ip("fd00::3"), "svc-c"),
        ]
    );
    for change in &changes {
        match change.kind {
            ChangeKind::Allocated => {
                assert_eq!(change.record.revision, change.revision, "{change:?}");
                let read = store.get(change.address).expect("get");
                assert_eq!(
                    read.as_ref(),
                    Some(&change.record),
                    "reads back as committed"
                );
            }
            // A release carries the allocation as it was.
            ChangeKind::Released => assert_eq!(change.record, held),
        }
    }
    let last = changes[changes.len() - 1].revision;
    assert!(store.revision().expect("rev") >= last);
    let later = allocate(store, "10.0.0.3", "svc-d");
    assert!(later.revision > last, "{} after {last}", later.revision);
}

pub(crate) fn decision_reads_see_staged_writes_and_committed_reads_see_them_once_flushed(
    store: &Store,
) {
    let held = allocate(store, "10.0.0.1", "svc-a");
    let before = store.revision().expect("rev");
    stage_allocate(store, "10.0.0.2", "svc-b");
    stage_release(store, "10.0.0.1");
    assert_eq!(
        store.record_for_decision(ip("10.0.0.1")).expect("get"),
        None
    );
    assert_eq!(store.owner_for_decision("svc-a").expect("owner"), None);
    assert_eq!(
        store.owner_for_decision("svc-b").expect("owner"),
        Some(ip("10.0.0.2"))
    );
    let staged = store
        .record_for_decision(ip("10.0.0.2"))
        .expect("get")
        .expect("staged");
    assert_eq!(staged.owner, "svc-b");
    // Nothing is committed yet.
    assert_eq!(committed(store), vec![(ip("10.0.0.1"), held.clone())]);
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), Some(held));
    assert_eq!(store.get(ip("10.0.0.2")).expect("get"), None);
    assert_eq!(store.owner_address("svc-b").expect("owner"), None);
    assert_eq!(store.changes(before, u64::MAX).count(), 0, "not applied");

    let changes = flush(store);
    let put = changes
        .iter()
        .find(|c| c.kind == ChangeKind::Allocated)
        .expect("the allocation")
        .record
        .clone();
    assert_eq!(committed(store), vec![(ip("10.0.0.2"), put.clone())]);
    assert_eq!(
        store.record_for_decision(ip("10.0.0.2")).expect("get"),
        Some(put)
    );
    assert_eq!(
        store.owner_address("svc-b").expect("owner"),
        Some(ip("10.0.0.2"))
    );
    assert_eq!(store.owner_address("svc-a").expect("owner"), None);
}

pub(crate) fn a_release_frees_the_address_and_the_owner(store: &Store) {
    let put = allocate(store, "10.0.0.1", "svc-a");
    let released = release(store, "10.0.0.1");
    assert!(released > put.revision, "{released} after {}", put.revision);
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), None);
    assert_eq!(
        store.record_for_decision(ip("10.0.0.1")).expect("get"),
        None
    );
    assert_eq!(store.owner_address("svc-a").expect("owner"), None);
    assert_eq!(store.owner_for_decision("svc-a").expect("owner"), None);
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

pub(crate) fn scans_are_ordered_by_address_ipv4_first(store: &Store) {
    let written = [
        "fd00::1",
        "10.0.0.10",
        "10.0.0.9",
        "9.255.255.255",
        "10.0.1.0",
    ];
    for (i, a) in written.iter().enumerate() {
        stage_allocate(store, a, &format!("o{i}"));
    }
    flush(store);
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

pub(crate) fn the_history_lists_every_change_by_revision_within_bounds(store: &Store) {
    let a = allocate(store, "10.0.0.1", "svc-a");
    let b = allocate(store, "fd00::2", "svc-b");
    let released = release(store, "10.0.0.1");
    let (r1, r2, r3) = (a.revision, b.revision, released);
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
    assert_eq!(history(store), all);
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

pub(crate) fn resuming_the_history_after_any_change_gives_exactly_the_later_ones(store: &Store) {
    // Flushes of several writes each, as the writer's group commit makes
    // them: a reader that stops after any change and resumes from its
    // revision must get every later change once.
    let flushes: [&[(&str, &str)]; 3] = [
        &[("10.0.0.1", "a"), ("10.0.0.2", "b"), ("fd00::1", "c")],
        &[("10.0.0.2", ""), ("10.0.0.3", "d"), ("10.0.0.4", "e")],
        &[("10.0.0.1", ""), ("fd00::1", ""), ("10.0.0.5", "f")],
    ];
    let mut written = Vec::new();
    for writes in flushes {
        for &(address, owner) in writes {
            match owner {
                "" => stage_release(store, address),
                owner => stage_allocate(store, address, owner),
            }
        }
        written.extend(flush(store));
    }
    assert_eq!(written.len(), 9);
    assert_eq!(history(store), written);
    for (i, change) in written.iter().enumerate() {
        let resumed: Vec<Change> = store
            .changes(change.revision, u64::MAX)
            .map(|c| c.expect("change"))
            .collect();
        assert_eq!(resumed, written[i + 1..], "resumed after {change:?}");
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

pub(crate) fn replaying_the_history_rebuilds_the_committed_allocations(store: &Store) {
    let flushes: [&[(&str, &str)]; 3] = [
        &[("10.0.0.1", "a"), ("fd00::1", "b"), ("10.0.0.2", "c")],
        &[("10.0.0.3", "d"), ("fd00::1", ""), ("10.0.0.4", "b")],
        &[("10.0.0.1", ""), ("fd00::1", "a"), ("10.0.0.2", "")],
    ];
    for writes in flushes {
        for &(address, owner) in writes {
            match owner {
                "" => stage_release(store, address),
                owner => stage_allocate(store, address, owner),
            }
        }
        flush(store);
    }
    let state = committed(store);
    assert_eq!(state.len(), 3, "{state:?}");
    assert_eq!(replay(history(store)), state);
}

pub(crate) fn a_writer_observes_none_of_its_own_changes(store: &Store) {
    drop(store.observed().expect("observed"));
    allocate(store, "10.0.0.1", "a");
    stage_allocate(store, "10.0.0.2", "b");
    stage_release(store, "10.0.0.1");
    let last = flush(store).last().expect("changes").revision;
    let observed = store.observed().expect("observed");
    assert_eq!(
        observed.changes,
        Vec::new(),
        "its own changes came from flush"
    );
    assert!(
        observed.revision >= last,
        "{} before {last}",
        observed.revision
    );
}

/// A failed flush commits none of its writes and leaves none staged.
/// `fail` is called with the writes staged and must make the next flush
/// fail (another writer taking the staged address, the database going
/// away); `mend` is called after the failed flush and must make the store
/// readable again. Returns the error of the failed flush.
pub(crate) fn a_failed_flush_applies_nothing_and_keeps_nothing_staged(
    store: &Store,
    fail: impl FnOnce(&Store),
    mend: impl FnOnce(&Store),
) -> StoreError {
    let kept = allocate(store, "10.0.0.1", "kept");
    stage_allocate(store, "10.0.0.2", "staged");
    stage_release(store, "10.0.0.1");
    fail(store);
    let err = match store.flush() {
        Ok(changes) => panic!("the flush did not fail: {changes:?}"),
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
    assert_eq!(
        store.record_for_decision(ip("10.0.0.1")).expect("get"),
        Some(kept)
    );
    assert_eq!(
        store.record_for_decision(ip("10.0.0.2")).expect("get"),
        store.get(ip("10.0.0.2")).expect("get")
    );
    assert_eq!(
        store.owner_for_decision("staged").expect("owner"),
        store.owner_address("staged").expect("owner")
    );
    let revision = store.revision().expect("rev");
    assert_eq!(flush(store), Vec::new(), "nothing was left staged");
    // A shared store's revision may move on with etcd's (a replica that
    // reconnects writes its sync key), but no change came after.
    assert_eq!(store.changes(revision, u64::MAX).count(), 0);
    err
}
