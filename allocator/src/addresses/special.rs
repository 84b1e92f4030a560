//! The special-purpose address blocks the allocator never hands out, each
//! with the reason, in one table; and the lookups over it (which block holds
//! an address, which block a pool spec overlaps, the IPv4 address an
//! IPv4-mapped spelling stands for). Private (RFC 1918), shared (100.64/10),
//! unique-local (fc00::/7) and documentation ranges are not in the table:
//! operators and examples use them. No I/O.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    addresses::family::{Family, to_int},
    addresses::intervals::Span,
};

/// A block of addresses that is never allocated, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Block {
    /// The block.
    pub net: IpNet,
    /// What the block is.
    pub name: &'static str,
    /// Why an address in it must not be a load balancer's address.
    pub why: &'static str,
}

impl Block {
    /// Every address of the block, as integers of its family.
    pub fn span(&self) -> Span {
        Span::new(to_int(self.net.network()).1, to_int(self.net.broadcast()).1)
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}: {})", self.net, self.name, self.why)
    }
}

/// What a block is, and why none of its addresses may be a load balancer's.
type Reason = (&'static str, &'static str);

const THIS_NETWORK: Reason = (
    "\"this network\"",
    "a source address only, never a destination",
);
const LOOPBACK: Reason = ("loopback", "it never leaves the host that uses it");
const LINK_LOCAL: Reason = (
    "link-local",
    "hosts assign it to themselves and routers never forward it",
);
const BROADCAST: Reason = ("limited broadcast", "it reaches every host on the link");
const MULTICAST: Reason = (
    "multicast",
    "it names a group, not a host (VRRP itself uses 224.0.0.18 and ff02::12)",
);
const FUTURE: Reason = ("reserved for future use", "hosts and routers drop it");
const UNSPECIFIED: Reason = ("unspecified", "it means \"no address\"");
const MAPPED: Reason = ("IPv4-mapped", "it is another spelling of an IPv4 address");
const COMPATIBLE: Reason = ("IPv4-compatible", "deprecated (RFC 4291) and never routed");

const fn v4(octets: [u8; 4], len: u8, (name, why): Reason) -> Block {
    let [a, b, c, d] = octets;
    Block {
        net: IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)),
        name,
        why,
    }
}

const fn v6(segments: [u16; 8], len: u8, (name, why): Reason) -> Block {
    let [a, b, c, d, e, f, g, h] = segments;
    Block {
        net: IpNet::V6(Ipv6Net::new_assert(
            Ipv6Addr::new(a, b, c, d, e, f, g, h),
            len,
        )),
        name,
        why,
    }
}

/// The refused blocks. A block nested in another comes first, so a lookup
/// names the most specific one.
pub const BLOCKS: [Block; 12] = [
    v4([0, 0, 0, 0], 8, THIS_NETWORK),
    v4([127, 0, 0, 0], 8, LOOPBACK),
    v4([169, 254, 0, 0], 16, LINK_LOCAL),
    v4([255, 255, 255, 255], 32, BROADCAST),
    v4([224, 0, 0, 0], 4, MULTICAST),
    v4([240, 0, 0, 0], 4, FUTURE),
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128, UNSPECIFIED),
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128, LOOPBACK),
    v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, MAPPED),
    v6([0, 0, 0, 0, 0, 0, 0, 0], 96, COMPATIBLE),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, LINK_LOCAL),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, MULTICAST),
];

/// The refused block holding `ip`, if any.
pub fn containing(ip: IpAddr) -> Option<&'static Block> {
    BLOCKS.iter().find(|b| b.net.contains(&ip))
}

/// The first refused block of `family` that shares an address with `span`.
pub fn overlapping(family: Family, span: Span) -> Option<&'static Block> {
    BLOCKS
        .iter()
        .find(|b| Family::of(b.net.network()) == family && b.span().overlaps(&span))
}

