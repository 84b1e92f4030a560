//! The allocation rules, as pure decisions: given what the store holds (a
//! [`View`]), the addresses taken, the pools and a request, the write to make
//! and the answer. Idempotency per owner and one address per owner come
//! first; then an explicit address must be free and not excluded, or a
//! free address of the pool is taken: the lowest ([`Pick::Lowest`]), or
//! the first from a place the owner gives ([`Pick::Spread`]). The address
//! rules come with
//! them: a special-purpose address ([`crate::addresses::special`]) is never taken, an
//! explicit address outside every pool only where the [`Policy`] allows it,
//! and a pool serves only the owners it admits. Nothing here writes: the
//! writer ([`crate::engine::ipam`]) applies the decision.

use std::{net::IpAddr, sync::Arc};

use crate::{
    addresses::intervals::IntervalSet,
    addresses::pool::{Family, Pools, from_int, to_int},
    addresses::special,
    error::{Error, Result, invalid},
    model::Record,
    model::{AllocateArgs, ReleaseArgs, Scope},
    policy::Policy,
    policy::scope,
    store::{Store, StoreError},
};

/// What the rules read: the allocations as the writer last decided them
/// (its own uncommitted writes included).
pub trait View {
    /// The address `owner` holds.
    fn held_by(&self, owner: &str) -> Result<Option<IpAddr>, StoreError>;
    /// The allocation at `ip`.
    fn record_at(&self, ip: IpAddr) -> Result<Option<Record>, StoreError>;
}

impl View for Store {
    fn held_by(&self, owner: &str) -> Result<Option<IpAddr>, StoreError> {
        self.owner_for_decision(owner)
    }

    fn record_at(&self, ip: IpAddr) -> Result<Option<Record>, StoreError> {
        self.record_for_decision(ip)
    }
}

/// What an Allocate decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Allocate {
    /// The owner already holds this allocation: answer it, write nothing.
    Holds(IpAddr, Record),
    /// Write this allocation, then answer it.
    Put(IpAddr, Record),
    /// Release the allocation the owner holds (`from`) and write `to` in
    /// the same flush, then answer `to`.
    Move {
        /// The address held and its allocation.
        from: (IpAddr, Record),
        /// The address moved to and its allocation.
        to: (IpAddr, Record),
    },
}

/// What a Release decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Release {
    /// Nothing matched: answer so, write nothing.
    Nothing,
    /// Remove this allocation, then answer it.
    Delete(IpAddr, Record),
}

/// Which free address of a pool an Allocate that names none gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pick {
    /// The lowest: a pool fills from its start, as with one writer.
    #[default]
    Lowest,
    /// The first from a place in the pool given by a hash of the owner,
    /// going round to the pool's start: writers sharing a store, asked for
    /// different owners at once, try different addresses instead of all
    /// racing for the lowest.
    Spread,
}

/// A hash of `owner` over 128 bits, the same in every process and version
/// (FNV-1a, then SplitMix64's finaliser for each half).
pub fn owner_place(owner: &str) -> u128 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in owner.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (u128::from(mix(h)) << 64) | u128::from(mix(h ^ 0x9e37_79b9_7f4a_7c15))
}

/// The pools and the addresses taken in them (and outside them).
pub struct Rules {
    pools: Arc<Pools>,
    taken: [IntervalSet; 2],
    policy: Policy,
    pick: Pick,
}

impl Rules {
    /// Rules over `pools` with nothing taken yet, lowest free address
    /// first.
    pub fn new(pools: Arc<Pools>) -> Rules {
        Rules {
            pools,
            taken: Default::default(),
            policy: Policy::default(),
            pick: Pick::default(),
        }
    }

    /// The same rules under `policy` (checked against the same pools).
    pub fn with_policy(self, policy: Policy) -> Rules {
        Rules { policy, ..self }
    }

    /// The same rules, picking free addresses as `pick` says.
    pub fn with_pick(self, pick: Pick) -> Rules {
        Rules { pick, ..self }
    }

