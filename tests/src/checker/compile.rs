//! Turns a [`History`] into what the searches work on: owners and addresses
//! as small numbers ([`Names`]), each operation that can tell anything about
//! the table as a [`Call`] whose [`Act`] the models step on, and the
//! operations whose answer no state of one correct allocator could give,
//! picked out with the reason.
//!
//! Dropped on the way, because they neither change nor show the table:
//! refusals that do not depend on it (INVALID_ARGUMENT, PERMISSION_DENIED,
//! NOT_FOUND of a pool, UNAUTHENTICATED…), and Get and List calls with an
//! unknown outcome.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use tonic::Code;

use crate::history::{Holding, Input, Operation, Output, Time};

/// An owner or an address, numbered.
pub(crate) type Id = u32;

/// The owners and addresses of a history, numbered. The usable addresses
/// of the pool come first: address `a` is usable when `a < usable`.
#[derive(Debug, Default)]
pub(crate) struct Names {
    pub owners: Vec<String>,
    pub addresses: Vec<IpAddr>,
    pub usable: usize,
    owner_ids: HashMap<String, Id>,
    address_ids: HashMap<IpAddr, Id>,
}

impl Names {
    fn new(usable: &[IpAddr]) -> Self {
        let mut names = Names::default();
        for address in usable.iter().collect::<BTreeSet<_>>() {
            names.address(*address);
        }
        names.usable = names.addresses.len();
        names
    }

    fn owner(&mut self, owner: &str) -> Id {
        if let Some(id) = self.owner_ids.get(owner) {
            return *id;
        }
        let id = self.owners.len() as Id;
        self.owners.push(owner.to_string());
        self.owner_ids.insert(owner.to_string(), id);
        id
    }

    fn address(&mut self, address: IpAddr) -> Id {
        if let Some(id) = self.address_ids.get(&address) {
            return *id;
        }
        let id = self.addresses.len() as Id;
        self.addresses.push(address);
        self.address_ids.insert(address, id);
        id
    }

    fn holding(&mut self, h: &Holding) -> (Id, Id) {
        (self.address(h.address), self.owner(&h.owner))
    }

    /// Whether Allocate may hand `address` out unasked.
    pub fn is_usable(&self, address: Id) -> bool {
        (address as usize) < self.usable
    }
}

/// What an Allocate was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AllocateOut {
    /// The owner holds this address.
    Got(Id),
    /// RESOURCE_EXHAUSTED.
    Exhausted,
    /// FAILED_PRECONDITION: the owner holds another address.
    OwnerHoldsOther,
    /// ALREADY_EXISTS: another owner holds the address asked for.
    HeldByOther,
    /// No definite answer.
    Unknown,
}

/// What a Release was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReleaseOut {
    /// It freed this address, which this owner held.
    Freed { address: Id, owner: Id },
    /// Nothing matched.
    Nothing,
    /// FAILED_PRECONDITION: the address is held by another owner.
    HeldByOther,
    /// No definite answer.
    Unknown,
}

/// An operation as the models see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Act {
    Allocate {
        owner: Id,
        at: Option<Id>,
        out: AllocateOut,
    },
    Release {
        owner: Option<Id>,
        at: Option<Id>,
        out: ReleaseOut,
    },
    /// Exactly one of `owner` and `at` is given.
    Get {
        owner: Option<Id>,
        at: Option<Id>,
        found: Option<(Id, Id)>,
    },
    /// The whole table as (address, owner), by address, each address and
    /// each owner once.
    List { table: Vec<(Id, Id)> },
}

/// An owner or an address, as something an operation names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Name {
    Owner(Id),
    Address(Id),
}

/// A set of names, as bits: owner `o` is bit `2o`, address `a` bit `2a+1`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NameSet(Vec<u64>);

impl NameSet {
    /// The set of `names`.
    pub fn of(names: &[Name]) -> Self {
        let mut set = NameSet::default();
        for name in names {
            let bit = match name {
                Name::Owner(o) => 2 * *o as usize,
                Name::Address(a) => 2 * *a as usize + 1,
            };
            if set.0.len() <= bit / 64 {
                set.0.resize(bit / 64 + 1, 0);
            }
            set.0[bit / 64] |= 1 << (bit % 64);
        }
        set
    }