/// The IPv4 address that an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
/// spells.
pub fn mapped_ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        IpAddr::V4(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::ip;

    fn block_name(s: &str) -> Option<String> {
        containing(ip(s)).map(|b| b.net.to_string())
    }

    /// Each block with its first and last address, and the addresses just
    /// outside it (which may lie in a neighbouring block, never in this one).
    /// A block, its first and last address, and the addresses just before
    /// and after it.
    type Edges = (
        &'static str,
        &'static str,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    );

    const EDGES: [Edges; 12] = [
        (
            "0.0.0.0/8",
            "0.0.0.0",
            "0.255.255.255",
            None,
            Some("1.0.0.0"),
        ),
        (
            "127.0.0.0/8",
            "127.0.0.0",
            "127.255.255.255",
            Some("126.255.255.255"),
            Some("128.0.0.0"),
        ),
        (
            "169.254.0.0/16",
            "169.254.0.0",
            "169.254.255.255",
            Some("169.253.255.255"),
            Some("169.255.0.0"),
        ),
        (
            "255.255.255.255/32",
            "255.255.255.255",
            "255.255.255.255",
            Some("255.255.255.254"),
            None,
        ),
        (
            "224.0.0.0/4",
            "224.0.0.0",
            "239.255.255.255",
            Some("223.255.255.255"),
            Some("240.0.0.0"),
        ),
        (
            "240.0.0.0/4",
            "240.0.0.0",
            "255.255.255.254",
            Some("239.255.255.255"),
            Some("255.255.255.255"),
        ),
        ("::/128", "::", "::", None, Some("::1")),
        ("::1/128", "::1", "::1", Some("::"), Some("::2")),
        (
            "::ffff:0.0.0.0/96",
            "::ffff:0.0.0.0",
            "::ffff:255.255.255.255",
            Some("::fffe:ffff:ffff"),
            Some("::1:0:0:0"),
        ),
        ("::/96", "::2", "::ffff:ffff", Some("::1"), Some("::1:0:0")),
        (
            "fe80::/10",
            "fe80::",
            "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            Some("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            Some("fec0::"),
        ),
        (
            "ff00::/8",
            "ff00::",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            Some("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            None,
        ),
    ];

    #[test]
    fn every_block_holds_its_first_and_last_address_and_nothing_beyond() {
        for (net, first, last, before, after) in EDGES {
            assert_eq!(block_name(first).as_deref(), Some(net), "{first}");
            assert_eq!(block_name(last).as_deref(), Some(net), "{last}");
            for outside in [before, after].into_iter().flatten() {
                assert_ne!(block_name(outside).as_deref(), Some(net), "{outside}");
            }
        }
        assert_eq!(EDGES.len(), BLOCKS.len());
    }

    #[test]
    fn nested_blocks_are_named_by_the_most_specific_one() {
        assert_eq!(block_name("::").as_deref(), Some("::/128"));
        assert_eq!(block_name("::1").as_deref(), Some("::1/128"));
        assert_eq!(block_name("::192.0.2.5").as_deref(), Some("::/96"));
        assert_eq!(
            block_name("255.255.255.255").as_deref(),
            Some("255.255.255.255/32")
        );
    }

    #[test]
    fn private_shared_unique_local_and_documentation_ranges_stay_usable() {
        for usable in [
            "10.0.0.1",
            "172.16.0.1",
            "192.168.255.254",
            "100.64.0.1",
            "100.127.255.254",
            "192.0.2.5",
            "198.51.100.7",
            "203.0.113.9",
            "1.0.0.0",
            "223.255.255.255",
            "fc00::1",
            "fd12:3456::1",
            "2001:db8::5",
            "::1:0:0:0",
            "fec0::1",
            "feff::1",
        ] {
            assert_eq!(block_name(usable), None, "{usable}");
        }
    }

    #[test]
    fn every_block_says_what_it_is_and_why() {
        for block in &BLOCKS {
            let text = block.to_string();
            assert!(text.starts_with(&block.net.to_string()), "{text}");
            assert!(!block.name.is_empty() && !block.why.is_empty(), "{text}");
        }
    }

    #[test]
    fn a_span_touching_a_block_overlaps_it_and_one_beside_it_does_not() {
        let x = |s: &str| to_int(ip(s)).1;
        let touching = Span::new(x("126.0.0.0"), x("127.0.0.0"));
        assert_eq!(
            overlapping(Family::V4, touching).map(|b| b.net.to_string()),
            Some("127.0.0.0/8".to_string())
        );
        let beside = Span::new(x("126.0.0.0"), x("126.255.255.255"));
        assert_eq!(overlapping(Family::V4, beside), None);
        let everything = Span::new(1, Family::V6.max());
        assert!(overlapping(Family::V6, everything).is_some());
        let ula = Span::new(x("fd00::"), x("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
        assert_eq!(overlapping(Family::V6, ula), None);
    }

    #[test]
    fn an_ipv4_mapped_address_spells_its_ipv4_address() {
        assert_eq!(
            mapped_ipv4(ip("::ffff:192.0.2.5")),
            Some(Ipv4Addr::new(192, 0, 2, 5))
        );
        assert_eq!(mapped_ipv4(ip("192.0.2.5")), None);
        assert_eq!(mapped_ipv4(ip("::192.0.2.5")), None);
        assert_eq!(mapped_ipv4(ip("2001:db8::5")), None);
    }
}
