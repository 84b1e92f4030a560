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
    compile::{Act, AllocateOut, Compiled, Id, Name, ReleaseOut},
    partition::shown,
    wgl::Model,
};

/// No one, no address.
const NONE: Id = Id::MAX;

/// The whole table: by address its holder, then by owner its address, in
/// one vector (one allocation a copy).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Table {
    addresses: usize,
    cells: Vec<Id>,
}

impl Table {
    fn new(addresses: usize, owners: usize) -> Self {
        Table {
            addresses,
            cells: vec![NONE; addresses + owners],
        }
    }

    fn take(&self, owner: Id, address: Id) -> Table {
        let mut next = self.clone();
        next.cells[address as usize] = owner;
        next.cells[self.addresses + owner as usize] = address;
        next
    }

    fn free(&self, address: Id) -> Table {
        let mut next = self.clone();
        if let Some(owner) = self.holder(address) {
            next.cells[address as usize] = NONE;
            next.cells[self.addresses + owner as usize] = NONE;
        }
        next
    }

    fn holder(&self, address: Id) -> Option<Id> {
        Some(self.cells[address as usize]).filter(|o| *o != NONE)
    }

    fn held(&self, owner: Id) -> Option<Id> {
        Some(self.cells[self.addresses + owner as usize]).filter(|a| *a != NONE)
    }

    /// Every (address, holder), by address.
    pub fn holdings(&self) -> impl Iterator<Item = (Id, Id)> + '_ {
        let holders = self.cells[..self.addresses].iter().enumerate();
        holders
            .filter(|(_, o)| **o != NONE)
            .map(|(a, o)| (a as Id, *o))
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
    /// Whether an Allocate of any address with an unknown outcome takes
    /// only likely addresses (a pruned search's model).
    pub likely_only: bool,
}

impl Whole {
    /// The model of the table of `compiled` (see [`Whole::likely_only`]).
    pub fn new(compiled: &Compiled, likely_only: bool) -> Self {
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
            likely_only,
        }
    }
}

impl Model for Whole {
    type State = Table;

    fn init(&self) -> Table {
        Table::new(self.addresses, self.owners)
    }

    fn blame(&self, table: &Table, act: &Act) -> Vec<Name> {
        let Act::List { table: listed } = act else {
            return act.names();
        };
        let now = table.holdings();
        let mut blamed: Vec<Name> = Vec::new();
        for (a, o) in now
            .filter(|e| !listed.contains(e))
            .chain(listed.iter().copied())
        {
            if table.holder(a) != Some(o) || !listed.contains(&(a, o)) {
                blamed.extend([Name::Address(a), Name::Owner(o)]);
            }
        }
        blamed
    }

    fn reach(&self, act: &Act) -> Vec<Name> {
        let mut names = act.names();
        if let Act::Allocate {
            owner, at: None, ..
        }
        | Act::Release {
            owner: Some(owner),
            at: None,
            ..
        } = act
        {
            names.extend(
                self.likely[*owner as usize]
                    .iter()
                    .map(|a| Name::Address(*a)),
            );
        }
        names
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
                if table.holdings().eq(listed.iter().copied()) {
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
                if self.likely_only {
                    return;
                }
                let others = (0..self.usable as Id).filter(|a| free(a) && !likely.contains(a));
                for a in others {
                    next.push(table.take(owner, a));
                }
            }
        }
    }

    fn full(&self, table: &Table) -> bool {
        table.cells[..self.usable].iter().all(|o| *o != NONE)
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
