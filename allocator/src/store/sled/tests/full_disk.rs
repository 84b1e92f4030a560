//! A full disk: a flush refused below the free space the store keeps, a
//! flush that sled fails with ENOSPC, and a failed flush whose batch
//! reached the disk all the same. Each changes nothing, reads go on, and
//! writes resume at the next write once the disk has room, without a
//! restart. The first two
//! fill a tmpfs of their own, which needs root: without it they say
//! `SKIPPED` and return, or fail under `CI`.

use vipam_test_support::tmpfs::{self, Tmpfs};

use super::*;
use crate::store::contract::{self, stage_allocate};

/// Size of each test's disk.
const DISK: u64 = 8 << 20;

/// A store on a tmpfs of its own, keeping `min_free` bytes free; `None`
/// where no tmpfs can be mounted. Drop the store before the disk.
fn mk_on_tmpfs(test: &str, min_free: u64) -> Option<(Tmpfs, SledStore)> {
    let disk = tmpfs::require(test, DISK)?;
    let store = SledStore::open(&disk.path().join("data"), 8 << 20)
        .expect("open")
        .with_min_free(min_free);
    Some((disk, store))
}

/// Asserts that `error` says the disk of `dir` is full.
fn assert_names_the_full_disk(error: &StoreError, dir: &Path, words: &str) {
    let expected = format!("the disk of {} is full{words}", dir.display());
    match error {
        StoreError::Unavailable(why) if why.contains(&expected) => {}
        other => panic!("not UNAVAILABLE naming the full disk ({expected:?}): {other}"),
    }
}

/// The history as (revision, kind, address).
fn history(store: &Store) -> Vec<(u64, ChangeKind, IpAddr)> {
    contract::revisions(store, 0, u64::MAX)
}

#[test]
fn a_flush_below_the_free_space_the_store_keeps_changes_nothing_until_space_is_freed() {
    let test = "a_flush_below_the_free_space_the_store_keeps_changes_nothing_until_space_is_freed";
    let Some((disk, sled)) = mk_on_tmpfs(test, 2 << 20) else {
        return;
    };
    let store = Store::from(sled.clone());
    let kept = contract::allocate(&store, "10.0.0.1", "kept");
    disk.fill().expect("fill the disk");

    stage_allocate(&store, "10.0.0.2", "refused");
    let error = store.flush().expect_err("a flush on a full disk");
    assert_names_the_full_disk(&error, &disk.path().join("data"), ": ");
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), Some(kept.clone()));
    assert_eq!(store.owner_address("refused").expect("owner"), None);
    assert_eq!(store.revision().expect("rev"), kept.revision);
    assert!(store.health().is_ok(), "reads are served");

    disk.free().expect("free the disk");
    let record = contract::allocate(&store, "10.0.0.2", "refused");
    assert_eq!(
        record.revision,
        kept.revision + 1,
        "numbered on from the last durable"
    );
    drop((store, sled));
}

#[test]
fn a_flush_sled_fails_on_a_full_disk_changes_nothing_and_writes_resume_once_space_is_freed() {
    let test =
        "a_flush_sled_fails_on_a_full_disk_changes_nothing_and_writes_resume_once_space_is_freed";
    let Some((disk, sled)) = mk_on_tmpfs(test, 0) else {
        return;
    };
    let data = disk.path().join("data");
    assert!(data.join(RESERVE).is_file(), "the store keeps its reserve");
    let store = Store::from(sled.clone());
    let error = contract::a_failed_flush_applies_nothing_and_keeps_nothing_staged(
        &store,
        |store| {
            disk.fill().expect("fill the disk");
            // More than the rest of sled's last page of log, which a small
            // batch could still fit in.
            for i in 0..64 {
                stage_allocate(store, &format!("10.0.1.{i}"), &format!("more-{i}"));
            }
        },
        |_| {},
    );
    assert_names_the_full_disk(&error, &data, " (No space left on device)");
    assert!(
        !data.join(RESERVE).exists(),
        "the reserve made room to reopen"
    );
    assert!(store.health().is_ok(), "reads are served");
    let revision = store.revision().expect("rev");
    stage_allocate(&store, "10.0.0.3", "after");
    let error = store.flush().expect_err("no room yet");
    assert_names_the_full_disk(&error, &data, ": ");

    disk.free().expect("free the disk");
    let record = contract::allocate(&store, "10.0.0.3", "after");
    assert_eq!(
        record.revision,
        revision + 1,
        "numbered on from the last durable"
    );
    assert!(data.join(RESERVE).is_file(), "the reserve is back");
    let expected = vec![
        (revision, ChangeKind::Allocated, ip("10.0.0.1")),
        (revision + 1, ChangeKind::Allocated, ip("10.0.0.3")),
    ];
    assert_eq!(history(&store), expected, "no change of the failed flush");
    drop((store, sled));

    let reopened = Store::from(SledStore::open(&data, 8 << 20).expect("reopen"));
    assert_eq!(history(&reopened), expected, "none on disk either");
    assert_eq!(reopened.revision().expect("rev"), revision + 1);
    assert_eq!(reopened.owner_address("staged").expect("owner"), None);
    assert_eq!(reopened.addresses().count(), 2);
}

