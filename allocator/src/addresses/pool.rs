//! Pool arithmetic: parsing pool specs, the addresses a pool may hand out, and
//! which pool holds an address. Pools are described by a few spans each and are
//! never enumerated, so a /8 or an IPv6 /64 costs the same as a /24.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;

use crate::{
    addresses::intervals::{self, Span},
    addresses::special::{self, Block},
};

pub use crate::addresses::family::{Family, from_int, to_int};

/// Errors in pool configuration. Each names the value it refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    /// A spec that is neither an address, a CIDR nor a range.
    #[error("invalid address, CIDR or range {spec:?}: {why}")]
    BadSpec { spec: String, why: String },
    /// A flag value without `NAME=`.
    #[error("invalid value {value:?}: expected NAME=SPEC[,SPEC...]")]
    BadAssignment { value: String },
    /// A pool name that is not a DNS label.
    #[error(
        "invalid pool name {name:?}: use 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
    )]
    BadName { name: String },
    /// The same pool given twice.
    #[error("pool {name:?} is defined twice")]
    Duplicate { name: String },
    /// A pool that holds the unspecified address.
    #[error("pool {name:?}: {spec} holds the unspecified address {addr}")]
    Unspecified {
        name: String,
        spec: String,
        addr: IpAddr,
    },
    /// Two pools share addresses.
    #[error("pools {a:?} and {b:?} overlap at {addr}")]
    Overlap { a: String, b: String, addr: IpAddr },
    /// A setting for a pool that is not defined.
    #[error("{setting} names pool {name:?}, which is not defined")]
    UnknownPool { setting: &'static str, name: String },
    /// A reserved address outside its pool.
    #[error("pool {name:?}: reserved {spec} lies outside the pool")]
    ReservedOutside { name: String, spec: String },
    /// No pool at all.
    #[error("no pool is configured")]
    NoPools,
    /// A pool with no address it may hand out.
    #[error("pool {name:?} has no usable address")]
    Empty { name: String },
    /// An owner prefix given a default pool that does not admit it.
    #[error(
        "--default-pool-for {prefix}={pool}: pool {pool:?} does not admit owners starting with {prefix:?} (see --pool-owners)"
    )]
    NotAdmitted { prefix: String, pool: String },
    /// A spec that shares addresses with a special-purpose block.
    #[error(
        "{setting}: {spec} overlaps {block}; such addresses are never allocated, so no pool may hold them"
    )]
    Special {
        setting: String,
        spec: String,
        block: &'static Block,
    },
}

/// One element of a pool spec: a CIDR or an inclusive range (a single address
/// is a range of one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Element {
    /// A network; its edge addresses are skipped unless the pool uses all addresses.
    Cidr(IpNet),
    /// An inclusive range, always used whole.
    Range(IpAddr, IpAddr),
}

impl Element {
    /// The family of the element.
    pub fn family(&self) -> Family {
        match self {
            Element::Cidr(net) => Family::of(net.network()),
            Element::Range(first, _) => Family::of(*first),
        }
    }

    /// Every address of the element.
    pub fn span(&self) -> Span {
        match self {
            Element::Cidr(net) => Span::new(to_int(net.network()).1, to_int(net.broadcast()).1),
            Element::Range(first, last) => Span::new(to_int(*first).1, to_int(*last).1),
        }
    }

