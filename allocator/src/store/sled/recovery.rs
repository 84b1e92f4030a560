//! How the sled engine lives through a full disk.
//!
//! A flush first checks that the disk keeps the room the store wants free
//! ([`SledStore::check_room`]), and refuses to write below it: then sled is
//! never asked to write to a full disk, and nothing changes.
//!
//! When sled fails a write all the same (the room was taken between the
//! check and the write, a quota, no room kept), three of its quirks matter.
//! It may have applied the batch in memory before failing to write it out,
//! so reads would show writes that were never acknowledged. It keeps the
//! failure and refuses every later write until the database is reopened,
//! and some reads fail too (those that would complete a split of a node the
//! batch grew). And it needs room to reopen: it fills the rest of its
//! current log segment and writes a snapshot. So the store keeps a file of
//! its own, [`RESERVE`], that holds that room; a failed flush
//! ([`SledStore::failed`]) hides its writes from reads (each key it wrote
//! reads as it was before), deletes the reserve and reopens the database at
//! once. The reopened database holds what was durable; when the failed
//! batch reached the disk after all, it is written over with what its keys
//! held before, so that no change of the failed flush stays in the history.
//! Writes stay refused until the disk has the room the store keeps free and
//! the reserve again ([`SledStore::recover`], at the next write), then go
//! on, numbered after the last durable revision. Where the database cannot
//! reopen (no reserve), reads go to the failed one, or fail once it is
//! closed, and every [`RETRY`] a read or a write tries again.

