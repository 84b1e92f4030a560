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
//! the log holds the last `history` revisions (fewer on a young store)
//! without gaps.
//!
//! A full disk stops writes, not reads: a flush first checks that the disk
//! keeps the room the store wants free, and refuses to write below it, so
//! that sled does not fill the disk to its last byte. When sled fails a
//! write all the same, the flush is undone (see `recovery.rs`): its writes
//! are hidden from reads, the database is reopened in the room of a reserve
//! file kept for that, and the flush is rolled back on disk if it reached
//! it. Either way the flush fails with [`StoreError::Unavailable`], nothing
//! is changed, and writes resume by themselves once the disk has room.
//!
//! [`Store`]: super::Store

mod keys;
mod recovery;
mod staged;
mod view;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::AtomicBool,
    },
    time::Duration,
};

use self::{
    keys::{
        ALLOC, CHANGE, OWNER, REVISION_KEY, alloc_key, alloc_key_int, change_key, decode_alloc_key,
        decode_change, decode_entry, decode_record, owner_key, read_revision,
    },
    recovery::{Open, open_with_reserve},
    staged::Staged,
    view::{inclusive, prefix},
};
use super::{Background, DEFAULT_HISTORY, Engine, Observed, Result, Scan, StoreError, Write};
use crate::{
    addresses::pool::Family,
    model::{Change, Record},
};

pub use self::recovery::{DEFAULT_MIN_FREE, LOCK_WAIT, RESERVE};

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match recovery::no_room(&e) {
            // A read of a database whose write failed for want of room.
            Some(why) => StoreError::Unavailable(format!("the disk is full ({why})")),
            None => StoreError::Engine(Box::new(e)),
        }
    }
}

/// The sled engine: a database in one directory. Clones share it.
#[derive(Clone)]
pub struct SledStore {
    shared: Arc<Shared>,
    history: u64,
    min_free: u64,
}

/// What the clones of a store share.
struct Shared {
    /// The directory, named in errors.
    dir: PathBuf,
    /// How the database is opened, to reopen it after a failed write.
    config: sled::Config,
    staged: Mutex<Staged>,
    open: RwLock<Open>,
    /// Whether the reserve is in place as far as this store knows: it
    /// deletes it only to reopen, so a flush need not look on disk.
    reserve_kept: AtomicBool,
}

impl SledStore {
    /// Opens (or creates) the store in `dir` with a page cache of
    /// `cache_bytes`, keeping [`DEFAULT_MIN_FREE`] bytes of its disk free,
    /// and the file [`RESERVE`] in `dir` that holds the room to reopen the
    /// database after a write failed for want of space (without it, if the
    /// disk has no room for it, such a failure may fail reads too). On a
    /// disk without room to open the database, the reserve makes it.
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
        let db = open_with_reserve(&config, dir)?;
        let committed = read_revision(db.get(REVISION_KEY)?.as_deref())?;
        let store = SledStore {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                config,
                staged: Mutex::new(Staged::new(committed)),
                open: RwLock::new(Open::new(db)),
                reserve_kept: AtomicBool::new(false),
            }),
            history: DEFAULT_HISTORY,
            min_free: DEFAULT_MIN_FREE,
        };
        if let Err(e) = store.keep_reserve() {
            tracing::warn!(dir = %dir.display(), error = %e, "no room for the reserve: a write that fails for want of space may fail reads too, until space is freed");
        }
        Ok(store)
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

    /// Writes only while the disk of the store has at least `bytes` free
    /// (0: until sled fails a write for want of room). Below that, a flush
    /// fails with [`StoreError::Unavailable`] and changes nothing.
    pub fn with_min_free(mut self, bytes: u64) -> SledStore {
        self.min_free = bytes;
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
        let db = self.view()?.db;
        let mut removed = 0;
        loop {
            // Bounded batches: a much shortened history must not build one
            // huge batch in memory.
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for key in db
                .range(change_key(0)..=change_key(last_dropped))
                .keys()
                .take(10_000)
            {
                batch.remove(key?);
                n += 1;
            }
            if n == 0 {
                if removed > 0 {
                    db.flush()?;
                }
                return Ok(removed);
            }
            db.apply_batch(batch)?;
            removed += n;
        }
    }

    fn staged(&self) -> MutexGuard<'_, Staged> {
        // The staged writes stay consistent even if a holder panicked: every
        // change to them is a single map insert.
        self.shared
            .staged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn open_state(&self) -> RwLockReadGuard<'_, Open> {
        // Each change to the state is a single assignment.
        self.shared
            .open
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn open_state_mut(&self) -> RwLockWriteGuard<'_, Open> {
        self.shared
            .open
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The value of `key`, staged writes included.
    fn read_latest(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(value) = self.staged().value(key) {
            return Ok(value.clone());
        }
        Ok(self.view()?.get(key)?.map(|v| v.to_vec()))
    }

    /// Every owner index entry as (owner, address).
    pub fn owner_index(&self) -> Scan<(String, IpAddr)> {
        let view = match self.view() {
            Ok(view) => view,
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        Box::new(view.range(prefix(OWNER)).map(|entry| {
            let (k, v) = entry?;
            let owner = String::from_utf8(k[1..].to_vec()).map_err(|_| StoreError::Corrupt {
                key: k.escape_ascii().to_string(),
                why: "owner is not UTF-8".to_string(),
            })?;
            Ok((owner, decode_alloc_key(&v)?))
        }))
    }

    /// A scan of the committed entries of `range`, each decoded by `decode`.
    fn scan_range<T: 'static>(
        &self,
        range: view::Range,
        decode: fn(&[u8], &[u8]) -> Result<T>,
    ) -> Scan<T> {
        match self.view() {
            Ok(view) => Box::new(view.range(range).map(move |entry| {
                let (k, v) = entry?;
                decode(&k, &v)
            })),
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }
}