    /// The addresses the element excludes by default, with the reason.
    fn edges(&self) -> Vec<(u128, Exclusion)> {
        let Element::Cidr(net) = self else {
            return Vec::new();
        };
        let span = self.span();
        match net {
            IpNet::V4(v4) if v4.prefix_len() <= 30 => vec![
                (span.first, Exclusion::Network(*net)),
                (span.last, Exclusion::Broadcast(*net)),
            ],
            IpNet::V6(v6) if v6.prefix_len() <= 126 => {
                vec![(span.first, Exclusion::SubnetRouter(*net))]
            }
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Element::Cidr(net) => write!(f, "{net}"),
            Element::Range(a, b) if a == b => write!(f, "{a}"),
            Element::Range(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

impl FromStr for Element {
    type Err = PoolError;

    /// Parses `10.0.0.0/24`, `10.0.0.5`, `10.0.0.10-10.0.0.20` (spaces around
    /// the `-` allowed) and their IPv6 forms. A CIDR with host bits set means
    /// its network (`10.210.38.100/26` is `10.210.38.64/26`).
    fn from_str(s: &str) -> Result<Self, PoolError> {
        let bad = |why: &str| PoolError::BadSpec {
            spec: s.to_string(),
            why: why.to_string(),
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(bad("empty"));
        }
        if let Some((a, b)) = t.split_once('-') {
            let first: IpAddr = a
                .trim()
                .parse()
                .map_err(|_| bad("the first address of the range is not an IP address"))?;
            let last: IpAddr = b
                .trim()
                .parse()
                .map_err(|_| bad("the last address of the range is not an IP address"))?;
            if Family::of(first) != Family::of(last) {
                return Err(bad("the two ends of the range are of different families"));
            }
            if to_int(first).1 > to_int(last).1 {
                return Err(bad("the first address of the range is after the last"));
            }
            return Ok(Element::Range(first, last));
        }
        if t.contains('/') {
            let net: IpNet = t
                .parse()
                .map_err(|_| bad("not a CIDR (address/prefix length)"))?;
            return Ok(Element::Cidr(net.trunc()));
        }
        let ip: IpAddr = t
            .parse()
            .map_err(|_| bad("not an IP address, CIDR or FIRST-LAST range"))?;
        Ok(Element::Range(ip, ip))
    }
}

/// Why an address inside a pool's ranges is never handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exclusion {
    /// Reserved by configuration.
    Reserved,
    /// The network address of an IPv4 CIDR.
    Network(IpNet),
    /// The broadcast address of an IPv4 CIDR.
    Broadcast(IpNet),
    /// The subnet-router anycast address of an IPv6 CIDR.
    SubnetRouter(IpNet),
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::Reserved => f.write_str("it is reserved"),
            Exclusion::Network(net) => write!(f, "it is the network address of {net}"),
            Exclusion::Broadcast(net) => write!(f, "it is the broadcast address of {net}"),
            Exclusion::SubnetRouter(net) => {
                write!(f, "it is the subnet-router anycast address of {net}")
            }
        }
    }
}

/// A pool as configured, before it is checked against the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolDef {
    /// Name of the pool.
    pub name: String,
    /// Its CIDRs and ranges.
    pub elements: Vec<Element>,
    /// Addresses never handed out.
    pub reserved: Vec<Element>,
    /// Only serve requests for a specific address.
    pub explicit_only: bool,
    /// Also hand out edge addresses of CIDRs.
    pub all_addresses: bool,
}

/// Parses `NAME=SPEC[,SPEC...]` into the name and its elements.
pub fn parse_assignment(value: &str) -> Result<(String, Vec<Element>), PoolError> {
    let (name, specs) = value
        .split_once('=')
        .ok_or_else(|| PoolError::BadAssignment {
            value: value.to_string(),
        })?;
    let name = name.trim();
    if !vipam::names::is_pool_name(name) {
        return Err(PoolError::BadName {
            name: name.to_string(),
        });
    }
    let elements = specs
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<Element>, _>>()?;
    Ok((name.to_string(), elements))
}

impl FromStr for PoolDef {
    type Err = PoolError;

    /// Parses a `--pool` value, `NAME=SPEC[,SPEC...]`.
    fn from_str(value: &str) -> Result<Self, PoolError> {
        let (name, elements) = parse_assignment(value)?;
        Ok(PoolDef {
            name,
            elements,
            reserved: Vec::new(),
            explicit_only: false,
            all_addresses: false,
        })
    }
}

