//! The store: the one type ([`Store`]) through which the allocation rules,
//! the writer and the readers reach a database, in front of a crate-private
//! [`Engine`] trait that each engine implements alike: [`sled`], the
//! embedded default, and [`etcd`], shared by replicas. Engine quirks stay in
//! the engines, errors come out engine-neutral ([`StoreError`]), and only an
//! engine's own files name its database. [`migrate`] copies a store into
//! another.
//!
//! The contract, which the suite in `contract.rs` checks against every
//! engine:
//!
//! - The writer stages writes ([`Store::stage`]) and commits them together
//!   with [`Store::flush`]: atomically (all staged writes or none) and
//!   durably (on disk, or acknowledged by a quorum, before it returns). One
//!   flush covers any number of writes: that is the group commit. A flush
//!   writes each address at most once. When it fails, none stays staged, the
//!   error says why, and none of the staged writes is applied unless the
//!   error says the outcome is unknown (a database that did not answer may
//!   have committed them): committed reads never show them, and the next
//!   writes are numbered after the last committed revision.
//! - Every write is one [`Change`] with a revision of its own, which the
//!   store gives it: [`Store::flush`] returns the flush's changes, by
//!   revision, and an allocation reads back with the revision of its change.
//!   Revisions grow from change to change, within a flush and across
//!   flushes, and the changes of other writers sharing the database come
//!   from [`Store::observed`] (never any on sled), together with the
//!   revision up to which the store has shown every change.
//! - The writer decides on [`Store::record_for_decision`] and
//!   [`Store::owner_for_decision`], which see its staged writes; a store
//!   shared with other writers checks at the flush that what they read still
//!   holds, and fails it with [`StoreError::Conflict`] when not. Every other
//!   read sees committed writes only.
//! - Scans are ordered by address, IPv4 before IPv6.
//! - The change history lists every change by revision, without gaps, for
//!   the most recent revisions; replaying it gives the committed
//!   allocations.

pub mod etcd;
pub mod migrate;
pub mod sled;

#[cfg(test)]
pub(crate) mod contract;

use std::{future::Future, net::IpAddr, sync::Arc, time::Duration};

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
    /// timeout, a full disk): nothing staged was applied, unless the error
    /// says the outcome is unknown; the next request may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Another writer sharing the database changed a key the batch relied
    /// on: nothing staged was applied, and the committed reads have caught
    /// up with the change, so deciding again sees it.
    #[error("store: another writer changed an entry first (at revision {seen})")]
    Conflict {
        /// The revision at which the conflict was seen.
        seen: u64,
    },
    /// The database holds a setting that disagrees with this allocator's
    /// (another replica defines a pool differently): the store refuses to
    /// open until the operator makes them agree.
    #[error("{0}")]
    Refused(String),
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

/// A write the writer stages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Allocates `address` to `record.owner`, which holds nothing; the store
    /// gives the record the revision of its change.
    Allocate {
        /// The address, free when the writer decided.
        address: IpAddr,
        /// The allocation; its revision is the store's to give.
        record: Record,
    },
    /// Releases the allocation `record` at `address`, as the writer decided
    /// on it.
    Release {
        /// The address.
        address: IpAddr,
        /// The allocation as read for the decision.
        record: Record,
    },
}

impl Write {
    /// The allocation of `address` to `record.owner`.
    pub fn allocate(address: IpAddr, record: &Record) -> Write {
        Write::Allocate {
            address,
            record: record.clone(),
        }
    }

    /// The release of the allocation `record` at `address`.
    pub fn release(address: IpAddr, record: &Record) -> Write {
        Write::Release {
            address,
            record: record.clone(),
        }
    }

    /// The address written.
    pub fn address(&self) -> IpAddr {
        match self {
            Write::Allocate { address, .. } | Write::Release { address, .. } => *address,
        }
    }
}

/// Work a store needs done for as long as it is used (following a shared
/// database), for the program's supervisor to run and watch.
pub struct Background {
    /// What it is, in logs and errors.
    pub name: &'static str,
    /// The work; it ends only with an error, or when the store cannot go
    /// on.
    pub run: std::pin::Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>,
}

/// An error of the store's background work.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What other writers sharing the database committed since the last call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Their changes, by revision (never any on an engine of one writer).
    pub changes: Vec<Change>,
    /// Every change up to this revision, this writer's included, has been
    /// flushed or observed.
    pub revision: u64,
}

/// What every engine does alike; see the module documentation for the
/// contract. Only [`Store`] calls it.
pub(crate) trait Engine: Send + Sync + 'static {
    fn get(&self, ip: IpAddr) -> Result<Option<Record>>;
    fn owner_address(&self, owner: &str) -> Result<Option<IpAddr>>;
    fn record_for_decision(&self, ip: IpAddr) -> Result<Option<Record>>;
    fn owner_for_decision(&self, owner: &str) -> Result<Option<IpAddr>>;
    fn revision(&self) -> Result<u64>;
    fn stage(&self, write: Write) -> Result<()>;
    fn flush(&self) -> Result<Vec<Change>>;
    fn observed(&self) -> Result<Observed>;
    fn on_observed(&self, wake: Box<dyn Fn() + Send + Sync>);
    fn catch_up(&self, revision: u64, limit: Duration) -> Result<u64>;
    fn number_after(&self, revision: u64);
    fn max_batch(&self) -> usize;
    fn health(&self) -> Result<(), String>;
    fn background(&self) -> Option<Background>;
    fn scan(&self, family: Family, first: u128, last: u128) -> Scan<(IpAddr, Record)>;
    fn scan_after(&self, after: Option<IpAddr>) -> Scan<(IpAddr, Record)>;
    fn addresses(&self) -> Scan<IpAddr>;
    fn changes(&self, after: u64, last: u64) -> Scan<Change>;
    fn first_change(&self) -> Result<Option<u64>>;
}