    /// The configured pools.
    pub fn pools(&self) -> &Arc<Pools> {
        &self.pools
    }

    /// Marks `ip` as taken; whether it was free.
    pub fn take(&mut self, ip: IpAddr) -> bool {
        let (f, x) = to_int(ip);
        self.taken[f.index()].insert(x)
    }

    /// Marks `ip` as free; whether it was taken.
    pub fn free(&mut self, ip: IpAddr) -> bool {
        let (f, x) = to_int(ip);
        self.taken[f.index()].remove(x)
    }

    /// Decides an Allocate; a new allocation gets `revision` and the time
    /// `now` (nanoseconds since the Unix epoch).
    pub fn allocate(
        &self,
        view: &impl View,
        args: AllocateArgs,
        revision: u64,
        now: u64,
    ) -> Result<Allocate> {
        let AllocateArgs {
            pool,
            owner,
            address,
            labels,
            family,
            adopt,
            replace_held,
            scope,
        } = args;
        if let (Some(ip), Some(f)) = (address, family)
            && Family::of(ip) != f
        {
            return Err(invalid(
                "family",
                &format!("{f}"),
                format!("does not match address {ip}"),
            ));
        }
        let named = match &pool {
            Some(name) => Some(
                self.pools
                    .index_of(name)
                    .ok_or_else(|| Error::UnknownPool { pool: name.clone() })?,
            ),
            None => None,
        };
        self.check_scope(view, &scope, &owner, address)?;

        // Idempotency, and one address per owner, come before anything else.
        let moving = match self.held(view, &owner)? {
            Some((held, record)) if self.answers(held, address, named, family) => {
                return Ok(Allocate::Holds(held, record));
            }
            Some(from) if replace_held => Some(from),
            Some((held, _)) => {
                return Err(Error::OwnerHoldsOther {
                    owner,
                    held,
                    pool: self
                        .pools
                        .containing(held)
                        .map(|i| self.pools.at(i).name().to_string()),
                });
            }
            None => None,
        };

        self.check_draw(&scope, &owner, named, address)?;
        let ip = match address {
            Some(ip) => self.check_explicit(view, &owner, ip, named, adopt)?,
            None => {
                let index = named.unwrap_or_else(|| self.default_index_for(&owner));
                self.check_admits(index, &owner)?;
                self.free_address(index, family, &owner)?
            }
        };
        let to = (
            ip,
            Record {
                owner,
                labels,
                created_unix_nanos: now,
                revision,
            },
        );
        Ok(match moving {
            Some(from) => Allocate::Move { from, to },
            None => Allocate::Put(to.0, to.1),
        })
    }

    /// The address `owner` holds and its allocation.
    fn held(&self, view: &impl View, owner: &str) -> Result<Option<(IpAddr, Record)>> {
        let Some(held) = view.held_by(owner)? else {
            return Ok(None);
        };
        let record = view.record_at(held)?.ok_or_else(|| StoreError::Corrupt {
            key: format!("o{owner}"),
            why: format!("owner index points to {held}, which holds no allocation"),
        })?;
        Ok(Some((held, record)))
    }

    /// Whether `held` answers a request for `address` in the pool `named`
    /// of `family` (each `None`: any).
    fn answers(
        &self,
        held: IpAddr,
        address: Option<IpAddr>,
        named: Option<usize>,
        family: Option<Family>,
    ) -> bool {
        address.is_none_or(|a| a == held)
            && named.is_none_or(|n| self.pools.containing(held) == Some(n))
            && family.is_none_or(|f| f == Family::of(held))
    }

    /// The credential may touch `owner`, and the holder of `address`.
    fn check_scope(
        &self,
        view: &impl View,
        scope: &Scope,
        owner: &str,
        address: Option<IpAddr>,
    ) -> Result<()> {
        scope::check_owner(scope, owner)?;
        if let Some(ip) = address
            && let Some(holder) = view.record_at(ip)?
        {
            scope::check_owner(scope, &holder.owner)?;
        }
        Ok(())
    }