use std::{
    io,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use fs2::FileExt as _;

use super::{
    SledStore,
    keys::{REVISION_KEY, read_revision},
    staged::Hidden,
    view::View,
};
use crate::store::{Result, StoreError};

/// How long [`SledStore::open`] waits for the directory's lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// The free space a store keeps on its disk unless told otherwise, besides
/// its reserve: room for the largest batch, and to spare.
pub const DEFAULT_MIN_FREE: u64 = 8 << 20;

/// The file in the store's directory that holds the room to reopen the
/// database after a write failed for want of space.
pub const RESERVE: &str = "vipam-reserve";

/// How long a store whose database failed a write waits between attempts
/// to reopen it.
pub(super) const RETRY: Duration = Duration::from_secs(1);

/// Room sled needs to reopen besides twice its snapshots: the rest of its
/// current log segment (512 KiB), which it fills when it opens, a rollback
/// and a margin.
const REOPEN_ROOM: u64 = 1 << 20;

/// The database and what reads and writes may do with it.
pub(super) struct Open {
    /// The database; `None` after a failed write while it cannot reopen.
    pub db: Option<sled::Db>,
    /// What the keys of a failed flush held before it, while the database
    /// may still show its writes.
    pub hidden: Arc<Hidden>,
    /// Set while writes are refused, since sled failed one.
    pub failed: Option<Failed>,
}

/// Why writes are refused.
pub(super) struct Failed {
    why: String,
    /// Whether the database was reopened since: then only room is missing.
    reopened: bool,
    /// When to try to reopen next.
    retry_at: Instant,
}

impl Open {
    /// A database that writes.
    pub fn new(db: sled::Db) -> Open {
        Open {
            db: Some(db),
            hidden: Arc::default(),
            failed: None,
        }
    }

    /// What reads see, when there is a database.
    fn view(&self) -> Option<View> {
        self.db.as_ref().map(|db| View {
            db: db.clone(),
            hidden: self.hidden.clone(),
        })
    }

    /// Whether the database failed a write, was not reopened since, and it
    /// is time to try.
    fn due(&self) -> bool {
        self.failed
            .as_ref()
            .is_some_and(|f| !f.reopened && Instant::now() >= f.retry_at)
    }
}

/// sled reports a lock held elsewhere as an I/O error of kind `Other` that
/// wraps the `WouldBlock` of the lock call, or as that `WouldBlock` itself.
fn is_lock_error(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

/// Opens the database `config` names, waiting up to [`LOCK_WAIT`] for the
/// lock on its directory.
pub(super) fn open_db(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(sled::Error::Io(e)) if is_lock_error(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Opens the database `config` names in `dir`; where the disk has no room
/// to open it, deletes the reserve and tries again.
pub(super) fn open_with_reserve(
    config: &sled::Config,
    dir: &std::path::Path,
) -> sled::Result<sled::Db> {
    match open_db(config) {
        Err(e) if no_room(&e).is_some() && std::fs::remove_file(dir.join(RESERVE)).is_ok() => {
            tracing::warn!(dir = %dir.display(), "no room to open the database: opened it in the room of its reserve; writes wait for space");
            open_db(config)
        }
        other => other,
    }
}

/// The words of an error that says the disk has no room for a write: it
/// is full, or the quota is used up.
pub(super) fn no_room(e: &sled::Error) -> Option<&'static str> {
    match e {
        sled::Error::Io(io) => match io.kind() {
            io::ErrorKind::StorageFull => Some("No space left on device"),
            io::ErrorKind::QuotaExceeded => Some("Disk quota exceeded"),
            _ => None,
        },
        _ => None,
    }
}

/// Makes the reopened `db` hold what was committed up to `committed`: when
/// the batch of a failed flush reached the disk after all (the stored
/// revision is past `committed`), writes over its keys what they held
/// before (`hidden`).
fn roll_back(db: &sled::Db, hidden: &Hidden, committed: u64) -> Result<()> {
    let durable = read_revision(db.get(REVISION_KEY)?.as_deref())?;
    if durable == committed {
        return Ok(());
    }
    if durable < committed {
        return Err(StoreError::Stopped(format!(
            "the database reopened at revision {durable}, before revision {committed}, which was durable"
        )));
    }
    let mut batch = sled::Batch::default();
    for (key, value) in hidden.iter() {
        match value {
            Some(value) => batch.insert(key.as_slice(), value.clone()),
            None => batch.remove(key.as_slice()),
        }
    }
    match committed {
        0 => batch.remove(REVISION_KEY),
        revision => batch.insert(REVISION_KEY, revision.to_be_bytes().to_vec()),
    }
    db.apply_batch(batch)?;
    db.flush()?;
    tracing::warn!(
        durable,
        committed,
        "a flush that failed had reached the disk; rolled it back"
    );
    Ok(())
}

impl SledStore {
    /// What a failed write of sled means, in words that name the directory.
    fn cannot_write(&self, e: &sled::Error) -> String {
        let dir = self.shared.dir.display();
        match no_room(e) {
            Some(words) => {
                format!("the disk of {dir} is full ({words}); writes resume once space is freed")
            }
            None => format!("writing to {dir} failed: {e}"),
        }
    }

    /// Refuses a write before it reaches sled while the disk of the store
    /// has less free than the store keeps; makes the reserve again when it
    /// is missing (the store used it to reopen the database, or could not
    /// make it) and the disk has room.
    pub(super) fn check_room(&self) -> Result<()> {
        self.room(self.min_free).map_err(StoreError::Unavailable)?;
        if !self.shared.reserve_kept.load(Ordering::Relaxed) {
            // Without it a write that fails for want of room may fail reads
            // too; writing on is still what `min_free` allows.
            drop(self.keep_reserve());
        }
        Ok(())
    }

    /// Why not, when the disk of the store has less than `needed` bytes
    /// free.
    fn room(&self, needed: u64) -> Result<(), String> {
        if needed == 0 {
            return Ok(());
        }
        let dir = &self.shared.dir;
        match fs2::available_space(dir) {
            Ok(free) if free < needed => Err(format!(
                "the disk of {} is full: {free} bytes free, less than the {needed} bytes the store keeps free to write; writes resume once space is freed",
                dir.display()
            )),
            // Where the free space cannot be read, sled finds out.
            _ => Ok(()),
        }
    }

    fn reserve_path(&self) -> PathBuf {
        self.shared.dir.join(RESERVE)
    }

    /// The size of the reserve: the room sled needs to reopen.
    fn reserve_size(&self) -> u64 {
        let snapshots: u64 = std::fs::read_dir(&self.shared.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("snap."))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        REOPEN_ROOM.saturating_add(snapshots.saturating_mul(2))
    }

    /// Makes sure the reserve holds the room sled needs to reopen.
    pub(super) fn keep_reserve(&self) -> io::Result<()> {
        let size = self.reserve_size();
        let path = self.reserve_path();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        // Allocated, not only sized: a sparse file would hold no room.
        let allocated = file.allocate(size).and_then(|()| file.sync_all());
        if allocated.is_err() {
            drop(file);
            drop(std::fs::remove_file(&path));
        }
        self.shared
            .reserve_kept
            .store(allocated.is_ok(), Ordering::Relaxed);
        allocated
    }

    /// The database for the next write; one whose write failed is reopened
    /// first (see [`SledStore::recover`]). The caller holds the staged
    /// writes, `committed` the last durable revision.
    pub(super) fn writable(&self, committed: u64) -> Result<sled::Db> {
        {
            let open = self.open_state();
            if let (None, Some(db)) = (&open.failed, &open.db) {
                return Ok(db.clone());
            }
        }
        self.recover(committed)
    }

    /// After sled failed to apply or write out a batch whose keys held
    /// `before`: hides the batch from reads, refuses writes, and when the
    /// disk had no room, reopens the database in the room of the reserve.
    /// The caller holds the staged writes, `committed` the last durable
    /// revision. The error for the flush: [`StoreError::Unavailable`] for a
    /// disk without room.
    pub(super) fn failed(&self, before: Hidden, e: sled::Error, committed: u64) -> StoreError {
        let why = self.cannot_write(&e);
        let mut open = self.open_state_mut();
        let mut hidden = Hidden::clone(&open.hidden);
        for (key, value) in before {
            // A key a rollback that failed wrote holds its older value.
            hidden.entry(key).or_insert(value);
        }
        open.hidden = Arc::new(hidden);
        if open.failed.is_none() {
            tracing::error!(error = %why, "the store cannot write; reads go on, writes are refused until its disk has room");
        }
        open.failed = Some(Failed {
            why: why.clone(),
            reopened: false,
            retry_at: Instant::now() + RETRY,
        });
        if no_room(&e).is_none() {
            return e.into();
        }
        self.shared.reserve_kept.store(false, Ordering::Relaxed);
        if let Err(e) = std::fs::remove_file(self.reserve_path())
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, "cannot delete the reserve to reopen the database");
        }
        if let Err(e) = self.reopen(&mut open, committed) {
            tracing::warn!(error = %e, "the database did not reopen; reads may fail until its disk has room");
        }
        StoreError::Unavailable(why)
    }

    /// What reads see. While a database that failed a write was not
    /// reopened, every [`RETRY`] a read tries to reopen it as a write
    /// would: reads of such a database may fail too.
    pub(super) fn view(&self) -> Result<View> {
        {
            let open = self.open_state();
            if !open.due() {
                return open.view().ok_or_else(|| self.closed(&open));
            }
        }
        let staged = self.staged();
        let recovered = self.recover(staged.committed);
        drop(staged);
        let open = self.open_state();
        match open.view() {
            Some(view) => Ok(view),
            None => Err(recovered.err().unwrap_or_else(|| self.closed(&open))),
        }
    }

    /// Whether there is a database to read, without trying to reopen one.
    pub(super) fn serves_reads(&self) -> Result<()> {
        let open = self.open_state();
        match open.db {
            Some(_) => Ok(()),
            None => Err(self.closed(&open)),
        }
    }

    /// Why there is no database to read.
    fn closed(&self, open: &Open) -> StoreError {
        let why = open.failed.as_ref().map_or("", |f| f.why.as_str());
        StoreError::Unavailable(format!(
            "the database in {} is closed since a write failed, and reopens once its disk has room: {why}",
            self.shared.dir.display()
        ))
    }

    /// Lets writes go on after a failed one, once the disk has the room the
    /// store keeps free and its reserve: reopens the database if it was not
    /// yet (at most every [`RETRY`]) and makes the reserve again. The
    /// database, which writes again. The caller holds the staged writes
    /// (none are), `committed` the last durable revision.
    pub(super) fn recover(&self, committed: u64) -> Result<sled::Db> {
        let mut open = self.open_state_mut();
        let Some(failed) = open.failed.as_mut() else {
            // Recovered by another caller meanwhile.
            return open.db.clone().ok_or_else(|| self.closed(&open));
        };
        if !failed.reopened {
            if Instant::now() < failed.retry_at {
                return Err(StoreError::Unavailable(failed.why.clone()));
            }
            failed.retry_at = Instant::now() + RETRY;
        }
        match self.resume(&mut open, committed) {
            Ok(db) => {
                tracing::info!(revision = committed, "the store writes again");
                open.failed = None;
                Ok(db)
            }
            Err(StoreError::Unavailable(why)) => {
                if let Some(failed) = open.failed.as_mut() {
                    failed.why = why.clone();
                }
                Err(StoreError::Unavailable(why))
            }
            Err(e) => Err(e),
        }
    }

    /// What [`SledStore::recover`] does once it is time.
    fn resume(&self, open: &mut Open, committed: u64) -> Result<sled::Db> {
        let reserve = self.reserve_size();
        self.room(self.min_free.saturating_add(reserve))
            .map_err(StoreError::Unavailable)?;
        if !open.failed.as_ref().is_some_and(|f| f.reopened) {
            self.reopen(open, committed)?;
        }
        self.keep_reserve().map_err(|e| {
            StoreError::Unavailable(format!(
                "keeping {reserve} bytes in {} to reopen the database with: {e}",
                self.reserve_path().display()
            ))
        })?;
        open.db.clone().ok_or_else(|| self.closed(open))
    }

    /// Drops and reopens the database, and rolls a failed flush back if it
    /// reached the disk. On failure, what is left to read: the reopened
    /// database with the failed writes hidden, or none.
    fn reopen(&self, open: &mut Open, committed: u64) -> Result<()> {
        // sled holds the directory's lock until every handle on the old
        // database is gone; reads still holding one end first (`open_db`
        // waits for the lock).
        open.db = None;
        let db = open_db(&self.shared.config)
            .map_err(|e| StoreError::Unavailable(self.cannot_write(&e)))?;
        let rolled_back = roll_back(&db, &open.hidden, committed);
        open.db = Some(db);
        match rolled_back {
            Ok(()) => {
                open.hidden = Arc::default();
                if let Some(failed) = open.failed.as_mut() {
                    failed.reopened = true;
                }
                Ok(())
            }
            Err(e @ StoreError::Stopped(_)) => Err(e),
            Err(e) => Err(StoreError::Unavailable(format!(
                "rolling back a failed flush: {e}"
            ))),
        }
    }
}
