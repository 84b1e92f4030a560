//! Where the etcd engine keeps what, under an installation's prefix, and
//! how values are written: pure functions, no etcd calls.
//!
//! - `<prefix>a/4/<8 hex digits>` and `<prefix>a/6/<32 hex digits>`: an
//!   allocation by address (keys sort by address, IPv4 first) → JSON
//!   [`Value`]. A key is only ever written to allocate; its mod revision is
//!   the transaction's, and the value carries the allocation's place among
//!   the changes of that transaction ([`Value::index`]).
//! - `<prefix>o/<owner>`: the address an owner holds, as text; written in
//!   the same transaction as the address key, so both share their mod
//!   revision. One whose address key does not name its owner is an orphan
//!   (left by hand or by a fault), which the engine deletes.
//! - `<prefix>pools/<name>`: a pool's definition ([`pool_definition`]).
//! - `<prefix>sync`: written empty when a replica needs to know that its
//!   watch has delivered every change up to now (its event comes after
//!   them); read by no one.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::addresses::pool::{Family, Pool, from_int, to_int};
use crate::{model::Record, store::StoreError};

/// How many changes one etcd revision may number: the store's revision of a
/// change is etcd's revision of its transaction times this, plus the
/// change's place among the transaction's changes (one transaction makes at
/// most 128 operations, so fewer changes).
pub const PER_REVISION: u64 = 1000;

/// The store revision of the change at `index` in the transaction of etcd
/// revision `etcd`.
pub fn change_revision(etcd: i64, index: u64) -> u64 {
    u64::try_from(etcd)
        .unwrap_or(0)
        .saturating_mul(PER_REVISION)
        .saturating_add(index.min(PER_REVISION - 1))
}

/// The store revision that covers every change up to etcd revision `etcd`.
pub fn reached(etcd: u64) -> u64 {
    etcd.saturating_mul(PER_REVISION)
        .saturating_add(PER_REVISION - 1)
}

/// The etcd revision of the transaction that made the change of store
/// revision `revision`.
pub fn etcd_revision(revision: u64) -> u64 {
    revision / PER_REVISION
}

/// The keys of one installation.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

/// What a key under the prefix is.
#[derive(Debug, PartialEq, Eq)]
pub enum Key {
    /// An allocation.
    Address(IpAddr),
    /// An owner's index entry, by owner.
    Owner(String),
    /// A pool definition.
    Pool(String),
    /// Anything else (left alone).
    Other,
}

impl Keys {
    /// Keys under `prefix`.
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// The installation prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key of the allocation at `ip`.
    pub fn address(&self, ip: IpAddr) -> Vec<u8> {
        let (family, x) = to_int(ip);
        match family {
            Family::V4 => format!("{}a/4/{x:08x}", self.prefix),
            Family::V6 => format!("{}a/6/{x:032x}", self.prefix),
        }
        .into_bytes()
    }

    /// The first key of the allocations.
    pub fn addresses(&self) -> Vec<u8> {
        format!("{}a/", self.prefix).into_bytes()
    }

    /// Whether `key` is an allocation's key.
    pub fn is_address(&self, key: &[u8]) -> bool {
        key.strip_prefix(self.prefix.as_bytes())
            .is_some_and(|rest| rest.starts_with(b"a/"))
    }

    /// The key of `owner`'s index entry.
    pub fn owner(&self, owner: &str) -> Vec<u8> {
        format!("{}o/{owner}", self.prefix).into_bytes()
    }

    /// The first key of the owners' index.
    pub fn owners(&self) -> Vec<u8> {
        format!("{}o/", self.prefix).into_bytes()
    }

    /// The key of the definition of pool `name`.
    pub fn pool(&self, name: &str) -> Vec<u8> {
        format!("{}pools/{name}", self.prefix).into_bytes()
    }

    /// The sync key.
    pub fn sync(&self) -> Vec<u8> {
        format!("{}sync", self.prefix).into_bytes()
    }

