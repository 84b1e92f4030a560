//! Requests and answers in domain terms: the input checks (`parse_*`) and
//! their limits, the checked Allocate, Release and List requests, and what
//! the allocator answers (allocations, pages, pool reports). No I/O.

use std::{collections::BTreeMap, net::IpAddr};

use crate::{
    error::{Result, invalid},
    pool::{Family, Pools},
    store::Record,
};

/// Longest owner, in bytes.
pub const MAX_OWNER_BYTES: usize = 256;
/// Most labels on one allocation.
pub const MAX_LABELS: usize = 32;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 128;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 512;
/// Default and largest List page.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest List page.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Checks an owner: 1 to 256 bytes, no control characters.
pub fn parse_owner(field: &'static str, value: &str) -> Result<String> {
    if value.is_empty() {
        return Err(invalid(field, value, "must not be empty"));
    }
    if value.len() > MAX_OWNER_BYTES {
        return Err(invalid(
            field,
            value,
            format!("longer than {MAX_OWNER_BYTES} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, value, "contains control characters"));
    }
    Ok(value.to_string())
}

/// Parses an address in text form; refuses the unspecified addresses.
pub fn parse_address(field: &'static str, value: &str) -> Result<IpAddr> {
    let ip: IpAddr = value
        .trim()
        .parse()
        .map_err(|_| invalid(field, value, "not an IPv4 or IPv6 address"))?;
    if ip.is_unspecified() {
        return Err(invalid(
            field,
            value,
            "the unspecified address cannot be allocated",
        ));
    }
    Ok(ip)
}

/// Checks a pool name (a DNS label).
pub fn parse_pool(field: &'static str, value: &str) -> Result<String> {
    if !vipam::names::is_pool_name(value) {
        return Err(invalid(
            field,
            value,
            format!("not a pool name ({})", vipam::names::POOL_NAME_RULE),
        ));
    }
    Ok(value.to_string())
}

/// Checks labels: at most 32, keys of 1 to 128 bytes, values of at most 512
/// bytes, no control characters.
pub fn parse_labels(
    labels: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>> {
    let labels: BTreeMap<String, String> = labels.into_iter().collect();
    if labels.len() > MAX_LABELS {
        return Err(invalid(
            "labels",
            &format!("{} labels", labels.len()),
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    for (k, v) in &labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY_BYTES || k.chars().any(char::is_control) {
            return Err(invalid(
                "labels",
                k,
                format!("a label key has 1 to {MAX_LABEL_KEY_BYTES} bytes, no control characters"),
            ));
        }
        if v.len() > MAX_LABEL_VALUE_BYTES || v.chars().any(char::is_control) {
            return Err(invalid(
                "labels",
                v,
                format!(
                    "a label value has at most {MAX_LABEL_VALUE_BYTES} bytes, no control characters"
                ),
            ));
        }
    }
    Ok(labels)
}

/// A checked Allocate request.
#[derive(Clone, Debug, Default)]
pub struct AllocateArgs {
    /// Named pool; `None` means the default pool (or, with an address, the
    /// pool that contains it).
    pub pool: Option<String>,
    /// The owner.
    pub owner: String,
    /// A specific address.
    pub address: Option<IpAddr>,
    /// Labels to store.
    pub labels: BTreeMap<String, String>,
    /// Family when no address is given.
    pub family: Option<Family>,
    /// The address is already in use by the owner: the outside-pools rule
    /// does not apply to it.
    pub adopt: bool,
    /// Who asks, and what they may touch.
    pub scope: Scope,
}

/// A checked Release request: owner, address or both.
#[derive(Clone, Debug, Default)]
pub struct ReleaseArgs {
    /// The owner whose address to release.
    pub owner: Option<String>,
    /// The address to release.
    pub address: Option<IpAddr>,
    /// Who asks, and what they may touch.
    pub scope: Scope,
}

/// Who is calling and what it may touch: the owners (by prefix) it may
/// allocate and release, and the pools it may draw from. The default scope,
/// a caller on the unauthenticated local listener, may touch everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// The credential's name, for errors and logs; empty for a caller
    /// without one.
    pub credential: String,
    /// Owner prefixes it may allocate and release; `None` means every owner.
    pub owners: Option<Vec<String>>,
    /// Pools it may draw from; `None` means every pool.
    pub pools: Option<Vec<String>>,
}

/// An allocation as clients see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// The address.
    pub address: IpAddr,
    /// The configured pool containing it, if any.
    pub pool: Option<String>,
    /// What the store keeps.
    pub record: Record,
}

impl Allocation {
    /// The allocation `record` at `address`, in the pool of `pools` that
    /// contains it, if any.
    pub fn at(pools: &Pools, address: IpAddr, record: Record) -> Allocation {
        let pool = pools
            .containing(address)
            .map(|i| pools.at(i).name().to_string());
        Allocation {
            address,
            pool,
            record,
        }
    }
}

/// One page of a List.
#[derive(Clone, Debug, Default)]
pub struct Page {
    /// Allocations, by address.
    pub allocations: Vec<Allocation>,
    /// Address after which the next page starts; `None` at the end.
    pub next_after: Option<IpAddr>,
}

/// A checked List request.
#[derive(Clone, Debug, Default)]
pub struct ListArgs {
    /// Only this pool.
    pub pool: Option<String>,
    /// Only owners with this prefix.
    pub owner_prefix: String,
    /// Most allocations in the page.
    pub page_size: usize,
    /// Start after this address.
    pub after: Option<IpAddr>,
}

/// Figures of one pool.
#[derive(Clone, Debug)]
pub struct PoolReport {
    /// Index in [`Pools`].
    pub index: usize,
    /// Addresses the pool hands out.
    pub size: u128,
    /// Allocations in the pool's ranges.
    pub allocated: u64,
    /// Usable addresses not allocated.
    pub free: u128,
}

/// Figures of every pool and the allocations outside them.
#[derive(Clone, Debug)]
pub struct PoolsReport {
    /// One per pool, in configuration order.
    pub pools: Vec<PoolReport>,
    /// Number of allocations outside every pool.
    pub outside_count: u64,
    /// The first of them, by address.
    pub outside: Vec<Allocation>,
}
