//! The writer's state: the allocation rules ([`crate::policy::rules`]) over a
//! [`Store`], the taken addresses, the revision and the counters. It applies
//! each decision to the store as a staged write; [`Ipam::flush`] commits
//! them. Owned by the writer thread ([`crate::engine::writer`]); generic over the
//! engine so the per-request path calls it directly.

use std::{
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    addresses::pool::Pools,
    engine::stats::Stats,
    error::Result,
    model::{AllocateArgs, Allocation, Event, Record, ReleaseArgs},
    policy::Policy,
    policy::rules::{self, Rules},
    store::{Store, StoreError},
};

fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The allocation rules over the store and an in-memory set of taken
/// addresses. Owned by the writer thread.
pub struct Ipam<S> {
    store: S,
    rules: Rules,
    stats: Arc<Stats>,
    revision: u64,
    /// Addresses written since the last flush, to undo a failed one.
    touched: Vec<IpAddr>,
    /// The revision before the first of them.
    base: u64,
}

impl<S: Store> Ipam<S> {
    /// Loads the taken addresses from the store. Allocations outside the
    /// configured pools stay allocated (and are counted as outside).
    pub fn load(store: S, pools: Arc<Pools>) -> Result<Ipam<S>, StoreError> {
        let stats = Arc::new(Stats::new(pools.len()));
        let mut rules = Rules::new(pools);
        for ip in store.addresses() {
            let ip = ip?;
            if rules.take(ip) {
                stats.count(rules.pools(), ip, 1);
            }
        }
        let revision = store.revision()?;
        stats.revision.store(revision, Ordering::Relaxed);
        Ok(Ipam {
            store,
            rules,
            stats,
            revision,
            touched: Vec::new(),
            base: revision,
        })
    }

    /// The same state under the operator's address `policy` (checked
    /// against the same pools).
    pub fn with_policy(self, policy: Policy) -> Ipam<S> {
        Ipam {
            rules: self.rules.with_policy(policy),
            ..self
        }
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The configured pools.
    pub fn pools(&self) -> &Arc<Pools> {
        self.rules.pools()
    }

    /// The revision of the last write applied.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn allocation(&self, address: IpAddr, record: Record) -> Allocation {
        Allocation::at(self.pools(), address, record)
    }

    /// Applies an Allocate. Returns the allocation and whether it was written
    /// (false when the owner already held it).
    pub fn allocate(&mut self, args: AllocateArgs) -> Result<(Allocation, bool)> {
        let next = self.revision + 1;
        match self
            .rules
            .allocate(&self.store, args, next, now_unix_nanos())?
        {
            rules::Allocate::Holds(ip, record) => Ok((self.allocation(ip, record), false)),
            rules::Allocate::Put(ip, record) => {
                self.store.put(ip, &record)?;
                self.wrote(ip, 1);
                Ok((self.allocation(ip, record), true))
            }
        }
    }

    /// Applies a Release. Returns the released allocation, or `None` when
    /// nothing matched.
    pub fn release(&mut self, args: ReleaseArgs) -> Result<Option<Allocation>> {
        match self.rules.release(&self.store, args)? {
            rules::Release::Nothing => Ok(None),
            rules::Release::Delete(ip, record) => {
                self.store.delete(ip, &record, self.revision + 1)?;
                self.wrote(ip, -1);
                Ok(Some(self.allocation(ip, record)))
            }
        }
    }

    /// Accounts for a staged write at `ip` that took (`delta` 1) or freed
    /// (-1) it, at the next revision.
    fn wrote(&mut self, ip: IpAddr, delta: i64) {
        let changed = if delta > 0 {
            self.rules.take(ip)
        } else {
            self.rules.free(ip)
        };
        if changed {
            self.stats.count(self.rules.pools(), ip, delta);
        }
        if self.touched.is_empty() {
            self.base = self.revision;
        }
        self.touched.push(ip);
        self.revision += 1;
        self.stats.revision.store(self.revision, Ordering::Relaxed);
    }

    /// Makes the taken set agree with the store at `ip` (staged writes
    /// included).
    fn resync(&mut self, ip: IpAddr) -> Result<(), StoreError> {
        let held = self.store.get_latest(ip)?.is_some();
        let changed = if held {
            self.rules.take(ip)
        } else {
            self.rules.free(ip)
        };
        if changed {
            self.stats
                .count(self.rules.pools(), ip, if held { 1 } else { -1 });
        }
        Ok(())
    }

    /// Undoes the writes of a failed flush (the store dropped them):
    /// the taken set follows the store again, and the revision is the one
    /// before them.
    pub fn rollback(&mut self) -> Result<(), StoreError> {
        let touched = std::mem::take(&mut self.touched);
        if !touched.is_empty() {
            self.revision = self.base;
        }
        for ip in touched {
            self.resync(ip)?;
        }
        self.stats.revision.store(self.revision, Ordering::Relaxed);
        Ok(())
    }

