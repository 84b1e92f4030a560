//! The sled engine, the embedded default: the [`Store`] contract over one
//! sled database in a directory. The only code that names sled; key
//! encoding lives in `keys.rs` alone.
//!
//! Writes are staged: [`Write`]s add to one pending batch, each numbered
//! with the next revision (sled's writes have no revision of their own, so
//! this engine numbers them: one per write, from 1), and a flush applies
//! the batch atomically and then makes it durable. Applying one batch per
//! flush, rather than one per write, matters: sled writes its log buffer out
//! on every applied batch, so a batch per write would cost a disk write per
//! allocation even with the flush shared. The writer's decision reads see
//! the staged writes; every other read sees them once applied, which is
//! immediately before they are made durable. No other writer shares the
//! database (sled locks its directory), so nothing is ever observed.
//!
//! Every write puts its change-log entry in the same batch as the
//! allocation, and removes the entry that falls out of the kept history, so
//! the log always holds exactly the last `history` revisions (fewer on a
//! young store) without gaps.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

mod keys;

use self::keys::{
    ALLOC, CHANGE, OWNER, REVISION_KEY, alloc_key, alloc_key_int, change_key, change_value,
    decode_alloc_key, decode_change, decode_entry, decode_record, encode_record, owner_key,
    read_revision,
};
use super::{Background, DEFAULT_HISTORY, Engine, Observed, Result, Scan, StoreError, Write};
use crate::{
    addresses::pool::Family,
    model::{Change, ChangeKind, Record},
};

/// How long [`SledStore::open`] waits for the directory's lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// sled reports a lock held elsewhere as an I/O error of kind `Other` that
/// wraps the `WouldBlock` of the lock call, or as that `WouldBlock` itself.
fn is_lock_error(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Engine(Box::new(e))
    }
}

/// The sled engine: a database in one directory.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    history: u64,
    staged: Arc<Mutex<Staged>>,
}

/// Writes not yet applied to sled: the value each key will have (`None`:
/// removed), the changes they make and the revisions they took. A flush
/// turns them into one batch; decision reads look here first.
#[derive(Default)]
struct Staged {
    values: HashMap<Vec<u8>, Option<Vec<u8>>>,
    changes: Vec<Change>,
    /// The revision of the last write applied and durable.
    committed: u64,
    /// The revision of the last write staged (`committed` when none is).
    last: u64,
}

