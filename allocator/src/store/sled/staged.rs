//! The writes of the sled engine that wait for the next flush: the value
//! each key will have, the changes they make, the revisions they took, and
//! what each key held before the batch, so that a flush that fails can be
//! undone in the reads and on disk.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use super::keys::{REVISION_KEY, alloc_key, change_key, change_value, encode_record, owner_key};
use crate::{
    model::{Change, ChangeKind, Record},
    store::Result,
};

/// Values of keys as committed, by key (`None`: no such key): what a flush
/// that failed wrote over.
pub(super) type Hidden = BTreeMap<Vec<u8>, Option<sled::IVec>>;

/// Writes not yet applied to sled: the value each key will have (`None`:
/// removed), the changes they make and the revisions they took. A flush
/// turns them into one batch; decision reads look here first.
#[derive(Default)]
pub(super) struct Staged {
    values: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// What each staged key held before the batch. The writes say it,
    /// without a read: an Allocate's address and owner were free, a
    /// Release's address held the record it names and its owner that
    /// address, and revisions after the committed one have no change yet.
    /// The first write of a key in a batch says it (a later one sees the
    /// earlier write). The change-log entries that leave the kept history
    /// are not among them: after a failed flush the history may start one
    /// revision later, which only shortens it.
    before: Hidden,
    changes: Vec<Change>,
    /// The revision of the last write applied and durable.
    pub committed: u64,
    /// The revision of the last write staged (`committed` when none is).
    pub last: u64,
}

/// The staged writes, taken out for a flush.
pub(super) struct Batch {
    /// The writes, as one sled batch.
    pub writes: sled::Batch,
    /// What the keys held before.
    pub before: Hidden,
    /// The changes the writes make, by revision.
    pub changes: Vec<Change>,
}

impl Staged {
    /// Nothing staged, numbering on from `committed`.
    pub fn new(committed: u64) -> Staged {
        Staged {
            committed,
            last: committed,
            ..Staged::default()
        }
    }

    /// The value `key` will have after the flush, when a write is staged
    /// for it (`Some(None)`: removed).
    pub fn value(&self, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.values.get(key)
    }

    /// Whether no write is staged.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    fn put(&mut self, key: Vec<u8>, value: Option<Vec<u8>>, before: Option<sled::IVec>) {
        self.before.entry(key.clone()).or_insert(before);
        self.values.insert(key, value);
    }

    /// Stages the next revision's change-log entry, and the removal of the
    /// entry that falls out of the last `history` revisions.
    fn log(&mut self, revision: u64, change: Vec<u8>, history: u64) {
        self.last = revision;
        self.put(change_key(revision).to_vec(), Some(change), None);
        if let Some(old) = revision.checked_sub(history)
            && old > 0
        {
            self.values.insert(change_key(old).to_vec(), None);
        }
        self.values
            .insert(REVISION_KEY.to_vec(), Some(revision.to_be_bytes().to_vec()));
    }

    /// Stages the allocation `record` at `ip` as the next revision.
    pub fn allocate(&mut self, ip: IpAddr, mut record: Record, history: u64) -> Result<()> {
        record.revision = self.last + 1;
        let key = alloc_key(ip);
        let value = encode_record(&key, &record)?;
        let change = change_value(ChangeKind::Allocated, &key, &value);
        self.log(record.revision, change, history);
        self.put(owner_key(&record.owner), Some(key.clone()), None);
        self.put(key, Some(value), None);
        self.changes.push(Change {
            revision: record.revision,
            kind: ChangeKind::Allocated,
            address: ip,
            record,
        });
        Ok(())
    }

    /// Stages the release of the allocation `record` at `ip` as the next
    /// revision.
    pub fn release(&mut self, ip: IpAddr, record: Record, history: u64) -> Result<()> {
        let revision = self.last + 1;
        let key = alloc_key(ip);
        let value = encode_record(&key, &record)?;
        let change = change_value(ChangeKind::Released, &key, &value);
        self.log(revision, change, history);
        self.put(owner_key(&record.owner), None, Some(key.clone().into()));
        self.put(key, None, Some(value.into()));
        self.changes.push(Change {
            revision,
            kind: ChangeKind::Released,
            address: ip,
            record,
        });
        Ok(())
    }

    /// Takes the staged writes out as one batch; nothing stays staged, and
    /// the next writes number on from the last one staged (the flush sets
    /// them back when it fails).
    pub fn take(&mut self) -> Batch {
        let mut writes = sled::Batch::default();
        for (key, value) in self.values.drain() {
            match value {
                Some(value) => writes.insert(key, value),
                None => writes.remove(key),
            }
        }
        Batch {
            writes,
            before: std::mem::take(&mut self.before),
            changes: std::mem::take(&mut self.changes),
        }
    }
}
