//! The sled store: allocations by address, an index by owner and the store
//! revision. Only this module touches sled, and key encoding lives here alone.
//!
//! Writes are staged: [`Store::put`] and [`Store::delete`] add to one pending
//! batch, which [`Store::flush`] applies atomically and then makes durable.
//! Applying one batch per flush, rather than one per write, matters: sled
//! writes its log buffer out on every applied batch, so a batch per write
//! would cost a disk write per allocation even with the flush shared. The
//! writer reads its own staged writes through [`Store::get_latest`],
//! [`Store::owner_address_latest`] and [`Store::revision`]; every other read
//! sees them once applied, which is immediately before they are made durable.
//!
//! Keys: `a` + family tag + big-endian address bytes (so keys sort by
//! address, IPv4 before IPv6) → JSON [`Record`]; `o` + owner → address key;
//! `m/revision` → big-endian u64; `r` + big-endian revision → the [`Change`]
//! of that revision (the change log Watch replays), kind byte + address key
//! + JSON record.
//!
//! Every write puts its change-log entry in the same batch as the
//! allocation, and removes the entry that falls out of the kept history, so
//! the log always holds exactly the last `history` revisions (fewer on a
//! young store) without gaps.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::pool::{Family, from_int};

const ALLOC: u8 = b'a';
const OWNER: u8 = b'o';
const CHANGE: u8 = b'r';
const REVISION_KEY: &[u8] = b"m/revision";
const TAG_V4: u8 = 4;
const TAG_V6: u8 = 6;
const KIND_ALLOCATED: u8 = b'+';
const KIND_RELEASED: u8 = b'-';

/// How long [`Store::open`] waits for the directory's lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// sled reports a lock held elsewhere as an I/O error of kind `Other` that
/// wraps the `WouldBlock` of the lock call, or as that `WouldBlock` itself.
fn is_lock_error(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

/// Revisions of change history kept when none is configured.
pub const DEFAULT_HISTORY: u64 = 100_000;

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

/// One entry of the change log: what the write of `revision` did.
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

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (I/O, corruption detected by sled).
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
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

/// The allocation store on disk.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    history: u64,
    staged: Arc<Mutex<Staged>>,
}

/// Writes not yet applied to sled: the value each key will have (`None`:
/// removed). [`Store::flush`] turns them into one batch; point reads of the
/// writer look here first.
#[derive(Default)]
struct Staged {
    values: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Staged {
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.values.insert(key, Some(value));
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.values.insert(key, None);
    }

    fn into_batch(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (key, value) in self.values {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        batch
    }
}

/// Encodes the key of an allocation.
pub fn alloc_key(ip: IpAddr) -> Vec<u8> {
    let mut key = Vec::with_capacity(18);
    key.push(ALLOC);
    match ip {
        IpAddr::V4(v4) => {
            key.push(TAG_V4);
            key.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            key.push(TAG_V6);
            key.extend_from_slice(&v6.octets());
        }
    }
    key
}

fn alloc_key_int(family: Family, value: u128) -> Vec<u8> {
    alloc_key(from_int(family, value))
}

fn decode_alloc_key(key: &[u8]) -> Result<IpAddr> {
    let corrupt = |why: &str| StoreError::Corrupt {
        key: key.escape_ascii().to_string(),
        why: why.to_string(),
    };
    match key {
        [ALLOC, TAG_V4, rest @ ..] => <[u8; 4]>::try_from(rest)
            .map(IpAddr::from)
            .map_err(|_| corrupt("IPv4 key of the wrong length")),
        [ALLOC, TAG_V6, rest @ ..] => <[u8; 16]>::try_from(rest)
            .map(IpAddr::from)
            .map_err(|_| corrupt("IPv6 key of the wrong length")),
        _ => Err(corrupt("not an allocation key")),
    }
}

fn owner_key(owner: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(owner.len() + 1);
    key.push(OWNER);
    key.extend_from_slice(owner.as_bytes());
    key
}

fn change_key(revision: u64) -> [u8; 9] {
    let mut key = [CHANGE; 9];
    key[1..].copy_from_slice(&revision.to_be_bytes());
    key
}

fn change_value(kind: ChangeKind, address_key: &[u8], record_json: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(1 + address_key.len() + record_json.len());
    value.push(match kind {
        ChangeKind::Allocated => KIND_ALLOCATED,
        ChangeKind::Released => KIND_RELEASED,
    });
    value.extend_from_slice(address_key);
    value.extend_from_slice(record_json);
    value
}

fn decode_change(key: &[u8], value: &[u8]) -> Result<Change> {
    let corrupt = |why: &str| StoreError::Corrupt {
        key: key.escape_ascii().to_string(),
        why: why.to_string(),
    };
    let revision = match key {
        [CHANGE, rest @ ..] => <[u8; 8]>::try_from(rest)
            .map(u64::from_be_bytes)
            .map_err(|_| corrupt("change key of the wrong length"))?,
        _ => return Err(corrupt("not a change key")),
    };
    let (kind, rest) = match value {
        [KIND_ALLOCATED, rest @ ..] => (ChangeKind::Allocated, rest),
        [KIND_RELEASED, rest @ ..] => (ChangeKind::Released, rest),
        _ => return Err(corrupt("unknown change kind")),
    };
    let address_len = match rest {
        [ALLOC, TAG_V4, ..] => 6,
        [ALLOC, TAG_V6, ..] => 18,
        _ => return Err(corrupt("change without an address")),
    };
    if rest.len() < address_len {
        return Err(corrupt("change with a truncated address"));
    }
    let (address, record) = rest.split_at(address_len);
    Ok(Change {
        revision,
        kind,
        address: decode_alloc_key(address)?,
        record: decode_record(key, record)?,
    })
}

fn encode_record(key: &[u8], record: &Record) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|e| StoreError::Corrupt {
        key: key.escape_ascii().to_string(),
        why: e.to_string(),
    })
}