    /// What `key` is; an unreadable allocation key is an error.
    pub fn classify(&self, key: &[u8]) -> Result<Key, StoreError> {
        let Some(rest) = key.strip_prefix(self.prefix.as_bytes()) else {
            return Ok(Key::Other);
        };
        if let Some(hex) = rest.strip_prefix(b"a/4/") {
            return parse_hex(key, hex, 8).map(|x| Key::Address(from_int(Family::V4, x)));
        }
        if let Some(hex) = rest.strip_prefix(b"a/6/") {
            return parse_hex(key, hex, 32).map(|x| Key::Address(from_int(Family::V6, x)));
        }
        if let Some(owner) = rest.strip_prefix(b"o/") {
            return Ok(Key::Owner(String::from_utf8_lossy(owner).into_owned()));
        }
        if let Some(name) = rest.strip_prefix(b"pools/") {
            return Ok(Key::Pool(String::from_utf8_lossy(name).into_owned()));
        }
        Ok(Key::Other)
    }
}

fn corrupt(key: &[u8], why: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: key.escape_ascii().to_string(),
        why: why.into(),
    }
}

fn parse_hex(key: &[u8], hex: &[u8], digits: usize) -> Result<u128, StoreError> {
    let text = std::str::from_utf8(hex).map_err(|_| corrupt(key, "address not in hex"))?;
    if text.len() != digits {
        return Err(corrupt(
            key,
            format!("address of {} hex digits, not {digits}", text.len()),
        ));
    }
    u128::from_str_radix(text, 16).map_err(|_| corrupt(key, "address not in hex"))
}

/// What an allocation key holds: the record but its revision, which the
/// key's mod revision and the change's place in its transaction give.
#[derive(Debug, Serialize, Deserialize)]
pub struct Value {
    /// The owner.
    pub owner: String,
    /// Labels given at allocation.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Allocation time, nanoseconds since the Unix epoch.
    pub created_unix_nanos: u64,
    /// The allocation's place among the changes of its transaction (absent
    /// in values written before revisions were numbered per change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
}

/// The value written for `record`, the change at `index` of its
/// transaction.
pub fn encode(record: &Record, index: u64) -> Vec<u8> {
    let value = Value {
        owner: record.owner.clone(),
        labels: record.labels.clone(),
        created_unix_nanos: record.created_unix_nanos,
        index: Some(index),
    };
    // Serialising strings and integers to JSON cannot fail.
    serde_json::to_vec(&value).unwrap_or_default()
}

/// The record in `value` of `key`, written at `mod_revision`; `counted` is
/// its place in the transaction where the value does not say.
pub fn decode(
    key: &[u8],
    value: &[u8],
    mod_revision: i64,
    counted: u64,
) -> Result<Record, StoreError> {
    let v: Value =
        serde_json::from_slice(value).map_err(|e| corrupt(key, format!("value: {e}")))?;
    Ok(Record {
        owner: v.owner,
        labels: v.labels,
        created_unix_nanos: v.created_unix_nanos,
        revision: change_revision(mod_revision, v.index.unwrap_or(counted)),
    })
}

