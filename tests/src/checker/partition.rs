//! Which operations each partition holds, and the models of one address and
//! of one owner: the projections of [`super::model::Whole`] on the holder
//! of an address and on the address of an owner.
//!
//! A call joins the partition of an address (owner) when its input or its
//! answer names that address (owner), or when it is a List; besides:
//! RESOURCE_EXHAUSTED joins every usable address (it says each is held);
//! an Allocate of any address with an unknown outcome joins the usable
//! addresses that any operation shows with its owner, and a Release by
//! owner of unknown outcome the addresses shown with that owner; a Release
//! by address of unknown outcome joins the owners shown with that address.
//! That is the *base* partition. An unknown call that took effect on an
//! address or owner never shown with it can still explain an answer that
//! names no holder (ALREADY_EXISTS, FAILED_PRECONDITION): the *widened*
//! partition adds every such call, and is what a failure is judged on.
//!
//! Why a partition's verdict binds the whole history: no call left out of
//! the widened partition of an address can change its holder (an Allocate
//! that answered another address took that one; a Release that answered
//! took what it named; one of unknown outcome that may take or free this
//! address is in), and none left out of an owner's can change its address;
//! and every step the whole model lets a member take is one the
//! partition's model allows on the projection. The owner's model keeps the
//! addresses the owner is never shown with as one value, [`OTHER`], which
//! allows more, never less.

use std::collections::BTreeSet;

use super::{
    compile::{Act, AllocateOut, Call, Compiled, Id, ReleaseOut},
    wgl::Model,
};

/// What a partition is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Key {
    Address(Id),
    Owner(Id),
}

/// The calls of one partition (indexes into [`Compiled::calls`]).
#[derive(Clone, Debug)]
pub(crate) struct Partition {
    pub key: Key,
    pub base: Vec<usize>,
    /// The calls the widened partition adds.
    pub widen: Vec<usize>,
}

/// Which owners each address is shown with, and the other way round.
struct Pairs {
    owners_of: Vec<BTreeSet<Id>>,
    addresses_of: Vec<BTreeSet<Id>>,
}

impl Pairs {
    fn new(compiled: &Compiled) -> Self {
        let mut pairs = Pairs {
            owners_of: vec![BTreeSet::new(); compiled.names.addresses.len()],
            addresses_of: vec![BTreeSet::new(); compiled.names.owners.len()],
        };
        for call in &compiled.calls {
            for (a, o) in shown(&call.act) {
                pairs.owners_of[a as usize].insert(o);
                pairs.addresses_of[o as usize].insert(a);
            }
        }
        pairs
    }
}

/// The (address, owner) pairs an operation names together.
pub(crate) fn shown(act: &Act) -> Vec<(Id, Id)> {
    match act {
        Act::Allocate { owner, at, out } => {
            let got = match out {
                AllocateOut::Got(a) => Some(*a),
                _ => *at,
            };
            got.map(|a| (a, *owner)).into_iter().collect()
        }
        Act::Release { owner, at, out } => match (out, owner, at) {
            (ReleaseOut::Freed { address, owner }, _, _) => vec![(*address, *owner)],
            (_, Some(o), Some(a)) => vec![(*a, *o)],
            _ => Vec::new(),
        },
        Act::Get { found, .. } => found.iter().copied().collect(),
        Act::List { table } => table.clone(),
    }
}

/// The addresses any operation shows `owner` with.
pub(crate) fn shown_with(compiled: &Compiled, owner: Id) -> BTreeSet<Id> {
    let pairs = compiled.calls.iter().flat_map(|c| shown(&c.act));
    pairs.filter(|(_, o)| *o == owner).map(|(a, _)| a).collect()
}

