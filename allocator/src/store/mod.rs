//! The store seam: what the allocation rules, the writer and the readers need
//! from a database, as the [`Store`] trait, with the types every engine
//! shares ([`Record`], [`Change`], [`StoreError`]). The engines live in the
//! submodules ([`sled`], the embedded default, and [`etcd`], shared by
//! replicas); nothing outside them knows which one runs, and only an
//! engine's own files name its database.
//!
//! The contract, which the suite in `contract.rs` checks against every
//! engine:
//!
//! - Writes are staged ([`Store::put`], [`Store::delete`]) and committed
//!   together by [`Store::flush`]: atomically (all staged writes or none) and
//!   durably (on disk, or acknowledged by a quorum, before it returns). One
//!   flush covers any number of writes: that is the group commit. When it
//!   fails, none stays staged, the error says why, and none of the staged
//!   writes is applied unless the error says the outcome is unknown (a
//!   database that did not answer may have committed them). A flush with
//!   nothing staged answers `Ok(None)`.
//! - The writer decides on its own staged writes: [`Store::get_latest`] and
//!   [`Store::owner_address_latest`] see them. Every other read sees
//!   committed writes only.
//! - Scans are ordered by address, IPv4 before IPv6.
//! - Every write has a revision: the one it was staged at (the writer's
//!   numbering, one per write, when the flush answers `Ok(None)`), or the
//!   batch's (the database's numbering, when it answers `Ok(Some(r))`). A
//!   record reads back with the revision of the write that created it; each
//!   flush's revisions are higher than the last flush's, and
//!   [`Store::revision`] is at least the last of them once it returns.
//! - Every write leaves a [`Change`] at its revision in a change history
//!   that Watch replays, by revision; replaying it gives the committed
//!   allocations. A release is a change even when the same flush allocates
//!   the address again; an address allocated and released within one flush
//!   may leave both changes or none. The history keeps the most recent
//!   revisions without gaps.

pub mod etcd;
pub mod migrate;
pub mod sled;

#[cfg(test)]
pub(crate) mod contract;

use std::net::IpAddr;

use crate::{
    addresses::pool::Family,
    model::{Change, Record},
};

pub use self::etcd::{EtcdSettings, EtcdStore};
pub use self::sled::SledStore;

