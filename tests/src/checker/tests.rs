//! The checker's verdicts on small histories known to be good or bad.

use tonic::Code;

use super::{
    Verdict, check, check_partitions, check_whole,
    fixtures::*,
    table::{double_holdings, lost_allocations},
};
use crate::history::{History, Input, Output};

fn assert_linearizable(history: &History, n: u8) {
    let report = check(history, &mk_config(n));
    assert!(report.is_linearizable(), "{report}");
}

fn assert_not_linearizable(history: &History, n: u8) -> String {
    let report = check(history, &mk_config(n));
    match &report.verdict {
        Verdict::NotLinearizable(c) => c.to_string(),
        _ => panic!("expected a violation, got {report}"),
    }
}

#[test]
fn two_owners_acknowledged_the_same_address_at_overlapping_times_is_not_linearizable() {
    let history = mk_history(vec![
        mk_allocate(0, (0, 10), "a", 1),
        mk_allocate(1, (5, 15), "b", 1),
    ]);
    let shown = assert_not_linearizable(&history, 2);
    assert!(shown.contains("address 10.0.0.1"), "{shown}");
    assert_eq!(double_holdings(&history).len(), 1);
}

#[test]
fn one_address_held_by_two_owners_in_turn_with_a_release_between_is_one_holder_at_a_time() {
    let history = mk_history(vec![
        mk_allocate(0, (0, 10), "a", 1),
        mk_release_owner(0, (20, 30), "a", Some(1)),
        mk_allocate(1, (25, 40), "b", 1),
        mk_get_address(1, (50, 60), 1, Some("b")),
    ]);
    assert_linearizable(&history, 2);
    assert!(double_holdings(&history).is_empty());
}

#[test]
fn a_get_after_a_completed_release_that_shows_the_old_holder_is_a_stale_read() {
    let history = mk_history(vec![
        mk_allocate(0, (0, 10), "a", 1),
        mk_release_owner(0, (20, 30), "a", Some(1)),
        mk_get_address(1, (40, 50), 1, Some("a")),
    ]);
    let shown = assert_not_linearizable(&history, 2);
    assert!(shown.contains("10.0.0.1"), "{shown}");
}

#[test]
fn an_acknowledged_allocation_missing_from_the_final_table_is_lost() {
    let history = mk_history(vec![
        mk_allocate(0, (0, 10), "a", 1),
        mk_allocate(1, (0, 10), "b", 2),
    ]);
    let lost = lost_allocations(&history, &[mk_holding(2, "b")]);
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].op.0, 0);
    assert!(lost[0].to_string().contains("owner=a"), "{}", lost[0]);
}

#[test]
fn a_release_of_unknown_outcome_explains_a_missing_allocation() {
    let history = mk_history(vec![
        mk_allocate(0, (0, 10), "a", 1),
        mk_unknown(0, 20, Input::release_owner("a")),
    ]);
    assert!(lost_allocations(&history, &[]).is_empty());
}

#[test]
fn a_release_that_ended_before_the_allocation_explains_nothing() {
    let history = mk_history(vec![
        mk_unknown(0, 0, Input::release_owner("a")),
        mk_release_owner(1, (1, 2), "a", Some(1)),
        mk_allocate(0, (5, 10), "a", 1),
    ]);
    // The unknown release may still have come after: it explains the loss.
    assert!(lost_allocations(&history, &[]).is_empty());
    let history = mk_history(history.ops[1..].to_vec());
    assert_eq!(lost_allocations(&history, &[]).len(), 1);
}

#[test]
fn an_allocate_of_unknown_outcome_explains_a_later_get_that_shows_its_owner_holding() {
    let history = mk_history(vec![
        mk_unknown(0, 0, Input::allocate("a")),
        mk_get_owner(1, (50, 60), "a", Some(2)),
        mk_get_address(1, (70, 80), 2, Some("a")),
        mk_list(2, (90, 95), &[(2, "a")]),
    ]);
    assert_linearizable(&history, 3);
}

#[test]
fn a_get_that_shows_an_owner_holding_with_nothing_to_explain_it_is_not_linearizable() {
    let history = mk_history(vec![mk_get_owner(1, (50, 60), "a", Some(2))]);
    assert_not_linearizable(&history, 3);
}

#[test]
fn an_idempotent_repeat_answering_a_different_address_is_not_linearizable() {
    let history = mk_history(vec![
        mk_allocate(0, (0, 10), "a", 1),
        mk_allocate(0, (20, 30), "a", 2),
    ]);
    let shown = assert_not_linearizable(&history, 3);
    assert!(shown.contains("owner a"), "{shown}");
}

#[test]
fn already_exists_when_the_address_was_free_at_every_possible_point_is_not_linearizable() {
    let refused = mk_refused(Code::AlreadyExists);
    let history = mk_history(vec![
        mk_allocate(0, (0, 10), "a", 1),
        mk_release_owner(0, (20, 30), "a", Some(1)),
        mk_allocate_at(1, (40, 50), "b", 1, refused.clone()),
    ]);
    assert_not_linearizable(&history, 2);
    // Overlapping the release, it may have come first.
    let history = mk_history(vec![
        mk_allocate(0, (0, 10), "a", 1),
        mk_release_owner(0, (20, 30), "a", Some(1)),
        mk_allocate_at(1, (25, 50), "b", 1, refused),
    ]);
    assert_linearizable(&history, 2);
}