#[test]
fn a_failed_flush_that_reached_the_disk_is_rolled_back_when_the_database_reopens() {
    let (dir, sled) = mk_sled();
    let store = Store::from(sled.clone());
    let kept = contract::allocate(&store, "10.0.0.1", "kept");
    stage_allocate(&store, "10.0.0.2", "lost");
    contract::stage_release(&store, "10.0.0.1");
    // As when sled writes a batch out and then fails: the batch is on disk,
    // and the flush fails.
    let error = {
        let mut staged = sled.staged();
        let batch = staged.take();
        staged.last = staged.committed;
        let db = raw(&sled);
        db.apply_batch(batch.writes).expect("apply");
        db.flush().expect("write out");
        drop(db);
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        sled.failed(batch.before, sled::Error::Io(full), staged.committed)
    };
    assert_names_the_full_disk(&error, dir.path(), " (No space left on device)");

    // Reopened and rolled back at once.
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), Some(kept.clone()));
    assert_eq!(
        store.owner_address("kept").expect("owner"),
        Some(ip("10.0.0.1"))
    );
    assert_eq!(store.owner_address("lost").expect("owner"), None);
    let listed: Vec<IpAddr> = store.addresses().map(|a| a.expect("address")).collect();
    assert_eq!(listed, vec![ip("10.0.0.1")]);
    assert_eq!(store.revision().expect("rev"), kept.revision);

    let record = contract::allocate(&store, "10.0.0.3", "next");
    assert_eq!(record.revision, kept.revision + 1);
    let expected = vec![
        (kept.revision, ChangeKind::Allocated, ip("10.0.0.1")),
        (kept.revision + 1, ChangeKind::Allocated, ip("10.0.0.3")),
    ];
    assert_eq!(history(&store), expected, "the failed flush rolled back");
    drop((store, sled));

    let reopened = Store::from(SledStore::open(dir.path(), 8 << 20).expect("reopen"));
    assert_eq!(history(&reopened), expected, "on disk too");
    assert_eq!(reopened.revision().expect("rev"), kept.revision + 1);
    assert_eq!(reopened.get(ip("10.0.0.1")).expect("get"), Some(kept));
    assert_eq!(reopened.owner_address("lost").expect("owner"), None);
}

#[test]
fn a_store_opens_on_a_full_disk_in_the_room_of_its_reserve_and_writes_once_space_is_freed() {
    let test =
        "a_store_opens_on_a_full_disk_in_the_room_of_its_reserve_and_writes_once_space_is_freed";
    let Some((disk, sled)) = mk_on_tmpfs(test, 2 << 20) else {
        return;
    };
    let data = disk.path().join("data");
    let store = Store::from(sled);
    let kept = contract::allocate(&store, "10.0.0.1", "kept");
    drop(store);
    disk.fill().expect("fill the disk");

    let sled = SledStore::open(&data, 8 << 20)
        .expect("opened in the room of the reserve")
        .with_min_free(2 << 20);
    assert!(
        !data.join(RESERVE).exists(),
        "the reserve made room to open"
    );
    let store = Store::from(sled.clone());
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), Some(kept.clone()));
    assert!(store.health().is_ok(), "reads are served");
    stage_allocate(&store, "10.0.0.2", "refused");
    let error = store.flush().expect_err("no room to write");
    assert_names_the_full_disk(&error, &data, ": ");

    disk.free().expect("free the disk");
    let record = contract::allocate(&store, "10.0.0.2", "after");
    assert_eq!(record.revision, kept.revision + 1);
    assert!(data.join(RESERVE).is_file(), "the reserve is back");
    drop((store, sled));
}
