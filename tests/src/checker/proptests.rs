//! Property tests on runs of a simulated correct allocator ([`super::sim`]):
//! they pass every check; one wrong answer in a sequential run is
//! rejected; partitions never reject what the whole search accepts, and
//! what a failure shows fails on its own.

use proptest::{collection::vec, prelude::*};
use tonic::Code;

use super::{
    Verdict, check, check_partitions, check_whole,
    fixtures::{mk_addr, mk_config, mk_history},
    sim::{Intent, Reference, input, intents_from_seed, private_owners, simulate, stream},
    table::{double_holdings, lost_allocations},
    watch::check_watches,
};
use crate::history::{History, Holding, Input, Output};

fn intent() -> impl Strategy<Value = Intent> {
    let numbers = (any::<[u8; 3]>(), 0u16..50, 0u16..400, any::<[u8; 3]>());
    numbers.prop_map(
        |([kind, owner, address], think, took, [at, fate, pick])| Intent {
            kind,
            owner,
            address,
            think,
            took,
            at,
            fate,
            pick,
        },
    )
}

fn show(history: &History) -> String {
    let lines: Vec<String> = history
        .ops
        .iter()
        .enumerate()
        .map(|(i, op)| format!("#{i} {op}"))
        .collect();
    lines.join("\n")
}

/// Whether a correct allocator in state `before` may answer `input` with
/// `output` (revisions aside).
fn allows(before: &Reference, input: &Input, output: &Output) -> bool {
    let mut after = before.clone();
    if let Input::Allocate {
        owner,
        address: None,
        ..
    } = input
        && before.of(owner).is_none()
    {
        let free =
            |a: &std::net::IpAddr| before.usable.contains(a) && !before.table.contains_key(a);
        return match output {
            Output::Allocated { address, .. } => free(address),
            Output::Refused { code, .. } => {
                *code == Code::ResourceExhausted && !before.usable.iter().any(free)
            }
            _ => false,
        };
    }
    let expected = after.apply(input, 0);
    match (&expected, output) {
        (Output::Allocated { address: a, .. }, Output::Allocated { address: b, .. }) => a == b,
        (Output::Refused { code: a, .. }, Output::Refused { code: b, .. }) => a == b,
        _ => expected == *output,
    }
}

