//! The keepalived ConfigMap, rendered as a whole from the managed Services,
//! and the ConfigMap left by the Go keepalived-cloud-provider, read for
//! adoption. Pure functions.
//!
//! Format, as kube-keepalived-vip reads it: key = the IPv4 VIP; value =
//! `<namespace>/<service>` or `<namespace>/<service>:<NAT|DR|PROXY>`.
//! ConfigMap keys cannot hold `:`, so IPv6 VIPs are left out and reported.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use serde::Deserialize;

use crate::desired::{ForwardMethod, Subject};

/// The annotation in which keepalived-cloud-provider kept its state.
pub const LEGACY_ANNOTATION: &str = "k8s.co/cloud-provider-config";
/// The most bytes a Kubernetes object may take.
pub const MAX_OBJECT_BYTES: usize = 1_048_576;

/// A Service's entry in the ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Forward method; `None` writes no suffix.
    pub forward_method: Option<ForwardMethod>,
}

impl Entry {
    /// The entry of a Service.
    pub fn of(subject: &Subject, forward_method: Option<ForwardMethod>) -> Self {
        Entry {
            namespace: subject.namespace.clone(),
            name: subject.name.clone(),
            forward_method,
        }
    }

    /// The ConfigMap value of the entry.
    pub fn value(&self) -> String {
        match self.forward_method {
            None => format!("{}/{}", self.namespace, self.name),
            Some(m) => format!("{}/{}:{m}", self.namespace, self.name),
        }
    }
}

/// The rendered ConfigMap data and what could not be written into it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    /// The data: IPv4 address → entry value.
    pub data: BTreeMap<String, String>,
    /// IPv6 addresses, which a ConfigMap key cannot hold, with their Service.
    pub ipv6: Vec<(IpAddr, String)>,
}

/// Renders the ConfigMap data from every managed Service's address.
pub fn render(entries: &BTreeMap<IpAddr, Entry>) -> Rendered {
    let mut out = Rendered::default();
    for (ip, entry) in entries {
        match ip {
            IpAddr::V4(v4) => {
                out.data.insert(v4.to_string(), entry.value());
            }
            IpAddr::V6(_) => out
                .ipv6
                .push((*ip, format!("{}/{}", entry.namespace, entry.name))),
        }
    }
    out
}

/// Bytes one entry adds to the ConfigMap as JSON: `"key":"value",`. Keys
/// (addresses) and values (Kubernetes names and a method) need no escapes.
pub fn entry_bytes(key: &str, value: &str) -> usize {
    key.len() + value.len() + 6
}

/// Bytes the entries add to the ConfigMap as JSON.
pub fn data_bytes(data: &BTreeMap<String, String>) -> usize {
    data.iter().map(|(k, v)| entry_bytes(k, v)).sum()
}

/// The entries written when not all fit, and those left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fitted {
    /// The data to write.
    pub data: BTreeMap<String, String>,
    /// Addresses left out, with their entry, by address.
    pub left_out: Vec<(String, String)>,
}

fn by_address(key: &str) -> (Option<Ipv4Addr>, &str) {
    (key.parse().ok(), key)
}

/// The entries of `rendered` that fit in `budget` bytes (as counted by
/// [`entry_bytes`]). Addresses already in `current` come first, so no entry
/// that kube-keepalived-vip announces is dropped to make room for a new one;
/// then the others, lowest address first; an entry that does not fit is
/// skipped. Entries of `current` that are not rendered (removed Services)
/// are never kept, so removals always go through. Fitting again with the
/// chosen data as `current` chooses the same data.
pub fn fit(
    rendered: &BTreeMap<String, String>,
    current: &BTreeMap<String, String>,
    budget: usize,
) -> Fitted {
    let mut order: Vec<(&String, &String)> = rendered.iter().collect();
    order.sort_by(|(a, _), (b, _)| {
        (!current.contains_key(*a), by_address(a)).cmp(&(!current.contains_key(*b), by_address(b)))
    });
    let mut out = Fitted::default();
    let mut used = 0usize;
    for (key, value) in order {
        let bytes = entry_bytes(key, value);
        if used + bytes <= budget {
            used += bytes;
            out.data.insert(key.clone(), value.clone());
        } else {
            out.left_out.push((key.clone(), value.clone()));
        }
    }
    out.left_out
        .sort_by(|(a, _), (b, _)| by_address(a).cmp(&by_address(b)));
    out
}

