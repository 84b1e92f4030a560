//! The fixtures of the crate's unit tests: builders of addresses, pools,
//! requests and records, and the store's state as plain maps for the pure
//! rules.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use crate::{
    addresses::pool::{PoolDef, Pools},
    model::{AllocateArgs, Record},
    policy::rules::{Rules, View},
    store::StoreError,
};

/// The store's state as plain maps.
#[derive(Default)]
pub struct MemView {
    records: HashMap<IpAddr, Record>,
    owners: HashMap<String, IpAddr>,
}

impl View for MemView {
    fn held_by(&self, owner: &str) -> Result<Option<IpAddr>, StoreError> {
        Ok(self.owners.get(owner).copied())
    }

    fn record_at(&self, ip: IpAddr) -> Result<Option<Record>, StoreError> {
        Ok(self.records.get(&ip).cloned())
    }
}

impl MemView {
    pub fn hold(&mut self, rules: &mut Rules, ip: IpAddr, record: Record) {
        rules.take(ip);
        self.owners.insert(record.owner.clone(), ip);
        self.records.insert(ip, record);
    }

    /// Removes the allocation at `ip`, as the writer would.
    pub fn unhold(&mut self, rules: &mut Rules, ip: IpAddr) {
        rules.free(ip);
        if let Some(record) = self.records.remove(&ip) {
            self.owners.remove(&record.owner);
        }
    }

    /// Every allocation, by address.
    pub fn records(&self) -> &HashMap<IpAddr, Record> {
        &self.records
    }
}

/// An address from its text.
pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// Pools from their flag values.
pub fn mk_pools(specs: &[&str]) -> Arc<Pools> {
    let defs: Vec<PoolDef> = specs
        .iter()
        .map(|s| s.parse().expect("test pool"))
        .collect();
    Arc::new(Pools::new(defs, None).expect("test pools"))
}

/// The allocation of `owner`, created at revision `revision`, without
/// labels.
pub fn mk_record(owner: &str, revision: u64) -> Record {
    Record {
        owner: owner.to_string(),
        labels: BTreeMap::new(),
        created_unix_nanos: 7,
        revision,
    }
}

/// An Allocate request of `owner` for any address of the default pool.
pub fn mk_args(owner: &str) -> AllocateArgs {
    AllocateArgs {
        owner: owner.to_string(),
        ..Default::default()
    }
}
