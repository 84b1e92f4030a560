//! The sled store: allocations by address, an index by owner and the store
//! revision, each write one atomic batch. Only this module touches sled, and
//! key encoding lives here alone.
//!
//! Keys: `a` + family tag + big-endian address bytes (so keys sort by
//! address, IPv4 before IPv6) → JSON [`Record`]; `o` + owner → address key;
//! `m/revision` → big-endian u64.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use serde::{Deserialize, Serialize};

use crate::pool::{Family, from_int};

const ALLOC: u8 = b'a';
const OWNER: u8 = b'o';
const REVISION_KEY: &[u8] = b"m/revision";
const TAG_V4: u8 = 4;
const TAG_V6: u8 = 6;

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
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Store> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // Durability comes from the explicit flush after each batch of
            // writes; a background flusher would only add concurrent flushes.
            .flush_every_ms(None)
            .open()?;
        Ok(Store { db })
    }

    /// The allocation at `ip`.
    pub fn get(&self, ip: IpAddr) -> Result<Option<Record>> {
        let key = alloc_key(ip);
        self.db
            .get(&key)?
            .map(|v| decode_record(&key, &v))
            .transpose()
    }

    /// The address held by `owner`.
    pub fn owner_address(&self, owner: &str) -> Result<Option<IpAddr>> {
        self.db
            .get(owner_key(owner))?
            .map(|k| decode_alloc_key(&k))
            .transpose()
    }

    /// Records an allocation and its owner index and sets the store revision
    /// to `record.revision`, atomically. Not durable until [`Store::flush`].
    pub fn put(&self, ip: IpAddr, record: &Record) -> Result<()> {
        let key = alloc_key(ip);
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt {
            key: key.escape_ascii().to_string(),
            why: e.to_string(),
        })?;
        let mut batch = sled::Batch::default();
        batch.insert(owner_key(&record.owner), key.clone());
        batch.insert(key, value);
        batch.insert(REVISION_KEY, &record.revision.to_be_bytes());
        self.db.apply_batch(batch)?;
        Ok(())
    }

    /// Removes the allocation at `ip` held by `owner` and sets the store
    /// revision, atomically. Not durable until [`Store::flush`].
    pub fn delete(&self, ip: IpAddr, owner: &str, revision: u64) -> Result<()> {
        let mut batch = sled::Batch::default();
        batch.remove(alloc_key(ip));
        batch.remove(owner_key(owner));
        batch.insert(REVISION_KEY, &revision.to_be_bytes());
        self.db.apply_batch(batch)?;
        Ok(())
    }

    /// The revision of the last write (0 for a new store).
    pub fn revision(&self) -> Result<u64> {
        match self.db.get(REVISION_KEY)? {
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

    /// Makes every write so far durable. One call covers any number of writes.
    pub fn flush(&self) -> Result<usize> {
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
    fn delete_removes_record_and_owner_index() {
        let (_dir, store) = mk_store();
        store
            .put(ip("10.0.0.1"), &mk_record("svc-a", 1))
            .expect("put");
        store.delete(ip("10.0.0.1"), "svc-a", 2).expect("delete");
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
            store.delete(ip("10.0.0.1"), "svc-a", 3).expect("delete");
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
}
