//! The writer's state: the allocation rules ([`crate::policy::rules`]) over
//! the [`Store`], the taken addresses, the revision published and the
//! counters. It stages each decision as a write; [`Ipam::flush`] commits
//! them, [`Ipam::rollback`] forgets them after a failed flush, and
//! [`Ipam::absorb`] takes in committed changes, this writer's and others'.
//! Owned by the writer thread ([`crate::engine::writer`]).

use std::{
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    addresses::{family::Family, pool::Pools},
    engine::stats::Stats,
    error::{Error, Result},
    model::{AllocateArgs, Allocation, Change, ChangeKind, Record, ReleaseArgs},
    policy::{
        Policy,
        rules::{self, Pick, Rules},
    },
    store::{Observed, Store, StoreError, Write},
};

fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What applying one request came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<T> {
    /// The answer, which wrote nothing.
    Read(T),
    /// The answer, with its write staged for the next flush.
    Wrote(T),
    /// The request writes an address this flush writes already, or finds
    /// its pool exhausted while this flush releases an address: it is
    /// decided again in the next flush, so that every write of a flush is
    /// a change of its own.
    Later,
}

/// The allocation rules over the store and an in-memory set of taken
/// addresses. Owned by the writer thread.
pub struct Ipam {
    store: Store,
    rules: Rules,
    stats: Arc<Stats>,
    /// Every change up to this revision is taken in.
    revision: u64,
    /// Addresses written since the last flush, with whether each was taken
    /// before, to undo a failed flush.
    touched: Vec<(IpAddr, bool)>,
}