/// Whether `act` belongs to the partition of address `a`: `Some(true)` in
/// the base partition, `Some(false)` only in the widened one.
fn in_address(act: &Act, a: Id, usable: bool, owners: &BTreeSet<Id>) -> Option<bool> {
    let base = match act {
        Act::Allocate { owner, at, out } => match out {
            AllocateOut::Got(x) => *x == a,
            AllocateOut::Exhausted => usable,
            AllocateOut::Unknown if at.is_none() => {
                if !usable {
                    return None;
                }
                owners.contains(owner)
            }
            _ => *at == Some(a),
        },
        Act::Release { owner, at, out } => match (out, at) {
            (ReleaseOut::Freed { address, .. }, _) => *address == a,
            (ReleaseOut::Unknown, None) => match owner {
                Some(o) => owners.contains(o),
                None => return None,
            },
            (_, at) => *at == Some(a),
        },
        Act::Get { at, found, .. } => *at == Some(a) || found.is_some_and(|(x, _)| x == a),
        Act::List { .. } => true,
    };
    if base {
        return Some(true);
    }
    let widened = matches!(
        act,
        Act::Allocate {
            at: None,
            out: AllocateOut::Unknown,
            ..
        } | Act::Release {
            at: None,
            out: ReleaseOut::Unknown,
            ..
        }
    );
    widened.then_some(false)
}

/// Whether `act` belongs to the partition of owner `o`, as [`in_address`].
fn in_owner(act: &Act, o: Id, addresses: &BTreeSet<Id>) -> Option<bool> {
    let base = match act {
        Act::Allocate { owner, .. } => *owner == o,
        Act::Release { owner, at, out } => match (out, owner) {
            (ReleaseOut::Freed { owner, .. }, _) => *owner == o,
            (ReleaseOut::Unknown, None) => {
                return at.map(|a| addresses.contains(&a));
            }
            (_, owner) => *owner == Some(o),
        },
        Act::Get { owner, found, .. } => {
            *owner == Some(o) || found.is_some_and(|(_, holder)| holder == o)
        }
        Act::List { .. } => true,
    };
    base.then_some(true)
}

/// Every partition of `compiled`: one per address, one per owner.
pub(crate) fn partitions(compiled: &Compiled) -> Vec<Partition> {
    let pairs = Pairs::new(compiled);
    let names = &compiled.names;
    let addresses = (0..names.addresses.len() as Id).map(|a| {
        let owners = &pairs.owners_of[a as usize];
        let usable = names.is_usable(a);
        split(compiled, Key::Address(a), |act| {
            in_address(act, a, usable, owners)
        })
    });
    let owners = (0..names.owners.len() as Id).map(|o| {
        let with = &pairs.addresses_of[o as usize];
        split(compiled, Key::Owner(o), |act| in_owner(act, o, with))
    });
    addresses
        .chain(owners)
        .filter(|p| p.base.iter().any(|&i| compiled.calls[i].known))
        .collect()
}

fn split(compiled: &Compiled, key: Key, member: impl Fn(&Act) -> Option<bool>) -> Partition {
    let mut partition = Partition {
        key,
        base: Vec::new(),
        widen: Vec::new(),
    };
    for (i, call) in compiled.calls.iter().enumerate() {
        match member(&call.act) {
            Some(true) => partition.base.push(i),
            Some(false) => partition.widen.push(i),
            None => {}
        }
    }
    partition
}

/// The holder of one address.
#[derive(Debug)]
pub(crate) struct OneAddress {
    pub address: Id,
}

impl Model for OneAddress {
    type State = Option<Id>;

    fn init(&self) -> Option<Id> {
        None
    }

    fn step(&self, holder: &Option<Id>, act: &Act, next: &mut Vec<Option<Id>>) {
        let holder = *holder;
        let to = match act {
            Act::Allocate { owner, out, .. } => match out {
                AllocateOut::Got(_) | AllocateOut::Unknown if holder.is_none() => Some(*owner),
                AllocateOut::Got(_) if holder == Some(*owner) => holder,
                AllocateOut::Exhausted if holder.is_some() => holder,
                AllocateOut::OwnerHoldsOther if holder != Some(*owner) => holder,
                AllocateOut::HeldByOther if holder.is_some_and(|h| h != *owner) => holder,
                _ => return,
            },
            Act::Release { owner, at, out } => match out {
                ReleaseOut::Freed { owner, .. } if holder == Some(*owner) => None,
                ReleaseOut::Nothing if at.is_some() && holder.is_none() => holder,
                ReleaseOut::Nothing if at.is_none() && holder != *owner => holder,
                ReleaseOut::HeldByOther if holder.is_some() && holder != *owner => holder,
                ReleaseOut::Unknown
                    if holder.is_some() && owner.is_none_or(|o| holder == Some(o)) =>
                {
                    None
                }
                _ => return,
            },
            Act::Get { owner, found, .. } => match found {
                Some((_, o)) if holder == Some(*o) => holder,
                None if owner.is_none() && holder.is_none() => holder,
                None if owner.is_some() && holder != *owner => holder,
                _ => return,
            },
            Act::List { table } => {
                let listed = table.iter().find(|(a, _)| *a == self.address);
                if listed.map(|(_, o)| *o) != holder {
                    return;
                }
                holder
            }
        };
        next.push(to);
    }
}