/// Revisions of change history kept when none is configured.
pub const DEFAULT_HISTORY: u64 = 100_000;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (I/O, corruption it detected, a lost connection).
    #[error("store: {0}")]
    Engine(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store cannot go on, for the reason given (it is not a fault of
    /// the database: another replica redefined a pool, say).
    #[error("store stopped: {0}")]
    Stopped(String),
    /// The database cannot be reached or cannot commit now (no quorum, a
    /// timeout): nothing staged was applied, unless the error says the
    /// outcome is unknown; the next request may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Another writer sharing the database changed a key the batch relied
    /// on: nothing staged was applied, and the committed reads have caught
    /// up with the change, so deciding again sees it.
    #[error("store: another writer changed an entry first (at revision {seen})")]
    Conflict {
        /// The database revision at which the conflict was seen.
        seen: u64,
    },
    /// Another installation sharing the database defines a pool differently.
    #[error(
        "pool {pool} is defined differently in the shared store: there \"{theirs}\", here \"{ours}\"; give every replica the same --pool, or use another --etcd-prefix"
    )]
    PoolDisagrees {
        /// The pool.
        pool: String,
        /// This replica's definition.
        ours: String,
        /// The stored one.
        theirs: String,
    },
    /// A key or value this version cannot read.
    #[error("store: unreadable entry {key}: {why}")]
    Corrupt {
        /// The key, escaped.
        key: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The items of a scan, in order; each read may fail on its own.
pub type Scan<T> = Box<dyn Iterator<Item = Result<T>>>;

/// A store engine: allocations by address, an index by owner, the store
/// revision and the change history, with staged writes committed in atomic,
/// durable batches. See the module documentation for the contract.
pub trait Store: Send + Sync + 'static {
    /// The allocation at `ip`, as committed.
    fn get(&self, ip: IpAddr) -> Result<Option<Record>>;

    /// The address held by `owner`, as committed.
    fn owner_address(&self, owner: &str) -> Result<Option<IpAddr>>;

    /// The allocation at `ip`, staged writes included: what the writer
    /// decides on.
    fn get_latest(&self, ip: IpAddr) -> Result<Option<Record>>;

    /// The address held by `owner`, staged writes included: what the writer
    /// decides on.
    fn owner_address_latest(&self, owner: &str) -> Result<Option<IpAddr>>;

    /// [`Store::get_latest`] for a decision of the writer. A store shared
    /// with other writers checks at the next flush that the allocation is
    /// still as read, and fails it with [`StoreError::Conflict`] when not,
    /// also when the batch writes nothing; a repeated read answers as the
    /// first.
    fn get_for_decision(&self, ip: IpAddr) -> Result<Option<Record>> {
        self.get_latest(ip)
    }

    /// [`Store::owner_address_latest`] for a decision of the writer, checked
    /// at the next flush as [`Store::get_for_decision`] is.
    fn owner_address_for_decision(&self, owner: &str) -> Result<Option<IpAddr>> {
        self.owner_address_latest(owner)
    }

    /// The revision the store stands at, which the writer stages its next
    /// write after: for an engine that takes the writer's numbering, the
    /// last write's, staged or not (0 for a new store); for one whose
    /// database numbers the batches, the database revision its committed
    /// reads show.
    fn revision(&self) -> Result<u64>;

    /// Stages an allocation, its owner index and its change, at the store
    /// revision `record.revision`. The writer puts only an address it saw
    /// free, for an owner it saw holding nothing; a store shared with other
    /// writers fails the flush with [`StoreError::Conflict`] when another
    /// took either since.
    fn put(&self, ip: IpAddr, record: &Record) -> Result<()>;

    /// Stages the removal of the allocation `record` at `ip` and of its owner
    /// index, and its change, at the store revision `revision`. `record` is
    /// the allocation as the writer saw it; a store shared with other
    /// writers fails the flush with [`StoreError::Conflict`] when it changed
    /// since.
    fn delete(&self, ip: IpAddr, record: &Record, revision: u64) -> Result<()>;

    /// Commits every staged write as one atomic batch and makes every write
    /// so far durable. When it fails, none of the staged writes is applied
    /// and none stays staged. `Ok(Some(r))`: the database gave every write
    /// of the batch its own revision `r` (which replaces the staged ones);
    /// `Ok(None)`: the staged revisions stand (or nothing was staged).
    fn flush(&self) -> Result<Option<u64>>;

    /// Most requests one flush may carry (each writes up to two keys).
    fn max_batch(&self) -> usize {
        usize::MAX
    }

    /// For a database shared by several writers: every change committed
    /// since the last call (this writer's and the others'), in revision
    /// order, already visible to the committed reads; the writer takes them
    /// into its taken set and publishes them to watchers. `None` for an
    /// engine with this writer alone, whose own changes the writer
    /// publishes. An error means the store cannot go on.
    fn observed(&self) -> Result<Option<Vec<Change>>> {
        Ok(None)
    }

    /// Whether other writers share the database (then [`Store::observed`]
    /// reports every committed change).
    fn is_shared(&self) -> bool {
        false
    }

    /// Calls `wake` whenever [`Store::observed`] has something new.
    fn on_observed(&self, wake: Box<dyn Fn() + Send + Sync>) {
        drop(wake);
    }

    /// Whether the store can serve now; the reason when it cannot.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    /// Committed allocations of a family from `first` to `last`
    /// (inclusive), by address.
    fn scan(&self, family: Family, first: u128, last: u128) -> Scan<(IpAddr, Record)>;

    /// Every committed allocation after `after` (or from the first), by
    /// address.
    fn scan_after(&self, after: Option<IpAddr>) -> Scan<(IpAddr, Record)>;

    /// Every committed allocated address, by address.
    fn addresses(&self) -> Scan<IpAddr>;

    /// The committed changes after revision `after` up to `last`
    /// (inclusive), by revision. Gaps mean the history no longer holds those
    /// revisions.
    fn changes(&self, after: u64, last: u64) -> Scan<Change>;

    /// The oldest revision the history covers (every change from it on is
    /// held), `None` when it holds none.
    fn first_change(&self) -> Result<Option<u64>>;
}