/// A checked pool: its spans per family, and the spans it may hand out.
#[derive(Clone, Debug)]
pub struct Pool {
    name: String,
    elements: Vec<Element>,
    reserved: Vec<Element>,
    explicit_only: bool,
    all_addresses: bool,
    /// Every address of the pool, merged, per family.
    covered: [Vec<Span>; 2],
    /// The addresses it hands out (covered minus edges and reserved), per family.
    usable: [Vec<Span>; 2],
    /// Edge addresses skipped by default, with the reason.
    edges: Vec<(Family, u128, Exclusion)>,
    reserved_spans: [Vec<Span>; 2],
}

impl Pool {
    /// Checks a definition on its own (not against other pools).
    pub fn new(def: PoolDef) -> Result<Pool, PoolError> {
        let PoolDef {
            name,
            elements,
            reserved,
            explicit_only,
            all_addresses,
        } = def;
        let mut covered: [Vec<Span>; 2] = Default::default();
        let mut base: [Vec<Span>; 2] = Default::default();
        let mut edges = Vec::new();
        for element in &elements {
            let family = element.family();
            let span = element.span();
            if span.first == 0 {
                return Err(PoolError::Unspecified {
                    name: name.clone(),
                    spec: element.to_string(),
                    addr: from_int(family, 0),
                });
            }
            refuse_special(&format!("pool {name:?}"), element)?;
            covered[family.index()].push(span);
            let element_edges = if all_addresses {
                Vec::new()
            } else {
                element.edges()
            };
            let holes = intervals::merge(
                element_edges
                    .iter()
                    .map(|(x, _)| Span::single(*x))
                    .collect(),
            );
            base[family.index()].extend(intervals::subtract(&[span], &holes));
            edges.extend(element_edges.into_iter().map(|(x, why)| (family, x, why)));
        }
        let covered = covered.map(intervals::merge);
        let base = base.map(intervals::merge);
        let mut reserved_spans: [Vec<Span>; 2] = Default::default();
        for r in &reserved {
            let family = r.family();
            let span = r.span();
            if !covered[family.index()]
                .iter()
                .any(|c| c.first <= span.first && span.last <= c.last)
            {
                return Err(PoolError::ReservedOutside {
                    name,
                    spec: r.to_string(),
                });
            }
            reserved_spans[family.index()].push(span);
        }
        let reserved_spans = reserved_spans.map(intervals::merge);
        let usable = [0, 1].map(|i| intervals::subtract(&base[i], &reserved_spans[i]));
        // A pool drained by its reservations still starts (and answers
        // exhausted); only one that never had a usable address is refused.
        if usable.iter().all(Vec::is_empty) && reserved.is_empty() {
            return Err(PoolError::Empty { name });
        }
        Ok(Pool {
            name,
            elements,
            reserved,
            explicit_only,
            all_addresses,
            covered,
            usable,
            edges,
            reserved_spans,
        })
    }

    /// Name of the pool.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configured CIDRs and ranges.
    pub fn elements(&self) -> &[Element] {
        &self.elements
    }

    /// The configured reserved addresses and ranges.
    pub fn reserved(&self) -> &[Element] {
        &self.reserved
    }

    /// Whether the pool only serves requests for a specific address.
    pub fn explicit_only(&self) -> bool {
        self.explicit_only
    }

    /// Whether edge addresses of CIDRs are handed out too.
    pub fn all_addresses(&self) -> bool {
        self.all_addresses
    }

    /// Every address of the pool, merged, for a family.
    pub fn covered(&self, family: Family) -> &[Span] {
        &self.covered[family.index()]
    }

    /// The addresses the pool hands out, for a family, lowest first.
    pub fn usable(&self, family: Family) -> &[Span] {
        &self.usable[family.index()]
    }

    /// Whether the pool has addresses of a family it can hand out.
    pub fn has_family(&self, family: Family) -> bool {
        !self.usable(family).is_empty()
    }

    /// The family used when a request names none: IPv4 when the pool has
    /// IPv4 addresses, else IPv6.
    pub fn default_family(&self) -> Family {
        if self.has_family(Family::V4) {
            Family::V4
        } else if self.has_family(Family::V6) || self.covered(Family::V4).is_empty() {
            Family::V6
        } else {
            // Every address is reserved: the pool is exhausted in the family
            // it would serve.
            Family::V4
        }
    }