    /// The credential may draw from the pool named, the pool of `address`
    /// or the default pool.
    fn check_draw(
        &self,
        scope: &Scope,
        owner: &str,
        named: Option<usize>,
        address: Option<IpAddr>,
    ) -> Result<()> {
        let pool = match (named, address) {
            (Some(i), _) => Some(i),
            (None, Some(ip)) => self.pools.containing(ip),
            (None, None) => Some(self.default_index_for(owner)),
        };
        match (pool, address) {
            (Some(i), _) => scope::check_pool(scope, self.pools.at(i).name()),
            (None, Some(ip)) => scope::check_outside(scope, ip),
            (None, None) => Ok(()),
        }
    }

    fn check_explicit(
        &self,
        view: &impl View,
        owner: &str,
        ip: IpAddr,
        named: Option<usize>,
        adopt: bool,
    ) -> Result<IpAddr> {
        refuse_special("address", ip)?;
        let index = match named {
            Some(i) => {
                let pool = self.pools.at(i);
                if !pool.covers(ip) {
                    return Err(Error::NotInPool {
                        address: ip,
                        pool: pool.name().to_string(),
                    });
                }
                Some(i)
            }
            None => self.pools.containing(ip),
        };
        match index {
            Some(i) => self.check_admits(i, owner)?,
            None if !adopt && !self.policy.allows_outside(ip) => {
                return Err(Error::OutsidePools { address: ip });
            }
            None => {}
        }
        if let Some(pool) = index.map(|i| self.pools.at(i))
            && let Some(why) = pool.exclusion(ip)
        {
            return Err(Error::Excluded {
                address: ip,
                pool: pool.name().to_string(),
                why,
            });
        }
        if let Some(holder) = view.record_at(ip)? {
            return Err(Error::Held {
                address: ip,
                holder: holder.owner,
            });
        }
        Ok(ip)
    }

    /// The pool an owner draws from when it names none: its prefix's own
    /// default pool, else the default pool.
    fn default_index_for(&self, owner: &str) -> usize {
        self.policy
            .default_for(owner)
            .unwrap_or(self.pools.default_index())
    }

    fn check_admits(&self, index: usize, owner: &str) -> Result<()> {
        match self.policy.owners_of(index) {
            Some(prefixes) if !self.policy.admits(index, owner) => Err(Error::PoolRefusesOwner {
                pool: self.pools.at(index).name().to_string(),
                owner: owner.to_string(),
                prefixes: prefixes.to_vec(),
            }),
            _ => Ok(()),
        }
    }

    /// A free address of pool `index` for `owner`, as [`Pick`] says.
    fn free_address(&self, index: usize, family: Option<Family>, owner: &str) -> Result<IpAddr> {
        let pool = self.pools.at(index);
        if pool.explicit_only() {
            return Err(Error::ExplicitOnly {
                pool: pool.name().to_string(),
            });
        }
        let family = family.unwrap_or_else(|| pool.default_family());
        // A pool whose every address of the family is reserved has the
        // family but nothing free: exhausted, not misconfigured.
        if pool.covered(family).is_empty() {
            return Err(Error::NoFamily {
                pool: pool.name().to_string(),
                family,
            });
        }
        let (taken, usable) = (&self.taken[family.index()], pool.usable(family));
        let x = match self.pick {
            Pick::Lowest => taken.first_free_in(usable),
            Pick::Spread => taken.first_free_from(usable, owner_place(owner)),
        };
        let x = x.ok_or_else(|| Error::Exhausted {
            pool: pool.name().to_string(),
            family,
        })?;
        Ok(from_int(family, x))
    }

