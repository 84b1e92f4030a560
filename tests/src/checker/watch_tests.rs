//! The Watch checks' verdicts on streams known to be good or bad.

use super::{
    fixtures::*,
    watch::{WatchViolation, check_watches},
};
use crate::history::{History, Input, Output, WatchKind::*, WatchRecord};

/// Two changes then a release, as every replica should show them.
fn mk_changes() -> Vec<WatchRecord> {
    vec![
        mk_event(SnapshotComplete, 0, None),
        mk_event(Allocated, 1000, Some((1, "a"))),
        mk_event(Allocated, 2000, Some((2, "b"))),
        mk_event(Released, 3000, Some((1, "a"))),
        mk_event(Progress, 4000, None),
    ]
}

fn violations(streams: Vec<Vec<WatchRecord>>, history: &History) -> Vec<WatchViolation> {
    let streams: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, events)| mk_stream(&format!("r{i}"), events))
        .collect();
    check_watches(&streams, Some(&[mk_holding(2, "b")]), history)
}

fn assert_found(found: &[WatchViolation], words: &str) {
    assert!(
        found.iter().any(|v| v.to_string().contains(words)),
        "no violation saying {words:?} in {found:#?}"
    );
}

#[test]
fn replicas_that_show_the_same_changes_from_any_snapshot_pass() {
    let resumed = vec![
        mk_event(Snapshot, 0, Some((1, "a"))),
        mk_event(SnapshotComplete, 1500, None),
        mk_event(Allocated, 2000, Some((2, "b"))),
        mk_event(Progress, 2500, None),
        mk_event(Released, 3000, Some((1, "a"))),
    ];
    let found = violations(vec![mk_changes(), resumed], &History::default());
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn a_stream_with_a_gap_disagrees_with_one_that_covers_the_missing_change() {
    let mut gap = mk_changes();
    gap.remove(2);
    let found = violations(vec![mk_changes(), gap], &History::default());
    assert_found(&found, "watch of r1: at revision 2000 shows no change");
    assert_found(
        &found,
        "watch of r1: ends with a table unlike the final one",
    );
}

#[test]
fn a_duplicated_event_is_reported() {
    let mut twice = mk_changes();
    twice.insert(2, mk_event(Allocated, 1000, Some((1, "a"))));
    let found = violations(vec![twice], &History::default());
    assert_found(
        &found,
        "event 2 (Allocated revision 1000 10.0.0.1=a) does not follow",
    );
}

#[test]
fn an_out_of_order_revision_is_reported() {
    let mut swapped = mk_changes();
    swapped.swap(1, 2);
    let found = violations(vec![swapped], &History::default());
    assert_found(
        &found,
        "event 2 (Allocated revision 1000 10.0.0.1=a) does not follow",
    );
}

#[test]
fn two_replicas_that_disagree_on_a_revision_are_reported() {
    let mut other = mk_changes();
    other[2] = mk_event(Allocated, 2000, Some((3, "b")));
    other[3] = mk_event(Released, 2500, Some((3, "b")));
    let found = violations(vec![mk_changes(), other], &History::default());
    assert_found(
        &found,
        "watch of r1: at revision 2000 shows ALLOCATED 10.0.0.3=b",
    );
    assert_found(&found, "watch of r0: at revision 2500 shows no change");
}

#[test]
fn a_change_that_does_not_fit_the_table_is_reported() {
    let mut freed_twice = mk_changes();
    freed_twice.insert(4, mk_event(Released, 3500, Some((1, "a"))));
    let found = violations(vec![freed_twice], &History::default());
    assert_found(&found, "releases 10.0.0.1=a, but the address is free");
    let mut two = mk_changes();
    two[2] = mk_event(Allocated, 2000, Some((2, "a")));
    assert_found(
        &violations(vec![two], &History::default()),
        "but a already holds 10.0.0.1",
    );
}

#[test]
fn an_acknowledged_allocation_missing_from_a_stream_that_covers_its_revision_is_reported() {
    let allocated = Output::Allocated {
        address: mk_addr(2),
        revision: 2500,
    };
    let history = mk_history(vec![mk_op(0, (0, 10), Input::allocate("b"), allocated)]);
    let found = violations(vec![mk_changes()], &history);
    assert_found(
        &found,
        "covers revision 2500 and shows no change there, but #0",
    );
    let allocated = Output::Allocated {
        address: mk_addr(2),
        revision: 2000,
    };
    let history = mk_history(vec![mk_op(0, (0, 10), Input::allocate("b"), allocated)]);
    assert!(violations(vec![mk_changes()], &history).is_empty());
}

#[test]
fn a_snapshot_unlike_the_table_another_stream_built_is_reported() {
    let stale = vec![
        mk_event(Snapshot, 0, Some((1, "a"))),
        mk_event(Snapshot, 0, Some((2, "b"))),
        mk_event(SnapshotComplete, 3500, None),
    ];
    let found = violations(vec![mk_changes(), stale], &History::default());
    assert_found(&found, "watch of r0: builds another table by revision 3500");
}
