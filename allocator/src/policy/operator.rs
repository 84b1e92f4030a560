//! The operator's rules over who may take which addresses, checked against
//! the pools at start: the CIDRs outside every pool where an explicit
//! address may be taken (`--allow-outside-pools`; none by default), the
//! owner prefixes a pool admits (`--pool-owners`; a pool without them admits
//! every owner) and the pool an owner gets when it names none
//! (`--default-pool-for`; the longest matching prefix wins, and an owner no
//! prefix matches gets the default pool). Pure.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use crate::addresses::pool::{PoolError, Pools};

/// The checked rules; the default allows nothing outside the pools and
/// admits every owner to every pool.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    allow_outside: Vec<IpNet>,
    /// Pool index → the owner prefixes it admits.
    pool_owners: BTreeMap<usize, Vec<String>>,
    /// Owner prefix → pool index, longest prefix first.
    default_for: Vec<(String, usize)>,
}

impl Policy {
    /// Checks the settings against `pools`: every pool they name exists,
    /// and no owner prefix is empty.
    pub fn new(
        pools: &Pools,
        allow_outside: Vec<IpNet>,
        pool_owners: Vec<(String, Vec<String>)>,
        default_for: Vec<(String, String)>,
    ) -> Result<Policy, PoolError> {
        let index = |setting: &'static str, name: &str| {
            pools.index_of(name).ok_or_else(|| PoolError::UnknownPool {
                setting,
                name: name.to_string(),
            })
        };
        let mut owners: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (pool, prefixes) in pool_owners {
            let i = index("--pool-owners", &pool)?;
            owners.entry(i).or_default().extend(prefixes);
        }
        let mut defaults = Vec::with_capacity(default_for.len());
        for (prefix, pool) in default_for {
            let i = index("--default-pool-for", &pool)?;
            // Every owner with the prefix would be refused by its own default.
            if let Some(admitted) = owners.get(&i)
                && !admitted.iter().any(|p| prefix.starts_with(p.as_str()))
            {
                return Err(PoolError::NotAdmitted { prefix, pool });
            }
            defaults.push((prefix, i));
        }
        defaults.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Ok(Policy {
            allow_outside: allow_outside.into_iter().map(|n| n.trunc()).collect(),
            pool_owners: owners,
            default_for: defaults,
        })
    }

    /// Whether an explicit request may take `ip`, which lies outside every
    /// pool.
    pub fn allows_outside(&self, ip: IpAddr) -> bool {
        self.allow_outside.iter().any(|n| n.contains(&ip))
    }

    /// The CIDRs outside the pools where explicit addresses may be taken.
    pub fn allowed_outside(&self) -> &[IpNet] {
        &self.allow_outside
    }

    /// The owner prefixes the pool at `index` admits; `None` when it admits
    /// every owner.
    pub fn owners_of(&self, index: usize) -> Option<&[String]> {
        self.pool_owners.get(&index).map(Vec::as_slice)
    }

    /// Whether the pool at `index` admits `owner`.
    pub fn admits(&self, index: usize, owner: &str) -> bool {
        self.owners_of(index)
            .is_none_or(|prefixes| prefixes.iter().any(|p| owner.starts_with(p.as_str())))
    }

    /// The pool an owner that names none gets, by the longest matching
    /// `--default-pool-for` prefix; `None` means the default pool.
    pub fn default_for(&self, owner: &str) -> Option<usize> {
        self.default_for
            .iter()
            .find(|(prefix, _)| owner.starts_with(prefix.as_str()))
            .map(|(_, i)| *i)
    }
}

/// Parses a `--pool-owners` value, `POOL=PREFIX[,PREFIX...]`.
pub fn parse_pool_owners(value: &str) -> Result<(String, Vec<String>), String> {
    let (pool, prefixes) = value
        .split_once('=')
        .ok_or_else(|| format!("invalid value {value:?}: expected POOL=PREFIX[,PREFIX...]"))?;
    let prefixes: Vec<String> = prefixes.split(',').map(|p| p.trim().to_string()).collect();
    if prefixes.iter().any(String::is_empty) {
        return Err(format!(
            "invalid value {value:?}: an owner prefix must not be empty (a pool without --pool-owners admits every owner)"
        ));
    }
    Ok((pool.trim().to_string(), prefixes))
}