/// A pool's definition as replicas compare it: the addresses it covers and
/// those it hands out, per family, as ranges.
pub fn pool_definition(pool: &Pool) -> String {
    let mut parts = Vec::new();
    for family in Family::ALL {
        let ranges = |spans: &[crate::addresses::intervals::Span]| {
            spans
                .iter()
                .map(|s| format!("{}-{}", from_int(family, s.first), from_int(family, s.last)))
                .collect::<Vec<_>>()
                .join(",")
        };
        if pool.has_family(family) {
            parts.push(format!(
                "{family} covers {} hands out {}",
                ranges(pool.covered(family)),
                ranges(pool.usable(family))
            ));
        }
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{addresses::pool::PoolDef, fixtures::ip};

    #[test]
    fn address_keys_sort_by_address_ipv4_first_and_read_back() {
        let keys = Keys::new("/vipam/");
        let order = ["9.255.255.255", "10.0.0.9", "10.0.0.10", "::1", "fd00::1"];
        let encoded: Vec<Vec<u8>> = order.iter().map(|a| keys.address(ip(a))).collect();
        let mut sorted = encoded.clone();
        sorted.sort();
        assert_eq!(sorted, encoded);
        for (a, key) in order.iter().zip(&encoded) {
            assert_eq!(keys.classify(key).expect("key"), Key::Address(ip(a)));
        }
        assert_eq!(
            keys.address(ip("10.0.0.1")),
            b"/vipam/a/4/0a000001".to_vec()
        );
    }

    #[test]
    fn keys_of_other_installations_and_kinds_are_told_apart() {
        let keys = Keys::new("/vipam/");
        assert_eq!(
            keys.classify(b"/other/a/4/0a000001").expect("key"),
            Key::Other
        );
        assert_eq!(
            keys.classify(&keys.owner("service:a/b")).expect("key"),
            Key::Owner("service:a/b".into())
        );
        assert_eq!(
            keys.classify(&keys.pool("default")).expect("key"),
            Key::Pool("default".into())
        );
        let err = keys.classify(b"/vipam/a/4/0a00").expect_err("short");
        assert!(err.to_string().contains("4 hex digits, not 8"), "{err}");
        assert!(keys.classify(b"/vipam/a/4/zz000001").is_err());
    }

    #[test]
    fn values_keep_owner_labels_and_time_and_take_the_change_revision() {
        let record = Record {
            owner: "vm:a".into(),
            labels: BTreeMap::from([("k".into(), "v".into())]),
            created_unix_nanos: 7,
            revision: 3,
        };
        let back = decode(b"k", &encode(&record, 2), 42, 9).expect("decode");
        assert_eq!(
            back,
            Record {
                revision: 42_002,
                ..record
            }
        );
        let err = decode(b"/vipam/a/4/0a000001", b"{", 1, 0).expect_err("corrupt");
        assert!(err.to_string().contains("/vipam/a/4/0a000001"), "{err}");
    }

    #[test]
    fn a_value_without_its_place_takes_the_counted_one() {
        let old = br#"{"owner":"vm:a","labels":{},"created_unix_nanos":7}"#;
        let back = decode(b"k", old, 42, 5).expect("decode");
        assert_eq!(back.revision, 42_005);
    }

    #[test]
    fn change_revisions_order_by_etcd_revision_then_place() {
        assert!(change_revision(41, 126) < change_revision(42, 0));
        assert!(change_revision(42, 0) < change_revision(42, 1));
        assert!(change_revision(42, 126) < reached(42));
        assert!(reached(42) < change_revision(43, 0));
        assert_eq!(etcd_revision(change_revision(42, 7)), 42);
        assert_eq!(etcd_revision(reached(42)), 42);
    }

    #[test]
    fn pool_definitions_differ_exactly_when_the_addresses_do() {
        let def = |spec: &str| {
            let d: PoolDef = spec.parse().expect("pool");
            pool_definition(&Pool::new(d).expect("pool"))
        };
        assert_eq!(
            def("a=10.0.0.1-10.0.0.9,10.0.0.10-10.0.0.20"),
            def("a=10.0.0.1-10.0.0.20")
        );
        // A range hands out its edges, a CIDR does not.
        assert_ne!(def("a=10.0.0.0/24"), def("a=10.0.0.0-10.0.0.255"));
        assert_ne!(def("a=10.0.0.0/24"), def("a=10.0.0.0/25"));
        assert!(
            def("a=10.0.0.0/24").contains("10.0.0.1-10.0.0.254"),
            "{}",
            def("a=10.0.0.0/24")
        );
    }
}