    /// Decides a Release by owner, address or both. Any allocation may be
    /// released, also one the address rules would refuse today.
    pub fn release(&self, view: &impl View, args: ReleaseArgs) -> Result<Release> {
        let ReleaseArgs {
            owner,
            address,
            scope,
        } = args;
        if let Some(owner) = &owner {
            scope::check_owner(&scope, owner)?;
        }
        let ip = match (address, &owner) {
            (Some(ip), _) => ip,
            (None, Some(owner)) => match view.held_by(owner)? {
                Some(ip) => ip,
                None => return Ok(Release::Nothing),
            },
            (None, None) => return Err(invalid("owner", "", "give an owner, an address, or both")),
        };
        let Some(record) = view.record_at(ip)? else {
            return Ok(Release::Nothing);
        };
        scope::check_owner(&scope, &record.owner)?;
        if let Some(owner) = owner
            && owner != record.owner
        {
            return Err(Error::HeldByOther {
                address: ip,
                holder: record.owner,
                owner,
            });
        }
        Ok(Release::Delete(ip, record))
    }
}

/// Refuses an explicit address in a special-purpose block
/// ([`special::BLOCKS`]), naming `field`, the address and the block. An
/// IPv4-mapped spelling (`::ffff:a.b.c.d`) is refused with the address to ask
/// for instead, so that one address has one key.
pub fn refuse_special(field: &'static str, ip: IpAddr) -> Result<()> {
    if let Some(v4) = special::mapped_ipv4(ip) {
        return Err(invalid(
            field,
            &ip.to_string(),
            format!(
                "an IPv4-mapped IPv6 address is another spelling of {v4}; ask for {v4} instead, so that one address has one key"
            ),
        ));
    }
    if let Some(block) = special::containing(ip) {
        return Err(invalid(
            field,
            &ip.to_string(),
            format!("it lies in {block}; such addresses are never allocated"),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::addresses::pool::PoolDef;
    use crate::fixtures::{MemView, ip, mk_args, mk_pools, mk_record, mk_release};

    fn mk_rules(specs: &[&str]) -> Rules {
        Rules::new(mk_pools(specs))
    }

    /// Rules over the pool `a=10.0.0.0/24` in which `owner` holds `address`
    /// (written at revision 1).
    fn mk_holding(owner: &str, address: &str) -> (Rules, MemView) {
        let mut rules = mk_rules(&["a=10.0.0.0/24"]);
        let mut view = MemView::default();
        view.hold(&mut rules, ip(address), mk_record(owner, 1));
        (rules, view)
    }

    fn mk_explicit(owner: &str, address: &str) -> AllocateArgs {
        AllocateArgs {
            address: Some(ip(address)),
            ..mk_args(owner)
        }
    }

    #[test]
    fn an_owner_that_moves_releases_what_it_holds_and_takes_what_it_asks_for() {
        let (rules, view) = mk_holding("svc", "10.0.0.9");
        let moving = AllocateArgs {
            replace_held: true,
            ..mk_explicit("svc", "10.0.0.20")
        };
        let decided = rules.allocate(&view, moving, 2, 7).expect("a move");
        assert_eq!(
            decided,
            Allocate::Move {
                from: (ip("10.0.0.9"), mk_record("svc", 1)),
                to: (ip("10.0.0.20"), mk_record("svc", 2)),
            }
        );
        // Asking for what it holds is no move.
        let staying = AllocateArgs {
            replace_held: true,
            ..mk_explicit("svc", "10.0.0.9")
        };
        let decided = rules.allocate(&view, staying, 2, 7).expect("holds");
        assert_eq!(
            decided,
            Allocate::Holds(ip("10.0.0.9"), mk_record("svc", 1))
        );
    }

    #[test]
    fn a_move_to_an_address_another_owner_holds_is_refused() {
        let (mut rules, mut view) = mk_holding("svc", "10.0.0.9");
        view.hold(&mut rules, ip("10.0.0.20"), mk_record("other", 1));
        let moving = AllocateArgs {
            replace_held: true,
            ..mk_explicit("svc", "10.0.0.20")
        };
        let err = rules.allocate(&view, moving, 2, 7).expect_err("held");
        assert!(matches!(err, Error::Held { .. }), "{err}");
    }

    #[test]
    fn a_move_to_another_pool_takes_its_lowest_free_address() {
        let mut rules = mk_rules(&["a=10.0.0.0/24", "b=10.0.1.0/24"]);
        let mut view = MemView::default();
        view.hold(&mut rules, ip("10.0.0.1"), mk_record("svc", 1));
        let moving = AllocateArgs {
            pool: Some("b".into()),
            replace_held: true,
            ..mk_args("svc")
        };
        let decided = rules.allocate(&view, moving, 2, 7).expect("a move");
        assert!(
            matches!(&decided, Allocate::Move { from, to } if from.0 == ip("10.0.0.1") && to.0 == ip("10.0.1.1")),
            "{decided:?}"
        );
    }

    #[test]
    fn a_new_owner_gets_the_lowest_free_address_at_the_given_revision_and_time() {
        let (rules, view) = mk_holding("first", "10.0.0.1");
        let decided = rules
            .allocate(&view, mk_args("svc"), 2, 7)
            .expect("allocate");
        assert_eq!(decided, Allocate::Put(ip("10.0.0.2"), mk_record("svc", 2)));
    }

    #[test]
    fn an_owner_that_holds_its_address_gets_it_again_without_a_write() {
        let (rules, view) = mk_holding("svc", "10.0.0.9");
        let decided = rules
            .allocate(&view, mk_args("svc"), 2, 7)
            .expect("allocate");
        assert_eq!(
            decided,
            Allocate::Holds(ip("10.0.0.9"), mk_record("svc", 1))
        );
    }

    #[test]
    fn an_owner_asking_for_another_address_is_refused_naming_the_one_it_holds() {
        let (rules, view) = mk_holding("svc", "10.0.0.9");
        let err = rules
            .allocate(&view, mk_explicit("svc", "10.0.0.20"), 2, 7)
            .expect_err("must fail");
        assert!(
            matches!(&err, Error::OwnerHoldsOther { held, pool, .. }
                if *held == ip("10.0.0.9") && pool.as_deref() == Some("a")),
            "{err}"
        );
    }

    #[test]
    fn an_explicit_address_held_by_another_owner_is_refused_naming_the_holder() {
        let (rules, view) = mk_holding("other", "10.0.0.9");
        let err = rules
            .allocate(&view, mk_explicit("svc", "10.0.0.9"), 2, 7)
            .expect_err("must fail");
        assert!(
            matches!(&err, Error::Held { holder, .. } if holder == "other"),
            "{err}"
        );
    }

    #[test]
    fn an_explicit_address_outside_the_named_pool_or_excluded_by_it_is_refused() {
        let rules = mk_rules(&["a=10.0.0.0/24", "b=10.0.1.0/24"]);
        let view = MemView::default();
        let outside = AllocateArgs {
            pool: Some("a".into()),
            address: Some(ip("10.0.1.5")),
            ..mk_args("svc")
        };
        let err = rules.allocate(&view, outside, 1, 7).expect_err("not in a");
        assert!(matches!(err, Error::NotInPool { .. }), "{err}");
        let err = rules
            .allocate(&view, mk_explicit("svc", "10.0.0.255"), 1, 7)
            .expect_err("excluded");
        assert!(matches!(err, Error::Excluded { .. }), "{err}");
    }

    #[test]
    fn an_address_of_the_other_family_than_the_one_asked_for_is_invalid() {
        let rules = mk_rules(&["a=10.0.0.0/24"]);
        let args = AllocateArgs {
            address: Some(ip("10.0.0.5")),
            family: Some(Family::V6),
            ..mk_args("svc")
        };
        let err = rules
            .allocate(&MemView::default(), args, 1, 7)
            .expect_err("must fail");
        assert!(
            matches!(
                err,
                Error::Invalid {
                    field: "family",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_full_pool_is_exhausted() {
        let mut rules = mk_rules(&["a=10.0.0.1-10.0.0.2"]);
        let mut view = MemView::default();
        view.hold(&mut rules, ip("10.0.0.1"), mk_record("x", 1));
        view.hold(&mut rules, ip("10.0.0.2"), mk_record("y", 2));
        let err = rules
            .allocate(&view, mk_args("svc"), 3, 7)
            .expect_err("full");
        assert!(matches!(err, Error::Exhausted { .. }), "{err}");
    }

    #[test]
    fn release_deletes_the_owners_allocation_and_refuses_another_holder() {
        let (rules, view) = mk_holding("svc", "10.0.0.9");
        let by_owner = mk_release("svc");
        assert_eq!(
            rules.release(&view, by_owner).expect("release"),
            Release::Delete(ip("10.0.0.9"), mk_record("svc", 1))
        );
        let wrong_owner = ReleaseArgs {
            owner: Some("other".into()),
            address: Some(ip("10.0.0.9")),
            scope: Default::default(),
        };
        let err = rules.release(&view, wrong_owner).expect_err("held by svc");
        assert!(matches!(err, Error::HeldByOther { .. }), "{err}");
        let nobody = mk_release("nobody");
        assert_eq!(
            rules.release(&view, nobody).expect("release"),
            Release::Nothing
        );
        let neither = ReleaseArgs::default();
        let err = rules.release(&view, neither).expect_err("needs a key");
        assert!(matches!(err, Error::Invalid { .. }), "{err}");
    }

    fn mk_policy_rules(
        specs: &[&str],
        owners: &[(&str, &str)],
        defaults: &[(&str, &str)],
    ) -> Rules {
        let pools = mk_pools(specs);
        let policy = Policy::new(
            &pools,
            vec!["192.0.2.0/24".parse().expect("net")],
            owners
                .iter()
                .map(|(p, o)| (p.to_string(), vec![o.to_string()]))
                .collect(),
            defaults
                .iter()
                .map(|(o, p)| (o.to_string(), p.to_string()))
                .collect(),
        )
        .expect("policy");
        Rules::new(pools).with_policy(policy)
    }

    #[test]
    fn an_explicit_special_purpose_address_is_invalid_naming_the_field_value_and_block() {
        let rules = mk_rules(&["a=10.0.0.0/24"]);
        for block in &special::BLOCKS {
            // The middle of the block, which no nested block holds.
            let span = block.span();
            let inside = from_int(
                Family::of(block.net.network()),
                span.first + (span.last - span.first) / 2,
            );
            let err = rules
                .allocate(
                    &MemView::default(),
                    mk_explicit("svc", &inside.to_string()),
                    1,
                    7,
                )
                .expect_err("special");
            let msg = err.to_string();
            assert!(
                matches!(
                    err,
                    Error::Invalid {
                        field: "address",
                        ..
                    }
                ),
                "{msg}"
            );
            assert!(msg.contains(&inside.to_string()), "{msg}");
            if special::mapped_ipv4(inside).is_none() {
                assert!(msg.contains(&block.net.to_string()), "{msg}");
            }
        }
    }

    #[test]
    fn an_ipv4_mapped_spelling_is_refused_naming_the_ipv4_address_to_ask_for() {
        let rules = mk_policy_rules(&["a=10.0.0.0/24"], &[], &[]);
        let err = rules
            .allocate(
                &MemView::default(),
                mk_explicit("a", "::ffff:192.0.2.5"),
                1,
                7,
            )
            .expect_err("mapped");
        assert!(err.to_string().contains("ask for 192.0.2.5"), "{err}");
        let decided = rules
            .allocate(&MemView::default(), mk_explicit("b", "192.0.2.5"), 1, 7)
            .expect("the IPv4 spelling");
        assert!(matches!(decided, Allocate::Put(a, _) if a == ip("192.0.2.5")));
    }

    #[test]
    fn an_explicit_address_outside_every_pool_is_refused_unless_its_cidr_is_allowed() {
        let strict = mk_rules(&["a=10.0.0.0/24"]);
        let err = strict
            .allocate(&MemView::default(), mk_explicit("svc", "192.0.2.9"), 1, 7)
            .expect_err("outside");
        assert!(matches!(err, Error::OutsidePools { .. }), "{err}");
        assert!(err.to_string().contains("--allow-outside-pools"), "{err}");
        let allowing = mk_policy_rules(&["a=10.0.0.0/24"], &[], &[]);
        assert!(
            allowing
                .allocate(&MemView::default(), mk_explicit("svc", "192.0.2.9"), 1, 7)
                .is_ok()
        );
        let err = allowing
            .allocate(
                &MemView::default(),
                mk_explicit("svc", "198.51.100.1"),
                1,
                7,
            )
            .expect_err("not allowed");
        assert!(matches!(err, Error::OutsidePools { .. }), "{err}");
    }

    #[test]
    fn an_address_in_use_outside_every_pool_is_adopted_but_never_a_special_one() {
        let rules = mk_rules(&["a=10.0.0.0/24"]);
        let adopt = |owner: &str, address: &str| AllocateArgs {
            adopt: true,
            ..mk_explicit(owner, address)
        };
        let got = rules
            .allocate(&MemView::default(), adopt("svc", "192.0.2.9"), 1, 7)
            .expect("an address in use is recorded");
        assert!(matches!(got, Allocate::Put(ip_, _) if ip_ == ip("192.0.2.9")));
        let err = rules
            .allocate(&MemView::default(), adopt("svc", "127.0.0.1"), 1, 7)
            .expect_err("special");
        assert!(matches!(err, Error::Invalid { .. }), "{err}");
        let (rules, view) = mk_holding("other", "192.0.2.9");
        let err = rules
            .allocate(&view, adopt("svc", "192.0.2.9"), 2, 7)
            .expect_err("held by another owner");
        assert!(matches!(err, Error::Held { .. }), "{err}");
    }

    #[test]
    fn an_owner_holding_an_address_the_rules_now_refuse_keeps_getting_it() {
        let mut rules = mk_rules(&["a=10.0.0.0/24"]);
        let mut view = MemView::default();
        view.hold(&mut rules, ip("198.51.100.1"), mk_record("outside", 1));
        view.hold(&mut rules, ip("127.0.0.1"), mk_record("loopback", 2));
        for (owner, address) in [("outside", "198.51.100.1"), ("loopback", "127.0.0.1")] {
            let decided = rules
                .allocate(&view, mk_explicit(owner, address), 3, 7)
                .expect("held");
            assert!(matches!(decided, Allocate::Holds(a, _) if a == ip(address)));
            let decided = rules.allocate(&view, mk_args(owner), 3, 7).expect("held");
            assert!(matches!(decided, Allocate::Holds(a, _) if a == ip(address)));
        }
    }

    #[test]
    fn a_pool_refuses_owners_outside_its_prefixes_whichever_way_it_is_reached() {
        // team-a comes first, so it is the default pool.
        let rules = mk_policy_rules(
            &["team-a=10.0.1.0/24", "a=10.0.0.0/24"],
            &[("team-a", "service:team-a/")],
            &[],
        );
        let view = MemView::default();
        let named = AllocateArgs {
            pool: Some("team-a".into()),
            ..mk_args("service:team-b/web")
        };
        let explicit = mk_explicit("service:team-b/web", "10.0.1.7");
        let by_default = mk_args("service:team-b/web");
        for args in [named, explicit, by_default] {
            let err = rules.allocate(&view, args, 1, 7).expect_err("refused");
            assert!(
                matches!(&err, Error::PoolRefusesOwner { pool, owner, .. }
                    if pool == "team-a" && owner == "service:team-b/web"),
                "{err}"
            );
        }
        let admitted = AllocateArgs {
            pool: Some("team-a".into()),
            ..mk_args("service:team-a/web")
        };
        assert!(rules.allocate(&view, admitted, 1, 7).is_ok());
        let elsewhere = AllocateArgs {
            pool: Some("a".into()),
            ..mk_args("tool:x")
        };
        let other = rules
            .allocate(&view, elsewhere, 1, 7)
            .expect("pool a admits everyone");
        assert!(matches!(other, Allocate::Put(a, _) if a == ip("10.0.0.1")));
    }

    #[test]
    fn an_owner_prefix_with_its_own_default_pool_draws_from_it() {
        let rules = mk_policy_rules(
            &["a=10.0.0.0/24", "team-a=10.0.1.0/24"],
            &[],
            &[("service:team-a/", "team-a")],
        );
        let decided = rules
            .allocate(&MemView::default(), mk_args("service:team-a/web"), 1, 7)
            .expect("allocate");
        assert!(matches!(decided, Allocate::Put(a, _) if a == ip("10.0.1.1")));
        let decided = rules
            .allocate(&MemView::default(), mk_args("service:team-b/web"), 1, 7)
            .expect("allocate");
        assert!(matches!(decided, Allocate::Put(a, _) if a == ip("10.0.0.1")));
    }

    #[test]
    fn spread_owners_start_from_their_own_place_and_go_round_the_pool() {
        let rules = mk_rules(&["a=10.0.0.0/24"]).with_pick(Pick::Spread);
        let mut view = MemView::default();
        let place = |owner: &str| (owner_place(owner) % 254) as u32;
        let at = |place: u32| IpAddr::from([10, 0, 0, 1 + place as u8]);
        let decided = rules.allocate(&view, mk_args("svc"), 1, 7).expect("free");
        assert_eq!(
            decided,
            Allocate::Put(at(place("svc")), mk_record("svc", 1))
        );
        // Owners land apart, whatever order they come in.
        let spread: std::collections::BTreeSet<u32> =
            (0..8).map(|i| place(&format!("service:ns/s{i}"))).collect();
        assert!(spread.len() >= 6, "{spread:?}");
        // Taken from its place to the pool's end: round to its start.
        let mut rules = rules;
        for p in place("svc")..254 {
            view.hold(&mut rules, at(p), mk_record("x", 1));
        }
        let decided = rules.allocate(&view, mk_args("svc"), 2, 7).expect("free");
        let expected = if place("svc") == 0 { None } else { Some(at(0)) };
        match decided {
            Allocate::Put(ip, _) => assert_eq!(Some(ip), expected),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn owner_places_are_the_same_in_every_process_and_version() {
        assert_eq!(owner_place("svc"), owner_place("svc"));
        assert_ne!(owner_place("svc"), owner_place("svd"));
        // The same in every version, so that replicas of two versions
        // spread alike (computed apart, from FNV-1a's and SplitMix64's
        // definitions).
        assert_eq!(owner_place(""), 0xf52a_15e9_a9b5_e89b_e9d3_2759_6b86_9820);
        assert_eq!(
            owner_place("service:ns/web"),
            0x3073_af88_a673_ade1_9f41_ea33_78a0_ac29
        );
    }

    #[test]
    fn a_spread_pick_in_an_ipv6_64_costs_what_a_24_costs() {
        let rules = mk_rules(&["a=fd00::/64"]).with_pick(Pick::Spread);
        let args = AllocateArgs {
            family: Some(Family::V6),
            ..mk_args("svc")
        };
        let decided = rules
            .allocate(&MemView::default(), args, 1, 7)
            .expect("free");
        let Allocate::Put(IpAddr::V6(v6), _) = decided else {
            panic!("{decided:?}");
        };
        let first = ip("fd00::1");
        let (_, first) = to_int(first);
        // The /64 hands out every address but its first.
        assert_eq!(u128::from(v6) - first, owner_place("svc") % ((1 << 64) - 1));
    }

    #[test]
    fn a_pool_whose_every_address_is_reserved_is_exhausted() {
        let mut def: PoolDef = "drained=10.0.0.0/30".parse().expect("spec");
        def.reserved = vec!["10.0.0.0/30".parse().expect("el")];
        let pools = Pools::new(vec![def], None).expect("a drained pool starts");
        assert_eq!(pools.at(0).size(), 0);
        let rules = Rules::new(Arc::new(pools));
        let err = rules
            .allocate(&MemView::default(), mk_args("svc"), 1, 7)
            .expect_err("drained");
        assert!(
            matches!(&err, Error::Exhausted { pool, family: Family::V4 } if pool == "drained"),
            "{err}"
        );
    }
}
