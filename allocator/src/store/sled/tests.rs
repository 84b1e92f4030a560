//! The sled engine's own promises, beyond the contract: what survives a
//! reopen, the directory lock, the kept change history, unreadable entries;
//! a full disk in [`full_disk`].

mod full_disk;

use std::time::Instant;

use super::{keys::TAG_V4, *};
use crate::{
    fixtures::{ip, mk_labelled_record, mk_sled},
    model::ChangeKind,
    store::{Store, contract::store_contract},
};

/// Stages the allocation of `ip` to `record.owner`.
fn put(store: &SledStore, ip: IpAddr, record: &Record) {
    store.stage(Write::allocate(ip, record)).expect("put");
}

/// Stages the release of the allocation `record` at `ip`.
fn delete(store: &SledStore, ip: IpAddr, record: &Record) {
    store.stage(Write::release(ip, record)).expect("delete");
}

/// The changes after `after` up to `last` as (revision, kind, address).
fn revisions(store: &SledStore, after: u64, last: u64) -> Vec<(u64, ChangeKind, IpAddr)> {
    crate::store::contract::revisions(&Store::from(store.clone()), after, last)
}

/// The database under the store, to write to it as sled would not.
fn raw(store: &SledStore) -> sled::Db {
    store.view().expect("a database").db
}

/// Allocates 10.0.0.1 to `svc-a` (revision 1) and fd00::2 to `svc-b` (2),
/// releases 10.0.0.1 (3), and flushes.
fn write_three(store: &SledStore) {
    put(store, ip("10.0.0.1"), &mk_labelled_record("svc-a", 1));
    put(store, ip("fd00::2"), &mk_labelled_record("svc-b", 2));
    delete(store, ip("10.0.0.1"), &mk_labelled_record("svc-a", 1));
    store.flush().expect("flush");
}

/// A store opened on a directory whose previous store `write` wrote to
/// and which was then closed.
fn reopened(write: impl FnOnce(&SledStore)) -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&SledStore::open(dir.path(), 8 << 20).expect("open"));
    let store = SledStore::open(dir.path(), 8 << 20).expect("reopen");
    (dir, store)
}

store_contract!(mk_sled());

#[test]
fn a_new_store_is_at_revision_zero_with_no_history() {
    let (_dir, store) = mk_sled();
    assert_eq!(store.revision().expect("rev"), 0);
    assert_eq!(store.first_change().expect("first"), None);
}

#[test]
fn each_write_of_a_flush_is_a_change_numbered_in_the_order_it_was_staged() {
    let (_dir, store) = mk_sled();
    // Given revisions are the store's to replace.
    put(&store, ip("10.0.0.1"), &mk_labelled_record("svc-a", 9));
    put(&store, ip("fd00::2"), &mk_labelled_record("svc-b", 9));
    delete(&store, ip("10.0.0.1"), &mk_labelled_record("svc-a", 1));
    assert_eq!(store.revision().expect("rev"), 0, "nothing committed yet");
    assert_eq!(store.changes(0, 3).count(), 0, "nothing applied yet");
    let expected = vec![
        Change {
            revision: 1,
            kind: ChangeKind::Allocated,
            address: ip("10.0.0.1"),
            record: mk_labelled_record("svc-a", 1),
        },
        Change {
            revision: 2,
            kind: ChangeKind::Allocated,
            address: ip("fd00::2"),
            record: mk_labelled_record("svc-b", 2),
        },
        Change {
            revision: 3,
            kind: ChangeKind::Released,
            address: ip("10.0.0.1"),
            record: mk_labelled_record("svc-a", 1),
        },
    ];
    assert_eq!(store.flush().expect("flush"), expected);
    assert_eq!(
        store
            .changes(0, 3)
            .map(|c| c.expect("change"))
            .collect::<Vec<_>>(),
        expected,
        "the address written twice in the flush is two changes"
    );
    assert_eq!(store.revision().expect("rev"), 3);
    assert_eq!(store.first_change().expect("first"), Some(1));
}

#[test]
fn a_copy_numbers_its_writes_after_the_revision_it_is_given() {
    let (_dir, store) = mk_sled();
    store.number_after(41);
    put(&store, ip("10.0.0.1"), &mk_labelled_record("svc-a", 0));
    let changes = store.flush().expect("flush");
    assert_eq!(changes[0].revision, 42);
    assert_eq!(store.revision().expect("rev"), 42);
}

#[test]
fn staged_writes_that_were_never_flushed_are_not_on_disk() {
    let (_dir, store) = reopened(|store| {
        put(store, ip("10.0.0.1"), &mk_labelled_record("svc-a", 1));
        store.flush().expect("flush");
        put(store, ip("10.0.0.2"), &mk_labelled_record("svc-b", 2));
    });
    assert_eq!(store.get(ip("10.0.0.2")).expect("get"), None);
    assert_eq!(store.owner_address("svc-b").expect("owner"), None);
    assert_eq!(store.revision().expect("rev"), 1);
    assert_eq!(store.addresses().count(), 1);
}

#[test]
fn flushed_writes_survive_reopen() {
    let (_dir, store) = reopened(write_three);
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), None);
    assert_eq!(
        store.get(ip("fd00::2")).expect("get"),
        Some(mk_labelled_record("svc-b", 2))
    );
    assert_eq!(
        store.owner_address("svc-b").expect("owner"),
        Some(ip("fd00::2"))
    );
    assert_eq!(store.revision().expect("rev"), 3);
    let index: Vec<(String, IpAddr)> = store.owner_index().map(|r| r.expect("index")).collect();
    assert_eq!(index, vec![("svc-b".to_string(), ip("fd00::2"))]);
}