impl Staged {
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.values.insert(key, Some(value));
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.values.insert(key, None);
    }

    /// Takes the staged writes out as one batch and their changes; nothing
    /// stays staged.
    fn take(&mut self) -> (sled::Batch, Vec<Change>) {
        let mut batch = sled::Batch::default();
        for (key, value) in self.values.drain() {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        (batch, std::mem::take(&mut self.changes))
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir` with a page cache of `cache_bytes`.
    ///
    /// sled locks the directory, and a handle closed a moment ago (in this
    /// process, or one that is exiting) may still hold the lock while its
    /// background thread winds down; opening waits up to [`LOCK_WAIT`] for
    /// that, then fails.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<SledStore> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // Durability comes from the explicit flush after each batch of
            // writes; a background flusher would only add concurrent flushes.
            .flush_every_ms(None);
        let deadline = Instant::now() + LOCK_WAIT;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e)) if is_lock_error(&e) => {
                    if Instant::now() >= deadline {
                        return Err(sled::Error::Io(e).into());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let committed = read_revision(db.get(REVISION_KEY)?.as_deref())?;
        Ok(SledStore {
            db,
            history: DEFAULT_HISTORY,
            staged: Arc::new(Mutex::new(Staged {
                committed,
                last: committed,
                ..Staged::default()
            })),
        })
    }

    /// Whether `dir` holds a database (sled's file `db`), without opening or
    /// creating one.
    pub fn exists_in(dir: &Path) -> bool {
        dir.join("db").is_file()
    }

    /// Keeps the change log of the last `revisions` writes (at least 1) from
    /// now on. Entries already older than that go with
    /// [`SledStore::trim_history`].
    pub fn with_history(mut self, revisions: u64) -> SledStore {
        self.history = revisions.max(1);
        self
    }

    /// Removes change-log entries older than the kept history (after the
    /// history was shortened), with nothing staged, and makes that durable.
    /// Returns how many it removed.
    pub fn trim_history(&self) -> Result<u64> {
        let revision = self.staged().committed;
        let Some(last_dropped) = revision.checked_sub(self.history) else {
            return Ok(0);
        };
        let mut removed = 0;
        loop {
            // Bounded batches: a much shortened history must not build one
            // huge batch in memory.
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for key in self
                .db
                .range(change_key(0)..=change_key(last_dropped))
                .keys()
                .take(10_000)
            {
                batch.remove(key?);
                n += 1;
            }
            if n == 0 {
                if removed > 0 {
                    self.db.flush()?;
                }
                return Ok(removed);
            }
            self.db.apply_batch(batch)?;
            removed += n;
        }
    }

    fn trim_one(&self, staged: &mut Staged, revision: u64) {
        if let Some(old) = revision.checked_sub(self.history)
            && old > 0
        {
            staged.remove(change_key(old).to_vec());
        }
    }

    fn staged(&self) -> MutexGuard<'_, Staged> {
        // The staged writes stay consistent even if a holder panicked: every
        // change to them is a single map insert.
        self.staged.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value of `key`, staged writes included.
    fn read_latest(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(value) = self.staged().values.get(key) {
            return Ok(value.clone());
        }
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    /// Every owner index entry as (owner, address).
    pub fn owner_index(&self) -> impl Iterator<Item = Result<(String, IpAddr)>> + use<> {
        self.db.scan_prefix([OWNER]).map(|entry| {
            let (k, v) = entry?;
            let owner = String::from_utf8(k[1..].to_vec()).map_err(|_| StoreError::Corrupt {
                key: k.escape_ascii().to_string(),
                why: "owner is not UTF-8".to_string(),
            })?;
            Ok((owner, decode_alloc_key(&v)?))
        })
    }
}

impl SledStore {
    /// Stages the allocation `record` at `ip` as the next revision.
    fn stage_allocate(&self, ip: IpAddr, mut record: Record) -> Result<()> {
        let mut staged = self.staged();
        record.revision = staged.last + 1;
        let key = alloc_key(ip);
        let value = encode_record(&key, &record)?;
        let change = change_value(ChangeKind::Allocated, &key, &value);
        staged.last = record.revision;
        staged.insert(change_key(record.revision).to_vec(), change);
        self.trim_one(&mut staged, record.revision);
        staged.insert(owner_key(&record.owner), key.clone());
        staged.insert(key, value);
        staged.insert(
            REVISION_KEY.to_vec(),
            record.revision.to_be_bytes().to_vec(),
        );
        staged.changes.push(Change {
            revision: record.revision,
            kind: ChangeKind::Allocated,
            address: ip,
            record,
        });
        Ok(())
    }

    /// Stages the release of the allocation `record` at `ip` as the next
    /// revision.
    fn stage_release(&self, ip: IpAddr, record: Record) -> Result<()> {
        let mut staged = self.staged();
        let revision = staged.last + 1;
        let key = alloc_key(ip);
        let value = encode_record(&key, &record)?;
        let change = change_value(ChangeKind::Released, &key, &value);
        staged.last = revision;
        staged.insert(change_key(revision).to_vec(), change);
        self.trim_one(&mut staged, revision);
        staged.remove(key);
        staged.remove(owner_key(&record.owner));
        staged.insert(REVISION_KEY.to_vec(), revision.to_be_bytes().to_vec());
        staged.changes.push(Change {
            revision,
            kind: ChangeKind::Released,
            address: ip,
            record,
        });
        Ok(())
    }
}

impl Engine for SledStore {
    fn get(&self, ip: IpAddr) -> Result<Option<Record>> {
        let key = alloc_key(ip);
        self.db
            .get(&key)?
            .map(|v| decode_record(&key, &v))
            .transpose()
    }

    fn owner_address(&self, owner: &str) -> Result<Option<IpAddr>> {
        self.db
            .get(owner_key(owner))?
            .map(|k| decode_alloc_key(&k))
            .transpose()
    }

    fn record_for_decision(&self, ip: IpAddr) -> Result<Option<Record>> {
        let key = alloc_key(ip);
        self.read_latest(&key)?
            .map(|v| decode_record(&key, &v))
            .transpose()
    }

    fn owner_for_decision(&self, owner: &str) -> Result<Option<IpAddr>> {
        self.read_latest(&owner_key(owner))?
            .map(|k| decode_alloc_key(&k))
            .transpose()
    }

    fn revision(&self) -> Result<u64> {
        Ok(self.staged().committed)
    }

    fn stage(&self, write: Write) -> Result<()> {
        match write {
            Write::Allocate { address, record } => self.stage_allocate(address, record),
            Write::Release { address, record } => self.stage_release(address, record),
        }
    }

    fn flush(&self) -> Result<Vec<Change>> {
        let mut staged = self.staged();
        if staged.values.is_empty() {
            // Every applied write was made durable by the flush that
            // applied it.
            return Ok(Vec::new());
        }
        let (batch, changes) = staged.take();
        // The lock is held until the batch is applied and durable, so a
        // decision read never misses a write that is neither staged nor
        // applied.
        if let Err(e) = self.db.apply_batch(batch) {
            // Nothing was applied: the numbering goes on from what is.
            staged.last = staged.committed;
            return Err(e.into());
        }
        // Applied: reads show it, and later writes number on from it.
        staged.committed = staged.last;
        self.db.flush()?;
        Ok(changes)
    }

    fn observed(&self) -> Result<Observed> {
        Ok(Observed {
            changes: Vec::new(),
            revision: self.staged().committed,
        })
    }

    fn on_observed(&self, wake: Box<dyn Fn() + Send + Sync>) {
        // Nothing else writes to this database: nothing to wake for.
        drop(wake);
    }

    fn catch_up(&self, _revision: u64, _limit: Duration) -> Result<u64> {
        // Only this writer writes here: what it committed is all there is.
        Ok(self.staged().committed)
    }

    fn number_after(&self, revision: u64) {
        let mut staged = self.staged();
        staged.last = staged.last.max(revision);
    }

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn health(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    fn background(&self) -> Option<Background> {
        // sled runs its own threads.
        None
    }

    fn first_change(&self) -> Result<Option<u64>> {
        match self.db.scan_prefix([CHANGE]).keys().next() {
            None => Ok(None),
            Some(key) => {
                let key = key?;
                <[u8; 8]>::try_from(&key[1..])
                    .map(u64::from_be_bytes)
                    .map(Some)
                    .map_err(|_| StoreError::Corrupt {
                        key: key.escape_ascii().to_string(),
                        why: "change key of the wrong length".to_string(),
                    })
            }
        }
    }

    fn changes(&self, after: u64, last: u64) -> Scan<Change> {
        let first = after.saturating_add(1);
        // sled refuses a range that ends before it starts.
        Box::new(
            (first <= last)
                .then(|| self.db.range(change_key(first)..=change_key(last)))
                .into_iter()
                .flatten()
                .map(|entry| {
                    let (k, v) = entry?;
                    decode_change(&k, &v)
                }),
        )
    }

    fn scan(&self, family: Family, first: u128, last: u128) -> Scan<(IpAddr, Record)> {
        Box::new(
            self.db
                .range(alloc_key_int(family, first)..=alloc_key_int(family, last))
                .map(decode_entry),
        )
    }

    fn scan_after(&self, after: Option<IpAddr>) -> Scan<(IpAddr, Record)> {
        let prefix_end = vec![ALLOC + 1];
        let iter = match after {
            None => self.db.range(vec![ALLOC]..prefix_end),
            Some(ip) => {
                let mut start = alloc_key(ip);
                start.push(0);
                self.db.range(start..prefix_end)
            }
        };
        Box::new(iter.map(decode_entry))
    }

    fn addresses(&self) -> Scan<IpAddr> {
        Box::new(
            self.db
                .scan_prefix([ALLOC])
                .keys()
                .map(|k| decode_alloc_key(&k?)),
        )
    }
}

#[cfg(test)]
mod tests;
