//! The sequential specification of one correct allocator with one pool
//! (DESIGN.md, "Allocator contract" and its edge rules), as a [`Model`] of
//! the whole table: who holds each address and what each owner holds, a
//! bijection between held addresses and their owners.
//!
//! Allocate of any address may hand out any free usable address (replicas
//! pick different candidates, so the lowest free one is not required);
//! RESOURCE_EXHAUSTED is right only when every usable address is held.
//!
//! An operation of unknown outcome steps only to the states in which it
//! took effect: one that did not is the same as one never placed, which
//! the search always allows.

use super::{
    compile::{Act, AllocateOut, Compiled, Id, ReleaseOut},
    partition::shown,
    wgl::Model,
};

/// The whole table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Table {
    /// By address: its holder.
    pub holder: Vec<Option<Id>>,
    /// By owner: its address.
    pub held: Vec<Option<Id>>,
}

impl Table {
    fn take(&self, owner: Id, address: Id) -> Table {
        let mut next = self.clone();
        next.holder[address as usize] = Some(owner);
        next.held[owner as usize] = Some(address);
        next
    }

    fn free(&self, address: Id) -> Table {
        let mut next = self.clone();
        if let Some(owner) = next.holder[address as usize].take() {
            next.held[owner as usize] = None;
        }
        next
    }

    fn holder(&self, address: Id) -> Option<Id> {
        self.holder[address as usize]
    }

    fn held(&self, owner: Id) -> Option<Id> {
        self.held[owner as usize]
    }
}

/// The allocator's specification over the whole table.
#[derive(Debug)]
pub(crate) struct Whole {
    pub addresses: usize,
    pub owners: usize,
    /// Usable addresses are those below this number.
    pub usable: usize,
    /// By owner: the usable addresses any operation shows it with, which an
    /// Allocate of unknown outcome is most likely to have taken: tried
    /// first.
    pub likely: Vec<Vec<Id>>,
}

impl Whole {
    /// The model of the table of `compiled`.
    pub fn new(compiled: &Compiled) -> Self {
        let names = &compiled.names;
        let mut likely = vec![Vec::new(); names.owners.len()];
        for (address, owner) in compiled.calls.iter().flat_map(|c| shown(&c.act)) {
            let owner = &mut likely[owner as usize];
            if names.is_usable(address) && !owner.contains(&address) {
                owner.push(address);
            }
        }
        Whole {
            addresses: names.addresses.len(),
            owners: names.owners.len(),
            usable: names.usable,
            likely,
        }
    }
}

impl Model for Whole {
    type State = Table;

    fn init(&self) -> Table {
        Table {
            holder: vec![None; self.addresses],
            held: vec![None; self.owners],
        }
    }

    fn step(&self, table: &Table, act: &Act, next: &mut Vec<Table>) {
        match act {
            Act::Allocate { owner, at, out } => self.allocate(table, *owner, *at, *out, next),
            Act::Release { owner, at, out } => release(table, *owner, *at, *out, next),
            Act::Get { owner, at, found } => {
                let now = match (owner, at) {
                    (Some(o), _) => table.held(*o).map(|a| (a, *o)),
                    (None, Some(a)) => table.holder(*a).map(|o| (*a, o)),
                    (None, None) => return,
                };
                if now == *found {
                    next.push(table.clone());
                }
            }
            Act::List { table: listed } => {
                let now = table
                    .holder
                    .iter()
                    .enumerate()
                    .filter_map(|(a, o)| o.map(|o| (a as Id, o)));
                if now.eq(listed.iter().copied()) {
                    next.push(table.clone());
                }
            }
        }
    }
}

impl Whole {
    fn allocate(
        &self,
        table: &Table,
        owner: Id,
        at: Option<Id>,
        out: AllocateOut,
        next: &mut Vec<Table>,
    ) {
        let held = table.held(owner);
        match (out, at) {
            (AllocateOut::Got(x), _) if held == Some(x) => next.push(table.clone()),
            (AllocateOut::Got(x), _) if held.is_none() && table.holder(x).is_none() => {
                next.push(table.take(owner, x));
            }
            (AllocateOut::Exhausted, None) if held.is_none() && self.full(table) => {
                next.push(table.clone());
            }
            (AllocateOut::OwnerHoldsOther, Some(x)) if held.is_some_and(|h| h != x) => {
                next.push(table.clone());
            }
            (AllocateOut::HeldByOther, Some(x))
                if held.is_none() && table.holder(x).is_some_and(|h| h != owner) =>
            {
                next.push(table.clone());
            }
            (AllocateOut::Unknown, _) if held.is_none() => self.takings(table, owner, at, next),
            _ => {}
        }
    }

    /// Every state an Allocate that took effect may leave: `at` taken, or
    /// any free usable address, the likely ones first.
    fn takings(&self, table: &Table, owner: Id, at: Option<Id>, next: &mut Vec<Table>) {
        let free = |a: &Id| table.holder(*a).is_none();
        match at {
            Some(x) if free(&x) => next.push(table.take(owner, x)),
            Some(_) => {}
            None => {
                let likely = &self.likely[owner as usize];
                for a in likely.iter().filter(|a| free(a)) {
                    next.push(table.take(owner, *a));
                }
                let others = (0..self.usable as Id).filter(|a| free(a) && !likely.contains(a));
                for a in others {
                    next.push(table.take(owner, a));
                }
            }
        }
    }

    fn full(&self, table: &Table) -> bool {
        table.holder[..self.usable].iter().all(Option::is_some)
    }
}

fn release(
    table: &Table,
    owner: Option<Id>,
    at: Option<Id>,
    out: ReleaseOut,
    next: &mut Vec<Table>,
) {
    // The address this release would free now.
    let target = match (owner, at) {
        (Some(o), None) => table.held(o),
        (None, Some(a)) => table.holder(a).map(|_| a),
        (Some(o), Some(a)) => (table.holder(a) == Some(o)).then_some(a),
        (None, None) => None,
    };
    let ok = match out {
        ReleaseOut::Freed { address, owner } => {
            target == Some(address) && table.holder(address) == Some(owner)
        }
        ReleaseOut::Nothing => match (owner, at) {
            (_, Some(a)) => table.holder(a).is_none(),
            (Some(o), None) => table.held(o).is_none(),
            (None, None) => false,
        },
        ReleaseOut::HeldByOther => match (owner, at) {
            (Some(o), Some(a)) => table.holder(a).is_some_and(|h| h != o),
            _ => false,
        },
        ReleaseOut::Unknown => {
            if let Some(a) = target {
                next.push(table.free(a));
            }
            return;
        }
    };
    if ok {
        match out {
            ReleaseOut::Freed { address, .. } => next.push(table.free(address)),
            _ => next.push(table.clone()),
        }
    }
}
