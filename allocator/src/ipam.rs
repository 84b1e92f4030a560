//! The allocation rules (idempotency per owner, explicit addresses, lowest
//! free first) and the single writer that applies them: every Allocate and
//! Release goes through one thread that writes to the store and makes each
//! batch durable with one flush before any of its requests is answered,
//! after publishing the batch's changes to watchers ([`crate::watch`]).
//! The writer stages a batch's writes and applies them in one go right
//! before the flush; reads (Get, List, pool reports) go to the store
//! directly and see a batch's writes once applied.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    intervals::IntervalSet,
    pool::{Exclusion, Family, Pools, to_int},
    store::{ChangeKind, Record, Store, StoreError},
    watch::{Event, Hub, WatchSettings},
};

/// Longest owner, in bytes.
pub const MAX_OWNER_BYTES: usize = 256;
/// Most labels on one allocation.
pub const MAX_LABELS: usize = 32;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 128;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 512;
/// Default and largest List page.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest List page.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Most records one List call reads before it returns a (possibly short) page.
pub const MAX_SCAN_PER_PAGE: usize = 10_000;
/// Most allocations outside pools that a pool report lists.
pub const OUTSIDE_LISTED: usize = 100;
/// Most requests one flush makes durable.
const MAX_BATCH: usize = 512;

/// Errors of the allocation rules. The service maps each to a gRPC code.
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
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result of the allocation rules.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn invalid(field: &'static str, value: &str, why: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        value: value.to_string(),
        why: why.into(),
    }
}