    /// Whether it shares a name with `other`.
    pub fn meets(&self, other: &NameSet) -> bool {
        self.0.iter().zip(&other.0).any(|(a, b)| a & b != 0)
    }
}

impl Act {
    /// The owners and addresses it names, in its input or its answer.
    pub fn names(&self) -> Vec<Name> {
        let owner = |o: &Option<Id>| o.map(Name::Owner);
        let address = |a: &Option<Id>| a.map(Name::Address);
        let pair = |(a, o): (Id, Id)| [Name::Address(a), Name::Owner(o)];
        match self {
            Act::Allocate { owner: o, at, out } => {
                let got = match out {
                    AllocateOut::Got(a) => Some(*a),
                    _ => None,
                };
                let named = [Some(Name::Owner(*o)), address(at), address(&got)];
                named.into_iter().flatten().collect()
            }
            Act::Release { owner: o, at, out } => {
                let freed = match out {
                    ReleaseOut::Freed { address, owner } => pair((*address, *owner)).to_vec(),
                    _ => Vec::new(),
                };
                let named = [owner(o), address(at)].into_iter().flatten();
                named.chain(freed).collect()
            }
            Act::Get {
                owner: o,
                at,
                found,
            } => {
                let found = found.iter().flat_map(|f| pair(*f));
                [owner(o), address(at)]
                    .into_iter()
                    .flatten()
                    .chain(found)
                    .collect()
            }
            Act::List { table } => table.iter().flat_map(|f| pair(*f)).collect(),
        }
    }
}

/// One operation to place in a linearization.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    /// Its index in the history.
    pub op: usize,
    pub invoked: Time,
    /// Its return, or `Time::MAX` when its outcome is unknown.
    pub deadline: Time,
    /// Whether its outcome is known (it must then be placed).
    pub known: bool,
    pub act: Act,
}

/// An operation whose answer no state explains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Impossible {
    pub op: usize,
    pub why: &'static str,
}

/// A history, compiled.
#[derive(Debug)]
pub(crate) struct Compiled {
    pub names: Names,
    pub calls: Vec<Call>,
    pub impossible: Vec<Impossible>,
}

/// Compiles `ops` for a pool whose usable addresses are `usable`.
pub(crate) fn compile(ops: &[Operation], usable: &[IpAddr]) -> Compiled {
    let mut names = Names::new(usable);
    let mut calls = Vec::new();
    let mut impossible = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match act(&mut names, &op.input, &op.output) {
            Ok(Some(act)) => calls.push(Call {
                op: i,
                invoked: op.invoked,
                deadline: op.deadline(),
                known: !op.output.is_unknown(),
                act,
            }),
            Ok(None) => {}
            Err(why) => impossible.push(Impossible { op: i, why }),
        }
    }
    Compiled {
        names,
        calls,
        impossible,
    }
}

/// A compiled operation: `None` when it tells nothing about the table.
type Compiling = Result<Option<Act>, &'static str>;

fn act(names: &mut Names, input: &Input, output: &Output) -> Compiling {
    if let Output::Refused { code, .. } = output
        && independent(*code, input)
    {
        return Ok(None);
    }
    match input {
        Input::Allocate { owner, address, .. } => {
            let owner = names.owner(owner);
            let at = address.map(|a| names.address(a));
            allocate(names, owner, at, output)
        }
        Input::Release { owner, address } => {
            let owner = owner.as_deref().map(|o| names.owner(o));
            let at = address.map(|a| names.address(a));
            release(names, owner, at, output)
        }
        Input::Get { owner, address } => {
            let owner = owner.as_deref().map(|o| names.owner(o));
            let at = address.map(|a| names.address(a));
            get(names, owner, at, output)
        }
        Input::List => list(names, output),
    }
}

/// Whether a refusal with `code` says nothing about the table.
fn independent(code: Code, input: &Input) -> bool {
    match code {
        Code::AlreadyExists | Code::FailedPrecondition | Code::ResourceExhausted | Code::Ok => {
            false
        }
        Code::NotFound => !matches!(input, Input::Get { .. }),
        Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Internal
        | Code::Unavailable
        | Code::DataLoss => true,
    }
}