/// Another answer to `input` than `output`, chosen by `choice`.
fn mutate(input: &Input, output: &Output, choice: u8, addresses: u8) -> Option<Output> {
    let address = mk_addr(choice % addresses + 1);
    let owner = format!("o{}", choice % addresses);
    let holding = match input {
        Input::Release {
            owner: Some(o),
            address: x,
        }
        | Input::Get {
            owner: Some(o),
            address: x,
        } => Holding::new(x.unwrap_or(address), o.as_str()),
        Input::Release {
            address: Some(x), ..
        }
        | Input::Get {
            address: Some(x), ..
        } => Holding::new(*x, owner.as_str()),
        _ => Holding::new(address, owner.as_str()),
    };
    Some(match output {
        Output::Allocated { revision, .. } => Output::Allocated {
            address,
            revision: *revision,
        },
        Output::Released(Some(_)) => Output::Released(None),
        Output::Released(None) => Output::Released(Some(holding)),
        Output::Got(Some(_)) => Output::Got(None),
        Output::Got(None) => Output::Got(Some(holding)),
        Output::Listed(table) if choice.is_multiple_of(2) && !table.is_empty() => {
            let mut table = table.clone();
            table.remove(usize::from(choice) % table.len());
            Output::Listed(table)
        }
        Output::Listed(table) => {
            let mut table = table.clone();
            table.push(holding);
            Output::Listed(table)
        }
        Output::Refused { .. } if matches!(input, Input::Allocate { .. }) => Output::Allocated {
            address,
            revision: 0,
        },
        Output::Refused { .. } => Output::Released(None),
        Output::Unknown(_) => return None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn runs_of_a_correct_allocator_pass_every_check(
        intents in vec(intent(), 1..120),
        clients in 1usize..7,
        addresses in 1u8..6,
        extra_owners in 0u8..2,
        cuts in vec(any::<usize>(), 1..4),
    ) {
        let (history, reference) = simulate(&intents, clients, addresses + extra_owners, addresses);
        let report = check(&history, &mk_config(addresses));
        prop_assert!(report.is_linearizable(), "{report}\n{}", show(&history));
        prop_assert!(double_holdings(&history).is_empty());
        let end = reference.listed();
        prop_assert!(lost_allocations(&history, &end).is_empty());
        let streams: Vec<_> = cuts
            .iter()
            .enumerate()
            .map(|(i, cut)| stream(&reference, &format!("r{i}"), cut % (reference.changes.len() + 1)))
            .collect();
        let found = check_watches(&streams, Some(&end), &history);
        prop_assert!(found.is_empty(), "{found:#?}");
    }

    #[test]
    fn one_wrong_answer_in_a_sequential_run_is_rejected(
        intents in vec(intent(), 1..60),
        addresses in 1u8..5,
        which in any::<usize>(),
        choice in any::<u8>(),
    ) {
        let intents: Vec<Intent> = intents.into_iter().map(|i| Intent { fate: 255, ..i }).collect();
        let (history, _) = simulate(&intents, 1, addresses, addresses);
        let i = which % history.ops.len();
        let (_, before) = simulate(&intents[..i], 1, addresses, addresses);
        let op = &history.ops[i];
        prop_assume!(op.input == input(&intents[i], addresses, addresses));
        let Some(wrong) = mutate(&op.input, &op.output, choice, addresses) else {
            return Ok(());
        };
        prop_assume!(!allows(&before, &op.input, &wrong));
        let mut mutated = history.clone();
        mutated.ops[i].output = wrong;
        let report = check(&mutated, &mk_config(addresses));
        prop_assert!(!report.is_linearizable(), "#{i} mutated, yet {report}\n{}", show(&mutated));
    }

    #[test]
    fn partitions_never_reject_what_the_whole_search_accepts(
        intents in vec(intent(), 1..40),
        clients in 1usize..5,
        addresses in 1u8..4,
        which in any::<usize>(),
        choice in any::<u8>(),
    ) {
        let (mut history, _) = simulate(&intents, clients, addresses + 1, addresses);
        let i = which % history.ops.len();
        if let Some(other) = mutate(&history.ops[i].input, &history.ops[i].output, choice, addresses) {
            history.ops[i].output = other;
        }
        let config = mk_config(addresses);
        let whole = check_whole(&history, &config);
        let partitioned = check_partitions(&history, &config);
        if whole.is_linearizable() {
            prop_assert!(partitioned.is_linearizable(), "{partitioned}\n{}", show(&history));
        }
        if let Verdict::NotLinearizable(shown) = check(&history, &config).verdict {
            let alone = mk_history(shown.ops.iter().map(|(_, op)| op.clone()).collect());
            prop_assert!(!check_whole(&alone, &config).is_linearizable(), "{shown}");
        }
    }
}

/// A run of `calls` calls by three clients on each of three replicas, on
/// a pool of 32 addresses, with a List every tenth call and one call in
/// sixteen of unknown outcome: every client's owners its own, or all
/// owners everyone's.
fn mk_run(calls: usize, private: bool) -> (History, Reference) {
    let intents = intents_from_seed(0x5eed_cafe, calls);
    let intents = if private {
        private_owners(&intents, 9, 32)
    } else {
        intents
    };
    simulate(&intents, 9, 32, 32)
}

/// Checks runs of `calls` calls, printing how long each check took.
fn assert_run_checks(calls: usize) {
    for private in [true, false] {
        let (history, reference) = mk_run(calls, private);
        let started = std::time::Instant::now();
        assert!(check_partitions(&history, &mk_config(32)).is_linearizable());
        let partitions = started.elapsed();
        let started = std::time::Instant::now();
        let report = check(&history, &mk_config(32));
        let linearizable = started.elapsed();
        assert!(report.is_linearizable(), "{report}");
        let started = std::time::Instant::now();
        let end = reference.listed();
        assert!(double_holdings(&history).is_empty());
        assert!(lost_allocations(&history, &end).is_empty());
        let tables = started.elapsed();
        let streams: Vec<_> = (0..3)
            .map(|i| stream(&reference, &format!("r{i}"), i * 100))
            .collect();
        let started = std::time::Instant::now();
        assert!(check_watches(&streams, Some(&end), &history).is_empty());
        println!(
            "{calls} calls, owners private {private}: {report}\
             partitions {partitions:?}, partitions and whole {linearizable:?}, \
             tables {tables:?}, watches {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_run_of_four_hundred_calls_by_nine_clients_passes_every_check() {
    assert_run_checks(400);
}

/// A larger run; prints how long each check takes (`cargo test -p vipam-e2e
/// --lib -- --nocapture two_thousand`; some 20 s in a debug build).
#[test]
fn a_run_of_two_thousand_calls_by_nine_clients_passes_every_check() {
    assert_run_checks(2000);
}