#[test]
fn a_database_exists_in_a_directory_only_once_a_store_was_opened_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(!SledStore::exists_in(dir.path()));
    assert!(!SledStore::exists_in(&dir.path().join("missing")));
    drop(SledStore::open(dir.path(), 8 << 20).expect("open"));
    assert!(SledStore::exists_in(dir.path()));
}

#[test]
fn a_directory_held_by_an_open_store_is_refused_after_the_lock_wait() {
    let (dir, _store) = mk_sled();
    let started = Instant::now();
    let err = match SledStore::open(dir.path(), 8 << 20) {
        Ok(_) => panic!("a second store opened a directory in use"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("could not acquire lock"), "{err}");
    assert!(started.elapsed() >= LOCK_WAIT, "it waited for the lock");
}

#[test]
fn a_directory_whose_store_was_just_closed_reopens() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Each close leaves sled's thread to release the lock a moment
    // later; enough rounds that opening right away would hit that.
    for round in 0..100u64 {
        let store = SledStore::open(dir.path(), 8 << 20).expect("reopen");
        assert_eq!(store.revision().expect("rev"), round);
        let addr = IpAddr::from([10, 0, 0, round as u8 + 1]);
        put(
            &store,
            addr,
            &mk_labelled_record(&format!("o{round}"), round + 1),
        );
        store.flush().expect("flush");
    }
}

#[test]
fn an_unreadable_record_is_an_error_not_a_panic() {
    let (_dir, store) = mk_sled();
    raw(&store)
        .insert(alloc_key(ip("10.0.0.1")), b"not json".to_vec())
        .expect("raw insert");
    assert!(matches!(
        store.get(ip("10.0.0.1")),
        Err(StoreError::Corrupt { .. })
    ));
    raw(&store)
        .insert([ALLOC, TAG_V4, 1], b"{}".to_vec())
        .expect("raw insert");
    assert!(
        store
            .addresses()
            .any(|r| matches!(r, Err(StoreError::Corrupt { .. })))
    );
}

#[test]
fn the_change_log_survives_reopen() {
    let (_dir, store) = reopened(|store| {
        put(store, ip("10.0.0.1"), &mk_labelled_record("svc-a", 1));
        delete(store, ip("10.0.0.1"), &mk_labelled_record("svc-a", 1));
        store.flush().expect("flush");
    });
    assert_eq!(
        revisions(&store, 0, u64::MAX),
        vec![
            (1, ChangeKind::Allocated, ip("10.0.0.1")),
            (2, ChangeKind::Released, ip("10.0.0.1")),
        ]
    );
}

#[test]
fn the_change_log_keeps_exactly_the_last_history_revisions() {
    let (_dir, store) = mk_sled();
    let store = store.with_history(3);
    assert_eq!(store.first_change().expect("first"), None);
    for r in 1..=10u64 {
        let addr = IpAddr::from([10, 0, 0, r as u8]);
        put(&store, addr, &mk_labelled_record(&format!("o{r}"), r));
        if r % 4 == 0 {
            // Trimming works within one staged batch and across batches.
            store.flush().expect("flush");
        }
    }
    store.flush().expect("flush");
    assert_eq!(store.first_change().expect("first"), Some(8));
    let kept: Vec<u64> = revisions(&store, 0, 10).iter().map(|c| c.0).collect();
    assert_eq!(kept, vec![8, 9, 10]);
    delete(
        &store,
        IpAddr::from([10, 0, 0, 1]),
        &mk_labelled_record("o1", 1),
    );
    store.flush().expect("flush");
    let kept: Vec<u64> = revisions(&store, 0, 11).iter().map(|c| c.0).collect();
    assert_eq!(kept, vec![9, 10, 11], "a release trims too");
}

#[test]
fn a_shortened_history_is_trimmed_after_reopen() {
    let (_dir, store) = reopened(|store| {
        for r in 1..=20u64 {
            let addr = IpAddr::from([10, 0, 0, r as u8]);
            put(store, addr, &mk_labelled_record(&format!("o{r}"), r));
        }
        store.flush().expect("flush");
    });
    let store = store.with_history(5);
    assert_eq!(store.first_change().expect("first"), Some(1));
    assert_eq!(store.trim_history().expect("trim"), 15);
    assert_eq!(store.first_change().expect("first"), Some(16));
    assert_eq!(store.trim_history().expect("trim again"), 0);
    put(&store, ip("10.0.1.1"), &mk_labelled_record("o21", 21));
    store.flush().expect("flush");
    let kept: Vec<u64> = revisions(&store, 0, 21).iter().map(|c| c.0).collect();
    assert_eq!(kept, vec![17, 18, 19, 20, 21]);
    // The allocations themselves are untouched.
    assert_eq!(store.addresses().count(), 21);
}

#[test]
fn an_unreadable_change_is_an_error_not_a_panic() {
    let (_dir, store) = mk_sled();
    raw(&store)
        .insert(change_key(1), b"?garbage".to_vec())
        .expect("raw insert");
    raw(&store)
        .insert(change_key(2), b"+a".to_vec())
        .expect("raw insert");
    let results: Vec<_> = store.changes(0, 2).collect();
    assert_eq!(results.len(), 2);
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(StoreError::Corrupt { .. })))
    );
}