    /// Whether other writers share the store.
    pub fn is_shared(&self) -> bool {
        self.store.is_shared()
    }

    /// Most requests one flush may carry.
    pub fn max_batch(&self) -> usize {
        self.store.max_batch()
    }

    /// The store, to register the writer's wake-up.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Takes in what other writers sharing the store committed (and this
    /// one's own commits, as the store saw them): the taken set follows,
    /// and the changes after revision `published` come back as events.
    pub fn observe(&mut self, published: u64) -> Result<Vec<Event>, StoreError> {
        let Some(changes) = self.store.observed()? else {
            return Ok(Vec::new());
        };
        let mut events = Vec::new();
        for change in changes {
            self.resync(change.address)?;
            self.revision = self.revision.max(change.revision);
            if change.revision > published {
                events.push(Event::from_change(self.pools(), change));
            }
        }
        self.stats.revision.store(self.revision, Ordering::Relaxed);
        Ok(events)
    }

    /// The changes after revision `after` up to `last`, from the change log.
    pub fn events_between(&self, after: u64, last: u64) -> Result<Vec<Event>> {
        self.store
            .changes(after, last)
            .map(|change| Ok(Event::from_change(self.pools(), change?)))
            .collect()
    }

    /// Commits every staged write and makes it durable; `Some(r)` when the
    /// store gave the batch its revision `r`.
    pub fn flush(&mut self) -> Result<Option<u64>, StoreError> {
        let assigned = self.store.flush()?;
        self.touched.clear();
        if assigned.is_some() {
            // The store numbered the batch; its changes come back through
            // `observe`, which moves the revision on.
            self.revision = self.base;
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(assigned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        addresses::pool::PoolDef,
        engine::handle::start,
        error::Error,
        fixtures::{ip, mk_args, mk_pools},
        store::SledStore,
    };
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    fn mk_ipam(dir: &std::path::Path, specs: &[&str]) -> Ipam<SledStore> {
        let store = SledStore::open(dir, 8 << 20).expect("open store");
        Ipam::load(store, mk_pools(specs)).expect("load")
    }

    #[test]
    fn allocate_is_idempotent_per_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
        let (first, wrote) = ipam.allocate(mk_args("svc")).expect("allocate");
        assert!(wrote);
        let (again, wrote_again) = ipam.allocate(mk_args("svc")).expect("allocate again");
        assert!(!wrote_again);
        assert_eq!(first, again);
    }

    #[test]
    fn owner_holding_another_address_is_refused_before_checking_the_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
        ipam.allocate(mk_args("svc")).expect("allocate");
        ipam.allocate(mk_args("other")).expect("allocate other");
        // 10.0.0.2 is held by "other"; "svc" still hears that it holds 10.0.0.1.
        let err = ipam
            .allocate(AllocateArgs {
                address: Some(ip("10.0.0.2")),
                ..mk_args("svc")
            })
            .expect_err("must fail");
        assert!(
            matches!(err, Error::OwnerHoldsOther { held, .. } if held == ip("10.0.0.1")),
            "{err}"
        );
    }