impl Ipam {
    /// Loads the taken addresses from the store. Allocations outside the
    /// configured pools stay allocated (and are counted as outside).
    pub fn load(store: Store, pools: Arc<Pools>) -> Result<Ipam, StoreError> {
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
        })
    }

    /// The same state under the operator's address `policy` (checked
    /// against the same pools).
    pub fn with_policy(self, policy: Policy) -> Ipam {
        Ipam {
            rules: self.rules.with_policy(policy),
            ..self
        }
    }

    /// The same state, picking free addresses as `pick` says.
    pub fn with_pick(self, pick: Pick) -> Ipam {
        Ipam {
            rules: self.rules.with_pick(pick),
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

    /// The revision up to which every change is taken in.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn allocation(&self, address: IpAddr, record: Record) -> Allocation {
        Allocation::at(self.pools(), address, record)
    }

    fn written(&self, ip: IpAddr) -> bool {
        self.touched.iter().any(|(t, _)| *t == ip)
    }

    /// Applies an Allocate. A new allocation's revision is the store's to
    /// give at the flush.
    pub fn allocate(&mut self, args: AllocateArgs) -> Result<Step<Allocation>> {
        // Revision 0 until the store numbers the write at the flush.
        let decided = self.rules.allocate(&self.store, args, 0, now_unix_nanos());
        let decided = match decided {
            // An address this flush releases may serve it in the next one.
            Err(Error::Exhausted { pool, family }) if self.frees_in(&pool, family) => {
                return Ok(Step::Later);
            }
            other => other?,
        };
        match decided {
            rules::Allocate::Holds(ip, record) => Ok(Step::Read(self.allocation(ip, record))),
            rules::Allocate::Put(ip, _) if self.written(ip) => Ok(Step::Later),
            rules::Allocate::Put(ip, record) => {
                let allocation = self.allocation(ip, record.clone());
                self.write(Write::Allocate {
                    address: ip,
                    record,
                })?;
                Ok(Step::Wrote(allocation))
            }
            rules::Allocate::Move { from, to } if self.written(from.0) || self.written(to.0) => {
                Ok(Step::Later)
            }
            rules::Allocate::Move {
                from: (held, old),
                to: (ip, record),
            } => {
                let allocation = self.allocation(ip, record.clone());
                // Both in this flush: the store commits them together.
                self.write(Write::Release {
                    address: held,
                    record: old,
                })?;
                self.write(Write::Allocate {
                    address: ip,
                    record,
                })?;
                Ok(Step::Wrote(allocation))
            }
        }
    }

    /// Applies a Release: the released allocation, or `None` when nothing
    /// matched.
    pub fn release(&mut self, args: ReleaseArgs) -> Result<Step<Option<Allocation>>> {
        match self.rules.release(&self.store, args)? {
            rules::Release::Nothing => Ok(Step::Read(None)),
            rules::Release::Delete(ip, _) if self.written(ip) => Ok(Step::Later),
            rules::Release::Delete(ip, record) => {
                let allocation = self.allocation(ip, record.clone());
                self.write(Write::Release {
                    address: ip,
                    record,
                })?;
                Ok(Step::Wrote(Some(allocation)))
            }
        }
    }

    /// Stages `write`. An allocated address is marked taken at once; a
    /// released one stays out of the free search until its release is
    /// durable and taken in (see [`Ipam::absorb`]): picked again in the same
    /// flush, it would be a second write of one address and wait a flush.
    fn write(&mut self, write: Write) -> Result<(), StoreError> {
        let ip = write.address();
        let allocate = matches!(write, Write::Allocate { .. });
        self.store.stage(write)?;
        // Taken before: false for an allocation, true for a release.
        self.touched.push((ip, !allocate));
        if allocate {
            self.mark(ip, true);
        }
        Ok(())
    }

    /// Whether a release staged in this flush frees an address of `family`
    /// in the pool named `pool` on commit.
    fn frees_in(&self, pool: &str, family: Family) -> bool {
        let pools = self.pools();
        self.touched.iter().any(|(ip, was_taken)| {
            *was_taken
                && Family::of(*ip) == family
                && pools.containing(*ip).map(|i| pools.at(i).name()) == Some(pool)
        })
    }

    /// Marks `ip` taken or free, counting it when that changes.
    fn mark(&mut self, ip: IpAddr, taken: bool) {
        let changed = if taken {
            self.rules.take(ip)
        } else {
            self.rules.free(ip)
        };
        if changed {
            self.stats
                .count(self.rules.pools(), ip, if taken { 1 } else { -1 });
        }
    }

    /// Commits every staged write and makes it durable: the changes, each
    /// with its revision.
    pub fn flush(&mut self) -> Result<Vec<Change>, StoreError> {
        let changes = self.store.flush()?;
        self.touched.clear();
        if !changes.is_empty() {
            // Counted as the metric says: flushes that made writes durable.
            self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(changes)
    }

    /// Forgets the writes of a failed flush (the store dropped them): the
    /// taken set is as before them.
    pub fn rollback(&mut self) {
        while let Some((ip, was_taken)) = self.touched.pop() {
            self.mark(ip, was_taken);
        }
    }

    /// What other writers sharing the store committed since the last call.
    pub fn observed(&self) -> Result<Observed, StoreError> {
        self.store.observed()
    }

    /// Takes in committed `changes`, in revision order (this writer's own
    /// are taken in already, and taking them again changes nothing), and
    /// moves the revision to at least `revision`.
    pub fn absorb(&mut self, changes: &[Change], revision: u64) {
        for change in changes {
            self.mark(change.address, change.kind == ChangeKind::Allocated);
            self.revision = self.revision.max(change.revision);
        }
        self.revision = self.revision.max(revision);
        self.stats.revision.store(self.revision, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        addresses::pool::PoolDef,
        engine::handle::start,
        error::Error,
        fixtures::{ip, mk_args, mk_ipam, mk_pools, mk_release},
        store::SledStore,
    };
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    /// Applies `apply` in a flush of its own, as the writer does with a
    /// request alone in its batch: its answer (with the revision its write
    /// got) and whether it wrote.
    fn now<T>(
        ipam: &mut Ipam,
        apply: impl Fn(&mut Ipam) -> Result<Step<T>>,
        revision: impl Fn(&mut T, &[Change]),
    ) -> Result<(T, bool)> {
        let (mut answer, wrote) = match apply(ipam)? {
            Step::Read(t) => (t, false),
            Step::Wrote(t) => (t, true),
            Step::Later => panic!("nothing else is staged"),
        };
        let changes = ipam.flush().expect("flush");
        revision(&mut answer, &changes);
        ipam.absorb(&changes, 0);
        Ok((answer, wrote))
    }

    /// An Allocate in a flush of its own: the allocation and whether it
    /// was written.
    fn allocate(ipam: &mut Ipam, args: AllocateArgs) -> Result<(Allocation, bool)> {
        now(
            ipam,
            |ipam| ipam.allocate(args.clone()),
            |a: &mut Allocation, changes| {
                if let Some(c) = changes.iter().find(|c| c.address == a.address) {
                    a.record.revision = c.revision;
                }
            },
        )
    }

    /// A Release in a flush of its own: what it released.
    fn release(ipam: &mut Ipam, args: ReleaseArgs) -> Result<Option<Allocation>> {
        now(ipam, |ipam| ipam.release(args.clone()), |_, _| {}).map(|(a, _)| a)
    }

    /// The flush staged so far, with its changes taken in as the writer
    /// takes them in.
    fn flush(ipam: &mut Ipam) {
        let changes = ipam.flush().expect("flush");
        ipam.absorb(&changes, 0);
    }

    #[test]
    fn an_address_released_in_a_flush_is_picked_again_only_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
        let (first, _) = allocate(&mut ipam, mk_args("first")).expect("allocate");
        assert_eq!(first.address, ip("10.0.0.1"));

        let released = ipam.release(mk_release("first")).expect("release");
        assert!(matches!(released, Step::Wrote(Some(_))), "{released:?}");
        match ipam.allocate(mk_args("second")).expect("allocate") {
            Step::Wrote(a) => assert_eq!(a.address, ip("10.0.0.2")),
            other => panic!("a fresh address in the same flush: {other:?}"),
        }
        flush(&mut ipam);

        let (third, _) = allocate(&mut ipam, mk_args("third")).expect("allocate");
        assert_eq!(third.address, ip("10.0.0.1"), "free once released");
    }

    #[test]
    fn a_pool_that_only_its_flush_frees_an_address_of_waits_for_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.1/32"]);
        allocate(&mut ipam, mk_args("first")).expect("allocate");

        ipam.release(mk_release("first")).expect("release");
        let later = ipam.allocate(mk_args("second")).expect("decided");
        assert_eq!(later, Step::Later);
        flush(&mut ipam);

        let (second, _) = allocate(&mut ipam, mk_args("second")).expect("allocate");
        assert_eq!(second.address, ip("10.0.0.1"));
        let err = allocate(&mut ipam, mk_args("third")).expect_err("exhausted");
        assert!(matches!(err, Error::Exhausted { .. }), "{err}");
    }

    #[test]
    fn a_release_in_another_pool_does_not_hold_back_an_exhausted_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.1/32", "b=10.0.1.0/24"]);
        let in_b = |owner: &str| AllocateArgs {
            pool: Some("b".into()),
            ..mk_args(owner)
        };
        allocate(&mut ipam, mk_args("first")).expect("allocate");
        allocate(&mut ipam, in_b("other")).expect("allocate");

        ipam.release(mk_release("other")).expect("release");
        let err = ipam.allocate(mk_args("second")).expect_err("exhausted");
        assert!(matches!(err, Error::Exhausted { .. }), "{err}");
    }

    #[test]
    fn allocate_is_idempotent_per_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
        let (first, wrote) = allocate(&mut ipam, mk_args("svc")).expect("allocate");
        assert!(wrote);
        let (again, wrote_again) = allocate(&mut ipam, mk_args("svc")).expect("allocate again");
        assert!(!wrote_again);
        assert_eq!(first, again);
    }

    #[test]
    fn owner_holding_another_address_is_refused_before_checking_the_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
        allocate(&mut ipam, mk_args("svc")).expect("allocate");
        allocate(&mut ipam, mk_args("other")).expect("allocate other");
        // 10.0.0.2 is held by "other"; "svc" still hears that it holds 10.0.0.1.
        let err = allocate(
            &mut ipam,
            AllocateArgs {
                address: Some(ip("10.0.0.2")),
                ..mk_args("svc")
            },
        )
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
                allocate(&mut ipam, mk_args(owner)).expect("allocate");
            }
            ipam.flush().expect("flush");
        }
        // The pool moves and shrinks: 10.0.0.1-3 now lie outside every pool.
        let store = SledStore::open(dir.path(), 8 << 20).expect("reopen");
        let mut ipam = Ipam::load(store.into(), mk_pools(&["a=10.0.0.2-10.0.0.9"])).expect("load");
        assert_eq!(ipam.stats.outside.load(Ordering::Relaxed), 1);
        assert_eq!(ipam.stats.in_pool[0].load(Ordering::Relaxed), 2);
        let (held, wrote) = allocate(&mut ipam, mk_args("s1")).expect("s1 keeps its address");
        assert_eq!(
            (held.address, held.pool, wrote),
            (ip("10.0.0.1"), None, false)
        );
        let (new, _) = allocate(&mut ipam, mk_args("s4")).expect("allocate s4");
        assert_eq!(
            new.address,
            ip("10.0.0.4"),
            "10.0.0.2 and .3 are still held"
        );
        ipam.flush().expect("flush");
        let (handle, writer) = start(ipam, 8).expect("start");
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
            let (a, _) = allocate(&mut ipam, mk_args("s1")).expect("allocate");
            assert_eq!(a.record.revision, 1);
            release(
                &mut ipam,
                ReleaseArgs {
                    owner: Some("s1".into()),
                    address: None,
                    scope: Default::default(),
                },
            )
            .expect("release");
            ipam.flush().expect("flush");
        }
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
        let (a, _) = allocate(&mut ipam, mk_args("s2")).expect("allocate");
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
            let mut ipam = Ipam::load(store.into(), pools).expect("load");
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
                        let result = allocate(&mut ipam, args);
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
                        let released = release(&mut ipam, ReleaseArgs { owner: Some(format!("o{owner}")), address: None, scope: Default::default() }).expect("release");
                        prop_assert_eq!(released.map(|a| host(a.address)), by_owner.remove(&owner));
                    }
                    Op::ReleaseAddress { address } => {
                        let released = release(&mut ipam, ReleaseArgs { owner: None, address: Some(IpAddr::from([10, 0, 0, address])), scope: Default::default() })
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
