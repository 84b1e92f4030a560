//! Moving the allocations from one store engine to another (`vipam-allocator
//! migrate`): every allocation is copied with its owner, labels and creation
//! time through the [`Store`], in batches the target commits at once,
//! and afterwards the target is checked to hold exactly what the source
//! holds. Which engines run and how they are opened is the caller's
//! (`args::migrate`); the comparison ([`compare`]) and the summary
//! ([`Summary`]) are pure.
//!
//! Revisions are not copied: the target gives each copied allocation one of
//! its own, after the source's last revision where it can (sled), so a
//! Watch client resuming from a revision of the source is told to start
//! again, or, if it had seen every change, sent the copy once more, rather
//! than replayed changes that do not follow what it has.

use std::{cmp::Ordering, fmt, net::IpAddr};

use crate::{
    addresses::family::{Family, to_int},
    addresses::pool::Pools,
    model::Record,
    store::{Store, StoreError, Write},
};

/// Most allocations staged in the target before a flush, whatever its
/// [`Store::max_batch`]: bounds the memory of an engine that takes any
/// batch.
pub const MAX_BATCH: usize = 10_000;

/// Differences listed one by one in an error; the others are counted.
const LISTED: usize = 10;

/// Allocations between two progress lines in the log.
const PROGRESS_EVERY: u64 = 100_000;

/// A store and how messages call it ("the sled store in /var/lib/vipam").
#[derive(Clone, Copy)]
pub struct Side<'a> {
    /// The store.
    pub store: &'a Store,
    /// Its name in messages.
    pub name: &'a str,
}

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The target already holds allocations.
    #[error(
        "the target, {target}, is not empty: it holds {count} allocation(s); migrate copies only into a store that holds none"
    )]
    TargetNotEmpty {
        /// The target's name.
        target: String,
        /// How many allocations it holds.
        count: u64,
    },
    /// A store could not be read.
    #[error("reading {store}: {error}")]
    Read {
        /// The store's name.
        store: String,
        /// What failed.
        #[source]
        error: StoreError,
    },
    /// The target could not commit a batch.
    #[error("writing {store}: {error}")]
    Write {
        /// The store's name.
        store: String,
        /// What failed.
        #[source]
        error: StoreError,
    },
    /// After the copy the target does not hold what the source holds.
    #[error("{target} does not hold exactly the allocations of {origin}: {differences}")]
    Differs {
        /// The target's name.
        target: String,
        /// The source's name.
        origin: String,
        /// What differs.
        differences: Differences,
    },
}

fn read(side: Side<'_>) -> impl Fn(StoreError) -> MigrateError + '_ {
    move |error| MigrateError::Read {
        store: side.name.to_string(),
        error,
    }
}

fn write(side: Side<'_>) -> impl Fn(StoreError) -> MigrateError + '_ {
    move |error| MigrateError::Write {
        store: side.name.to_string(),
        error,
    }
}

/// What was copied: allocations per pool and family, and outside the pools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Per pool (in [`Pools::iter`] order), per family.
    per_pool: Vec<[u64; 2]>,
    /// Outside every pool, per family.
    outside: [u64; 2],
}

impl Summary {
    /// Nothing counted yet, for these pools.
    pub fn new(pools: &Pools) -> Summary {
        Summary {
            per_pool: vec![[0; 2]; pools.len()],
            outside: [0; 2],
        }
    }

    /// Counts the allocation at `ip`.
    pub fn add(&mut self, pools: &Pools, ip: IpAddr) {
        let family = to_int(ip).0.index();
        match pools.containing(ip) {
            Some(i) => self.per_pool[i][family] += 1,
            None => self.outside[family] += 1,
        }
    }

    /// Allocations counted.
    pub fn total(&self) -> u64 {
        self.per_pool.iter().chain([&self.outside]).flatten().sum()
    }

    /// One line per pool, then one for the allocations outside every pool:
    /// `pool a: 3 (IPv4 2, IPv6 1)`.
    pub fn lines(&self, pools: &Pools) -> Vec<String> {
        let line = |what: String, counts: &[u64; 2]| {
            let total: u64 = counts.iter().sum();
            let families: Vec<String> = Family::ALL
                .iter()
                .filter(|f| counts[f.index()] > 0)
                .map(|f| format!("{f} {}", counts[f.index()]))
                .collect();
            if families.is_empty() {
                format!("{what}: {total}")
            } else {
                format!("{what}: {total} ({})", families.join(", "))
            }
        };
        pools
            .iter()
            .zip(&self.per_pool)
            .map(|(pool, counts)| line(format!("pool {}", pool.name()), counts))
            .chain([line("outside every pool".to_string(), &self.outside)])
            .collect()
    }
}

/// Copies every allocation of `source` into `target`, which must hold none,
/// committing a batch at a time; what it copied.
pub fn copy(source: Side<'_>, target: Side<'_>, pools: &Pools) -> Result<Summary, MigrateError> {
    let held = count(target)?;
    if held > 0 {
        return Err(MigrateError::TargetNotEmpty {
            target: target.name.to_string(),
            count: held,
        });
    }
    let batch = target.store.max_batch().clamp(1, MAX_BATCH);
    target
        .store
        .number_after(source.store.revision().map_err(read(source))?);
    let mut summary = Summary::new(pools);
    let mut staged = 0;
    for item in source.store.scan_after(None) {
        let (ip, record) = item.map_err(read(source))?;
        target
            .store
            .stage(Write::Allocate {
                address: ip,
                record,
            })
            .map_err(write(target))?;
        summary.add(pools, ip);
        staged += 1;
        if staged == batch {
            commit(target)?;
            staged = 0;
        }
        if summary.total().is_multiple_of(PROGRESS_EVERY) {
            tracing::info!(copied = summary.total(), "copying");
        }
    }
    if staged > 0 {
        commit(target)?;
    }
    Ok(summary)
}

/// Commits the staged batch.
fn commit(target: Side<'_>) -> Result<(), MigrateError> {
    target.store.flush().map_err(write(target))?;
    // A shared store reports what other writers commit for a writer to
    // take; nobody takes them here, and dropping them keeps memory flat.
    drop(target.store.observed());
    Ok(())
}

/// How many allocations `side` holds.
fn count(side: Side<'_>) -> Result<u64, MigrateError> {
    let mut n = 0;
    for item in side.store.addresses() {
        item.map_err(read(side))?;
        n += 1;
    }
    Ok(n)
}

/// Checks that `target` holds exactly the allocations of `source` (address,
/// owner, labels, creation time) and that each owner's index entry names
/// its address; how many allocations that is.
pub fn verify(source: Side<'_>, target: Side<'_>) -> Result<u64, MigrateError> {
    let theirs = source
        .store
        .scan_after(None)
        .map(|item| item.map_err(read(source)));
    let ours = target
        .store
        .scan_after(None)
        .map(|item| item.map_err(read(target)));
    let (count, mut differences) = compare(theirs, ours)?;
    for item in target.store.scan_after(None) {
        let (ip, record) = item.map_err(read(target))?;
        let found = target
            .store
            .owner_address(&record.owner)
            .map_err(read(target))?;
        if found != Some(ip) {
            differences.push(Difference::OwnerIndex {
                owner: record.owner,
                address: ip,
                found,
            });
        }
    }
    if differences.count == 0 {
        return Ok(count);
    }
    Err(MigrateError::Differs {
        target: target.name.to_string(),
        origin: source.name.to_string(),
        differences,
    })
}

/// One way the target differs from the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Difference {
    /// The source holds the address, the target does not.
    Missing(IpAddr),
    /// The target holds the address, the source does not.
    Extra(IpAddr),
    /// Both hold the address, with something else different.
    Changed {
        /// The address.
        address: IpAddr,
        /// "owner", "labels" or "creation time".
        what: &'static str,
    },
    /// The target's index of `owner` does not name its address.
    OwnerIndex {
        /// The owner.
        owner: String,
        /// The address it holds.
        address: IpAddr,
        /// The address its index names.
        found: Option<IpAddr>,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Missing(ip) => write!(f, "{ip} is missing"),
            Difference::Extra(ip) => write!(f, "{ip} is there but not in the source"),
            Difference::Changed { address, what } => write!(f, "{address} has another {what}"),
            Difference::OwnerIndex {
                owner,
                address,
                found: Some(found),
            } => write!(
                f,
                "owner {owner} holds {address} but its index names {found}"
            ),
            Difference::OwnerIndex {
                owner,
                address,
                found: None,
            } => write!(f, "owner {owner} holds {address} but has no index entry"),
        }
    }
}

