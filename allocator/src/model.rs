//! The allocator's domain types, below every layer that uses them: what the
//! store keeps of an allocation ([`Record`]) and of a change ([`Change`]),
//! the checked requests, and what clients are answered ([`Allocation`],
//! [`Event`], [`Page`], the pool reports). No I/O.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::addresses::pool::{Family, Pools};

/// What the store keeps of an allocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The owner holding the address.
    pub owner: String,
    /// Labels given at allocation.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Allocation time, nanoseconds since the Unix epoch.
    pub created_unix_nanos: u64,
    /// Store revision of the write that created the allocation.
    pub revision: u64,
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// An allocation was created.
    Allocated,
    /// An allocation was removed.
    Released,
}

/// One entry of the change history: what the write of `revision` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The revision of the write.
    pub revision: u64,
    /// Allocated or released.
    pub kind: ChangeKind,
    /// The address.
    pub address: IpAddr,
    /// The allocation created, or the one removed as it was.
    pub record: Record,
}

/// One durable change, as watchers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Revision of the write.
    pub revision: u64,
    /// Allocated or released.
    pub kind: ChangeKind,
    /// The allocation created, or the one released as it was.
    pub allocation: Allocation,
}

impl Event {
    /// The event of a change, its address placed in `pools`.
    pub fn from_change(pools: &Pools, change: Change) -> Event {
        let Change {
            revision,
            kind,
            address,
            record,
        } = change;
        Event {
            revision,
            kind,
            allocation: Allocation::at(pools, address, record),
        }
    }
}

/// A checked Allocate request.
#[derive(Clone, Debug, Default)]
pub struct AllocateArgs {
    /// Named pool; `None` means the default pool (or, with an address, the
    /// pool that contains it).
    pub pool: Option<String>,
    /// The owner.
    pub owner: String,
    /// A specific address.
    pub address: Option<IpAddr>,
    /// Labels to store.
    pub labels: BTreeMap<String, String>,
    /// Family when no address is given.
    pub family: Option<Family>,
    /// The address is already in use by the owner: the outside-pools rule
    /// does not apply to it.
    pub adopt: bool,
    /// The owner moves: another address it holds is released in the same
    /// write.
    pub replace_held: bool,
    /// Who asks, and what they may touch.
    pub scope: Scope,
}

/// A checked Release request: owner, address or both.
#[derive(Clone, Debug, Default)]
pub struct ReleaseArgs {
    /// The owner whose address to release.
    pub owner: Option<String>,
    /// The address to release.
    pub address: Option<IpAddr>,
    /// Who asks, and what they may touch.
    pub scope: Scope,
}

/// Who is calling and what it may touch: the owners (by prefix) it may
/// allocate and release, and the pools it may draw from. The default scope,
/// a caller on the unauthenticated local listener, may touch everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// The credential's name, for errors and logs; empty for a caller
    /// without one.
    pub credential: String,
    /// Owner prefixes it may allocate and release; `None` means every owner.
    pub owners: Option<Vec<String>>,
    /// Pools it may draw from; `None` means every pool.
    pub pools: Option<Vec<String>>,
}

/// An allocation as clients see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// The address.
    pub address: IpAddr,
    /// The configured pool containing it, if any.
    pub pool: Option<String>,
    /// What the store keeps.
    pub record: Record,
}

impl Allocation {
    /// The allocation `record` at `address`, in the pool of `pools` that
    /// contains it, if any.
    pub fn at(pools: &Pools, address: IpAddr, record: Record) -> Allocation {
        let pool = pools
            .containing(address)
            .map(|i| pools.at(i).name().to_string());
        Allocation {
            address,
            pool,
            record,
        }
    }
}

/// One page of a List.
#[derive(Clone, Debug, Default)]
pub struct Page {
    /// Allocations, by address.
    pub allocations: Vec<Allocation>,
    /// Address after which the next page starts; `None` at the end.
    pub next_after: Option<IpAddr>,
}

/// A checked List request.
#[derive(Clone, Debug, Default)]
pub struct ListArgs {
    /// Only this pool.
    pub pool: Option<String>,
    /// Only owners with this prefix.
    pub owner_prefix: String,
    /// Who asks: only what it may read is listed.
    pub scope: Scope,
    /// Most allocations in the page.
    pub page_size: usize,
    /// Start after this address.
    pub after: Option<IpAddr>,
}

/// Figures of one pool.
#[derive(Clone, Debug)]
pub struct PoolReport {
    /// Index in [`Pools`].
    pub index: usize,
    /// Addresses the pool hands out.
    pub size: u128,
    /// Allocations in the pool's ranges.
    pub allocated: u64,
    /// Usable addresses not allocated.
    pub free: u128,
}

/// Figures of every pool and the allocations outside them.
#[derive(Clone, Debug)]
pub struct PoolsReport {
    /// One per pool, in configuration order.
    pub pools: Vec<PoolReport>,
    /// Number of allocations outside every pool.
    pub outside_count: u64,
    /// The first of them, by address.
    pub outside: Vec<Allocation>,
}