    /// Whether `ip` lies in the pool's ranges (usable or not).
    pub fn covers(&self, ip: IpAddr) -> bool {
        let (family, x) = to_int(ip);
        self.covered(family).iter().any(|s| s.contains(x))
    }

    /// Whether the pool may hand out `ip`.
    pub fn is_usable(&self, ip: IpAddr) -> bool {
        let (family, x) = to_int(ip);
        self.usable(family).iter().any(|s| s.contains(x))
    }

    /// Why the pool never hands out `ip`, when it covers it but may not use it.
    pub fn exclusion(&self, ip: IpAddr) -> Option<Exclusion> {
        if !self.covers(ip) || self.is_usable(ip) {
            return None;
        }
        let (family, x) = to_int(ip);
        if self.reserved_spans[family.index()]
            .iter()
            .any(|s| s.contains(x))
        {
            return Some(Exclusion::Reserved);
        }
        self.edges
            .iter()
            .find(|(f, at, _)| *f == family && *at == x)
            .map(|(_, _, why)| why.clone())
    }

    /// Number of addresses the pool hands out, both families.
    pub fn size(&self) -> u128 {
        self.usable
            .iter()
            .flatten()
            .fold(0u128, |acc, s| acc.saturating_add(s.count()))
    }
}

/// The checked set of pools: names unique, no two overlapping, one default.
#[derive(Clone, Debug)]
pub struct Pools {
    pools: Vec<Pool>,
    default: usize,
    /// Spans covered by no pool, per family.
    outside: [Vec<Span>; 2],
}

impl Pools {
    /// Checks the definitions against each other. `default` names the default
    /// pool; without it the first definition is the default.
    pub fn new(defs: Vec<PoolDef>, default: Option<&str>) -> Result<Pools, PoolError> {
        if defs.is_empty() {
            return Err(PoolError::NoPools);
        }
        let mut pools: Vec<Pool> = Vec::with_capacity(defs.len());
        for def in defs {
            if pools.iter().any(|p| p.name == def.name) {
                return Err(PoolError::Duplicate { name: def.name });
            }
            let pool = Pool::new(def)?;
            for other in &pools {
                for family in Family::ALL {
                    for a in pool.covered(family) {
                        if let Some(b) = other.covered(family).iter().find(|b| a.overlaps(b)) {
                            return Err(PoolError::Overlap {
                                a: other.name.clone(),
                                b: pool.name.clone(),
                                addr: from_int(family, a.first.max(b.first)),
                            });
                        }
                    }
                }
            }
            pools.push(pool);
        }
        let default =
            match default {
                None => 0,
                Some(name) => pools.iter().position(|p| p.name == name).ok_or_else(|| {
                    PoolError::UnknownPool {
                        setting: "--default-pool",
                        name: name.to_string(),
                    }
                })?,
            };
        let outside = Family::ALL.map(|family| {
            let all: Vec<Span> = pools
                .iter()
                .flat_map(|p| p.covered(family).iter().copied())
                .collect();
            intervals::complement(&intervals::merge(all), family.max())
        });
        Ok(Pools {
            pools,
            default,
            outside,
        })
    }

    /// Every pool, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Pool> {
        self.pools.iter()
    }

    /// Number of pools.
    pub fn len(&self) -> usize {
        self.pools.len()
    }

    /// Whether there are no pools (never true for a checked set).
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// The pool at an index of [`Pools::iter`].
    pub fn at(&self, index: usize) -> &Pool {
        &self.pools[index]
    }

    /// The default pool.
    pub fn default_pool(&self) -> &Pool {
        &self.pools[self.default]
    }

    /// Index of the default pool.
    pub fn default_index(&self) -> usize {
        self.default
    }

    /// The pool of that name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }

    /// The pool whose ranges hold `ip`, if any.
    pub fn containing(&self, ip: IpAddr) -> Option<usize> {
        self.pools.iter().position(|p| p.covers(ip))
    }

    /// Spans of a family that no pool covers.
    pub fn outside(&self, family: Family) -> &[Span] {
        &self.outside[family.index()]
    }
}