/// The differences found: the first few, and how many in all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Differences {
    /// The first [`LISTED`] differences.
    pub listed: Vec<Difference>,
    /// How many there are.
    pub count: u64,
}

impl Differences {
    fn push(&mut self, difference: Difference) {
        self.count += 1;
        if self.listed.len() < LISTED {
            self.listed.push(difference);
        }
    }
}

impl fmt::Display for Differences {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let listed: Vec<String> = self.listed.iter().map(ToString::to_string).collect();
        write!(f, "{} difference(s): {}", self.count, listed.join("; "))?;
        let more = self.count - self.listed.len() as u64;
        if more > 0 {
            write!(f, "; and {more} more")?;
        }
        Ok(())
    }
}

/// Compares two scans ordered by address (IPv4 first, as every store
/// scans): how many allocations `source` holds, and how `target` differs
/// from it. Revisions are not compared: each store gives its own.
pub fn compare<E>(
    mut source: impl Iterator<Item = Result<(IpAddr, Record), E>>,
    mut target: impl Iterator<Item = Result<(IpAddr, Record), E>>,
) -> Result<(u64, Differences), E> {
    let mut count = 0;
    let mut differences = Differences::default();
    let mut theirs = source.next().transpose()?;
    let mut ours = target.next().transpose()?;
    loop {
        let order = match (&theirs, &ours) {
            (None, None) => return Ok((count, differences)),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((a, _)), Some((b, _))) => to_int(*a).cmp(&to_int(*b)),
        };
        match order {
            Ordering::Less => {
                if let Some((ip, _)) = &theirs {
                    count += 1;
                    differences.push(Difference::Missing(*ip));
                }
                theirs = source.next().transpose()?;
            }
            Ordering::Greater => {
                if let Some((ip, _)) = &ours {
                    differences.push(Difference::Extra(*ip));
                }
                ours = target.next().transpose()?;
            }
            Ordering::Equal => {
                if let (Some((ip, a)), Some((_, b))) = (&theirs, &ours) {
                    count += 1;
                    if let Some(what) = changed(a, b) {
                        differences.push(Difference::Changed { address: *ip, what });
                    }
                }
                theirs = source.next().transpose()?;
                ours = target.next().transpose()?;
            }
        }
    }
}

/// What differs between two records of one address, revisions aside.
fn changed(theirs: &Record, ours: &Record) -> Option<&'static str> {
    if theirs.owner != ours.owner {
        Some("owner")
    } else if theirs.labels != ours.labels {
        Some("labels")
    } else if theirs.created_unix_nanos != ours.created_unix_nanos {
        Some("creation time")
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