/// An address the previous provider (or an earlier ConfigMap) assigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Legacy {
    /// The Service's uid, when recorded.
    pub uid: Option<String>,
    /// Namespace and name, when recorded.
    pub service: Option<(String, String)>,
    /// The address.
    pub ip: IpAddr,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LegacyConfig {
    #[serde(default)]
    services: Vec<LegacyService>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LegacyService {
    #[serde(default)]
    uid: Option<String>,
    ip: String,
    #[serde(default)]
    service_namespace: Option<String>,
    #[serde(default)]
    service_name: Option<String>,
}

/// Reads the `k8s.co/cloud-provider-config` annotation: JSON
/// `{"services":[{"uid","ip","serviceNamespace","serviceName","forwardMethod"}]}`,
/// older entries only `{uid, ip}`. Entries with an unparsable IP are returned
/// as errors beside the good ones.
pub fn parse_legacy_annotation(json: &str) -> Result<(Vec<Legacy>, Vec<String>), String> {
    let config: LegacyConfig = serde_json::from_str(json)
        .map_err(|e| format!("{LEGACY_ANNOTATION} is not valid JSON: {e}"))?;
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for s in config.services {
        match s.ip.trim().parse() {
            Ok(ip) => good.push(Legacy {
                uid: s.uid.filter(|u| !u.is_empty()),
                service: s
                    .service_namespace
                    .zip(s.service_name)
                    .filter(|(ns, n)| !ns.is_empty() && !n.is_empty()),
                ip,
            }),
            Err(_) => bad.push(format!(
                "{LEGACY_ANNOTATION}: entry with ip {:?} is not an IP address",
                s.ip
            )),
        }
    }
    Ok((good, bad))
}

/// Reads ConfigMap data in the kube-keepalived-vip format (written by vipam
/// or by the Go provider) as addresses per Service. Keys that are not IPv4
/// addresses and values that are not `<namespace>/<name>[:METHOD]` are
/// returned as errors.
pub fn parse_data(data: &BTreeMap<String, String>) -> (Vec<Legacy>, Vec<String>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (key, value) in data {
        let Ok(ip) = key.parse::<Ipv4Addr>() else {
            bad.push(format!("key {key:?} is not an IPv4 address"));
            continue;
        };
        let service = value.split(':').next().unwrap_or_default();
        match service.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => good.push(Legacy {
                uid: None,
                service: Some((ns.to_string(), name.to_string())),
                ip: IpAddr::V4(ip),
            }),
            _ => bad.push(format!(
                "value {value:?} of {key} is not <namespace>/<service>"
            )),
        }
    }
    (good, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{mk_entry, mk_ip};

    #[test]
    fn render_writes_the_keepalived_format() {
        let entries = BTreeMap::from([
            (
                mk_ip("10.0.0.2"),
                mk_entry("shop", "web", Some(ForwardMethod::Dr)),
            ),
            (mk_ip("10.0.0.1"), mk_entry("default", "db", None)),
        ]);
        let r = render(&entries);
        assert_eq!(
            r.data,
            BTreeMap::from([
                ("10.0.0.1".to_string(), "default/db".to_string()),
                ("10.0.0.2".to_string(), "shop/web:DR".to_string())
            ])
        );
        assert!(r.ipv6.is_empty());
    }

    #[test]
    fn ipv6_addresses_are_left_out_and_reported() {
        let entries = BTreeMap::from([
            (mk_ip("fd00::5"), mk_entry("shop", "v6", None)),
            (mk_ip("10.0.0.1"), mk_entry("shop", "v4", None)),
        ]);
        let r = render(&entries);
        assert_eq!(r.data.len(), 1);
        assert_eq!(r.ipv6, vec![(mk_ip("fd00::5"), "shop/v6".to_string())]);
        assert!(r.data.keys().all(|k| {
            k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        }));
    }

    #[test]
    fn rendering_is_a_function_of_the_entries_alone() {
        let a = BTreeMap::from([
            (mk_ip("10.0.0.1"), mk_entry("a", "b", None)),
            (mk_ip("10.0.0.3"), mk_entry("c", "d", None)),
        ]);
        let mut b = BTreeMap::new();
        b.insert(mk_ip("10.0.0.3"), mk_entry("c", "d", None));
        b.insert(mk_ip("10.0.0.1"), mk_entry("a", "b", None));
        assert_eq!(render(&a), render(&b));
    }

    #[test]
    fn entry_bytes_count_the_json_of_the_data() {
        let data = BTreeMap::from([
            ("10.0.0.1".to_string(), "a/b".to_string()),
            ("10.0.0.2".to_string(), "shop/web:PROXY".to_string()),
        ]);
        let json = serde_json::to_string(&data).expect("json");
        // {"k":"v","k":"v"}: the braces take the place of the last comma.
        assert_eq!(data_bytes(&data), json.len() - 1);
    }

    fn mk_data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn everything_fits_in_a_large_enough_budget() {
        let rendered = mk_data(&[("10.0.0.1", "a/b"), ("10.0.0.2", "a/c")]);
        let f = fit(&rendered, &BTreeMap::new(), data_bytes(&rendered));
        assert_eq!(f.data, rendered);
        assert!(f.left_out.is_empty());
    }

    #[test]
    fn fitting_keeps_written_entries_first_and_drops_removed_ones() {
        let current = mk_data(&[("10.0.0.9", "a/old"), ("10.0.0.5", "a/gone")]);
        let rendered = mk_data(&[
            ("10.0.0.1", "a/new"),
            ("10.0.0.2", "a/new2"),
            ("10.0.0.9", "a/old:DR"),
        ]);
        let budget = entry_bytes("10.0.0.9", "a/old:DR") + entry_bytes("10.0.0.1", "a/new");
        let f = fit(&rendered, &current, budget);
        assert_eq!(
            f.data,
            mk_data(&[("10.0.0.1", "a/new"), ("10.0.0.9", "a/old:DR")])
        );
        assert_eq!(
            f.left_out,
            vec![("10.0.0.2".to_string(), "a/new2".to_string())]
        );
    }

    #[test]
    fn new_entries_fill_by_address_not_by_text() {
        let rendered = mk_data(&[("10.0.0.10", "a/x"), ("10.0.0.9", "a/y")]);
        let f = fit(&rendered, &BTreeMap::new(), entry_bytes("10.0.0.10", "a/x"));
        assert_eq!(f.data, mk_data(&[("10.0.0.9", "a/y")]));
    }

    proptest::proptest! {
        #[test]
        fn fitting_is_stable_and_within_budget(
            entries in proptest::collection::btree_map(0u32..64, 1usize..40, 0..24),
            current in proptest::collection::btree_set(0u32..64, 0..24),
            budget in 0usize..600,
        ) {
            let ip = |i: u32| Ipv4Addr::from(0x0a00_0000 + i).to_string();
            let rendered: BTreeMap<String, String> = entries
                .iter()
                .map(|(i, len)| (ip(*i), "n/".to_string() + &"x".repeat(*len)))
                .collect();
            let current: BTreeMap<String, String> =
                current.iter().map(|i| (ip(*i), "n/old".to_string())).collect();
            let f = fit(&rendered, &current, budget);
            proptest::prop_assert!(data_bytes(&f.data) <= budget);
            proptest::prop_assert_eq!(f.data.len() + f.left_out.len(), rendered.len());
            proptest::prop_assert!(f.data.iter().all(|(k, v)| rendered.get(k) == Some(v)));
            // The next sync, with what was written, writes nothing new.
            proptest::prop_assert_eq!(fit(&rendered, &f.data, budget).data, f.data);
        }
    }

    #[test]
    fn legacy_annotation_in_both_formats_is_read() {
        let json = r#"{"services":[
            {"uid":"u1","ip":"10.210.38.65","serviceNamespace":"shop","serviceName":"web","forwardMethod":"NAT"},
            {"uid":"u2","ip":"10.210.38.66"},
            {"uid":"u3","ip":"bogus"}
        ]}"#;
        let (good, bad) = parse_legacy_annotation(json).expect("parse");
        assert_eq!(
            good,
            vec![
                Legacy {
                    uid: Some("u1".into()),
                    service: Some(("shop".into(), "web".into())),
                    ip: mk_ip("10.210.38.65")
                },
                Legacy {
                    uid: Some("u2".into()),
                    service: None,
                    ip: mk_ip("10.210.38.66")
                },
            ]
        );
        assert_eq!(bad.len(), 1);
        assert!(bad[0].contains("bogus"));
        assert!(parse_legacy_annotation("not json").is_err());
    }

    #[test]
    fn existing_data_is_read_back_per_service() {
        let data = BTreeMap::from([
            ("10.0.0.1".to_string(), "shop/web:NAT".to_string()),
            ("10.0.0.2".to_string(), "default/db".to_string()),
            ("junk".to_string(), "x/y".to_string()),
            ("10.0.0.3".to_string(), "nonsense".to_string()),
        ]);
        let (good, bad) = parse_data(&data);
        assert_eq!(good.len(), 2);
        assert_eq!(good[0].service, Some(("shop".into(), "web".into())));
        assert_eq!(bad.len(), 2);
    }
}
