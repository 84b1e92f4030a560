//! Decides whether a recorded [`History`] could have happened on one correct
//! allocator: whether its operations can be put in one order, each at a
//! moment between its invocation and its return, in which every answer is
//! what the sequential specification ([`model`]) gives. That is
//! linearizability, checked as Porcupine does (the search in [`wgl`]),
//! partitioned (below), then on the whole history. Besides, checks that
//! look at the history directly ([`table`]) and at the Watch streams
//! ([`watch`]).
//!
//! # Partitions
//!
//! A history of thousands of operations is too large to search whole when
//! it is wrong, so it is first checked in partitions ([`partition`]): one
//! per address (its holder over time) and one per owner (its address over
//! time). Each partition's model is the projection of the whole table's on
//! that address or owner, built so that (1) every step of the whole model
//! by an operation of the partition projects onto a step the partition's
//! model allows, and (2) an operation left out of the (widened) partition
//! never changes the projected value. Restricting a linearization of the
//! whole history to a partition's operations is then a linearization of
//! the partition, so *a partition that fails proves the whole history
//! wrong*, and the failing partition, cut to its shortest failing prefix in
//! time, is a small counterexample.
//!
//! The converse does not hold, because one operation touches two
//! partitions (an owner and an address) and their orders are chosen apart:
//! - RESOURCE_EXHAUSTED needs every usable address held *at once*; each
//!   address partition checks only that its address is held at some moment
//!   of the call.
//! - Two partitions may each order the same two operations, but oppositely
//!   (the test `partitions_alone_miss_orders_that_disagree` shows one).
//!
//! So after every partition passes, [`check`] searches the whole history
//! with the whole table as state, in two passes. The first places a call of
//! unknown outcome only together with a known call that fits nowhere
//! without it, and lets an Allocate of any address take only addresses
//! some call shows its owner with ([`wgl::Mode::Enablers`]): quick, and an
//! order it finds is an order, but it may miss one. When it does, the
//! second pass is exact. Each is bounded by [`Config::max_states`]: past it
//! the verdict is [`Verdict::GaveUp`], never a pass. [`check_partitions`]
//! alone is the sound, fast half.
//!
//! Histories of runs with faults are dominated by calls of unknown outcome:
//! each may have taken effect at any moment after its invocation, or never.
//! Partitions keep each search to the few that can matter to one address
//! or owner; the whole search keeps them from multiplying by trying one
//! only where a known call needs it, and of several alike only the last
//! invoked ([`wgl`]), and by treating a node reached with more of them
//! placed as seen ([`memo`]).

pub mod table;
pub mod watch;

mod compile;
mod memo;
mod model;
mod partition;
mod report;
mod wgl;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod watch_tests;

use std::net::IpAddr;

use crate::history::History;
use compile::{Call, Compiled, Id, compile};
use partition::{Key, OneAddress, OneOwner, Partition, calls, partitions};
pub use report::{Counterexample, Report, Verdict};
use wgl::{Mode, Model, Search, search};

/// What the checker needs to know about the run.
#[derive(Clone, Debug)]
pub struct Config {
    /// The addresses the run's pool hands out.
    pub usable: Vec<IpAddr>,
    /// Most search nodes one search may enter before giving up.
    pub max_states: u64,
}

impl Config {
    /// A pool of `usable` addresses and a bound of a million nodes a search.
    pub fn new(usable: impl IntoIterator<Item = IpAddr>) -> Self {
        Config {
            usable: usable.into_iter().collect(),
            max_states: 1_000_000,
        }
    }
}

/// Checks `history` partition by partition, then whole.
pub fn check(history: &History, config: &Config) -> Report {
    let compiled = compile(&history.ops, &config.usable);
    let mut report = partitioned(history, &compiled, config);
    if report.verdict == Verdict::Linearizable {
        let whole = whole(history, &compiled, config);
        report.states += whole.states;
        report.verdict = whole.verdict;
    }
    report
}

/// Checks `history` partition by partition only: a failure is certain, a
/// pass is not (see the module's documentation).
pub fn check_partitions(history: &History, config: &Config) -> Report {
    partitioned(history, &compile(&history.ops, &config.usable), config)
}

