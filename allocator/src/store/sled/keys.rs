//! Key encoding of the sled engine, in one place: `a` + family tag +
//! big-endian address bytes (so keys sort by address, IPv4 before IPv6) →
//! JSON [`Record`]; `o` + owner → address key; `m/revision` → big-endian
//! u64; `r` + big-endian revision → the [`Change`] of that revision, kind
//! byte + address key + JSON record.

use std::net::IpAddr;

use crate::{
    addresses::pool::{Family, from_int},
    model::{Change, ChangeKind, Record},
    store::{Result, StoreError},
};

pub(super) const ALLOC: u8 = b'a';
pub(super) const OWNER: u8 = b'o';
pub(super) const CHANGE: u8 = b'r';
pub(super) const REVISION_KEY: &[u8] = b"m/revision";
pub(super) const TAG_V4: u8 = 4;
pub(super) const TAG_V6: u8 = 6;
const KIND_ALLOCATED: u8 = b'+';
const KIND_RELEASED: u8 = b'-';

/// Encodes the key of an allocation.
pub(super) fn alloc_key(ip: IpAddr) -> Vec<u8> {
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

pub(super) fn alloc_key_int(family: Family, value: u128) -> Vec<u8> {
    alloc_key(from_int(family, value))
}

pub(super) fn decode_alloc_key(key: &[u8]) -> Result<IpAddr> {
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

pub(super) fn owner_key(owner: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(owner.len() + 1);
    key.push(OWNER);
    key.extend_from_slice(owner.as_bytes());
    key
}

pub(super) fn change_key(revision: u64) -> [u8; 9] {
    let mut key = [CHANGE; 9];
    key[1..].copy_from_slice(&revision.to_be_bytes());
    key
}

pub(super) fn change_value(kind: ChangeKind, address_key: &[u8], record_json: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(1 + address_key.len() + record_json.len());
    value.push(match kind {
        ChangeKind::Allocated => KIND_ALLOCATED,
        ChangeKind::Released => KIND_RELEASED,
    });
    value.extend_from_slice(address_key);
    value.extend_from_slice(record_json);
    value
}

pub(super) fn decode_change(key: &[u8], value: &[u8]) -> Result<Change> {
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

pub(super) fn encode_record(key: &[u8], record: &Record) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|e| StoreError::Corrupt {
        key: key.escape_ascii().to_string(),
        why: e.to_string(),
    })
}

pub(super) fn decode_record(key: &[u8], value: &[u8]) -> Result<Record> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: key.escape_ascii().to_string(),
        why: e.to_string(),
    })
}

pub(super) fn decode_entry(key: &[u8], value: &[u8]) -> Result<(IpAddr, Record)> {
    Ok((decode_alloc_key(key)?, decode_record(key, value)?))
}

/// The revision stored under [`REVISION_KEY`], 0 when there is none.
pub(super) fn read_revision(value: Option<&[u8]>) -> Result<u64> {
    match value {
        None => Ok(0),
        Some(v) => {
            <[u8; 8]>::try_from(v)
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    key: "m/revision".to_string(),
                    why: "not an 8-byte integer".to_string(),
                })
        }
    }
}