/// Parses a `--default-pool-for` value, `PREFIX=POOL`.
pub fn parse_default_for(value: &str) -> Result<(String, String), String> {
    let (prefix, pool) = value
        .rsplit_once('=')
        .ok_or_else(|| format!("invalid value {value:?}: expected PREFIX=POOL"))?;
    let prefix = prefix.trim();
    if prefix.is_empty() {
        return Err(format!(
            "invalid value {value:?}: the owner prefix must not be empty (use --default-pool for every owner)"
        ));
    }
    Ok((prefix.to_string(), pool.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{ip, mk_pools};

    fn mk_policy(owners: &[&str], defaults: &[&str]) -> Result<Policy, PoolError> {
        let pools = mk_pools(&["a=10.0.0.0/24", "team-a=10.0.1.0/24", "team-b=10.0.2.0/24"]);
        Policy::new(
            &pools,
            vec!["192.0.2.0/24".parse().expect("net")],
            owners
                .iter()
                .map(|v| parse_pool_owners(v).expect("owners"))
                .collect(),
            defaults
                .iter()
                .map(|v| parse_default_for(v).expect("default"))
                .collect(),
        )
    }

    #[test]
    fn a_pool_without_owner_prefixes_admits_every_owner() {
        let policy = mk_policy(&["team-a=service:team-a/"], &[]).expect("policy");
        assert!(policy.admits(0, "anything"));
        assert_eq!(policy.owners_of(0), None);
    }

    #[test]
    fn a_pool_with_owner_prefixes_admits_only_owners_under_them() {
        let policy = mk_policy(&["team-a=service:team-a/", "team-a=tool:a-"], &[]).expect("policy");
        assert!(policy.admits(1, "service:team-a/web"));
        assert!(policy.admits(1, "tool:a-1"));
        assert!(!policy.admits(1, "service:team-b/web"));
        assert!(!policy.admits(1, "service:team-a"));
    }

    #[test]
    fn the_longest_matching_prefix_picks_the_default_pool_and_no_match_means_none() {
        let policy =
            mk_policy(&[], &["service:=team-b", "service:team-a/=team-a"]).expect("policy");
        assert_eq!(policy.default_for("service:team-a/web"), Some(1));
        assert_eq!(policy.default_for("service:other/web"), Some(2));
        assert_eq!(policy.default_for("tool:x"), None);
    }

    #[test]
    fn settings_naming_an_unknown_pool_are_refused_naming_the_flag() {
        let err = mk_policy(&["nope=service:x/"], &[]).expect_err("unknown");
        assert!(err.to_string().contains("--pool-owners"), "{err}");
        let err = mk_policy(&[], &["service:x/=nope"]).expect_err("unknown");
        assert!(err.to_string().contains("--default-pool-for"), "{err}");
    }

    #[test]
    fn a_default_pool_for_a_prefix_the_pool_does_not_admit_is_refused() {
        let err = mk_policy(&["team-a=service:team-a/"], &["service:team-b/=team-a"])
            .expect_err("not admitted");
        assert!(
            matches!(&err, PoolError::NotAdmitted { prefix, pool }
                if prefix == "service:team-b/" && pool == "team-a"),
            "{err}"
        );
        assert!(mk_policy(&["team-a=service:team-a/"], &["service:team-a/web-=team-a"]).is_ok());
    }

    #[test]
    fn only_the_allowed_cidrs_outside_the_pools_are_allowed() {
        let policy = mk_policy(&[], &[]).expect("policy");
        assert!(policy.allows_outside(ip("192.0.2.77")));
        assert!(!policy.allows_outside(ip("192.0.3.1")));
        assert!(!Policy::default().allows_outside(ip("192.0.2.77")));
    }

    #[test]
    fn malformed_owner_settings_are_refused_naming_the_value() {
        for bad in ["team-a", "team-a=", "team-a=x,,y"] {
            let err = parse_pool_owners(bad).expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
        for bad in ["team-a", "=team-a"] {
            let err = parse_default_for(bad).expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
    }
}