/// Checks `history` whole only.
pub fn check_whole(history: &History, config: &Config) -> Report {
    whole(history, &compile(&history.ops, &config.usable), config)
}

fn partitioned(history: &History, compiled: &Compiled, config: &Config) -> Report {
    if let Some(report) = report::impossible(history, compiled) {
        return report;
    }
    let parts = partitions(compiled);
    let mut report = Report::new(parts.len());
    let mut failures = Vec::new();
    for p in &parts {
        let (verdict, states) = one_partition(history, compiled, p, config.max_states);
        report.states += states;
        match verdict {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable(c) => failures.push(c),
            gave_up @ Verdict::GaveUp { .. } => {
                if report.verdict == Verdict::Linearizable {
                    report.verdict = gave_up;
                }
            }
        }
    }
    let failing = failures.len();
    if let Some(mut smallest) = failures.into_iter().min_by_key(|c| c.ops.len()) {
        smallest.other_failures = failing - 1;
        report.verdict = Verdict::NotLinearizable(smallest);
    }
    report
}

fn one_partition(
    history: &History,
    compiled: &Compiled,
    p: &Partition,
    limit: u64,
) -> (Verdict, u64) {
    let names = &compiled.names;
    match p.key {
        Key::Address(address) => {
            let model = OneAddress { address };
            let scope = format!("address {}", names.addresses[address as usize]);
            let describe = |s: &Option<Id>| report::holder(names, address, *s);
            judge(history, compiled, p, limit, &model, &scope, &describe)
        }
        Key::Owner(owner) => {
            let model = OneOwner::new(compiled, owner);
            let scope = format!("owner {}", names.owners[owner as usize]);
            let describe = |s: &Option<Id>| report::held(names, owner, *s);
            judge(history, compiled, p, limit, &model, &scope, &describe)
        }
    }
}

/// Searches partition `p` with `model`: base first, widened when the base
/// fails and widening adds calls.
fn judge<M: Model>(
    history: &History,
    compiled: &Compiled,
    p: &Partition,
    limit: u64,
    model: &M,
    scope: &str,
    describe: &dyn Fn(&M::State) -> String,
) -> (Verdict, u64) {
    let mut states = 0;
    for widened in [false, true] {
        if widened && p.widen.is_empty() {
            break;
        }
        let (found, more) = search(model, &calls(compiled, p, widened), limit, Mode::Exact);
        states += more;
        match found {
            Search::Linearized => return (Verdict::Linearizable, states),
            Search::GaveUp => return (Verdict::gave_up(scope, states), states),
            Search::Stuck(_) => {}
        }
    }
    let failing = calls(compiled, p, !p.widen.is_empty());
    let verdict = report::shrink(history, model, &failing, limit, scope, describe);
    (verdict, states)
}

/// Searches the whole history: first pruned, with an Allocate of unknown
/// outcome taking only addresses some call shows its owner with (a pass
/// then is a pass); when that fails, exactly.
fn whole(history: &History, compiled: &Compiled, config: &Config) -> Report {
    if let Some(report) = report::impossible(history, compiled) {
        return report;
    }
    let all: Vec<&Call> = compiled.calls.iter().collect();
    let mut report = Report::new(0);
    let likely = model::Whole::new(compiled, true);
    let (found, states) = search(&likely, &all, config.max_states, Mode::Enablers);
    report.states = states;
    if let Search::Linearized = found {
        return report;
    }
    let model = model::Whole::new(compiled, false);
    let (found, states) = search(&model, &all, config.max_states, Mode::Exact);
    report.states += states;
    let scope = "the whole history";
    report.verdict = match found {
        Search::Linearized => Verdict::Linearizable,
        Search::GaveUp => Verdict::gave_up(scope, states),
        Search::Stuck(_) => {
            let describe = |t: &model::Table| report::table(&compiled.names, t);
            report::shrink(history, &model, &all, config.max_states, scope, &describe)
        }
    };
    report
}