/// The store, whichever engine runs it: allocations by address, an index
/// by owner, the revision and the change history, with staged writes
/// committed in atomic, durable flushes. Clones share the engine.
#[derive(Clone)]
pub struct Store {
    engine: Arc<dyn Engine>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl From<SledStore> for Store {
    fn from(engine: SledStore) -> Store {
        Store::new(engine)
    }
}

impl From<EtcdStore> for Store {
    fn from(engine: EtcdStore) -> Store {
        Store::new(engine)
    }
}

impl Store {
    /// The store over `engine`.
    pub(crate) fn new(engine: impl Engine) -> Store {
        Store {
            engine: Arc::new(engine),
        }
    }

    /// The allocation at `ip`, as committed.
    pub fn get(&self, ip: IpAddr) -> Result<Option<Record>> {
        self.engine.get(ip)
    }

    /// The address held by `owner`, as committed.
    pub fn owner_address(&self, owner: &str) -> Result<Option<IpAddr>> {
        self.engine.owner_address(owner)
    }

    /// The allocation at `ip` as the writer decides on it: staged writes
    /// included; on a store shared with other writers, checked at the next
    /// flush (a repeated read answers as the first).
    pub fn record_for_decision(&self, ip: IpAddr) -> Result<Option<Record>> {
        self.engine.record_for_decision(ip)
    }

    /// The address held by `owner` as the writer decides on it, as
    /// [`Store::record_for_decision`].
    pub fn owner_for_decision(&self, owner: &str) -> Result<Option<IpAddr>> {
        self.engine.owner_for_decision(owner)
    }

    /// The revision up to which the committed reads show every change.
    pub fn revision(&self) -> Result<u64> {
        self.engine.revision()
    }

    /// Stages a write for the next flush. The writer writes each address at
    /// most once per flush, and only what it decided on.
    pub fn stage(&self, write: Write) -> Result<()> {
        self.engine.stage(write)
    }

    /// Commits every staged write as one atomic, durable batch: the changes
    /// it made, by revision, each with its own revision. Nothing staged: no
    /// change, and nothing to wait for (a store shared with other writers
    /// still checks what the decisions read).
    pub fn flush(&self) -> Result<Vec<Change>> {
        self.engine.flush()
    }

    /// What other writers sharing the database committed since the last
    /// call, and how far the store has shown every change. An error means
    /// the store cannot go on.
    pub fn observed(&self) -> Result<Observed> {
        self.engine.observed()
    }

    /// Calls `wake` whenever [`Store::observed`] has something new.
    pub fn on_observed(&self, wake: Box<dyn Fn() + Send + Sync>) {
        self.engine.on_observed(wake);
    }

    /// Waits up to `limit` until the store has shown every change up to
    /// `revision` (which a client may have got from another writer sharing
    /// the database); the revision it has shown. Blocks: call it off the
    /// async runtime.
    pub fn catch_up(&self, revision: u64, limit: Duration) -> Result<u64> {
        self.engine.catch_up(revision, limit)
    }

    /// Gives the next writes revisions above `revision`, where the store
    /// numbers writes itself (a database that numbers them keeps its own):
    /// a copy of another store then never reuses the source's revisions.
    pub fn number_after(&self, revision: u64) {
        self.engine.number_after(revision);
    }

    /// Most requests one flush may carry (each writes up to two keys).
    pub fn max_batch(&self) -> usize {
        self.engine.max_batch()
    }

    /// Whether the store can serve now; the reason when it cannot.
    pub fn health(&self) -> Result<(), String> {
        self.engine.health()
    }

    /// The work the store needs run for as long as it is used, once (the
    /// first call takes it): `None` for an engine that needs none.
    pub fn background(&self) -> Option<Background> {
        self.engine.background()
    }

    /// Committed allocations of a family from `first` to `last`
    /// (inclusive), by address.
    pub fn scan(&self, family: Family, first: u128, last: u128) -> Scan<(IpAddr, Record)> {
        self.engine.scan(family, first, last)
    }

    /// Every committed allocation after `after` (or from the first), by
    /// address.
    pub fn scan_after(&self, after: Option<IpAddr>) -> Scan<(IpAddr, Record)> {
        self.engine.scan_after(after)
    }

    /// Every committed allocated address, by address.
    pub fn addresses(&self) -> Scan<IpAddr> {
        self.engine.addresses()
    }

    /// The committed changes after revision `after` up to `last`
    /// (inclusive), by revision. Gaps mean the history no longer holds those
    /// revisions.
    pub fn changes(&self, after: u64, last: u64) -> Scan<Change> {
        self.engine.changes(after, last)
    }

    /// The oldest revision the history covers (every change from it on is
    /// held), `None` when it holds none.
    pub fn first_change(&self) -> Result<Option<u64>> {
        self.engine.first_change()
    }
}