/// What one owner holds: an address it is shown with, or [`OTHER`].
#[derive(Debug)]
pub(crate) struct OneOwner {
    pub owner: Id,
    /// The addresses it is shown with.
    pub with: BTreeSet<Id>,
    /// The usable ones among them.
    pub usable_with: Vec<Id>,
    /// Whether a usable address exists that it is never shown with.
    pub other: bool,
}

/// An address the owner is never shown with.
pub(crate) const OTHER: Id = Id::MAX;

impl OneOwner {
    /// The model of `owner` in `compiled`.
    pub fn new(compiled: &Compiled, owner: Id) -> Self {
        let with = shown_with(compiled, owner);
        let names = &compiled.names;
        let usable_with: Vec<Id> = with
            .iter()
            .copied()
            .filter(|a| names.is_usable(*a))
            .collect();
        OneOwner {
            owner,
            other: usable_with.len() < names.usable,
            usable_with,
            with,
        }
    }

    fn slot(&self, address: Id) -> Id {
        if self.with.contains(&address) {
            address
        } else {
            OTHER
        }
    }
}

impl Model for OneOwner {
    type State = Option<Id>;

    fn init(&self) -> Option<Id> {
        None
    }

    fn step(&self, held: &Option<Id>, act: &Act, next: &mut Vec<Option<Id>>) {
        let held = *held;
        let to = match act {
            Act::Allocate { at, out, .. } => match (out, at) {
                (AllocateOut::Got(x), _) if held.is_none_or(|h| h == *x) => Some(*x),
                (AllocateOut::Exhausted | AllocateOut::HeldByOther, _) if held.is_none() => None,
                (AllocateOut::OwnerHoldsOther, Some(x)) if held.is_some_and(|h| h != *x) => held,
                (AllocateOut::Unknown, Some(x)) if held.is_none() => Some(self.slot(*x)),
                (AllocateOut::Unknown, None) if held.is_none() => {
                    next.extend(self.usable_with.iter().map(|a| Some(*a)));
                    if self.other {
                        next.push(Some(OTHER));
                    }
                    return;
                }
                _ => return,
            },
            Act::Release { at, out, .. } => match (out, at) {
                (ReleaseOut::Freed { address, .. }, _) if held == Some(*address) => None,
                (ReleaseOut::Nothing, None) if held.is_none() => None,
                (ReleaseOut::Nothing | ReleaseOut::HeldByOther, Some(x)) if held != Some(*x) => {
                    held
                }
                (ReleaseOut::Unknown, None) if held.is_some() => None,
                (ReleaseOut::Unknown, Some(x)) if held == Some(self.slot(*x)) => None,
                _ => return,
            },
            Act::Get { owner, found, .. } => {
                let shows = found.filter(|(_, o)| *o == self.owner).map(|(a, _)| a);
                let fits = match owner {
                    Some(_) => shows == held,
                    None => shows.is_some() && shows == held,
                };
                if !fits {
                    return;
                }
                held
            }
            Act::List { table } => {
                let listed = table.iter().find(|(_, o)| *o == self.owner);
                if listed.map(|(a, _)| *a) != held {
                    return;
                }
                held
            }
        };
        next.push(to);
    }
}

/// The search's slice of a partition's calls, widened or not.
pub(crate) fn calls<'a>(compiled: &'a Compiled, p: &Partition, widened: bool) -> Vec<&'a Call> {
    let extra = if widened { &p.widen[..] } else { &[] };
    let mut ids: Vec<usize> = p.base.iter().chain(extra).copied().collect();
    ids.sort_unstable();
    ids.iter().map(|&i| &compiled.calls[i]).collect()
}