#[test]
fn concurrent_operations_that_fit_only_one_order_are_linearizable() {
    // Only: a takes .1, the Get sees a, the release frees it, b takes it.
    let history = mk_history(vec![
        mk_allocate_at(
            0,
            (0, 100),
            "a",
            1,
            Output::Allocated {
                address: mk_addr(1),
                revision: 0,
            },
        ),
        mk_release_address(1, (10, 90), 1, Some("a")),
        mk_get_address(2, (20, 80), 1, Some("a")),
        mk_allocate(3, (30, 95), "b", 1),
        mk_list(4, (0, 99), &[(1, "b")]),
    ]);
    assert_linearizable(&history, 1);
}

#[test]
fn resource_exhausted_is_linearizable_only_when_every_address_is_held() {
    let exhausted = |span| {
        mk_op(
            2,
            span,
            Input::allocate("c"),
            mk_refused(Code::ResourceExhausted),
        )
    };
    let mut ops = vec![
        mk_allocate(0, (0, 10), "a", 1),
        mk_allocate(1, (0, 10), "b", 2),
        exhausted((20, 30)),
    ];
    assert_linearizable(&mk_history(ops.clone()), 2);
    ops.push(mk_release_owner(0, (12, 15), "a", Some(1)));
    assert_not_linearizable(&mk_history(ops), 2);
}

#[test]
fn partitions_alone_miss_orders_that_disagree() {
    // The address says the allocation came before the refusal, the owner
    // says its empty Get came before the allocation; in real time the
    // refusal ended before the Get began.
    let allocated = Output::Allocated {
        address: mk_addr(1),
        revision: 0,
    };
    let history = mk_history(vec![
        mk_allocate_at(0, (0, 100), "o", 1, allocated),
        mk_allocate_at(1, (10, 20), "p", 1, mk_refused(Code::AlreadyExists)),
        mk_get_owner(2, (30, 40), "o", None),
    ]);
    assert!(check_partitions(&history, &mk_config(1)).is_linearizable());
    assert!(!check_whole(&history, &mk_config(1)).is_linearizable());
    assert_not_linearizable(&history, 1);
}

#[test]
fn partitions_alone_miss_an_exhaustion_with_an_address_free_throughout() {
    // .1 is held until 30, .2 from 40: never both while the refusal ran.
    let history = mk_history(vec![
        mk_allocate(0, (0, 10), "a", 1),
        mk_release_owner(0, (20, 30), "a", Some(1)),
        mk_allocate(1, (40, 50), "b", 2),
        mk_op(
            2,
            (5, 60),
            Input::allocate("c"),
            mk_refused(Code::ResourceExhausted),
        ),
    ]);
    assert!(check_partitions(&history, &mk_config(2)).is_linearizable());
    assert_not_linearizable(&history, 2);
}

#[test]
fn an_unknown_allocate_of_an_owner_never_seen_again_explains_already_exists() {
    let history = mk_history(vec![
        mk_unknown(0, 0, Input::allocate("ghost")),
        mk_allocate_at(1, (10, 20), "b", 1, mk_refused(Code::AlreadyExists)),
        mk_unknown(2, 30, Input::release_address(mk_addr(1))),
        mk_get_address(1, (40, 50), 1, None),
    ]);
    assert!(check_partitions(&history, &mk_config(1)).is_linearizable());
    assert_linearizable(&history, 1);
}

#[test]
fn an_answer_no_state_explains_is_reported_alone() {
    let history = mk_history(vec![
        mk_allocate(0, (0, 10), "a", 1),
        mk_allocate_at(
            0,
            (20, 30),
            "a",
            2,
            Output::Allocated {
                address: mk_addr(3),
                revision: 0,
            },
        ),
    ]);
    let shown = assert_not_linearizable(&history, 3);
    assert!(shown.contains("one operation"), "{shown}");
    assert_eq!(shown.lines().count(), 2, "{shown}");
}

#[test]
fn a_failure_is_shown_as_the_shortest_failing_prefix_one_operation_a_line() {
    let mut ops = vec![
        mk_allocate(0, (0, 10), "a", 1),
        mk_allocate(1, (5, 15), "b", 1),
    ];
    for t in 1..20 {
        ops.push(mk_get_owner(2, (100 * t, 100 * t + 10), "c", None));
        ops.push(mk_list(2, (100 * t + 20, 100 * t + 30), &[(1, "a")]));
    }
    let shown = assert_not_linearizable(&mk_history(ops), 2);
    // The two allocations: the later calls are cut.
    let ops: Vec<&str> = shown.lines().filter(|l| l.starts_with("  #")).collect();
    assert_eq!(ops.len(), 2, "{shown}");
    assert!(
        ops[0].contains("owner=a") && ops[1].contains("owner=b"),
        "{shown}"
    );
}

#[test]
fn a_search_past_its_bound_gives_up_and_says_so() {
    let ops = (0..8)
        .map(|i| mk_allocate(i, (0, 100), &format!("o{i}"), i as u8 + 1))
        .collect();
    let mut config = mk_config(8);
    config.max_states = 3;
    let report = check(&mk_history(ops), &config);
    assert!(matches!(report.verdict, Verdict::GaveUp { .. }), "{report}");
    assert!(report.to_string().contains("gave up"), "{report}");
    assert!(!report.is_linearizable());
}

#[test]
fn refusals_that_do_not_depend_on_the_table_are_left_out() {
    let history = mk_history(vec![
        mk_op(
            0,
            (0, 10),
            Input::allocate("a"),
            mk_refused(Code::InvalidArgument),
        ),
        mk_op(
            0,
            (20, 30),
            Input::get_owner("a"),
            mk_refused(Code::NotFound),
        ),
    ]);
    assert_linearizable(&history, 1);
}
