//! What a credential may touch, as pure checks over a [`Scope`]: the owners
//! (by prefix) it may allocate, release or take an address from, the pools
//! it may draw from, and the allocations it may read (its owners' in its
//! pools). The allocation rules call them before deciding anything, so a
//! refusal changes nothing.

use std::net::IpAddr;

use crate::{
    error::{Error, Result},
    model::Scope,
};

/// Refuses `owner` unless it starts with one of the scope's owner prefixes.
/// Applies to the owner a request names and to the holder of an address it
/// names.
pub fn check_owner(scope: &Scope, owner: &str) -> Result<()> {
    let Some(prefixes) = &scope.owners else {
        return Ok(());
    };
    if prefixes.iter().any(|p| owner.starts_with(p.as_str())) {
        return Ok(());
    }
    Err(Error::OwnerNotPermitted {
        credential: scope.credential.clone(),
        owner: owner.to_string(),
        prefixes: prefixes.clone(),
    })
}

/// Refuses drawing from `pool` (by name, for an explicit address in it, or
/// as the default) unless the scope gives that pool.
pub fn check_pool(scope: &Scope, pool: &str) -> Result<()> {
    match &scope.pools {
        Some(pools) if !pools.iter().any(|p| p == pool) => Err(Error::PoolNotPermitted {
            credential: scope.credential.clone(),
            pool: pool.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Whether the scope may read the allocation of `owner` in `pool` (`None`:
/// outside every pool): one of its owners, in one of its pools (outside
/// every pool only for a scope of every pool), as it may change them.
pub fn sees(scope: &Scope, owner: &str, pool: Option<&str>) -> bool {
    let owner_seen = scope
        .owners
        .as_ref()
        .is_none_or(|prefixes| prefixes.iter().any(|p| owner.starts_with(p.as_str())));
    let pool_seen = match (&scope.pools, pool) {
        (None, _) => true,
        (Some(pools), Some(pool)) => pools.iter().any(|p| p == pool),
        (Some(_), None) => false,
    };
    owner_seen && pool_seen
}

/// Refuses reading `what` (an owner's allocation, the one at an address),
/// held by `owner` in `pool`, unless the scope [`sees`] it.
pub fn check_read(scope: &Scope, what: String, owner: &str, pool: Option<&str>) -> Result<()> {
    if sees(scope, owner, pool) {
        return Ok(());
    }
    Err(Error::ReadNotPermitted {
        credential: scope.credential.clone(),
        what,
    })
}

/// Refuses `address`, which lies outside every pool, unless the scope gives
/// every pool.
pub fn check_outside(scope: &Scope, address: IpAddr) -> Result<()> {
    match &scope.pools {
        Some(_) => Err(Error::OutsidePoolsNotPermitted {
            credential: scope.credential.clone(),
            address,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_reads_its_own_owners_in_its_own_pools_only() {
        let tool = mk_scope(&["vm:"], &["vms"]);
        assert!(sees(&tool, "vm:a", Some("vms")));
        assert!(!sees(&tool, "vm:a", Some("services")), "another pool");
        assert!(!sees(&tool, "service:x", Some("vms")), "another owner");
        assert!(!sees(&tool, "vm:a", None), "outside every pool");
        let every_pool = mk_scope(&["vm:"], &[]);
        let every_pool = Scope {
            pools: None,
            ..every_pool
        };
        assert!(sees(&every_pool, "vm:a", None));
        assert!(
            sees(&Scope::default(), "anyone", None),
            "the local listener"
        );
        let err = check_read(
            &tool,
            "the allocation at 10.0.0.1".into(),
            "service:x",
            None,
        )
        .expect_err("refused");
        assert_eq!(
            err.to_string(),
            "credential \"tool\" may not read the allocation at 10.0.0.1: it reads only its own owners in its own pools"
        );
    }
    use crate::fixtures::ip;

    fn mk_scope(owners: &[&str], pools: &[&str]) -> Scope {
        let list = |items: &[&str]| Some(items.iter().map(|s| s.to_string()).collect());
        Scope {
            credential: "tool".into(),
            owners: list(owners),
            pools: list(pools),
        }
    }

    #[test]
    fn the_default_scope_may_touch_every_owner_and_pool() {
        let scope = Scope::default();
        assert!(check_owner(&scope, "service:ns/web").is_ok());
        assert!(check_pool(&scope, "any").is_ok());
        assert!(check_outside(&scope, ip("192.0.2.1")).is_ok());
    }

    #[test]
    fn an_owner_outside_every_prefix_is_refused_naming_the_credential_and_the_owner() {
        let scope = mk_scope(&["vm:", "lab:"], &["vms"]);
        assert!(check_owner(&scope, "vm:one").is_ok());
        assert!(check_owner(&scope, "lab:x").is_ok());
        let err = check_owner(&scope, "service:ns/web").expect_err("not a vm");
        assert!(
            matches!(&err, Error::OwnerNotPermitted { credential, owner, .. }
                if credential == "tool" && owner == "service:ns/web"),
            "{err}"
        );
        assert!(err.to_string().contains("\"vm:\""), "{err}");
    }

    #[test]
    fn a_prefix_is_matched_from_the_start_of_the_owner_only() {
        let scope = mk_scope(&["vm:"], &["vms"]);
        assert!(check_owner(&scope, "x-vm:one").is_err());
        assert!(check_owner(&scope, "vm").is_err());
    }

    #[test]
    fn a_pool_not_given_and_an_address_outside_every_pool_are_refused() {
        let scope = mk_scope(&["vm:"], &["vms"]);
        assert!(check_pool(&scope, "vms").is_ok());
        let err = check_pool(&scope, "services").expect_err("foreign pool");
        assert!(
            matches!(&err, Error::PoolNotPermitted { credential, pool }
                if credential == "tool" && pool == "services"),
            "{err}"
        );
        let err = check_outside(&scope, ip("192.0.2.1")).expect_err("outside");
        assert!(
            matches!(&err, Error::OutsidePoolsNotPermitted { address, .. } if *address == ip("192.0.2.1")),
            "{err}"
        );
    }
}

#[cfg(test)]
mod property {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        fixtures::{MemView, mk_pools},
        model::{AllocateArgs, Record, ReleaseArgs},
        policy::rules::{Allocate, Release, Rules},
    };

    /// Each credential's owner prefix; the two are disjoint.
    const PREFIXES: [&str; 2] = ["a:", "b:"];

    #[derive(Clone, Debug)]
    enum Op {
        Allocate {
            by: usize,
            owner: (usize, u8),
            address: Option<u8>,
            pool: Option<usize>,
        },
        Release {
            by: usize,
            owner: Option<(usize, u8)>,
            address: Option<u8>,
        },
    }

    fn mk_credentials() -> [Scope; 2] {
        [("a", vec!["p"]), ("b", vec!["p", "q"])].map(|(name, pools)| Scope {
            credential: name.to_string(),
            owners: Some(vec![format!("{name}:")]),
            pools: Some(pools.into_iter().map(str::to_string).collect()),
        })
    }

    /// Addresses of both pools and one outside them.
    fn mk_address(i: u8) -> IpAddr {
        match i % 17 {
            16 => IpAddr::from([10, 9, 0, 1]),
            i => IpAddr::from([10, 0, i / 8, i % 8]),
        }
    }

    fn mk_owner((who, n): (usize, u8)) -> String {
        format!("{}{}", PREFIXES[who % 2], n % 4)
    }

    fn op() -> impl Strategy<Value = Op> {
        let owner = (0..2usize, any::<u8>());
        prop_oneof![
            (
                0..2usize,
                owner.clone(),
                any::<Option<u8>>(),
                any::<Option<usize>>()
            )
                .prop_map(|(by, owner, address, pool)| Op::Allocate {
                    by,
                    owner,
                    address,
                    pool
                }),
            (0..2usize, proptest::option::of(owner), any::<Option<u8>>())
                .prop_map(|(by, owner, address)| Op::Release { by, owner, address }),
        ]
    }

    /// The allocations whose owner belongs to credential `who`.
    fn held_by(view: &MemView, who: usize) -> BTreeMap<IpAddr, Record> {
        view.records()
            .iter()
            .filter(|(_, r)| r.owner.starts_with(PREFIXES[who]))
            .map(|(ip, r)| (*ip, r.clone()))
            .collect()
    }

    proptest! {
        #[test]
        fn no_sequence_of_calls_lets_a_credential_change_another_credentials_allocation(
            ops in proptest::collection::vec(op(), 1..60)
        ) {
            let mut rules = Rules::new(mk_pools(&["p=10.0.0.0/29", "q=10.0.1.0/29"]));
            let mut view = MemView::default();
            let scopes = mk_credentials();
            for (revision, op) in (1u64..).zip(ops) {
                let by = match &op {
                    Op::Allocate { by, .. } | Op::Release { by, .. } => *by,
                };
                let other = held_by(&view, 1 - by);
                match op {
                    Op::Allocate { owner, address, pool, .. } => {
                        let foreign = owner.0 % 2 != by;
                        let args = AllocateArgs {
                            pool: pool.map(|p| ["p", "q"][p % 2].to_string()),
                            owner: mk_owner(owner),
                            address: address.map(mk_address),
                            scope: scopes[by].clone(),
                            ..Default::default()
                        };
                        match rules.allocate(&view, args, revision, 7) {
                            Ok(Allocate::Put(ip, record)) => {
                                prop_assert!(!foreign, "{record:?} at {ip} for a foreign owner");
                                view.hold(&mut rules, ip, record);
                            }
                            Ok(Allocate::Holds(..)) => prop_assert!(!foreign),
                            Ok(decided @ Allocate::Move { .. }) => {
                                prop_assert!(false, "a move nobody asked for: {decided:?}");
                            }
                            Err(e) if foreign => prop_assert!(
                                matches!(e, Error::OwnerNotPermitted { .. }), "{e}"
                            ),
                            Err(_) => {}
                        }
                    }
                    Op::Release { owner, address, .. } => {
                        let args = ReleaseArgs {
                            owner: owner.map(mk_owner),
                            address: address.map(mk_address),
                            scope: scopes[by].clone(),
                        };
                        if let Ok(Release::Delete(ip, _)) = rules.release(&view, args) {
                            view.unhold(&mut rules, ip);
                        }
                    }
                }
                prop_assert_eq!(&held_by(&view, 1 - by), &other);
            }
        }
    }
}