/// Checks an owner: 1 to 256 bytes, no control characters.
pub fn parse_owner(field: &'static str, value: &str) -> Result<String> {
    if value.is_empty() {
        return Err(invalid(field, value, "must not be empty"));
    }
    if value.len() > MAX_OWNER_BYTES {
        return Err(invalid(
            field,
            value,
            format!("longer than {MAX_OWNER_BYTES} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, value, "contains control characters"));
    }
    Ok(value.to_string())
}

/// Parses an address in text form; refuses the unspecified addresses.
pub fn parse_address(field: &'static str, value: &str) -> Result<IpAddr> {
    let ip: IpAddr = value
        .trim()
        .parse()
        .map_err(|_| invalid(field, value, "not an IPv4 or IPv6 address"))?;
    if ip.is_unspecified() {
        return Err(invalid(
            field,
            value,
            "the unspecified address cannot be allocated",
        ));
    }
    Ok(ip)
}

/// Checks a pool name (a DNS label).
pub fn parse_pool(field: &'static str, value: &str) -> Result<String> {
    if !vipam::names::is_pool_name(value) {
        return Err(invalid(
            field,
            value,
            format!("not a pool name ({})", vipam::names::POOL_NAME_RULE),
        ));
    }
    Ok(value.to_string())
}

/// Checks labels: at most 32, keys of 1 to 128 bytes, values of at most 512
/// bytes, no control characters.
pub fn parse_labels(
    labels: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>> {
    let labels: BTreeMap<String, String> = labels.into_iter().collect();
    if labels.len() > MAX_LABELS {
        return Err(invalid(
            "labels",
            &format!("{} labels", labels.len()),
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    for (k, v) in &labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY_BYTES || k.chars().any(char::is_control) {
            return Err(invalid(
                "labels",
                k,
                format!("a label key has 1 to {MAX_LABEL_KEY_BYTES} bytes, no control characters"),
            ));
        }
        if v.len() > MAX_LABEL_VALUE_BYTES || v.chars().any(char::is_control) {
            return Err(invalid(
                "labels",
                v,
                format!(
                    "a label value has at most {MAX_LABEL_VALUE_BYTES} bytes, no control characters"
                ),
            ));
        }
    }
    Ok(labels)
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
}

/// A checked Release request: owner, address or both.
#[derive(Clone, Debug, Default)]
pub struct ReleaseArgs {
    /// The owner whose address to release.
    pub owner: Option<String>,
    /// The address to release.
    pub address: Option<IpAddr>,
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

/// Counters shared between the writer and readers.
#[derive(Debug, Default)]
pub struct Stats {
    in_pool: Vec<AtomicU64>,
    usable_in_pool: Vec<AtomicU64>,
    outside: AtomicU64,
    /// Flushes made.
    pub flushes: AtomicU64,
    /// Requests answered by the writer.
    pub writes: AtomicU64,
    /// Current store revision.
    pub revision: AtomicU64,
    /// False once the writer has stopped.
    pub writer_alive: AtomicBool,
}

impl Stats {
    fn new(pools: usize) -> Self {
        Stats {
            in_pool: (0..pools).map(|_| AtomicU64::new(0)).collect(),
            usable_in_pool: (0..pools).map(|_| AtomicU64::new(0)).collect(),
            writer_alive: AtomicBool::new(true),
            ..Default::default()
        }
    }

    fn count(&self, pools: &Pools, ip: IpAddr, delta: i64) {
        let add = |c: &AtomicU64| {
            if delta > 0 {
                c.fetch_add(1, Ordering::Relaxed);
            } else {
                c.fetch_sub(1, Ordering::Relaxed);
            }
        };
        match pools.containing(ip) {
            Some(i) => {
                add(&self.in_pool[i]);
                if pools.at(i).is_usable(ip) {
                    add(&self.usable_in_pool[i]);
                }
            }
            None => add(&self.outside),
        }
    }
}

fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The allocation rules over the store and an in-memory set of taken
/// addresses. Owned by the writer thread.
pub struct Ipam {
    store: Store,
    pools: Arc<Pools>,
    taken: [IntervalSet; 2],
    stats: Arc<Stats>,
    revision: u64,
}

impl Ipam {
    /// Loads the taken addresses from the store. Allocations outside the
    /// configured pools stay allocated (and are counted as outside).
    pub fn load(store: Store, pools: Arc<Pools>) -> Result<Ipam, StoreError> {
        let stats = Arc::new(Stats::new(pools.len()));
        let mut taken: [IntervalSet; 2] = Default::default();
        for ip in store.addresses() {
            let ip = ip?;
            let (family, x) = to_int(ip);
            taken[family.index()].insert(x);
            stats.count(&pools, ip, 1);
        }
        let revision = store.revision()?;
        stats.revision.store(revision, Ordering::Relaxed);
        Ok(Ipam {
            store,
            pools,
            taken,
            stats,
            revision,
        })
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    fn pool_name_of(&self, ip: IpAddr) -> Option<String> {
        self.pools
            .containing(ip)
            .map(|i| self.pools.at(i).name().to_string())
    }

    fn allocation(&self, address: IpAddr, record: Record) -> Allocation {
        Allocation {
            address,
            pool: self.pool_name_of(address),
            record,
        }
    }

    /// Applies an Allocate. Returns the allocation and whether it was written
    /// (false when the owner already held it).
    pub fn allocate(&mut self, args: AllocateArgs) -> Result<(Allocation, bool)> {
        let AllocateArgs {
            pool,
            owner,
            address,
            labels,
            family,
        } = args;
        if let (Some(ip), Some(f)) = (address, family)
            && Family::of(ip) != f
        {
            return Err(invalid(
                "family",
                &format!("{f}"),
                format!("does not match address {ip}"),
            ));
        }
        let named = match &pool {
            Some(name) => Some(
                self.pools
                    .index_of(name)
                    .ok_or_else(|| Error::UnknownPool { pool: name.clone() })?,
            ),
            None => None,
        };

        // Idempotency, and one address per owner, come before anything else.
        if let Some(held) = self.store.owner_address_latest(&owner)? {
            let record = self
                .store
                .get_latest(held)?
                .ok_or_else(|| StoreError::Corrupt {
                    key: format!("o{owner}"),
                    why: format!("owner index points to {held}, which holds no allocation"),
                })?;
            let held_pool = self.pools.containing(held);
            let same_address = address.is_none_or(|a| a == held);
            let same_pool = named.is_none_or(|n| held_pool == Some(n));
            let same_family = family.is_none_or(|f| f == Family::of(held));
            if same_address && same_pool && same_family {
                return Ok((self.allocation(held, record), false));
            }
            return Err(Error::OwnerHoldsOther {
                owner,
                held,
                pool: self.pool_name_of(held),
            });
        }

        let ip = match address {
            Some(ip) => self.check_explicit(ip, named)?,
            None => self.lowest_free(named.unwrap_or(self.pools.default_index()), family)?,
        };
        self.revision += 1;
        let record = Record {
            owner,
            labels,
            created_unix_nanos: now_unix_nanos(),
            revision: self.revision,
        };
        if let Err(e) = self.store.put(ip, &record) {
            self.revision -= 1;
            return Err(e.into());
        }
        let (f, x) = to_int(ip);
        self.taken[f.index()].insert(x);
        self.stats.count(&self.pools, ip, 1);
        self.stats.revision.store(self.revision, Ordering::Relaxed);
        Ok((self.allocation(ip, record), true))
    }

    fn check_explicit(&self, ip: IpAddr, named: Option<usize>) -> Result<IpAddr> {
        let pool = match named {
            Some(i) => {
                let pool = self.pools.at(i);
                if !pool.covers(ip) {
                    return Err(Error::NotInPool {
                        address: ip,
                        pool: pool.name().to_string(),
                    });
                }
                Some(pool)
            }
            None => self.pools.containing(ip).map(|i| self.pools.at(i)),
        };
        if let Some(pool) = pool
            && let Some(why) = pool.exclusion(ip)
        {
            return Err(Error::Excluded {
                address: ip,
                pool: pool.name().to_string(),
                why,
            });
        }
        if let Some(holder) = self.store.get_latest(ip)? {
            return Err(Error::Held {
                address: ip,
                holder: holder.owner,
            });
        }
        Ok(ip)
    }

    fn lowest_free(&self, index: usize, family: Option<Family>) -> Result<IpAddr> {
        let pool = self.pools.at(index);
        if pool.explicit_only() {
            return Err(Error::ExplicitOnly {
                pool: pool.name().to_string(),
            });
        }
        let family = family.unwrap_or_else(|| pool.default_family());
        if !pool.has_family(family) {
            return Err(Error::NoFamily {
                pool: pool.name().to_string(),
                family,
            });
        }
        let x = self.taken[family.index()]
            .first_free_in(pool.usable(family))
            .ok_or_else(|| Error::Exhausted {
                pool: pool.name().to_string(),
                family,
            })?;
        Ok(crate::pool::from_int(family, x))
    }

    /// Applies a Release. Returns the released allocation, or `None` when
    /// nothing matched.
    pub fn release(&mut self, args: ReleaseArgs) -> Result<Option<Allocation>> {
        let ReleaseArgs { owner, address } = args;
        let ip = match (address, &owner) {
            (Some(ip), _) => ip,
            (None, Some(owner)) => match self.store.owner_address_latest(owner)? {
                Some(ip) => ip,
                None => return Ok(None),
            },
            (None, None) => return Err(invalid("owner", "", "give an owner, an address, or both")),
        };
        let Some(record) = self.store.get_latest(ip)? else {
            return Ok(None);
        };
        if let Some(owner) = owner
            && owner != record.owner
        {
            return Err(Error::HeldByOther {
                address: ip,
                holder: record.owner,
                owner,
            });
        }
        self.revision += 1;
        if let Err(e) = self.store.delete(ip, &record, self.revision) {
            self.revision -= 1;
            return Err(e.into());
        }
        let (f, x) = to_int(ip);
        self.taken[f.index()].remove(x);
        self.stats.count(&self.pools, ip, -1);
        self.stats.revision.store(self.revision, Ordering::Relaxed);
        Ok(Some(self.allocation(ip, record)))
    }

    /// The changes after revision `after` up to `last`, from the change log.
    fn events_between(&self, after: u64, last: u64) -> Result<Vec<Event>> {
        self.store
            .changes(after, last)
            .map(|change| {
                let change = change?;
                Ok(Event {
                    revision: change.revision,
                    kind: change.kind,
                    allocation: self.allocation(change.address, change.record),
                })
            })
            .collect()
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.store.flush()?;
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

enum Command {
    Allocate(AllocateArgs, oneshot::Sender<Result<Allocation>>),
    Release(ReleaseArgs, oneshot::Sender<Result<Option<Allocation>>>),
    /// Answered with the store revision once every write applied before it
    /// is durable and published.
    Barrier(oneshot::Sender<u64>),
}

/// Answers a request once its batch is durable.
enum Reply {
    Allocate(oneshot::Sender<Result<Allocation>>, Result<Allocation>),
    Release(
        oneshot::Sender<Result<Option<Allocation>>>,
        Result<Option<Allocation>>,
    ),
    Barrier(oneshot::Sender<u64>),
}

impl Reply {
    fn fail(self) -> Option<Self> {
        match self {
            Reply::Allocate(tx, Ok(_)) => Some(Reply::Allocate(tx, Err(Error::Unavailable))),
            Reply::Release(tx, Ok(_)) => Some(Reply::Release(tx, Err(Error::Unavailable))),
            // A dropped barrier answers UNAVAILABLE.
            Reply::Barrier(_) => None,
            other => Some(other),
        }
    }

    fn send(self, revision: u64) {
        // A requester that has gone away (timeout, cancelled) needs no answer.
        match self {
            Reply::Allocate(tx, r) => drop(tx.send(r)),
            Reply::Release(tx, r) => drop(tx.send(r)),
            Reply::Barrier(tx) => drop(tx.send(revision)),
        }
    }
}

/// Runs the writer until every [`Handle`] is dropped (then it flushes and
/// returns `Ok`) or a flush fails (then it returns the error and every later
/// write is answered `UNAVAILABLE`). After each durable batch it publishes
/// the batch's changes to watchers, then answers its requests.
fn run_writer(
    mut ipam: Ipam,
    mut rx: mpsc::Receiver<Command>,
    hub: &Hub,
) -> Result<(), StoreError> {
    let stats = ipam.stats();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let result = loop {
        let Some(first) = rx.blocking_recv() else {
            break ipam.flush();
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let published = ipam.revision;
        // Events are built only while someone watches; a watcher that
        // subscribes during the batch gets them from the change log.
        let mut events = hub.is_watched().then(Vec::new);
        let mut dirty = false;
        let replies: Vec<Reply> = batch
            .drain(..)
            .map(|cmd| match cmd {
                Command::Allocate(args, tx) => {
                    let result = ipam.allocate(args).map(|(a, wrote)| {
                        dirty |= wrote;
                        if wrote && let Some(events) = &mut events {
                            events.push(Event {
                                revision: a.record.revision,
                                kind: ChangeKind::Allocated,
                                allocation: a.clone(),
                            });
                        }
                        a
                    });
                    Reply::Allocate(tx, result)
                }
                Command::Release(args, tx) => {
                    let result = ipam.release(args);
                    if let Ok(Some(a)) = &result {
                        dirty = true;
                        if let Some(events) = &mut events {
                            events.push(Event {
                                revision: ipam.revision,
                                kind: ChangeKind::Released,
                                allocation: a.clone(),
                            });
                        }
                    }
                    Reply::Release(tx, result)
                }
                Command::Barrier(tx) => Reply::Barrier(tx),
            })
            .collect();
        stats
            .writes
            .fetch_add(replies.len() as u64, Ordering::Relaxed);
        // Answers wait for the flush even when this request wrote nothing: an
        // idempotent answer may report a write made earlier in this batch.
        let flushed = if dirty { ipam.flush() } else { Ok(()) };
        match flushed {
            Ok(()) => {
                if dirty {
                    hub.publish(ipam.revision, events, || {
                        ipam.events_between(published, ipam.revision)
                    });
                }
                let revision = ipam.revision;
                replies.into_iter().for_each(|r| r.send(revision));
            }
            Err(e) => {
                tracing::error!(error = %e, "store flush failed; refusing further writes");
                replies
                    .into_iter()
                    .filter_map(Reply::fail)
                    .for_each(|r| r.send(0));
                break Err(e);
            }
        }
    };
    stats.writer_alive.store(false, Ordering::Relaxed);
    rx.close();
    hub.close();
    result
}

/// The running writer thread.
pub struct Writer {
    done: oneshot::Receiver<Result<(), StoreError>>,
}

impl Writer {
    /// Waits until the writer stops: after the last [`Handle`] is dropped
    /// (`Ok`, all writes flushed) or when a flush fails.
    pub async fn wait(self) -> Result<(), StoreError> {
        self.done.await.unwrap_or(Ok(()))
    }
}

/// The allocator as the gRPC service and HTTP endpoints use it.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    store: Store,
    pools: Arc<Pools>,
    stats: Arc<Stats>,
    hub: Arc<Hub>,
}

/// Starts the writer thread over `ipam`, with room for `queue` waiting
/// requests and the default watch limits.
pub fn start(ipam: Ipam, store: Store, queue: usize) -> std::io::Result<(Handle, Writer)> {
    start_with(ipam, store, queue, WatchSettings::default())
}

/// Starts the writer thread over `ipam`, with room for `queue` waiting
/// requests and the given watch limits.
pub fn start_with(
    ipam: Ipam,
    store: Store,
    queue: usize,
    watch: WatchSettings,
) -> std::io::Result<(Handle, Writer)> {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let (done_tx, done) = oneshot::channel();
    let pools = ipam.pools.clone();
    let stats = ipam.stats();
    let hub = Hub::new(ipam.revision, watch);
    let writer_hub = hub.clone();
    std::thread::Builder::new()
        .name("vipam-writer".into())
        .spawn(move || {
            let result = run_writer(ipam, rx, &writer_hub);
            drop(done_tx.send(result));
        })?;
    Ok((
        Handle {
            tx,
            store,
            pools,
            stats,
            hub,
        },
        Writer { done },
    ))
}

impl Handle {
    /// The configured pools.
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// Shared counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Where watchers subscribe.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Ends every watch stream (on shutdown, before draining requests).
    pub fn close_watchers(&self) {
        self.hub.close();
    }

    /// The store revision once every write applied so far is durable and
    /// published to watchers.
    pub async fn barrier(&self) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Barrier(tx))
            .await
            .map_err(|_| Error::Unavailable)?;
        rx.await.map_err(|_| Error::Unavailable)
    }

    /// Whether the writer still takes requests.
    pub fn is_ready(&self) -> bool {
        self.stats.writer_alive.load(Ordering::Relaxed) && !self.tx.is_closed()
    }

    /// Allocates; answered once durable.
    pub async fn allocate(&self, args: AllocateArgs) -> Result<Allocation> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Allocate(args, tx))
            .await
            .map_err(|_| Error::Unavailable)?;
        rx.await.map_err(|_| Error::Unavailable)?
    }

    /// Releases; answered once durable.
    pub async fn release(&self, args: ReleaseArgs) -> Result<Option<Allocation>> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Release(args, tx))
            .await
            .map_err(|_| Error::Unavailable)?;
        rx.await.map_err(|_| Error::Unavailable)?
    }

    pub(crate) fn allocation(&self, address: IpAddr, record: Record) -> Allocation {
        let pool = self
            .pools
            .containing(address)
            .map(|i| self.pools.at(i).name().to_string());
        Allocation {
            address,
            pool,
            record,
        }
    }

    /// The allocation held by an owner.
    pub fn get_by_owner(&self, owner: &str) -> Result<Allocation> {
        let not_found = || Error::NotFound {
            what: format!("owner {owner:?}"),
        };
        let ip = self.store.owner_address(owner)?.ok_or_else(not_found)?;
        let record = self.store.get(ip)?.ok_or_else(not_found)?;
        Ok(self.allocation(ip, record))
    }

    /// The allocation at an address.
    pub fn get_by_address(&self, ip: IpAddr) -> Result<Allocation> {
        let record = self.store.get(ip)?.ok_or_else(|| Error::NotFound {
            what: format!("address {ip}"),
        })?;
        Ok(self.allocation(ip, record))
    }

    /// One page of allocations, by address.
    pub fn list(&self, args: &ListArgs) -> Result<Page> {
        let ListArgs {
            pool,
            owner_prefix,
            page_size,
            after,
        } = args;
        let page_size = (*page_size).clamp(1, MAX_PAGE_SIZE);
        let entries: Box<dyn Iterator<Item = Result<(IpAddr, Record), StoreError>>> = match pool {
            None => Box::new(self.store.scan_after(*after)),
            Some(name) => {
                let index = self
                    .pools
                    .index_of(name)
                    .ok_or_else(|| Error::UnknownPool { pool: name.clone() })?;
                let pool = self.pools.at(index);
                let store = self.store.clone();
                let after = after.map(to_int);
                let spans: Vec<(Family, crate::intervals::Span)> = Family::ALL
                    .into_iter()
                    .flat_map(|f| pool.covered(f).iter().map(move |s| (f, *s)))
                    .collect();
                Box::new(spans.into_iter().flat_map(move |(family, span)| {
                    // Where this span's scan starts, or None when the page
                    // token is already past it.
                    let first = match after {
                        Some((f, x)) if f == family && x >= span.last => None,
                        Some((f, x)) if f == family => Some((x + 1).max(span.first)),
                        Some((f, _)) if f > family => None,
                        _ => Some(span.first),
                    };
                    let store = store.clone();
                    first
                        .into_iter()
                        .flat_map(move |first| store.scan(family, first, span.last))
                }))
            }
        };
        let mut page = Page::default();
        let mut last_seen = None;
        for (scanned, entry) in entries.enumerate() {
            if scanned == MAX_SCAN_PER_PAGE {
                page.next_after = last_seen;
                return Ok(page);
            }
            let (ip, record) = entry?;
            last_seen = Some(ip);
            if record.owner.starts_with(owner_prefix.as_str()) {
                page.allocations.push(self.allocation(ip, record));
                if page.allocations.len() == page_size {
                    page.next_after = Some(ip);
                    return Ok(page);
                }
            }
        }
        Ok(page)
    }

    /// Figures of every pool, and the first allocations outside them.
    pub fn pools_report(&self) -> Result<PoolsReport> {
        let pools = self
            .pools
            .iter()
            .enumerate()
            .map(|(index, pool)| {
                let size = pool.size();
                let usable_taken =
                    u128::from(self.stats.usable_in_pool[index].load(Ordering::Relaxed));
                PoolReport {
                    index,
                    size,
                    allocated: self.stats.in_pool[index].load(Ordering::Relaxed),
                    free: size.saturating_sub(usable_taken),
                }
            })
            .collect();
        let mut outside = Vec::new();
        'families: for family in Family::ALL {
            for span in self.pools.outside(family) {
                for entry in self.store.scan(family, span.first, span.last) {
                    if outside.len() == OUTSIDE_LISTED {
                        break 'families;
                    }
                    let (ip, record) = entry?;
                    outside.push(self.allocation(ip, record));
                }
            }
        }
        Ok(PoolsReport {
            pools,
            outside_count: self.stats.outside.load(Ordering::Relaxed),
            outside,
        })
    }

    /// Bytes the store takes on disk.
    pub fn store_size(&self) -> Result<u64, StoreError> {
        self.store.size_on_disk()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::PoolDef;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn mk_pools(specs: &[&str]) -> Arc<Pools> {
        let defs: Vec<PoolDef> = specs
            .iter()
            .map(|s| s.parse().expect("test pool"))
            .collect();
        Arc::new(Pools::new(defs, None).expect("test pools"))
    }

    fn mk_ipam(dir: &std::path::Path, specs: &[&str]) -> Ipam {
        let store = Store::open(dir, 8 << 20).expect("open store");
        Ipam::load(store, mk_pools(specs)).expect("load")
    }

    fn mk_args(owner: &str) -> AllocateArgs {
        AllocateArgs {
            owner: owner.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn allocate_is_idempotent_per_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
        let (first, wrote) = ipam.allocate(mk_args("svc")).expect("allocate");
        assert!(wrote);
        let (again, wrote_again) = ipam.allocate(mk_args("svc")).expect("allocate again");
        assert!(!wrote_again);
        assert_eq!(first, again);
    }

    #[test]
    fn owner_holding_another_address_is_refused_before_checking_the_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
        ipam.allocate(mk_args("svc")).expect("allocate");
        ipam.allocate(mk_args("other")).expect("allocate other");
        // 10.0.0.2 is held by "other"; "svc" still hears that it holds 10.0.0.1.
        let err = ipam
            .allocate(AllocateArgs {
                address: Some(ip("10.0.0.2")),
                ..mk_args("svc")
            })
            .expect_err("must fail");
        assert!(
            matches!(err, Error::OwnerHoldsOther { held, .. } if held == ip("10.0.0.1")),
            "{err}"
        );
    }

    #[test]
    fn a_changed_pool_across_restarts_keeps_every_allocation() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
            for owner in ["s1", "s2", "s3"] {
                ipam.allocate(mk_args(owner)).expect("allocate");
            }
            ipam.flush().expect("flush");
        }
        // The pool moves and shrinks: 10.0.0.1-3 now lie outside every pool.
        let store = Store::open(dir.path(), 8 << 20).expect("reopen");
        let mut ipam = Ipam::load(store.clone(), mk_pools(&["a=10.0.0.2-10.0.0.9"])).expect("load");
        assert_eq!(ipam.stats.outside.load(Ordering::Relaxed), 1);
        assert_eq!(ipam.stats.in_pool[0].load(Ordering::Relaxed), 2);
        let (held, wrote) = ipam.allocate(mk_args("s1")).expect("s1 keeps its address");
        assert_eq!(
            (held.address, held.pool, wrote),
            (ip("10.0.0.1"), None, false)
        );
        let (new, _) = ipam.allocate(mk_args("s4")).expect("allocate s4");
        assert_eq!(
            new.address,
            ip("10.0.0.4"),
            "10.0.0.2 and .3 are still held"
        );
        ipam.flush().expect("flush");
        let (handle, writer) = start(ipam, store, 8).expect("start");
        let report = handle.pools_report().expect("report");
        assert_eq!(report.outside_count, 1);
        assert_eq!(
            report.outside.iter().map(|a| a.address).collect::<Vec<_>>(),
            vec![ip("10.0.0.1")]
        );
        drop(handle);
        drop(writer);
    }

    #[test]
    fn the_revision_grows_with_every_write_and_survives_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
            let (a, _) = ipam.allocate(mk_args("s1")).expect("allocate");
            assert_eq!(a.record.revision, 1);
            ipam.release(ReleaseArgs {
                owner: Some("s1".into()),
                address: None,
            })
            .expect("release");
            ipam.flush().expect("flush");
        }
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
        let (a, _) = ipam.allocate(mk_args("s2")).expect("allocate");
        assert_eq!(a.record.revision, 3);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Allocate { owner: u8, address: Option<u8> },
        Release { owner: u8 },
        ReleaseAddress { address: u8 },
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12, prop::option::of(0u8..16))
                .prop_map(|(owner, address)| Op::Allocate { owner, address }),
            (0u8..12).prop_map(|owner| Op::Release { owner }),
            (0u8..16).prop_map(|address| Op::ReleaseAddress { address }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Against a plain model: one address per owner, never one address
        /// twice, lowest free first, reserved and edge addresses never
        /// handed out, release then allocate reuses.
        #[test]
        fn allocator_agrees_with_a_model(ops in prop::collection::vec(arb_op(), 1..60)) {
            let dir = tempfile::tempdir().expect("tempdir");
            // 10.0.0.0/28 minus network, broadcast and reserved .5: 13 usable.
            let store = Store::open(dir.path(), 8 << 20).expect("open store");
            let mut def: PoolDef = "a=10.0.0.0/28".parse().expect("pool");
            def.reserved = vec!["10.0.0.5".parse().expect("reserved")];
            let pools = Arc::new(Pools::new(vec![def], None).expect("pools"));
            let mut ipam = Ipam::load(store, pools).expect("load");
            let usable: Vec<u8> = (1..15).filter(|h| *h != 5).collect();
            let mut by_owner: HashMap<u8, u8> = HashMap::new();
            let host = |a: IpAddr| match a { IpAddr::V4(v4) => v4.octets()[3], IpAddr::V6(_) => u8::MAX };
            for op in ops {
                match op {
                    Op::Allocate { owner, address } => {
                        let args = AllocateArgs {
                            owner: format!("o{owner}"),
                            address: address.map(|h| IpAddr::from([10, 0, 0, h])),
                            ..Default::default()
                        };
                        let result = ipam.allocate(args);
                        let held: BTreeSet<u8> = by_owner.values().copied().collect();
                        match (by_owner.get(&owner), address) {
                            (Some(&h), None) => prop_assert_eq!(host(result.expect("idempotent").0.address), h),
                            (Some(&h), Some(a)) if a == h => prop_assert_eq!(host(result.expect("idempotent").0.address), h),
                            (Some(_), Some(_)) => prop_assert!(matches!(result, Err(Error::OwnerHoldsOther { .. })), "{:?}", result),
                            (None, None) => match usable.iter().find(|h| !held.contains(h)) {
                                Some(&lowest) => {
                                    let got = host(result.expect("free address").0.address);
                                    prop_assert_eq!(got, lowest);
                                    by_owner.insert(owner, got);
                                }
                                None => prop_assert!(matches!(result, Err(Error::Exhausted { .. })), "{:?}", result),
                            },
                            (None, Some(a)) => {
                                if a == 0 || a == 15 || a == 5 {
                                    prop_assert!(matches!(result, Err(Error::Excluded { .. })), "{:?}", result);
                                } else if held.contains(&a) {
                                    prop_assert!(matches!(result, Err(Error::Held { .. })), "{:?}", result);
                                } else {
                                    prop_assert_eq!(host(result.expect("explicit").0.address), a);
                                    by_owner.insert(owner, a);
                                }
                            }
                        }
                    }
                    Op::Release { owner } => {
                        let released = ipam.release(ReleaseArgs { owner: Some(format!("o{owner}")), address: None }).expect("release");
                        prop_assert_eq!(released.map(|a| host(a.address)), by_owner.remove(&owner));
                    }
                    Op::ReleaseAddress { address } => {
                        let released = ipam
                            .release(ReleaseArgs { owner: None, address: Some(IpAddr::from([10, 0, 0, address])) })
                            .expect("release");
                        let holder = by_owner.iter().find(|(_, h)| **h == address).map(|(o, _)| *o);
                        prop_assert_eq!(released.is_some(), holder.is_some());
                        if let Some(o) = holder {
                            by_owner.remove(&o);
                        }
                    }
                }
                let held: Vec<u8> = by_owner.values().copied().collect();
                let unique: BTreeSet<u8> = held.iter().copied().collect();
                prop_assert_eq!(held.len(), unique.len(), "an address is held twice");
                prop_assert!(held.iter().all(|h| usable.contains(h)));
            }
        }
    }
}
