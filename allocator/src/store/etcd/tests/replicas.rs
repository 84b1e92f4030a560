//! Replicas sharing one etcd: a race for an address, an owner or a release
//! has one winner and a [`StoreError::Conflict`] for the others, whose
//! committed reads then show the winner; every replica observes every
//! write in revision order, and one opened later replays what came before
//! (what etcd has not compacted).

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use super::{Etcd, eventually};
use crate::{
    fixtures::{ip, mk_labelled_record},
    model::{Change, ChangeKind},
    store::{
        Store, StoreError,
        contract::{
            a_failed_flush_applies_nothing_and_keeps_nothing_staged, allocate, flush, release,
            stage_allocate, stage_release,
        },
        etcd::keys,
    },
};

/// Two replicas on one etcd, or `None` when etcd cannot run here.
fn mk_replicas(test: &str) -> Option<(Etcd, Store, Store)> {
    let etcd = Etcd::start(test)?;
    let (a, b) = (etcd.open(), etcd.open());
    Some((etcd, a, b))
}

/// Flushes `winner` then `loser`, both with one write staged that cannot
/// both commit: the revision of the winner's change; the loser must fail
/// with a conflict seen at or after it.
fn race(winner: &Store, loser: &Store) -> u64 {
    let won = match flush(winner).as_slice() {
        [change] => change.revision,
        other => panic!("the first flush made {other:?}"),
    };
    match loser.flush() {
        Err(StoreError::Conflict { seen }) => {
            assert!(seen >= won, "conflict seen at {seen}, before the win {won}");
        }
        other => panic!("the second flush was not a conflict: {other:?}"),
    }
    won
}

/// Waits until `store`'s committed copy shows `address` as `expected`.
fn wait_for_address(store: &Store, address: &str, expected: Option<&str>) {
    eventually(&format!("{address} held by {expected:?}"), || {
        let held = store.get(ip(address)).expect("get");
        (held.as_ref().map(|r| r.owner.as_str()) == expected).then_some(())
    });
}

#[test]
fn replicas_racing_for_one_address_for_two_owners_commit_one() {
    let Some((_etcd, a, b)) =
        mk_replicas("replicas_racing_for_one_address_for_two_owners_commit_one")
    else {
        return;
    };
    stage_allocate(&a, "10.0.0.1", "owner-a");
    stage_allocate(&b, "10.0.0.1", "owner-b");
    let won = race(&a, &b);
    let winner = mk_labelled_record("owner-a", won);
    // The loser's committed reads have caught up, and nothing stays staged.
    assert_eq!(b.get(ip("10.0.0.1")).expect("get"), Some(winner.clone()));
    assert_eq!(
        b.record_for_decision(ip("10.0.0.1")).expect("get"),
        Some(winner)
    );
    assert_eq!(
        b.owner_address("owner-a").expect("owner"),
        Some(ip("10.0.0.1"))
    );
    assert_eq!(b.owner_address("owner-b").expect("owner"), None);
    assert_eq!(b.owner_for_decision("owner-b").expect("owner"), None);
    // Deciding again on what it now sees commits.
    let again = allocate(&b, "10.0.0.2", "owner-b");
    wait_for_address(&a, "10.0.0.2", Some("owner-b"));
    assert_eq!(a.get(ip("10.0.0.2")).expect("get"), Some(again));
}

#[test]
fn replicas_racing_to_give_one_owner_two_addresses_commit_one() {
    let Some((_etcd, a, b)) =
        mk_replicas("replicas_racing_to_give_one_owner_two_addresses_commit_one")
    else {
        return;
    };
    stage_allocate(&a, "10.0.0.1", "owner");
    stage_allocate(&b, "10.0.0.2", "owner");
    let won = race(&a, &b);
    assert_eq!(
        b.owner_address("owner").expect("owner"),
        Some(ip("10.0.0.1"))
    );
    assert_eq!(
        b.owner_for_decision("owner").expect("owner"),
        Some(ip("10.0.0.1"))
    );
    assert_eq!(
        b.get(ip("10.0.0.1")).expect("get"),
        Some(mk_labelled_record("owner", won))
    );
    assert_eq!(b.get(ip("10.0.0.2")).expect("get"), None);
    assert_eq!(b.record_for_decision(ip("10.0.0.2")).expect("get"), None);
    let all: Vec<_> = b.addresses().map(|r| r.expect("address")).collect();
    assert_eq!(all, vec![ip("10.0.0.1")]);
}

#[test]
fn replicas_racing_to_release_one_allocation_commit_one() {
    let Some((_etcd, a, b)) = mk_replicas("replicas_racing_to_release_one_allocation_commit_one")
    else {
        return;
    };
    allocate(&a, "10.0.0.1", "owner");
    wait_for_address(&b, "10.0.0.1", Some("owner"));
    stage_release(&a, "10.0.0.1");
    stage_release(&b, "10.0.0.1");
    let won = race(&a, &b);
    assert_eq!(b.get(ip("10.0.0.1")).expect("get"), None);
    assert_eq!(b.owner_address("owner").expect("owner"), None);
    let released: Vec<(u64, ChangeKind)> = b
        .changes(0, u64::MAX)
        .map(|c| c.expect("change"))
        .filter(|c| c.kind == ChangeKind::Released)
        .map(|c| (c.revision, c.kind))
        .collect();
    assert_eq!(released, vec![(won, ChangeKind::Released)], "released once");
}