/// Refuses `element` when it shares an address with a special-purpose
/// block, naming `setting` (the flag and pool) and the block.
pub fn refuse_special(setting: &str, element: &Element) -> Result<(), PoolError> {
    match special::overlapping(element.family(), element.span()) {
        Some(block) => Err(PoolError::Special {
            setting: setting.to_string(),
            spec: element.to_string(),
            block,
        }),
        None => Ok(()),
    }
}

/// Applies per-pool settings given by name to the definitions.
pub fn apply_settings(
    defs: &mut [PoolDef],
    reserved: Vec<(String, Vec<Element>)>,
    explicit_only: &[String],
    all_addresses: &[String],
) -> Result<(), PoolError> {
    for (name, elements) in reserved {
        let def = defs
            .iter_mut()
            .find(|d| d.name == name)
            .ok_or(PoolError::UnknownPool {
                setting: "--reserved",
                name,
            })?;
        for element in &elements {
            refuse_special(&format!("--reserved {:?}", def.name), element)?;
        }
        def.reserved.extend(elements);
    }
    for (setting, names) in [
        ("--explicit-only", explicit_only),
        ("--all-addresses", all_addresses),
    ] {
        for name in names {
            let def = defs.iter_mut().find(|d| &d.name == name).ok_or_else(|| {
                PoolError::UnknownPool {
                    setting,
                    name: name.clone(),
                }
            })?;
            match setting {
                "--explicit-only" => def.explicit_only = true,
                _ => def.all_addresses = true,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{addresses::intervals::IntervalSet, fixtures::ip};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn mk_pool(value: &str) -> Pool {
        Pool::new(value.parse().expect("test pool spec")).expect("test pool")
    }

    fn usable_addrs(pool: &Pool, family: Family) -> Vec<IpAddr> {
        pool.usable(family)
            .iter()
            .flat_map(|s| s.first..=s.last)
            .map(|x| from_int(family, x))
            .collect()
    }

    #[test]
    fn ipv4_cidr_skips_network_and_broadcast_by_default() {
        let pool = mk_pool("a=10.0.0.0/29");
        let addrs = usable_addrs(&pool, Family::V4);
        assert_eq!(addrs.first(), Some(&ip("10.0.0.1")));
        assert_eq!(addrs.last(), Some(&ip("10.0.0.6")));
        assert_eq!(pool.size(), 6);
        assert_eq!(
            pool.exclusion(ip("10.0.0.0")),
            Some(Exclusion::Network("10.0.0.0/29".parse().expect("net")))
        );
        assert_eq!(
            pool.exclusion(ip("10.0.0.7")),
            Some(Exclusion::Broadcast("10.0.0.0/29".parse().expect("net")))
        );
    }

    #[test]
    fn all_addresses_uses_network_and_broadcast() {
        let mut def: PoolDef = "a=10.0.0.0/29".parse().expect("spec");
        def.all_addresses = true;
        let pool = Pool::new(def).expect("pool");
        assert_eq!(pool.size(), 8);
        assert_eq!(pool.exclusion(ip("10.0.0.0")), None);
    }

    #[test]
    fn slash_31_and_32_use_every_address() {
        assert_eq!(
            usable_addrs(&mk_pool("a=10.0.0.4/31"), Family::V4),
            vec![ip("10.0.0.4"), ip("10.0.0.5")]
        );
        assert_eq!(
            usable_addrs(&mk_pool("a=10.0.0.9/32"), Family::V4),
            vec![ip("10.0.0.9")]
        );
    }

    #[test]
    fn ipv6_skips_subnet_router_but_not_on_127_and_128() {
        let pool = mk_pool("a=fd00::/126");
        assert_eq!(
            usable_addrs(&pool, Family::V6),
            vec![ip("fd00::1"), ip("fd00::2"), ip("fd00::3")]
        );
        assert!(matches!(
            pool.exclusion(ip("fd00::")),
            Some(Exclusion::SubnetRouter(_))
        ));
        assert_eq!(
            usable_addrs(&mk_pool("a=fd00::/127"), Family::V6),
            vec![ip("fd00::"), ip("fd00::1")]
        );
        assert_eq!(
            usable_addrs(&mk_pool("a=fd00::5/128"), Family::V6),
            vec![ip("fd00::5")]
        );
    }

    #[test]
    fn ranges_are_used_whole_and_accept_spaces_around_the_dash() {
        let pool = mk_pool("a=10.0.0.0 - 10.0.0.3");
        assert_eq!(pool.size(), 4);
        assert!(pool.is_usable(ip("10.0.0.0")));
    }

    #[test]
    fn cidr_with_host_bits_means_its_network() {
        let pool = mk_pool("default=10.210.38.100/26");
        assert_eq!(
            pool.elements(),
            &[Element::Cidr("10.210.38.64/26".parse().expect("net"))]
        );
        assert_eq!(
            usable_addrs(&pool, Family::V4).first(),
            Some(&ip("10.210.38.65"))
        );
    }

    #[test]
    fn overlapping_specs_in_one_pool_are_merged() {
        let pool = mk_pool("a=10.0.0.0/30,10.0.0.2-10.0.0.5");
        assert_eq!(
            pool.covered(Family::V4),
            &[Span::new(
                to_int(ip("10.0.0.0")).1,
                to_int(ip("10.0.0.5")).1
            )]
        );
        // The range takes 10.0.0.3 whole even though it is the /30's broadcast.
        assert!(pool.is_usable(ip("10.0.0.3")));
        assert!(!pool.is_usable(ip("10.0.0.0")));
    }

    #[test]
    fn a_pool_may_hold_both_families() {
        let pool = mk_pool("a=fd00::/120,10.0.0.0/24");
        assert_eq!(pool.default_family(), Family::V4);
        assert!(pool.has_family(Family::V6));
        assert_eq!(mk_pool("b=fd00::/120").default_family(), Family::V6);
    }

    #[test]
    fn reserved_addresses_are_not_usable() {
        let mut def: PoolDef = "a=10.0.0.0/29".parse().expect("spec");
        def.reserved = vec![
            "10.0.0.1".parse().expect("el"),
            "10.0.0.3-10.0.0.4".parse().expect("el"),
        ];
        let pool = Pool::new(def).expect("pool");
        assert_eq!(
            usable_addrs(&pool, Family::V4),
            vec![ip("10.0.0.2"), ip("10.0.0.5"), ip("10.0.0.6")]
        );
        assert_eq!(pool.exclusion(ip("10.0.0.4")), Some(Exclusion::Reserved));
    }

    #[test]
    fn reserved_outside_the_pool_is_refused() {
        let mut def: PoolDef = "a=10.0.0.0/29".parse().expect("spec");
        def.reserved = vec!["10.0.1.1".parse().expect("el")];
        assert_eq!(
            Pool::new(def).err(),
            Some(PoolError::ReservedOutside {
                name: "a".into(),
                spec: "10.0.1.1".into()
            })
        );
    }

    #[test]
    fn malformed_specs_are_refused_naming_the_value() {
        for bad in [
            "a=10.0.0.0/33",
            "a=10.0.0.300",
            "a=10.0.0.9-10.0.0.1",
            "a=10.0.0.1-fd00::1",
            "a=",
            "a=hello",
            "nopool",
        ] {
            let err = bad.parse::<PoolDef>().expect_err(bad);
            let msg = err.to_string();
            let value = bad.split_once('=').map_or(bad, |(_, v)| v);
            assert!(msg.contains(value), "{bad}: {msg}");
        }
        assert!(matches!(
            "Bad_Name=10.0.0.0/24".parse::<PoolDef>(),
            Err(PoolError::BadName { .. })
        ));
    }

    #[test]
    fn pools_holding_the_unspecified_address_are_refused() {
        for spec in ["a=0.0.0.0/0", "a=0.0.0.0", "a=::/0", "a=::-::5"] {
            let def: PoolDef = spec.parse().expect(spec);
            assert!(
                matches!(Pool::new(def), Err(PoolError::Unspecified { .. })),
                "{spec}"
            );
        }
    }

    #[test]
    fn pool_and_reserved_specs_overlapping_a_special_purpose_block_are_refused_naming_it() {
        for (spec, block) in [
            ("a=127.0.0.0/24", "127.0.0.0/8"),
            ("a=169.254.1.1", "169.254.0.0/16"),
            ("a=223.255.255.0-224.0.0.3", "224.0.0.0/4"),
            ("a=fe80::/64", "fe80::/10"),
            ("a=::ffff:10.0.0.0/120", "::ffff:0.0.0.0/96"),
            ("a=::1", "::1/128"),
        ] {
            let err = Pool::new(spec.parse().expect(spec)).expect_err(spec);
            let msg = err.to_string();
            assert!(matches!(err, PoolError::Special { .. }), "{msg}");
            assert!(msg.contains(block) && msg.contains("pool \"a\""), "{msg}");
        }
        let mut defs: Vec<PoolDef> = vec!["a=10.0.0.0/24".parse().expect("a")];
        let reserved = vec![("a".to_string(), vec!["127.0.0.1".parse().expect("el")])];
        let err = apply_settings(&mut defs, reserved, &[], &[]).expect_err("reserved");
        assert!(err.to_string().contains("--reserved"), "{err}");
        assert!(err.to_string().contains("127.0.0.0/8"), "{err}");
    }

    #[test]
    fn shared_documentation_and_unique_local_pools_are_accepted() {
        for spec in [
            "a=100.64.0.0/10",
            "a=192.0.2.0/24",
            "a=fd00::/64",
            "a=2001:db8::/48",
        ] {
            assert!(Pool::new(spec.parse().expect(spec)).is_ok(), "{spec}");
        }
    }

    #[test]
    fn a_pool_whose_every_address_is_reserved_starts_with_size_zero() {
        let mut def: PoolDef = "a=10.0.0.0/29".parse().expect("spec");
        def.reserved = vec!["10.0.0.0/29".parse().expect("el")];
        let pool = Pool::new(def).expect("drained pool");
        assert_eq!(pool.size(), 0);
        assert_eq!(pool.default_family(), Family::V4);
    }

    #[test]
    fn overlapping_pools_are_refused() {
        let defs = vec![
            "a=10.0.0.0/24".parse().expect("a"),
            "b=10.0.0.128-10.0.1.5".parse().expect("b"),
        ];
        let err = Pools::new(defs, None).expect_err("overlap");
        assert_eq!(
            err,
            PoolError::Overlap {
                a: "a".into(),
                b: "b".into(),
                addr: ip("10.0.0.128")
            }
        );
    }

    #[test]
    fn default_pool_is_the_first_unless_named() {
        let defs: Vec<PoolDef> = vec![
            "a=10.0.0.0/24".parse().expect("a"),
            "b=10.0.1.0/24".parse().expect("b"),
        ];
        assert_eq!(
            Pools::new(defs.clone(), None)
                .expect("pools")
                .default_pool()
                .name(),
            "a"
        );
        assert_eq!(
            Pools::new(defs.clone(), Some("b"))
                .expect("pools")
                .default_pool()
                .name(),
            "b"
        );
        assert!(matches!(
            Pools::new(defs, Some("c")),
            Err(PoolError::UnknownPool { .. })
        ));
    }

    #[test]
    fn outside_is_the_complement_of_every_pool() {
        let defs = vec![
            "a=10.0.0.0/24".parse().expect("a"),
            "b=fd00::/64".parse().expect("b"),
        ];
        let pools = Pools::new(defs, None).expect("pools");
        let (_, x) = to_int(ip("10.0.0.0"));
        assert!(pools.outside(Family::V4).iter().any(|s| s.contains(x - 1)));
        assert!(!pools.outside(Family::V4).iter().any(|s| s.contains(x)));
        assert_eq!(pools.containing(ip("fd00::1234")), Some(1));
        assert_eq!(pools.containing(ip("10.0.1.0")), None);
    }

    #[test]
    fn huge_pools_have_exact_sizes_without_enumeration() {
        assert_eq!(mk_pool("a=10.0.0.0/8").size(), (1 << 24) - 2);
        assert_eq!(mk_pool("a=fd00::/64").size(), (1u128 << 64) - 1);
        assert_eq!(mk_pool("a=fd00::/8").size(), (1u128 << 120) - 1);
    }

    fn arb_pool() -> impl Strategy<Value = (Pool, Vec<u128>)> {
        // A /24 split into up to three elements, some reserved addresses, all
        // within 10.0.0.0/24 so a brute-force model stays small.
        (
            prop::collection::vec((0u8..=255, 24u8..=32), 1..4),
            prop::collection::vec(0u8..=255, 0..6),
            any::<bool>(),
        )
            .prop_filter_map("pool without usable addresses", |(nets, reserved, all)| {
                let elements: Vec<Element> = nets
                    .iter()
                    .map(|(host, len)| {
                        Some(Element::Cidr(
                            IpNet::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, *host)), *len)
                                .ok()?
                                .trunc(),
                        ))
                    })
                    .collect::<Option<_>>()?;
                let reserved: Vec<Element> = reserved
                    .iter()
                    .map(|h| Ipv4Addr::new(10, 0, 0, *h))
                    .map(|a| Element::Range(a.into(), a.into()))
                    .collect();
                let def = PoolDef {
                    name: "p".into(),
                    elements: elements.clone(),
                    reserved: reserved.clone(),
                    explicit_only: false,
                    all_addresses: all,
                };
                let pool = Pool::new(def).ok()?;
                // Brute force: which addresses may be handed out.
                let mut model = Vec::new();
                for h in 0..=255u8 {
                    let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, h));
                    let x = to_int(a).1;
                    let in_element = elements.iter().any(|e| {
                        let s = e.span();
                        s.contains(x) && (all || !e.edges().iter().any(|(at, _)| *at == x))
                    });
                    let is_reserved = reserved.iter().any(|r| r.span().contains(x));
                    if in_element && !is_reserved {
                        model.push(x);
                    }
                }
                Some((pool, model))
            })
    }

    proptest! {
        #[test]
        fn usable_spans_match_a_brute_force_model((pool, model) in arb_pool()) {
            let got: Vec<u128> = pool.usable(Family::V4).iter().flat_map(|s| s.first..=s.last).collect();
            prop_assert_eq!(&got, &model);
            prop_assert_eq!(pool.size(), model.len() as u128);
        }

        #[test]
        fn allocating_lowest_first_never_repeats_and_never_returns_reserved(
            (pool, model) in arb_pool(),
            releases in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let spans = pool.usable(Family::V4);
            let mut taken = IntervalSet::new();
            let mut handed = Vec::new();
            // Fill the pool: each address is the lowest free one and none repeats.
            while let Some(x) = taken.first_free_in(spans) {
                let expected = model.iter().copied().find(|m| !taken.contains(*m));
                prop_assert_eq!(Some(x), expected);
                prop_assert!(taken.insert(x), "{} handed out twice", x);
                prop_assert!(pool.is_usable(from_int(Family::V4, x)));
                handed.push(x);
            }
            prop_assert_eq!(handed.len(), model.len());
            // Release some; the next allocation reuses the lowest released one.
            let mut released: Vec<u128> = releases.iter().map(|i| handed[i.index(handed.len())]).collect();
            released.sort();
            released.dedup();
            for x in &released {
                prop_assert!(taken.remove(*x));
            }
            for x in &released {
                prop_assert_eq!(taken.first_free_in(spans), Some(*x));
                taken.insert(*x);
            }
            prop_assert_eq!(taken.first_free_in(spans), None);
        }
    }
}
