//! What the writer has staged for the next flush: its writes, the reads its
//! decisions rest on (of the replica's copy, [`Mirror`]), what both make it
//! see, and the orphaned owner keys they came across; and the one etcd
//! transaction that commits the writes only while every key is still as the
//! writer saw it.
//!
//! The copy a replica decides on follows etcd's watch, so it may lack what
//! another replica committed a moment ago. A decision that writes nothing
//! (an owner already holds its address, a release finds nothing) is as
//! exposed to that as one that writes: each key a decision read is compared
//! in the transaction too, and when one changed meanwhile the transaction
//! fails and the writer decides again on the caught-up copy.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, btree_map},
    net::IpAddr,
};

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};

use super::{
    keys::{self, Keys},
    mirror::{Mirror, Orphan},
};
use crate::{addresses::pool::Pools, model::Record};

/// What a key must hold for the transaction to commit: what the writer
/// decided on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Expect {
    Absent,
    ModRevision(i64),
}

impl Expect {
    /// A key absent, or last written at `mod_revision`.
    pub(super) fn of(mod_revision: Option<i64>) -> Expect {
        mod_revision.map_or(Expect::Absent, Expect::ModRevision)
    }

    fn compare(self, key: &[u8]) -> Compare {
        match self {
            Expect::Absent => Compare::version(key.to_vec(), CompareOp::Equal, 0),
            Expect::ModRevision(m) => Compare::mod_revision(key.to_vec(), CompareOp::Equal, m),
        }
    }
}

/// What a staged write puts in its key.
#[derive(Debug)]
pub(super) enum Put {
    /// An allocation, encoded with its place among the transaction's
    /// changes when the transaction is built.
    Allocation(Record),
    /// An owner's index entry.
    Owner(IpAddr),
}

/// A staged write of one key: what it must find, and what it writes
/// (`None` deletes).
#[derive(Debug)]
struct Op {
    expect: Expect,
    value: Option<Put>,
}

/// The writes and reads of the next flush, and how they change what the
/// writer sees.
#[derive(Default)]
pub(super) struct Staged {
    ops: BTreeMap<Vec<u8>, Op>,
    /// Keys decisions read but do not write, with what they held.
    reads: BTreeMap<Vec<u8>, Expect>,
    /// Pools allocated in, whose definitions must not have changed.
    pub(super) pools: BTreeSet<usize>,
    /// Allocations as the staged writes leave them, or as decisions first
    /// read them (so every decision of a batch sees one state).
    pub(super) records: HashMap<IpAddr, Option<Record>>,
    /// Owners' addresses, likewise.
    pub(super) owners: HashMap<String, Option<IpAddr>>,
    /// A write was decided on a copy that has changed since: the flush
    /// conflicts without asking etcd.
    pub(super) stale: bool,
    /// Orphaned owner keys of the owners decisions read: the flush deletes
    /// them, then conflicts, so that the decisions are made again without.
    pub(super) orphans: Vec<Orphan>,
}

impl Staged {
    /// Stages `value` for `key`. A key staged before keeps what it
    /// expected then (etcd still holds that); a new one expects `expect()`,
    /// `None` when the decision is stale.
    pub(super) fn write(
        &mut self,
        key: Vec<u8>,
        expect: impl FnOnce() -> Option<Expect>,
        value: Option<Put>,
    ) {
        self.reads.remove(&key);
        match self.ops.entry(key) {
            btree_map::Entry::Occupied(mut op) => op.get_mut().value = value,
            btree_map::Entry::Vacant(slot) => match expect() {
                Some(expect) => {
                    slot.insert(Op { expect, value });
                }
                None => self.stale = true,
            },
        }
    }

    /// Notes that a decision read `key` holding `expect`. The first read
    /// of a key counts, and a write of it replaces the read.
    pub(super) fn read(&mut self, key: Vec<u8>, expect: Expect) {
        if !self.ops.contains_key(&key) {
            self.reads.entry(key).or_insert(expect);
        }
    }

    /// The allocation at `ip` as a decision reads it: as staged, or as the
    /// copy holds it (and then compared at the flush).
    pub(super) fn record(&mut self, keys: &Keys, mirror: &Mirror, ip: IpAddr) -> Option<Record> {
        if let Some(record) = self.records.get(&ip) {
            return record.clone();
        }
        let entry = mirror.get(ip);
        self.read(keys.address(ip), Expect::of(entry.map(|e| e.mod_revision)));
        let record = entry.map(|e| e.record.clone());
        self.records.insert(ip, record.clone());
        record
    }

    /// The address `owner` holds as a decision reads it: as staged, or as
    /// the copy holds it (and then its owner key and its allocation are
    /// compared at the flush). An orphaned owner key is noted.
    pub(super) fn owner(&mut self, keys: &Keys, mirror: &Mirror, owner: &str) -> Option<IpAddr> {
        if let Some(ip) = self.owners.get(owner) {
            return *ip;
        }
        let key = mirror.owner_key(owner).map(|k| k.mod_revision);
        self.read(keys.owner(owner), Expect::of(key));
        self.orphans.extend(mirror.orphan(owner));
        let held = mirror
            .owner(owner)
            .and_then(|ip| mirror.get(ip).map(|e| (ip, e)));
        if let Some((ip, e)) = held {
            // Read together, so the decision sees the owner's allocation
            // even when the copy moves on before it asks for it.
            self.read(keys.address(ip), Expect::ModRevision(e.mod_revision));
            self.records
                .entry(ip)
                .or_insert_with(|| Some(e.record.clone()));
        }
        let ip = held.map(|(ip, _)| ip);
        self.owners.insert(owner.to_string(), ip);
        ip
    }