#[test]
fn a_failed_flush_applies_nothing_and_keeps_nothing_staged_after_a_lost_race() {
    let Some((_etcd, a, b)) =
        mk_replicas("a_failed_flush_applies_nothing_and_keeps_nothing_staged_after_a_lost_race")
    else {
        return;
    };
    let err = a_failed_flush_applies_nothing_and_keeps_nothing_staged(
        &a,
        |_| {
            allocate(&b, "10.0.0.2", "other");
        },
        |_| {},
    );
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(
        a.get(ip("10.0.0.2")).expect("get").map(|r| r.owner),
        Some("other".to_string()),
        "the other replica's write is seen"
    );
}

/// Takes what `store` observed until it holds `n` changes.
fn observe(store: &Store, n: usize) -> Vec<Change> {
    let mut seen = Vec::new();
    eventually(&format!("{n} changes observed"), || {
        seen.extend(store.observed().expect("observed").changes);
        (seen.len() >= n).then_some(())
    });
    assert_eq!(seen.len(), n, "no more than written: {seen:?}");
    seen
}

/// Writes through `store` one allocation, then a batch of an allocation
/// and a release, then one release: the changes they made, in order.
fn write_some(store: &Store) -> Vec<Change> {
    let change = |revision, kind, address: &str, owner: &str, created| Change {
        revision,
        kind,
        address: ip(address),
        record: mk_labelled_record(owner, created),
    };
    let r1 = allocate(store, "10.0.0.1", "a").revision;
    stage_allocate(store, "fd00::1", "b");
    stage_release(store, "10.0.0.1");
    let batch = flush(store);
    let (r2, r3) = (batch[0].revision, batch[1].revision);
    let r4 = release(store, "fd00::1");
    assert!(r1 < r2 && r2 < r3 && r3 < r4);
    // One transaction, two changes of their own: etcd reports its keys in
    // order.
    assert_eq!(keys::etcd_revision(r2), keys::etcd_revision(r3));
    vec![
        change(r1, ChangeKind::Allocated, "10.0.0.1", "a", r1),
        change(r2, ChangeKind::Released, "10.0.0.1", "a", r1),
        change(r3, ChangeKind::Allocated, "fd00::1", "b", r3),
        change(r4, ChangeKind::Released, "fd00::1", "b", r3),
    ]
}

#[test]
fn a_replica_observes_the_others_writes_in_revision_order_and_replays_them() {
    let Some((_etcd, a, b)) =
        mk_replicas("a_replica_observes_the_others_writes_in_revision_order_and_replays_them")
    else {
        return;
    };
    let wakes = Arc::new(AtomicUsize::new(0));
    let counter = wakes.clone();
    b.on_observed(Box::new(move || {
        counter.fetch_add(1, Ordering::Relaxed);
    }));
    let written = write_some(&a);
    assert_eq!(observe(&b, written.len()), written);
    assert!(wakes.load(Ordering::Relaxed) > 0, "the writer was woken");
    let replayed: Vec<Change> = b.changes(0, u64::MAX).map(|c| c.expect("change")).collect();
    assert_eq!(replayed, written);
    // The writer's own commits came back to it from its flushes.
    assert_eq!(a.observed().expect("observed").changes, Vec::new());
    assert!(b.revision().expect("rev") >= written[3].revision);
}

#[test]
fn a_replica_opened_later_replays_history_from_before_it_started() {
    let Some((etcd, a, _)) =
        mk_replicas("a_replica_opened_later_replays_history_from_before_it_started")
    else {
        return;
    };
    let written = write_some(&a);
    let first = written[0].revision;
    let c = etcd.open();
    eventually("the history replayed up to the copy", || {
        matches!(c.first_change(), Ok(Some(from)) if from <= first).then_some(())
    });
    let replayed: Vec<Change> = c.changes(0, u64::MAX).map(|c| c.expect("change")).collect();
    assert_eq!(replayed, written);
    let before: Vec<Change> = c
        .changes(first, written[2].revision)
        .map(|c| c.expect("change"))
        .collect();
    assert_eq!(before, written[1..3], "bounded by revision");
    assert_eq!(
        c.observed().expect("observed").changes,
        Vec::new(),
        "what it loaded is not news to its writer"
    );
    let later = allocate(&a, "10.0.0.9", "later");
    let news = observe(&c, 1);
    assert_eq!(news[0].record, later);
    assert_eq!(news[0].kind, ChangeKind::Allocated);
}

#[test]
fn a_replica_opened_after_a_compaction_replays_what_came_after_it() {
    let Some((etcd, a, _)) =
        mk_replicas("a_replica_opened_after_a_compaction_replays_what_came_after_it")
    else {
        return;
    };
    let written = write_some(&a);
    let compacted = i64::try_from(keys::etcd_revision(written[2].revision)).expect("a revision");
    let endpoints = etcd.cluster().endpoints();
    etcd.block_on(async {
        let mut client = etcd_client::Client::connect(endpoints, None)
            .await
            .expect("connect");
        client.compact(compacted, None).await.expect("compact");
    });
    let c = etcd.open();
    let after = keys::change_revision(compacted + 1, 0);
    eventually("the history replayed after the compaction", || {
        matches!(c.first_change(), Ok(Some(from)) if from == after).then_some(())
    });
    let replayed: Vec<Change> = c.changes(0, u64::MAX).map(|c| c.expect("change")).collect();
    assert_eq!(replayed, written[3..]);
    let later = allocate(&a, "10.0.0.9", "later");
    let news = observe(&c, 1);
    assert_eq!(news[0].record, later);
}