fn allocate(names: &mut Names, owner: Id, at: Option<Id>, output: &Output) -> Compiling {
    let out = match (output, at) {
        (Output::Allocated { address, .. }, _) => {
            let got = names.address(*address);
            match at {
                Some(asked) if asked != got => return Err("answered another address than asked"),
                None if !names.is_usable(got) => {
                    return Err("handed out an address outside the pool");
                }
                _ => AllocateOut::Got(got),
            }
        }
        (Output::Refused { code, .. }, None) => match code {
            Code::ResourceExhausted => AllocateOut::Exhausted,
            _ => return Err("refused an allocation of any address with this code"),
        },
        (Output::Refused { code, .. }, Some(_)) => match code {
            Code::FailedPrecondition => AllocateOut::OwnerHoldsOther,
            Code::AlreadyExists => AllocateOut::HeldByOther,
            _ => return Err("refused an allocation of an address with this code"),
        },
        (Output::Unknown(_), _) => AllocateOut::Unknown,
        (Output::Released(_) | Output::Got(_) | Output::Listed(_), _) => {
            return Err("an Allocate answered as another call");
        }
    };
    Ok(Some(Act::Allocate { owner, at, out }))
}

fn release(names: &mut Names, owner: Option<Id>, at: Option<Id>, output: &Output) -> Compiling {
    if owner.is_none() && at.is_none() {
        return match output {
            Output::Unknown(_) => Ok(None),
            _ => Err("a Release naming nothing was not refused as invalid"),
        };
    }
    let out = match output {
        Output::Released(Some(h)) => {
            let (address, holder) = names.holding(h);
            if owner.is_some_and(|o| o != holder) || at.is_some_and(|a| a != address) {
                return Err("released another allocation than asked");
            }
            ReleaseOut::Freed {
                address,
                owner: holder,
            }
        }
        Output::Released(None) => ReleaseOut::Nothing,
        Output::Refused {
            code: Code::FailedPrecondition,
            ..
        } if owner.is_some() && at.is_some() => ReleaseOut::HeldByOther,
        Output::Refused { .. } => return Err("refused a release with this code"),
        Output::Unknown(_) => ReleaseOut::Unknown,
        Output::Allocated { .. } | Output::Got(_) | Output::Listed(_) => {
            return Err("a Release answered as another call");
        }
    };
    Ok(Some(Act::Release { owner, at, out }))
}

fn get(names: &mut Names, owner: Option<Id>, at: Option<Id>, output: &Output) -> Compiling {
    let found = match output {
        Output::Unknown(_) => return Ok(None),
        Output::Got(Some(h)) => Some(names.holding(h)),
        Output::Got(None)
        | Output::Refused {
            code: Code::NotFound,
            ..
        } => None,
        Output::Refused { .. } => return Err("refused a lookup with this code"),
        Output::Allocated { .. } | Output::Released(_) | Output::Listed(_) => {
            return Err("a Get answered as another call");
        }
    };
    match (owner, at, found) {
        (Some(_), Some(_), _) | (None, None, _) => Err("a Get naming both or neither answered"),
        (Some(o), None, Some((_, holder))) if holder != o => Err("answered another owner"),
        (None, Some(a), Some((address, _))) if address != a => Err("answered another address"),
        _ => Ok(Some(Act::Get { owner, at, found })),
    }
}

fn list(names: &mut Names, output: &Output) -> Compiling {
    let entries = match output {
        Output::Listed(entries) => entries,
        Output::Unknown(_) => return Ok(None),
        Output::Refused { .. } => return Err("refused a List with this code"),
        Output::Allocated { .. } | Output::Released(_) | Output::Got(_) => {
            return Err("a List answered as another call");
        }
    };
    let mut table: Vec<(Id, Id)> = entries.iter().map(|h| names.holding(h)).collect();
    table.sort_unstable();
    let addresses: BTreeSet<Id> = table.iter().map(|(a, _)| *a).collect();
    let owners: BTreeSet<Id> = table.iter().map(|(_, o)| *o).collect();
    if addresses.len() != table.len() {
        return Err("listed an address twice");
    }
    if owners.len() != table.len() {
        return Err("listed an owner with two addresses");
    }
    Ok(Some(Act::List { table }))
}