impl Engine for SledStore {
    fn get(&self, ip: IpAddr) -> Result<Option<Record>> {
        let key = alloc_key(ip);
        self.view()?
            .get(&key)?
            .map(|v| decode_record(&key, &v))
            .transpose()
    }

    fn owner_address(&self, owner: &str) -> Result<Option<IpAddr>> {
        self.view()?
            .get(&owner_key(owner))?
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
        let mut staged = self.staged();
        match write {
            Write::Allocate { address, record } => staged.allocate(address, record, self.history),
            Write::Release { address, record } => staged.release(address, record, self.history),
        }
    }

    fn flush(&self) -> Result<Vec<Change>> {
        let mut staged = self.staged();
        if staged.is_empty() {
            // Every applied write was made durable by the flush that
            // applied it.
            return Ok(Vec::new());
        }
        let batch = staged.take();
        // Unless this flush commits, the next writes number on from what is
        // durable.
        let committed = staged.committed;
        let last = std::mem::replace(&mut staged.last, committed);
        self.check_room()?;
        let db = self.writable(committed)?;
        // The lock is held until the batch is applied and durable, so a
        // decision read never misses a write that is neither staged nor
        // applied.
        match db.apply_batch(batch.writes).and_then(|()| db.flush()) {
            Ok(_) => {
                staged.committed = last;
                staged.last = last;
                Ok(batch.changes)
            }
            Err(e) => {
                drop(db);
                Err(self.failed(batch.before, e, committed))
            }
        }
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
        // Ready while reads are served, also when the disk is full: no other
        // allocator could serve them, and writes say why they fail. Only
        // reads and writes try to reopen a closed database.
        self.serves_reads().map_err(|e| e.to_string())
    }

    fn background(&self) -> Option<Background> {
        // sled runs its own threads.
        None
    }

    fn first_change(&self) -> Result<Option<u64>> {
        match self.view()?.range(prefix(CHANGE)).next() {
            None => Ok(None),
            Some(entry) => {
                let (key, _) = entry?;
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
        if first > last {
            // sled refuses a range that ends before it starts.
            return Box::new(std::iter::empty());
        }
        let range = inclusive(change_key(first), change_key(last));
        self.scan_range(range, decode_change)
    }

    fn scan(&self, family: Family, first: u128, last: u128) -> Scan<(IpAddr, Record)> {
        let range = inclusive(alloc_key_int(family, first), alloc_key_int(family, last));
        self.scan_range(range, decode_entry)
    }

    fn scan_after(&self, after: Option<IpAddr>) -> Scan<(IpAddr, Record)> {
        let range = match after {
            None => prefix(ALLOC),
            Some(ip) => {
                let mut start = alloc_key(ip);
                start.push(0);
                (
                    std::ops::Bound::Included(start),
                    std::ops::Bound::Excluded(vec![ALLOC + 1]),
                )
            }
        };
        self.scan_range(range, decode_entry)
    }

    fn addresses(&self) -> Scan<IpAddr> {
        self.scan_range(prefix(ALLOC), |k, _| decode_alloc_key(k))
    }
}

#[cfg(test)]
mod tests;
