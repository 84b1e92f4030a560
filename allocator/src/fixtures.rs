//! The fixtures of the crate's unit tests: builders of addresses, pools,
//! requests, records and stores, and the store's state as plain maps for the
//! pure rules.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::Path,
    sync::Arc,
};

use crate::{
    addresses::pool::{PoolDef, Pools},
    engine::ipam::Ipam,
    model::{AllocateArgs, Record, ReleaseArgs},
    policy::rules::{Rules, View},
    store::{SledStore, StoreError},
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

/// The allocation of `owner`, created at revision `revision`, with one
/// label (`k=v`), as the store contract writes and reads it back.
pub fn mk_labelled_record(owner: &str, revision: u64) -> Record {
    Record {
        owner: owner.to_string(),
        labels: BTreeMap::from([("k".to_string(), "v".to_string())]),
        created_unix_nanos: 1_700_000_000_000_000_000,
        revision,
    }
}

/// The allocation of `owner` labelled `name=<name>`, created at
/// `created_unix_nanos`, at revision 1.
pub fn mk_named_record(owner: &str, name: &str, created_unix_nanos: u64) -> Record {
    Record {
        owner: owner.to_string(),
        labels: BTreeMap::from([("name".to_string(), name.to_string())]),
        created_unix_nanos,
        revision: 1,
    }
}

/// An Allocate request of `owner` for any address of the default pool.
pub fn mk_args(owner: &str) -> AllocateArgs {
    AllocateArgs {
        owner: owner.to_string(),
        ..Default::default()
    }
}

/// A Release request of `owner`, whatever its address.
pub fn mk_release(owner: &str) -> ReleaseArgs {
    ReleaseArgs {
        owner: Some(owner.into()),
        address: None,
        scope: Default::default(),
    }
}

/// A sled store on a temporary directory of its own, which lives as long as
/// the directory.
pub fn mk_sled() -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), 8 << 20).expect("open the sled store");
    (dir, store)
}

/// The allocator's state over a sled store in `dir`, with the pools of
/// `specs`.
pub fn mk_ipam(dir: &Path, specs: &[&str]) -> Ipam {
    let store = SledStore::open(dir, 8 << 20).expect("open the sled store");
    Ipam::load(store.into(), mk_pools(specs)).expect("load")
}