    /// Stages the allocation `record` at `ip`, in the pool `pool` if any.
    pub(super) fn allocate(
        &mut self,
        keys: &Keys,
        pool: Option<usize>,
        ip: IpAddr,
        record: Record,
    ) {
        // The writer allocates only an address it saw free, for an owner it
        // saw holding nothing: etcd must hold neither key (the copy may
        // already show another replica's newer commit, which must win).
        let owner = keys.owner(&record.owner);
        self.write(owner, || Some(Expect::Absent), Some(Put::Owner(ip)));
        self.pools.extend(pool);
        self.records.insert(ip, Some(record.clone()));
        self.owners.insert(record.owner.clone(), Some(ip));
        let address = keys.address(ip);
        self.write(
            address,
            || Some(Expect::Absent),
            Some(Put::Allocation(record)),
        );
    }

    /// Stages the release of the allocation `record` at `ip`: both keys
    /// must be as the copy holds them while it still holds that very
    /// allocation there. When the follower has changed it since the writer
    /// decided, the decision is stale: comparing with the newer entry would
    /// remove another replica's allocation.
    pub(super) fn release(&mut self, keys: &Keys, mirror: &Mirror, ip: IpAddr, record: &Record) {
        let held = mirror.get(ip).filter(|e| e.record == *record);
        let address = held.map(|e| Expect::ModRevision(e.mod_revision));
        let owner_key = mirror.owner_key(&record.owner).map(|k| k.mod_revision);
        let owner_key = held.map(|_| Expect::of(owner_key));
        self.write(keys.address(ip), || address, None);
        self.write(keys.owner(&record.owner), || owner_key, None);
        self.records.insert(ip, None);
        self.owners.insert(record.owner.clone(), None);
    }

    /// Whether no transaction is needed.
    pub(super) fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.reads.is_empty()
    }

    /// Whether the transaction writes anything.
    pub(super) fn writes(&self) -> bool {
        !self.ops.is_empty()
    }

    /// The transaction that commits the staged writes while every key
    /// written or read, and every pool allocated in, is as the writer saw
    /// it.
    ///
    /// etcd applies the operations in order and its watch reports their
    /// events in that order, so each allocation's place among the
    /// transaction's changes is known here: in key order, a deleted
    /// allocation is one change (a release), a new one is one, and one put
    /// over another is two (a release, then the allocation).
    pub(super) fn txn(&self, keys: &Keys, pool_keys: &[(String, i64)], pools: &Pools) -> Txn {
        let mut compares: Vec<Compare> = self
            .ops
            .iter()
            .map(|(key, op)| op.expect.compare(key))
            .chain(self.reads.iter().map(|(key, expect)| expect.compare(key)))
            .collect();
        compares.extend(self.pools.iter().map(|&i| {
            let name = pools.at(i).name();
            Compare::mod_revision(keys.pool(name), CompareOp::Equal, pool_keys[i].1)
        }));
        let mut index = 0;
        let mut ops: Vec<TxnOp> = Vec::with_capacity(self.ops.len());
        for (key, op) in &self.ops {
            let replaces = matches!(op.expect, Expect::ModRevision(_));
            ops.push(match &op.value {
                Some(Put::Allocation(record)) => {
                    index += u64::from(replaces);
                    let value = keys::encode(record, index);
                    index += 1;
                    TxnOp::put(key.clone(), value, None)
                }
                Some(Put::Owner(ip)) => TxnOp::put(key.clone(), ip.to_string(), None),
                None => {
                    if replaces && keys.is_address(key) {
                        index += 1;
                    }
                    TxnOp::delete(key.clone(), None)
                }
            });
        }
        if ops.is_empty() {
            // etcd serves a transaction without operations from whichever
            // member it reaches, however far behind (it counts as a
            // serializable read); a linearizable read makes it compare
            // with what the cluster has committed.
            let count = GetOptions::new().with_count_only();
            ops.push(TxnOp::get(keys.sync(), Some(count)));
        }
        Txn::new().when(compares).and_then(ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::ip;

    #[test]
    fn a_key_read_then_written_is_compared_once_with_the_writes_expectation() {
        let mut s = Staged::default();
        s.read(b"k".to_vec(), Expect::Absent);
        s.read(b"k".to_vec(), Expect::ModRevision(3));
        assert_eq!(s.reads.get(b"k".as_slice()), Some(&Expect::Absent));
        s.write(
            b"k".to_vec(),
            || Some(Expect::Absent),
            Some(Put::Owner(ip("10.0.0.1"))),
        );
        s.read(b"k".to_vec(), Expect::ModRevision(9));
        assert!(s.reads.is_empty());
        assert!(s.writes());
        s.write(b"k".to_vec(), || Some(Expect::ModRevision(9)), None);
        assert_eq!(s.ops[b"k".as_slice()].expect, Expect::Absent);
        assert!(s.ops[b"k".as_slice()].value.is_none());
    }

    #[test]
    fn reads_alone_still_need_a_transaction() {
        let mut s = Staged::default();
        assert!(s.is_empty());
        s.read(b"o".to_vec(), Expect::Absent);
        assert!(!s.is_empty());
        assert!(!s.writes());
    }
}