fn decode_record(key: &[u8], value: &[u8]) -> Result<Record> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: key.escape_ascii().to_string(),
        why: e.to_string(),
    })
}

fn decode_entry(entry: sled::Result<(sled::IVec, sled::IVec)>) -> Result<(IpAddr, Record)> {
    let (k, v) = entry?;
    Ok((decode_alloc_key(&k)?, decode_record(&k, &v)?))
}

impl Store {
    /// Opens (or creates) the store in `dir` with a page cache of `cache_bytes`.
    ///
    /// sled locks the directory, and a handle closed a moment ago (in this
    /// process, or one that is exiting) may still hold the lock while its
    /// background thread winds down; opening waits up to [`LOCK_WAIT`] for
    /// that, then fails.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Store> {
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
        Ok(Store {
            db,
            history: DEFAULT_HISTORY,
            staged: Arc::default(),
        })
    }

    /// Keeps the change log of the last `revisions` writes (at least 1) from
    /// now on. Entries already older than that go with
    /// [`Store::trim_history`].
    pub fn with_history(mut self, revisions: u64) -> Store {
        self.history = revisions.max(1);
        self
    }

    /// Revisions of change history this store keeps.
    pub fn history(&self) -> u64 {
        self.history
    }

    /// Removes change-log entries older than the kept history (after the
    /// history was shortened), with nothing staged. Returns how many it
    /// removed. Not durable until
    /// [`Store::flush`].
    pub fn trim_history(&self) -> Result<u64> {
        let revision = self.revision()?;
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

    /// The allocation at `ip`, as applied (staged writes not included).
    pub fn get(&self, ip: IpAddr) -> Result<Option<Record>> {
        let key = alloc_key(ip);
        self.db
            .get(&key)?
            .map(|v| decode_record(&key, &v))
            .transpose()
    }

    /// The address held by `owner`, as applied (staged writes not included).
    pub fn owner_address(&self, owner: &str) -> Result<Option<IpAddr>> {
        self.db
            .get(owner_key(owner))?
            .map(|k| decode_alloc_key(&k))
            .transpose()
    }

    /// The allocation at `ip`, staged writes included: what the writer
    /// decides on.
    pub fn get_latest(&self, ip: IpAddr) -> Result<Option<Record>> {
        let key = alloc_key(ip);
        self.read_latest(&key)?
            .map(|v| decode_record(&key, &v))
            .transpose()
    }

    /// The address held by `owner`, staged writes included: what the writer
    /// decides on.
    pub fn owner_address_latest(&self, owner: &str) -> Result<Option<IpAddr>> {
        self.read_latest(&owner_key(owner))?
            .map(|k| decode_alloc_key(&k))
            .transpose()
    }

    /// Stages an allocation, its owner index and its change-log entry, and
    /// the store revision `record.revision`. Applied atomically with the
    /// other staged writes, and durable, by [`Store::flush`].
    pub fn put(&self, ip: IpAddr, record: &Record) -> Result<()> {
        let key = alloc_key(ip);
        let value = encode_record(&key, record)?;
        let change = change_value(ChangeKind::Allocated, &key, &value);
        let mut staged = self.staged();
        staged.insert(change_key(record.revision).to_vec(), change);
        self.trim_one(&mut staged, record.revision);
        staged.insert(owner_key(&record.owner), key.clone());
        staged.insert(key, value);
        staged.insert(
            REVISION_KEY.to_vec(),
            record.revision.to_be_bytes().to_vec(),
        );
        Ok(())
    }

    /// Stages the removal of the allocation `record` at `ip` and its owner
    /// index, the release's change-log entry and the store revision
    /// `revision`. Applied atomically with the other staged writes, and
    /// durable, by [`Store::flush`].
    pub fn delete(&self, ip: IpAddr, record: &Record, revision: u64) -> Result<()> {
        let key = alloc_key(ip);
        let value = encode_record(&key, record)?;
        let change = change_value(ChangeKind::Released, &key, &value);
        let mut staged = self.staged();
        staged.insert(change_key(revision).to_vec(), change);
        self.trim_one(&mut staged, revision);
        staged.remove(key);
        staged.remove(owner_key(&record.owner));
        staged.insert(REVISION_KEY.to_vec(), revision.to_be_bytes().to_vec());
        Ok(())
    }

    /// The oldest revision whose change the log still holds, `None` when it
    /// holds none.
    pub fn first_change(&self) -> Result<Option<u64>> {
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

    /// The changes after revision `after` up to `last` (inclusive), by
    /// revision. Gaps mean the log no longer holds those revisions.
    pub fn changes(&self, after: u64, last: u64) -> impl Iterator<Item = Result<Change>> + use<> {
        let first = after.saturating_add(1);
        // sled refuses a range that ends before it starts.
        (first <= last)
            .then(|| self.db.range(change_key(first)..=change_key(last)))
            .into_iter()
            .flatten()
            .map(|entry| {
                let (k, v) = entry?;
                decode_change(&k, &v)
            })
    }

    /// The revision of the last write, staged or not (0 for a new store).
    pub fn revision(&self) -> Result<u64> {
        match self.read_latest(REVISION_KEY)? {
            None => Ok(0),
            Some(v) => <[u8; 8]>::try_from(v.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    key: "m/revision".to_string(),
                    why: "not an 8-byte integer".to_string(),
                }),
        }
    }

    /// Allocations of a family from `first` to `last` (inclusive), by address.
    pub fn scan(
        &self,
        family: Family,
        first: u128,
        last: u128,
    ) -> impl Iterator<Item = Result<(IpAddr, Record)>> + use<> {
        self.db
            .range(alloc_key_int(family, first)..=alloc_key_int(family, last))
            .map(decode_entry)
    }

    /// Every allocation after `after` (or from the first), by address.
    pub fn scan_after(
        &self,
        after: Option<IpAddr>,
    ) -> impl Iterator<Item = Result<(IpAddr, Record)>> + use<> {
        let prefix_end = vec![ALLOC + 1];
        let iter = match after {
            None => self.db.range(vec![ALLOC]..prefix_end),
            Some(ip) => {
                let mut start = alloc_key(ip);
                start.push(0);
                self.db.range(start..prefix_end)
            }
        };
        iter.map(decode_entry)
    }

    /// Every allocated address, by address.
    pub fn addresses(&self) -> impl Iterator<Item = Result<IpAddr>> + use<> {
        self.db
            .scan_prefix([ALLOC])
            .keys()
            .map(|k| decode_alloc_key(&k?))
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

    /// Applies the staged writes as one atomic batch and makes every write
    /// so far durable. One call covers any number of writes. When applying
    /// fails, the staged writes are dropped, none of them applied.
    pub fn flush(&self) -> Result<usize> {
        {
            let mut staged = self.staged();
            if !staged.values.is_empty() {
                let batch = std::mem::take(&mut *staged).into_batch();
                // The lock is held until the batch is applied, so a point read
                // never misses a write that is neither staged nor applied.
                self.db.apply_batch(batch)?;
            }
        }
        Ok(self.db.flush()?)
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::to_int;

    fn mk_record(owner: &str, revision: u64) -> Record {
        Record {
            owner: owner.to_string(),
            labels: BTreeMap::from([("k".to_string(), "v".to_string())]),
            created_unix_nanos: 1_700_000_000_000_000_000,
            revision,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn mk_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8 << 20).expect("open");
        (dir, store)
    }

    #[test]
    fn put_then_get_by_address_and_owner() {
        let (_dir, store) = mk_store();
        store
            .put(ip("10.0.0.1"), &mk_record("svc-a", 1))
            .expect("put");
        store.flush().expect("flush");
        assert_eq!(
            store.get(ip("10.0.0.1")).expect("get"),
            Some(mk_record("svc-a", 1))
        );
        assert_eq!(
            store.owner_address("svc-a").expect("owner"),
            Some(ip("10.0.0.1"))
        );
        assert_eq!(store.get(ip("10.0.0.2")).expect("get"), None);
        assert_eq!(store.owner_address("svc-b").expect("owner"), None);
        assert_eq!(store.revision().expect("rev"), 1);
    }

    #[test]
    fn the_latest_reads_see_staged_writes_and_the_others_see_them_once_flushed() {
        let (_dir, store) = mk_store();
        store
            .put(ip("10.0.0.1"), &mk_record("svc-a", 1))
            .expect("put");
        store
            .put(ip("10.0.0.2"), &mk_record("svc-b", 2))
            .expect("put");
        store
            .delete(ip("10.0.0.1"), &mk_record("svc-a", 1), 3)
            .expect("delete");
        assert_eq!(store.get_latest(ip("10.0.0.1")).expect("get"), None);
        assert_eq!(store.owner_address_latest("svc-a").expect("owner"), None);
        assert_eq!(
            store.owner_address_latest("svc-b").expect("owner"),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(store.revision().expect("rev"), 3);
        assert_eq!(store.get(ip("10.0.0.2")).expect("get"), None, "not applied");
        assert_eq!(store.owner_address("svc-b").expect("owner"), None);
        assert_eq!(store.addresses().count(), 0, "nothing applied yet");
        assert_eq!(store.changes(0, 3).count(), 0, "nothing applied yet");

        store.flush().expect("flush");
        let addrs: Vec<IpAddr> = store.addresses().map(|r| r.expect("addr")).collect();
        assert_eq!(addrs, vec![ip("10.0.0.2")]);
        assert_eq!(store.changes(0, 3).count(), 3);
        assert_eq!(
            store.get(ip("10.0.0.2")).expect("get"),
            Some(mk_record("svc-b", 2))
        );
        assert_eq!(
            store.owner_address("svc-b").expect("owner"),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(store.get(ip("10.0.0.1")).expect("get"), None);
        assert_eq!(store.revision().expect("rev"), 3);
    }

    #[test]
    fn staged_writes_that_were_never_flushed_are_not_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), 8 << 20).expect("open");
            store
                .put(ip("10.0.0.1"), &mk_record("svc-a", 1))
                .expect("put");
            store.flush().expect("flush");
            store
                .put(ip("10.0.0.2"), &mk_record("svc-b", 2))
                .expect("put");
        }
        let store = Store::open(dir.path(), 8 << 20).expect("reopen");
        assert_eq!(store.get(ip("10.0.0.2")).expect("get"), None);
        assert_eq!(store.owner_address("svc-b").expect("owner"), None);
        assert_eq!(store.revision().expect("rev"), 1);
        assert_eq!(store.addresses().count(), 1);
    }

    #[test]
    fn delete_removes_record_and_owner_index() {
        let (_dir, store) = mk_store();
        store
            .put(ip("10.0.0.1"), &mk_record("svc-a", 1))
            .expect("put");
        store.flush().expect("flush");
        store
            .delete(ip("10.0.0.1"), &mk_record("svc-a", 1), 2)
            .expect("delete");
        store.flush().expect("flush");
        assert_eq!(store.get(ip("10.0.0.1")).expect("get"), None);
        assert_eq!(store.owner_address("svc-a").expect("owner"), None);
        assert_eq!(store.revision().expect("rev"), 2);
    }

    #[test]
    fn scans_are_ordered_by_address_ipv4_first() {
        let (_dir, store) = mk_store();
        for (i, a) in [
            "fd00::1",
            "10.0.0.10",
            "10.0.0.9",
            "9.255.255.255",
            "10.0.1.0",
        ]
        .iter()
        .enumerate()
        {
            store
                .put(ip(a), &mk_record(&format!("o{i}"), i as u64 + 1))
                .expect("put");
        }
        store.flush().expect("flush");
        let all: Vec<IpAddr> = store
            .scan_after(None)
            .map(|r| r.expect("entry").0)
            .collect();
        assert_eq!(
            all,
            vec![
                ip("9.255.255.255"),
                ip("10.0.0.9"),
                ip("10.0.0.10"),
                ip("10.0.1.0"),
                ip("fd00::1")
            ]
        );
        let after: Vec<IpAddr> = store
            .scan_after(Some(ip("10.0.0.10")))
            .map(|r| r.expect("entry").0)
            .collect();
        assert_eq!(after, vec![ip("10.0.1.0"), ip("fd00::1")]);
        let (f, first) = to_int(ip("10.0.0.0"));
        let (_, last) = to_int(ip("10.0.0.255"));
        let ranged: Vec<IpAddr> = store
            .scan(f, first, last)
            .map(|r| r.expect("entry").0)
            .collect();
        assert_eq!(ranged, vec![ip("10.0.0.9"), ip("10.0.0.10")]);
        let addrs: Vec<IpAddr> = store.addresses().map(|r| r.expect("addr")).collect();
        assert_eq!(addrs, all);
    }

    #[test]
    fn flushed_writes_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), 8 << 20).expect("open");
            store
                .put(ip("10.0.0.1"), &mk_record("svc-a", 1))
                .expect("put");
            store
                .put(ip("fd00::2"), &mk_record("svc-b", 2))
                .expect("put");
            store
                .delete(ip("10.0.0.1"), &mk_record("svc-a", 1), 3)
                .expect("delete");
            store.flush().expect("flush");
        }
        let store = Store::open(dir.path(), 8 << 20).expect("reopen");
        assert_eq!(store.get(ip("10.0.0.1")).expect("get"), None);
        assert_eq!(
            store.get(ip("fd00::2")).expect("get"),
            Some(mk_record("svc-b", 2))
        );
        assert_eq!(
            store.owner_address("svc-b").expect("owner"),
            Some(ip("fd00::2"))
        );
        assert_eq!(store.revision().expect("rev"), 3);
        let index: Vec<(String, IpAddr)> = store.owner_index().map(|r| r.expect("index")).collect();
        assert_eq!(index, vec![("svc-b".to_string(), ip("fd00::2"))]);
    }

    #[test]
    fn a_directory_held_by_an_open_store_is_refused_after_the_lock_wait() {
        let (dir, _store) = mk_store();
        let started = Instant::now();
        let err = match Store::open(dir.path(), 8 << 20) {
            Ok(_) => panic!("a second store opened a directory in use"),
            Err(e) => e,
        };
        assert!(err.to_string().contains("could not acquire lock"), "{err}");
        assert!(started.elapsed() >= LOCK_WAIT, "it waited for the lock");
    }

    #[test]
    fn a_directory_whose_store_was_just_closed_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Each close leaves sled's thread to release the lock a moment
        // later; enough rounds that opening right away would hit that.
        for round in 0..100u64 {
            let store = Store::open(dir.path(), 8 << 20).expect("reopen");
            assert_eq!(store.revision().expect("rev"), round);
            let addr = IpAddr::from([10, 0, 0, round as u8 + 1]);
            store
                .put(addr, &mk_record(&format!("o{round}"), round + 1))
                .expect("put");
            store.flush().expect("flush");
        }
    }

    #[test]
    fn an_unreadable_record_is_an_error_not_a_panic() {
        let (_dir, store) = mk_store();
        store
            .db
            .insert(alloc_key(ip("10.0.0.1")), b"not json".to_vec())
            .expect("raw insert");
        assert!(matches!(
            store.get(ip("10.0.0.1")),
            Err(StoreError::Corrupt { .. })
        ));
        store
            .db
            .insert([ALLOC, TAG_V4, 1], b"{}".to_vec())
            .expect("raw insert");
        assert!(
            store
                .addresses()
                .any(|r| matches!(r, Err(StoreError::Corrupt { .. })))
        );
    }

    fn revisions(store: &Store, after: u64, last: u64) -> Vec<(u64, ChangeKind, IpAddr)> {
        store
            .changes(after, last)
            .map(|c| {
                let c = c.expect("change");
                (c.revision, c.kind, c.address)
            })
            .collect()
    }

    #[test]
    fn every_write_is_in_the_change_log_in_revision_order() {
        let (_dir, store) = mk_store();
        store
            .put(ip("10.0.0.1"), &mk_record("svc-a", 1))
            .expect("put");
        store
            .put(ip("fd00::2"), &mk_record("svc-b", 2))
            .expect("put");
        store
            .delete(ip("10.0.0.1"), &mk_record("svc-a", 1), 3)
            .expect("delete");
        store.flush().expect("flush");
        let all: Vec<Change> = store.changes(0, 3).map(|c| c.expect("change")).collect();
        assert_eq!(
            all,
            vec![
                Change {
                    revision: 1,
                    kind: ChangeKind::Allocated,
                    address: ip("10.0.0.1"),
                    record: mk_record("svc-a", 1),
                },
                Change {
                    revision: 2,
                    kind: ChangeKind::Allocated,
                    address: ip("fd00::2"),
                    record: mk_record("svc-b", 2),
                },
                Change {
                    revision: 3,
                    kind: ChangeKind::Released,
                    address: ip("10.0.0.1"),
                    record: mk_record("svc-a", 1),
                },
            ]
        );
        assert_eq!(
            revisions(&store, 1, 2),
            vec![(2, ChangeKind::Allocated, ip("fd00::2"))]
        );
        assert!(revisions(&store, 3, 3).is_empty(), "nothing after the last");
        assert!(revisions(&store, 3, 1).is_empty(), "an empty range");
        assert_eq!(store.first_change().expect("first"), Some(1));
    }

    #[test]
    fn the_change_log_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), 8 << 20).expect("open");
            store
                .put(ip("10.0.0.1"), &mk_record("svc-a", 1))
                .expect("put");
            store
                .delete(ip("10.0.0.1"), &mk_record("svc-a", 1), 2)
                .expect("delete");
            store.flush().expect("flush");
        }
        let store = Store::open(dir.path(), 8 << 20).expect("reopen");
        assert_eq!(
            revisions(&store, 0, u64::MAX),
            vec![
                (1, ChangeKind::Allocated, ip("10.0.0.1")),
                (2, ChangeKind::Released, ip("10.0.0.1")),
            ]
        );
    }

    #[test]
    fn the_change_log_keeps_exactly_the_last_history_revisions() {
        let (_dir, store) = mk_store();
        let store = store.with_history(3);
        assert_eq!(store.first_change().expect("first"), None);
        for r in 1..=10u64 {
            let addr = IpAddr::from([10, 0, 0, r as u8]);
            store
                .put(addr, &mk_record(&format!("o{r}"), r))
                .expect("put");
            if r % 4 == 0 {
                // Trimming works within one staged batch and across batches.
                store.flush().expect("flush");
            }
        }
        store.flush().expect("flush");
        assert_eq!(store.first_change().expect("first"), Some(8));
        let kept: Vec<u64> = revisions(&store, 0, 10).iter().map(|c| c.0).collect();
        assert_eq!(kept, vec![8, 9, 10]);
        store
            .delete(IpAddr::from([10, 0, 0, 1]), &mk_record("o1", 1), 11)
            .expect("delete");
        store.flush().expect("flush");
        let kept: Vec<u64> = revisions(&store, 0, 11).iter().map(|c| c.0).collect();
        assert_eq!(kept, vec![9, 10, 11], "a release trims too");
    }

    #[test]
    fn a_shortened_history_is_trimmed_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), 8 << 20).expect("open");
            for r in 1..=20u64 {
                let addr = IpAddr::from([10, 0, 0, r as u8]);
                store
                    .put(addr, &mk_record(&format!("o{r}"), r))
                    .expect("put");
            }
            store.flush().expect("flush");
        }
        let store = Store::open(dir.path(), 8 << 20)
            .expect("reopen")
            .with_history(5);
        assert_eq!(store.first_change().expect("first"), Some(1));
        assert_eq!(store.trim_history().expect("trim"), 15);
        assert_eq!(store.first_change().expect("first"), Some(16));
        assert_eq!(store.trim_history().expect("trim again"), 0);
        store
            .put(ip("10.0.1.1"), &mk_record("o21", 21))
            .expect("put");
        store.flush().expect("flush");
        let kept: Vec<u64> = revisions(&store, 0, 21).iter().map(|c| c.0).collect();
        assert_eq!(kept, vec![17, 18, 19, 20, 21]);
        // The allocations themselves are untouched.
        assert_eq!(store.addresses().count(), 21);
    }

    #[test]
    fn an_unreadable_change_is_an_error_not_a_panic() {
        let (_dir, store) = mk_store();
        store
            .db
            .insert(change_key(1), b"?garbage".to_vec())
            .expect("raw insert");
        store
            .db
            .insert(change_key(2), b"+a".to_vec())
            .expect("raw insert");
        let results: Vec<_> = store.changes(0, 2).collect();
        assert_eq!(results.len(), 2);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(StoreError::Corrupt { .. })))
        );
    }
}
