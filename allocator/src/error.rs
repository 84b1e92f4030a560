//! The allocator's errors: one enum for the allocation rules, the reads and
//! Watch, each variant naming the field, pool, address or owner concerned.
//! The gRPC service maps every variant to a status code.

use std::net::IpAddr;

use crate::{
    addresses::pool::{Exclusion, Family},
    store::StoreError,
};

/// Errors of the allocator. The service maps each to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed request field.
    #[error("invalid {field} {value:?}: {why}")]
    Invalid {
        /// The request field.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A pool name that is not configured.
    #[error("pool {pool:?} does not exist")]
    UnknownPool {
        /// The name asked for.
        pool: String,
    },
    /// No allocation matches a lookup.
    #[error("no allocation for {what}")]
    NotFound {
        /// What was looked up.
        what: String,
    },
    /// The pool has no free address of the family.
    #[error("pool {pool:?} has no free {family} address")]
    Exhausted {
        /// The pool.
        pool: String,
        /// The family asked for.
        family: Family,
    },
    /// The requested address is held by another owner.
    #[error("address {address} is held by {holder:?}")]
    Held {
        /// The address asked for.
        address: IpAddr,
        /// Its holder.
        holder: String,
    },
    /// The owner already holds a different address.
    #[error("owner {owner:?} already holds {held}{}; release it first", pool.as_ref().map(|p| format!(" in pool {p:?}")).unwrap_or_default())]
    OwnerHoldsOther {
        /// The owner.
        owner: String,
        /// The address it holds.
        held: IpAddr,
        /// The pool of the held address, if any.
        pool: Option<String>,
    },
    /// The address lies in a pool but the pool never hands it out.
    #[error("address {address} is excluded from pool {pool:?}: {why}")]
    Excluded {
        /// The address asked for.
        address: IpAddr,
        /// The pool.
        pool: String,
        /// Why it is excluded.
        why: Exclusion,
    },
    /// An explicit address outside the named pool.
    #[error("address {address} is not in pool {pool:?}")]
    NotInPool {
        /// The address asked for.
        address: IpAddr,
        /// The pool named.
        pool: String,
    },
    /// The pool only serves explicit addresses.
    #[error("pool {pool:?} only serves requests for a specific address")]
    ExplicitOnly {
        /// The pool.
        pool: String,
    },
    /// The pool has no address of the family asked for.
    #[error("pool {pool:?} has no {family} addresses")]
    NoFamily {
        /// The pool.
        pool: String,
        /// The family asked for.
        family: Family,
    },
    /// A release naming both an owner and an address held by someone else.
    #[error("address {address} is held by {holder:?}, not by {owner:?}")]
    HeldByOther {
        /// The address.
        address: IpAddr,
        /// Its holder.
        holder: String,
        /// The owner named in the request.
        owner: String,
    },
    /// The store cannot commit now (unreachable, no quorum, a timeout, a
    /// full disk).
    #[error(
        "the store cannot commit now: {why}; nothing was changed unless it says the outcome is unknown; retry"
    )]
    StoreUnavailable {
        /// What the store said.
        why: String,
    },
    /// Other allocators sharing the store took the addresses this one
    /// chose, round after round.
    #[error(
        "lost the race for addresses to other allocators sharing the store {rounds} times in a row; nothing was changed; retry"
    )]
    LostRace {
        /// How many times.
        rounds: u32,
    },
    /// The writer has stopped (shutdown, or a failed store).
    #[error("the allocator is shutting down or its store has failed; retry later")]
    Unavailable,
    /// A watch asked to resume from a revision whose following changes the
    /// change log no longer holds.
    #[error(
        "since_revision {since} is older than the kept change history, which allows resuming from revision {oldest} on; watch again with since_revision=0"
    )]
    HistoryTrimmed {
        /// The revision asked for.
        since: u64,
        /// The oldest revision a watch can resume from.
        oldest: u64,
    },
    /// A watch asked to resume from a revision this allocator never reached.
    #[error(
        "since_revision {since} is ahead of the allocator's revision {current}: its store was replaced or reset; watch again with since_revision=0"
    )]
    RevisionAhead {
        /// The revision asked for.
        since: u64,
        /// The allocator's revision.
        current: u64,
    },
    /// A watcher fell too far behind and was cut off.
    #[error("watcher too slow; reconnect with since_revision={resume}")]
    WatcherTooSlow {
        /// The revision to reconnect with.
        resume: u64,
    },
    /// A watch ended because the allocator is shutting down.
    #[error("the allocator is shutting down; reconnect with since_revision={resume}")]
    WatchInterrupted {
        /// The revision to reconnect with.
        resume: u64,
    },
    /// Every watcher slot is taken.
    #[error("too many watchers (at most {max}); retry later")]
    TooManyWatchers {
        /// The limit.
        max: usize,
    },
    /// The caller's credential may not allocate or release this owner, nor
    /// take or release an address it holds.
    #[error("credential {credential:?} may not allocate or release owner {owner:?}: its owners start with {}", prefixes.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(" or "))]
    OwnerNotPermitted {
        /// The credential's name.
        credential: String,
        /// The owner refused.
        owner: String,
        /// The owner prefixes the credential has.
        prefixes: Vec<String>,
    },
    /// The caller's credential may not draw from this pool.
    #[error("credential {credential:?} may not draw from pool {pool:?}")]
    PoolNotPermitted {
        /// The credential's name.
        credential: String,
        /// The pool refused.
        pool: String,
    },
    /// The caller's credential may not read an allocation: its owner or its
    /// pool is not the credential's.
    #[error(
        "credential {credential:?} may not read {what}: it reads only its own owners in its own pools"
    )]
    ReadNotPermitted {
        /// The credential's name.
        credential: String,
        /// What it asked for.
        what: String,
    },
    /// The caller's credential may not take an address outside every pool.
    #[error("credential {credential:?} may not allocate {address}, which lies outside every pool")]
    OutsidePoolsNotPermitted {
        /// The credential's name.
        credential: String,
        /// The address refused.
        address: IpAddr,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An explicit address outside every pool, in no CIDR the operator
    /// allows.
    #[error(
        "address {address} lies outside every pool; the operator can allow it with --allow-outside-pools (VIPAM_ALLOW_OUTSIDE_POOLS) naming a CIDR that holds it"
    )]
    OutsidePools {
        /// The address asked for.
        address: IpAddr,
    },
    /// A pool that does not admit the owner.
    #[error("pool {pool:?} does not admit owner {owner:?}: it admits only owners starting with {}", prefixes.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", "))]
    PoolRefusesOwner {
        /// The pool.
        pool: String,
        /// The owner asking.
        owner: String,
        /// The owner prefixes the pool admits.
        prefixes: Vec<String>,
    },
}

/// Result of the allocator.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A malformed request field.
pub(crate) fn invalid(field: &'static str, value: &str, why: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        value: value.to_string(),
        why: why.into(),
    }
}
