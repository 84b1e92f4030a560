//! What a check answers ([`Report`], [`Verdict`], [`Counterexample`]) and
//! how a failure is made small and readable: the failing operations cut to
//! the shortest prefix in time that still fails, one operation a line, with
//! where the search got furthest and in what state.

use std::fmt;

use super::{
    compile::{Call, Compiled, Id, Names},
    model::Table,
    partition::OTHER,
    wgl::{Mode, Model, Search, Stuck, search},
};
use crate::history::{History, Operation, Time};

/// The outcome of a check, with what it cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The verdict.
    pub verdict: Verdict,
    /// How many partitions were searched (0 for the whole history alone).
    pub partitions: usize,
    /// How many search nodes were entered in all.
    pub states: u64,
}

impl Report {
    pub(crate) fn new(partitions: usize) -> Self {
        Report {
            verdict: Verdict::Linearizable,
            partitions,
            states: 0,
        }
    }

    /// Whether the history is linearizable (a search that gave up is not).
    pub fn is_linearizable(&self) -> bool {
        self.verdict == Verdict::Linearizable
    }
}

/// Whether the history could have happened on one correct allocator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It could.
    Linearizable,
    /// It could not: here is why.
    NotLinearizable(Counterexample),
    /// A search entered as many nodes as it may without a verdict.
    GaveUp {
        /// What it searched.
        scope: String,
        /// How many nodes it entered.
        states: u64,
    },
}

impl Verdict {
    pub(crate) fn gave_up(scope: &str, states: u64) -> Self {
        Verdict::GaveUp {
            scope: scope.to_string(),
            states,
        }
    }
}

/// Operations that no order explains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counterexample {
    /// What they are about: an operation, an address, an owner, the whole
    /// history.
    pub scope: String,
    /// Where the search got furthest, and in what state.
    pub why: String,
    /// The operations (index in the history, operation), by invocation.
    pub ops: Vec<(usize, Operation)>,
    /// How many other partitions failed too.
    pub other_failures: usize,
}

impl fmt::Display for Counterexample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "not linearizable: {}: {}", self.scope, self.why)?;
        for (i, op) in &self.ops {
            writeln!(f, "  #{i:<5} {op}")?;
        }
        if self.other_failures > 0 {
            writeln!(f, "({} other partitions fail too)", self.other_failures)?;
        }
        Ok(())
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Linearizable => writeln!(f, "linearizable"),
            Verdict::NotLinearizable(c) => c.fmt(f),
            Verdict::GaveUp { scope, states } => writeln!(
                f,
                "no verdict: gave up on {scope} after {states} states \
                 (raise Config::max_states, or record a shorter history)"
            ),
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.verdict)?;
        writeln!(
            f,
            "({} partitions, {} search states)",
            self.partitions, self.states
        )
    }
}

/// A report of the first operation whose answer no state explains.
pub(crate) fn impossible(history: &History, compiled: &Compiled) -> Option<Report> {
    let first = compiled.impossible.first()?;
    let mut report = Report::new(0);
    report.verdict = Verdict::NotLinearizable(Counterexample {
        scope: "one operation".into(),
        why: format!("{}, which no state explains", first.why),
        ops: vec![(first.op, history.ops[first.op].clone())],
        other_failures: compiled.impossible.len() - 1,
    });
    Some(report)
}

/// The calls of `calls` that can matter to those that returned by `cut`:
/// every call invoked by then, and, as long as one of them returns later,
/// every call invoked by that return. A call invoked after every known call
/// kept returned cannot come before any of them, so a linearization of all
/// `calls` restricted to these is one of them: if they fail, all fail.
fn prefix<'a>(calls: &[&'a Call], cut: Time) -> Vec<&'a Call> {
    let mut until = cut;
    loop {
        let known = calls.iter().filter(|c| c.known && c.invoked <= until);
        let later = known.map(|c| c.deadline).max().unwrap_or(until).max(until);
        if later == until {
            break;
        }
        until = later;
    }
    calls
        .iter()
        .filter(|c| c.invoked <= until)
        .copied()
        .collect()
}

/// The verdict on `calls`, which `model` cannot order: the shortest prefix
/// in time that still fails (found by bisection: if a prefix fails, every
/// longer one does), described.
pub(crate) fn shrink<M: Model>(
    history: &History,
    model: &M,
    calls: &[&Call],
    limit: u64,
    scope: &str,
    describe: &dyn Fn(&M::State) -> String,
) -> Verdict {
    let mut cuts: Vec<Time> = calls
        .iter()
        .filter(|c| c.known)
        .map(|c| c.deadline)
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let fails = |cut: Time| {
        let kept = prefix(calls, cut);
        match search(model, &kept, limit, Mode::Exact).0 {
            Search::Stuck(stuck) => Some((kept, stuck)),
            Search::Linearized | Search::GaveUp => None,
        }
    };
    let (mut lo, mut hi) = (0, cuts.len());
    let mut best = None;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match fails(cuts[mid]) {
            Some(found) => {
                best = Some(found);
                hi = mid;
            }
            None => lo = mid + 1,
        }
    }
    let Some((kept, stuck)) = best else {
        return Verdict::gave_up(scope, limit);
    };
    Verdict::NotLinearizable(counterexample(history, &kept, &stuck, scope, describe))
}

fn counterexample<S>(
    history: &History,
    kept: &[&Call],
    stuck: &Stuck<S>,
    scope: &str,
    describe: &dyn Fn(&S) -> String,
) -> Counterexample {
    let next: Vec<String> = stuck
        .next
        .iter()
        .map(|&i| format!("#{}", kept[i].op))
        .collect();
    let why = format!(
        "at most {} of the {} operations with an answer fit in one order; after them {}, \
         and none of {} fits next",
        stuck.placed,
        stuck.known,
        describe(&stuck.state),
        if next.is_empty() {
            "them".to_string()
        } else {
            next.join(", ")
        }
    );
    let mut ops: Vec<(usize, Operation)> = kept
        .iter()
        .map(|c| (c.op, history.ops[c.op].clone()))
        .collect();
    ops.sort_by_key(|(i, op)| (op.invoked, *i));
    Counterexample {
        scope: scope.to_string(),
        why,
        ops,
        other_failures: 0,
    }
}

/// "10.0.0.1 is free" or "10.0.0.1 is held by a".
pub(crate) fn holder(names: &Names, address: Id, holder: Option<Id>) -> String {
    let address = names.addresses[address as usize];
    match holder {
        Some(o) => format!("{address} is held by {}", names.owners[o as usize]),
        None => format!("{address} is free"),
    }
}

/// "a holds 10.0.0.1", "a holds nothing", or an address it is never shown
/// with.
pub(crate) fn held(names: &Names, owner: Id, held: Option<Id>) -> String {
    let owner = &names.owners[owner as usize];
    match held {
        Some(OTHER) => format!("{owner} holds an address no operation shows it with"),
        Some(a) => format!("{owner} holds {}", names.addresses[a as usize]),
        None => format!("{owner} holds nothing"),
    }
}

/// The table as "[10.0.0.1=a, 10.0.0.2=b]".
pub(crate) fn table(names: &Names, table: &Table) -> String {
    let entries: Vec<String> = table
        .holdings()
        .map(|(a, o)| {
            format!(
                "{}={}",
                names.addresses[a as usize], names.owners[o as usize]
            )
        })
        .collect();
    format!("the table is [{}]", entries.join(", "))
}
