//! Checks read off the history directly, without a search: no address is
//! ever held by two owners at once ([`double_holdings`]), and every
//! acknowledged allocation is still in the table read after the faults
//! unless something may have released it ([`lost_allocations`]). Both are
//! implied by linearizability; they stay because they name the broken
//! promise plainly, and the second looks at a table the history does not
//! hold.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use crate::history::{History, Holding, Input, Operation, Output, Time};

/// Two operations show one address held by two owners, and no release of
/// it can come between them in either order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoubleHolding {
    /// The address.
    pub address: IpAddr,
    /// The operations (index in the history, operation).
    pub ops: [(usize, Operation); 2],
}

impl fmt::Display for DoubleHolding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} held by two owners, with no release between:",
            self.address
        )?;
        for (i, op) in &self.ops {
            writeln!(f, "  #{i:<5} {op}")?;
        }
        Ok(())
    }
}

/// An acknowledged allocation that the final table lacks, with no
/// operation that may have released it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostAllocation {
    /// The Allocate (index in the history, operation).
    pub op: (usize, Operation),
    /// What the final table holds at that address instead.
    pub now: Option<Holding>,
}

impl fmt::Display for LostAllocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let now = match &self.now {
            Some(h) => format!("held by {}", h.owner),
            None => "free".to_string(),
        };
        writeln!(
            f,
            "acknowledged allocation lost (its address is {now} in the final table, \
             and nothing may have released it):\n  #{:<5} {}",
            self.op.0, self.op.1
        )
    }
}

/// An operation's interval: its invocation and its deadline.
#[derive(Clone, Copy, Debug)]
struct Span {
    op: usize,
    from: Time,
    to: Time,
}

/// What `op` shows held at some moment of its interval.
fn shows(op: &Operation) -> Vec<Holding> {
    match (&op.input, &op.output) {
        (Input::Allocate { owner, .. }, Output::Allocated { address, .. }) => {
            vec![Holding::new(*address, owner.clone())]
        }
        (_, Output::Got(Some(h)) | Output::Released(Some(h))) => vec![h.clone()],
        (_, Output::Listed(table)) => table.clone(),
        _ => Vec::new(),
    }
}

/// Whether `op` may have released `h`.
fn may_release(op: &Operation, h: &Holding) -> bool {
    let Input::Release { owner, address } = &op.input else {
        return false;
    };
    match &op.output {
        Output::Released(Some(freed)) => freed == h,
        Output::Unknown(_) => {
            owner.as_ref().is_none_or(|o| *o == h.owner) && address.is_none_or(|a| a == h.address)
        }
        _ => false,
    }
}

fn span(history: &History, op: usize) -> Span {
    Span {
        op,
        from: history.ops[op].invoked,
        to: history.ops[op].deadline(),
    }
}

/// Every pair of operations that shows an address held by two owners
/// where no release of the first holder's can come between them, in
/// either order.
pub fn double_holdings(history: &History) -> Vec<DoubleHolding> {
    let mut seen: BTreeMap<IpAddr, Vec<(String, Span)>> = BTreeMap::new();
    let mut releases: BTreeMap<Holding, Vec<Span>> = BTreeMap::new();
    for (i, op) in history.ops.iter().enumerate() {
        for h in shows(op) {
            seen.entry(h.address)
                .or_default()
                .push((h.owner.clone(), span(history, i)));
        }
    }
    let held: BTreeSet<Holding> = seen
        .iter()
        .flat_map(|(a, v)| v.iter().map(|(o, _)| Holding::new(*a, o.clone())))
        .collect();
    for (i, op) in history.ops.iter().enumerate() {
        if !matches!(op.input, Input::Release { .. }) {
            continue;
        }
        for h in held.iter().filter(|h| may_release(op, h)) {
            releases
                .entry(h.clone())
                .or_default()
                .push(span(history, i));
        }
    }
    for spans in releases.values_mut() {
        spans.sort_by_key(|s| s.from);
    }
    let mut found = Vec::new();
    for (address, shown) in &seen {
        for (i, (o1, s1)) in shown.iter().enumerate() {
            for (o2, s2) in &shown[i + 1..] {
                let released = |o: &String, s: &Span, t: &Span| {
                    let h = Holding::new(*address, o.clone());
                    releases.get(&h).is_some_and(|r| between(r, s, t))
                };
                if o1 != o2 && !released(o1, s1, s2) && !released(o2, s2, s1) {
                    found.push(DoubleHolding {
                        address: *address,
                        ops: [s1.op, s2.op].map(|i| (i, history.ops[i].clone())),
                    });
                }
            }
        }
    }
    found
}

/// Whether one of `releases` can be placed after a moment of `first` and
/// before a moment of `second`, `first` before `second`.
fn between(releases: &[Span], first: &Span, second: &Span) -> bool {
    first.from <= second.to
        && releases
            .iter()
            .take_while(|r| r.from <= second.to)
            .any(|r| r.to >= first.from)
}

/// Every acknowledged allocation missing from `final_table` (read after
/// the faults, from a healthy replica) that no Release may explain: one
/// that answered its release, or had an unknown outcome, and did not end
/// before the Allocate was invoked.
pub fn lost_allocations(history: &History, final_table: &[Holding]) -> Vec<LostAllocation> {
    let now: BTreeMap<IpAddr, &Holding> = final_table.iter().map(|h| (h.address, h)).collect();
    let mut lost = Vec::new();
    for (i, op) in history.ops.iter().enumerate() {
        let (Input::Allocate { owner, .. }, Output::Allocated { address, .. }) =
            (&op.input, &op.output)
        else {
            continue;
        };
        let h = Holding::new(*address, owner.clone());
        if now.get(address).is_some_and(|n| **n == h) {
            continue;
        }
        let explained = history
            .ops
            .iter()
            .any(|r| may_release(r, &h) && r.deadline() >= op.invoked);
        if !explained {
            lost.push(LostAllocation {
                op: (i, op.clone()),
                now: now.get(address).map(|n| (*n).clone()),
            });
        }
    }
    lost
}