    #[test]
    fn a_changed_pool_across_restarts_keeps_every_allocation() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
            for owner in ["s1", "s2", "s3"] {
                ipam.allocate(mk_args(owner)).expect("allocate");
            }
            ipam.flush().expect("flush");
        }
        // The pool moves and shrinks: 10.0.0.1-3 now lie outside every pool.
        let store = SledStore::open(dir.path(), 8 << 20).expect("reopen");
        let mut ipam = Ipam::load(store.clone(), mk_pools(&["a=10.0.0.2-10.0.0.9"])).expect("load");
        assert_eq!(ipam.stats.outside.load(Ordering::Relaxed), 1);
        assert_eq!(ipam.stats.in_pool[0].load(Ordering::Relaxed), 2);
        let (held, wrote) = ipam.allocate(mk_args("s1")).expect("s1 keeps its address");
        assert_eq!(
            (held.address, held.pool, wrote),
            (ip("10.0.0.1"), None, false)
        );
        let (new, _) = ipam.allocate(mk_args("s4")).expect("allocate s4");
        assert_eq!(
            new.address,
            ip("10.0.0.4"),
            "10.0.0.2 and .3 are still held"
        );
        ipam.flush().expect("flush");
        let (handle, writer) = start(ipam, store, 8).expect("start");
        let report = handle.pools_report().expect("report");
        assert_eq!(report.outside_count, 1);
        assert_eq!(
            report.outside.iter().map(|a| a.address).collect::<Vec<_>>(),
            vec![ip("10.0.0.1")]
        );
        drop(handle);
        drop(writer);
    }

    #[test]
    fn the_revision_grows_with_every_write_and_survives_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
            let (a, _) = ipam.allocate(mk_args("s1")).expect("allocate");
            assert_eq!(a.record.revision, 1);
            ipam.release(ReleaseArgs {
                owner: Some("s1".into()),
                address: None,
                scope: Default::default(),
            })
            .expect("release");
            ipam.flush().expect("flush");
        }
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
        let (a, _) = ipam.allocate(mk_args("s2")).expect("allocate");
        assert_eq!(a.record.revision, 3);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Allocate { owner: u8, address: Option<u8> },
        Release { owner: u8 },
        ReleaseAddress { address: u8 },
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12, prop::option::of(0u8..16))
                .prop_map(|(owner, address)| Op::Allocate { owner, address }),
            (0u8..12).prop_map(|owner| Op::Release { owner }),
            (0u8..16).prop_map(|address| Op::ReleaseAddress { address }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Against a plain model: one address per owner, never one address
        /// twice, lowest free first, reserved and edge addresses never
        /// handed out, release then allocate reuses.
        #[test]
        fn allocator_agrees_with_a_model(ops in prop::collection::vec(arb_op(), 1..60)) {
            let dir = tempfile::tempdir().expect("tempdir");
            // 10.0.0.0/28 minus network, broadcast and reserved .5: 13 usable.
            let store = SledStore::open(dir.path(), 8 << 20).expect("open store");
            let mut def: PoolDef = "a=10.0.0.0/28".parse().expect("pool");
            def.reserved = vec!["10.0.0.5".parse().expect("reserved")];
            let pools = Arc::new(Pools::new(vec![def], None).expect("pools"));
            let mut ipam = Ipam::load(store, pools).expect("load");
            let usable: Vec<u8> = (1..15).filter(|h| *h != 5).collect();
            let mut by_owner: HashMap<u8, u8> = HashMap::new();
            let host = |a: IpAddr| match a { IpAddr::V4(v4) => v4.octets()[3], IpAddr::V6(_) => u8::MAX };
            for op in ops {
                match op {
                    Op::Allocate { owner, address } => {
                        let args = AllocateArgs {
                            owner: format!("o{owner}"),
                            address: address.map(|h| IpAddr::from([10, 0, 0, h])),
                            ..Default::default()
                        };
                        let result = ipam.allocate(args);
                        let held: BTreeSet<u8> = by_owner.values().copied().collect();
                        match (by_owner.get(&owner), address) {
                            (Some(&h), None) => prop_assert_eq!(host(result.expect("idempotent").0.address), h),
                            (Some(&h), Some(a)) if a == h => prop_assert_eq!(host(result.expect("idempotent").0.address), h),
                            (Some(_), Some(_)) => prop_assert!(matches!(result, Err(Error::OwnerHoldsOther { .. })), "{:?}", result),
                            (None, None) => match usable.iter().find(|h| !held.contains(h)) {
                                Some(&lowest) => {
                                    let got = host(result.expect("free address").0.address);
                                    prop_assert_eq!(got, lowest);
                                    by_owner.insert(owner, got);
                                }
                                None => prop_assert!(matches!(result, Err(Error::Exhausted { .. })), "{:?}", result),
                            },
                            (None, Some(a)) => {
                                if a == 0 || a == 15 || a == 5 {
                                    prop_assert!(matches!(result, Err(Error::Excluded { .. })), "{:?}", result);
                                } else if held.contains(&a) {
                                    prop_assert!(matches!(result, Err(Error::Held { .. })), "{:?}", result);
                                } else {
                                    prop_assert_eq!(host(result.expect("explicit").0.address), a);
                                    by_owner.insert(owner, a);
                                }
                            }
                        }
                    }
                    Op::Release { owner } => {
                        let released = ipam.release(ReleaseArgs { owner: Some(format!("o{owner}")), address: None, scope: Default::default() }).expect("release");
                        prop_assert_eq!(released.map(|a| host(a.address)), by_owner.remove(&owner));
                    }
                    Op::ReleaseAddress { address } => {
                        let released = ipam
                            .release(ReleaseArgs { owner: None, address: Some(IpAddr::from([10, 0, 0, address])), scope: Default::default() })
                            .expect("release");
                        let holder = by_owner.iter().find(|(_, h)| **h == address).map(|(o, _)| *o);
                        prop_assert_eq!(released.is_some(), holder.is_some());
                        if let Some(o) = holder {
                            by_owner.remove(&o);
                        }
                    }
                }
                let held: Vec<u8> = by_owner.values().copied().collect();
                let unique: BTreeSet<u8> = held.iter().copied().collect();
                prop_assert_eq!(held.len(), unique.len(), "an address is held twice");
                prop_assert!(held.iter().all(|h| usable.contains(h)));
            }
        }
    }
}
