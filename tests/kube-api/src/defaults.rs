//! Defaulting and allocation the real server performs on writes: Service types, ports,
//! traffic policies, cluster IPs and node ports; Namespace finalizers, phase and name label;
//! the `ipMode` of load-balancer ingress points.
//!
//! A client comparing what it wrote with what it reads back sees these fields on a real
//! cluster, so it must see them here too, or a "no writes in steady state" test would
//! pass here and loop on a real cluster.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::error::ApiError;
use crate::objects::metadata_mut;
use crate::resources::Storage;

/// Service cluster IPs come from this range, as with kubeadm's default `10.96.0.0/12`.
const SERVICE_CIDR_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
const SERVICE_CIDR_SIZE: u32 = 1 << 20;
/// The default node port range.
const NODE_PORTS: std::ops::RangeInclusive<i64> = 30000..=32767;

/// Cluster IPs and node ports held by the stored Services, with how many Services hold
/// each (the server does not refuse an explicitly requested duplicate). The store keeps it
/// up to date on every write, so a write never rescans all Services.
#[derive(Debug, Default, Clone)]
pub struct Held {
    cluster_ips: HashMap<String, usize>,
    node_ports: HashMap<i64, usize>,
}

fn cluster_ips_of(svc: &Value) -> impl Iterator<Item = &str> {
    svc.pointer("/spec/clusterIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

fn node_ports_of(svc: &Value) -> impl Iterator<Item = i64> + '_ {
    svc.pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("nodePort").and_then(Value::as_i64))
}

/// Takes one holder off `key`, dropping it with the last.
fn release<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: K) {
    if let std::collections::hash_map::Entry::Occupied(mut held) = counts.entry(key) {
        *held.get_mut() -= 1;
        if *held.get() == 0 {
            held.remove();
        }
    }
}

impl Held {
    /// What one Service holds.
    pub fn of(svc: &Value) -> Self {
        let mut h = Self::default();
        h.add(svc);
        h
    }

    /// Counts what a stored Service holds.
    pub fn add(&mut self, svc: &Value) {
        for ip in cluster_ips_of(svc) {
            *self.cluster_ips.entry(ip.to_owned()).or_default() += 1;
        }
        for port in node_ports_of(svc) {
            *self.node_ports.entry(port).or_default() += 1;
        }
    }

    /// Forgets what a Service that is replaced or removed held.
    pub fn remove(&mut self, svc: &Value) {
        for ip in cluster_ips_of(svc) {
            release(&mut self.cluster_ips, ip.to_owned());
        }
        for port in node_ports_of(svc) {
            release(&mut self.node_ports, port);
        }
    }

    /// How many stored Services hold a cluster IP.
    pub fn ip_count(&self, ip: &str) -> usize {
        self.cluster_ips.get(ip).copied().unwrap_or(0)
    }

    /// How many stored Services hold a node port.
    pub fn port_count(&self, port: i64) -> usize {
        self.node_ports.get(&port).copied().unwrap_or(0)
    }
}

/// What one write may not take: what the other stored Services hold (all held minus what
/// the object being replaced holds) and what this write has taken so far.
#[derive(Debug)]
pub struct Allocated<'a> {
    held: &'a Held,
    own: Held,
    taken: Held,
}

fn random_below(n: u32) -> u32 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) % n.max(1)
}

impl<'a> Allocated<'a> {
    /// For a write replacing `old` (or creating, `None`) while `held` is stored.
    pub fn new(held: &'a Held, old: Option<&Value>) -> Self {
        Self {
            held,
            own: old.map(Held::of).unwrap_or_default(),
            taken: Held::default(),
        }
    }

    fn ip_free(&self, ip: &str) -> bool {
        self.taken.ip_count(ip) == 0 && self.held.ip_count(ip) <= self.own.ip_count(ip)
    }

    fn port_free(&self, port: i64) -> bool {
        self.taken.port_count(port) == 0 && self.held.port_count(port) <= self.own.port_count(port)
    }

    /// A free cluster IP, picked at random as the real allocator does, or the error the real
    /// server answers when the range is full.
    fn next_ip(&mut self) -> Result<String, ApiError> {
        // Skip the network address and the first address, which the API server keeps for
        // itself, and the broadcast address.
        let usable = SERVICE_CIDR_SIZE - 3;
        let start = random_below(usable);
        let found = (0..usable)
            .map(|i| Ipv4Addr::from(SERVICE_CIDR_BASE + 2 + (start + i) % usable).to_string())
            .find(|ip| self.ip_free(ip))
            .ok_or_else(|| {
                ApiError::Internal("failed to allocate a serviceIP: range is full".into())
            })?;
        self.taken.cluster_ips.insert(found.clone(), 1);
        Ok(found)
    }

    /// A free node port, picked at random, or the real server's error when none is left.
    fn next_node_port(&mut self) -> Result<i64, ApiError> {
        let first = *NODE_PORTS.start();
        let size = (NODE_PORTS.end() - first + 1) as u32;
        let start = random_below(size);
        let found = (0..size)
            .map(|i| first + i64::from((start + i) % size))
            .find(|p| self.port_free(*p))
            .ok_or_else(|| {
                ApiError::Internal("failed to allocate a nodePort: range is full".into())
            })?;
        self.taken.node_ports.insert(found, 1);
        Ok(found)
    }
}

/// Applies the defaults of `storage` to a new or updated object (`old` on update).
pub fn apply(
    storage: Storage,
    obj: &mut Value,
    old: Option<&Value>,
    allocated: &mut Allocated<'_>,
) -> Result<(), ApiError> {
    match storage {
        Storage::Services => service(obj, old, allocated)?,
        Storage::Namespaces => namespace(obj, old),
        Storage::ConfigMaps | Storage::Events | Storage::Leases => {}
    }
    Ok(())
}

fn namespace(obj: &mut Value, old: Option<&Value>) {
    let name = crate::objects::name_of(obj).to_owned();
    let meta = metadata_mut(obj);
    let labels = meta.entry("labels").or_insert_with(|| json!({}));
    if let Value::Object(l) = labels {
        l.insert("kubernetes.io/metadata.name".into(), json!(name));
    }
    if old.is_none() && obj.pointer("/spec/finalizers").is_none() {
        obj["spec"] = json!({"finalizers": ["kubernetes"]});
    }
    if obj.pointer("/status/phase").is_none() {
        obj["status"] = json!({"phase": "Active"});
    }
}

fn service(
    obj: &mut Value,
    old: Option<&Value>,
    allocated: &mut Allocated<'_>,
) -> Result<(), ApiError> {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    let old_spec = old.and_then(|o| o.get("spec"));
    let ty = spec
        .entry("type")
        .or_insert_with(|| json!("ClusterIP"))
        .as_str()
        .unwrap_or("ClusterIP")
        .to_owned();
    spec.entry("sessionAffinity")
        .or_insert_with(|| json!("None"));
    if ty == "ExternalName" {
        return Ok(());
    }
    spec.entry("internalTrafficPolicy")
        .or_insert_with(|| json!("Cluster"));
    let node_ports_wanted = match ty.as_str() {
        "NodePort" => true,
        "LoadBalancer" => {
            *spec
                .entry("allocateLoadBalancerNodePorts")
                .or_insert_with(|| json!(true))
                == json!(true)
        }
        _ => false,
    };
    if ty == "NodePort" || ty == "LoadBalancer" {
        spec.entry("externalTrafficPolicy")
            .or_insert_with(|| json!("Cluster"));
    } else {
        // Leaving NodePort/LoadBalancer drops what only those types use, as the real strategy does.
        for f in [
            "externalTrafficPolicy",
            "allocateLoadBalancerNodePorts",
            "loadBalancerClass",
            "healthCheckNodePort",
        ] {
            if old_spec.and_then(|s| s.get(f)).is_some()
                && spec.get(f) == old_spec.and_then(|s| s.get(f))
            {
                spec.remove(f);
            }
        }
    }
    // An update that leaves allocated values out keeps them, as the real service REST does.
    for f in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
        if spec.get(f).is_none()
            && let Some(v) = old_spec.and_then(|s| s.get(f))
        {
            spec.insert(f.to_owned(), v.clone());
        }
    }
    let cluster_ip = match spec.get("clusterIP").and_then(Value::as_str) {
        Some(ip) => ip.to_owned(),
        None => {
            let ip = allocated.next_ip()?;
            spec.insert("clusterIP".into(), json!(ip));
            ip
        }
    };
    spec.entry("clusterIPs")
        .or_insert_with(|| json!([cluster_ip]));
    spec.entry("ipFamilies").or_insert_with(|| {
        if cluster_ip.contains(':') {
            json!(["IPv6"])
        } else {
            json!(["IPv4"])
        }
    });
    spec.entry("ipFamilyPolicy")
        .or_insert_with(|| json!("SingleStack"));
    let old_ports: Vec<Value> = old_spec
        .and_then(|s| s.get("ports"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        for p in ports.iter_mut() {
            let Some(port) = p.as_object_mut() else {
                continue;
            };
            port.entry("protocol").or_insert_with(|| json!("TCP"));
            if let Some(n) = port.get("port").cloned() {
                port.entry("targetPort").or_insert(n);
            }
            if node_ports_wanted && port.get("nodePort").is_none() {
                let same = old_ports.iter().find(|o| {
                    o.get("port") == port.get("port")
                        && o.get("protocol").unwrap_or(&json!("TCP"))
                            == port.get("protocol").unwrap_or(&json!("TCP"))
                });
                let np = match same.and_then(|o| o.get("nodePort")).and_then(Value::as_i64) {
                    Some(np) => np,
                    None => allocated.next_node_port()?,
                };
                port.insert("nodePort".into(), json!(np));
            } else if !node_ports_wanted && ty == "ClusterIP" {
                let np = port.get("nodePort").cloned();
                if np.is_some() && old_ports.iter().any(|o| o.get("nodePort") == np.as_ref()) {
                    port.remove("nodePort");
                }
            }
        }
    }
    Ok(())
}

/// `ipMode: VIP` on every ingress point that has an IP and no mode.
pub fn ingress_ip_mode(obj: &mut Value) {
    if let Some(Value::Array(ingress)) = obj.pointer_mut("/status/loadBalancer/ingress") {
        for i in ingress.iter_mut() {
            if let Some(m) = i.as_object_mut()
                && m.get("ip")
                    .and_then(Value::as_str)
                    .is_some_and(|ip| !ip.is_empty())
                && m.get("ipMode").is_none()
            {
                m.insert("ipMode".into(), json!("VIP"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_service_cidr(ip: &Value) -> bool {
        ip.as_str()
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .is_some_and(|n| {
                (SERVICE_CIDR_BASE + 2..SERVICE_CIDR_BASE + SERVICE_CIDR_SIZE - 1).contains(&n)
            })
    }

    #[test]
    fn load_balancer_services_get_the_real_defaults() {
        let mut svc =
            json!({"metadata":{"name":"s"},"spec":{"type":"LoadBalancer","ports":[{"port":80}]}});
        let held = Held::default();
        apply(
            Storage::Services,
            &mut svc,
            None,
            &mut Allocated::new(&held, None),
        )
        .expect("defaults");
        let spec = &svc["spec"];
        assert!(in_service_cidr(&spec["clusterIP"]), "{spec}");
        assert_eq!(spec["clusterIPs"], json!([spec["clusterIP"]]));
        let node_port = spec["ports"][0]["nodePort"].as_i64().unwrap_or_default();
        assert!(NODE_PORTS.contains(&node_port), "{spec}");
        assert_eq!(
            spec["ports"][0],
            json!({"port":80,"protocol":"TCP","targetPort":80,"nodePort":node_port})
        );
        assert_eq!(spec["externalTrafficPolicy"], "Cluster");
        assert_eq!(spec["allocateLoadBalancerNodePorts"], true);
        assert_eq!(spec["sessionAffinity"], "None");
        assert_eq!(spec["ipFamilyPolicy"], "SingleStack");
    }

    #[test]
    fn updates_keep_allocated_cluster_ips_and_node_ports() {
        let empty = Held::default();
        let mut old = json!({"spec":{"type":"NodePort","ports":[{"port":80}]}});
        apply(
            Storage::Services,
            &mut old,
            None,
            &mut Allocated::new(&empty, None),
        )
        .expect("defaults");
        let held = Held::of(&old);
        let mut new = json!({"spec":{"type":"NodePort","ports":[{"port":80}]}});
        apply(
            Storage::Services,
            &mut new,
            Some(&old),
            &mut Allocated::new(&held, Some(&old)),
        )
        .expect("defaults");
        assert_eq!(new["spec"]["clusterIP"], old["spec"]["clusterIP"]);
        assert_eq!(
            new["spec"]["ports"][0]["nodePort"],
            old["spec"]["ports"][0]["nodePort"]
        );
    }

    #[test]
    fn a_new_service_never_gets_what_another_holds() {
        // Every node port but one is held; the new Service must get that one.
        let ports: Vec<Value> = NODE_PORTS
            .clone()
            .filter(|p| *p != 31000)
            .map(|p| json!({"port": p, "nodePort": p}))
            .collect();
        let others = json!({"spec":{"clusterIPs":["10.96.0.7"],"ports":ports}});
        let held = Held::of(&others);
        let mut svc = json!({"spec":{"type":"NodePort","ports":[{"port":80}]}});
        apply(
            Storage::Services,
            &mut svc,
            None,
            &mut Allocated::new(&held, None),
        )
        .expect("one port is left");
        assert_eq!(svc["spec"]["ports"][0]["nodePort"], 31000);
        assert_ne!(svc["spec"]["clusterIP"], "10.96.0.7");
    }

    #[test]
    fn a_full_node_port_range_is_the_real_servers_internal_error() {
        let ports: Vec<Value> = NODE_PORTS
            .clone()
            .map(|p| json!({"port": p, "nodePort": p}))
            .collect();
        let held = Held::of(&json!({"spec":{"ports":ports}}));
        let mut svc = json!({"spec":{"type":"LoadBalancer","ports":[{"port":80}]}});
        let err = apply(
            Storage::Services,
            &mut svc,
            None,
            &mut Allocated::new(&held, None),
        )
        .expect_err("no node port is left");
        assert_eq!(err.status_code(), 500);
        assert_eq!(
            err.to_string(),
            "Internal error occurred: failed to allocate a nodePort: range is full"
        );
        // Without node ports, a LoadBalancer Service still fits.
        let mut svc = json!({"spec":{"type":"LoadBalancer","allocateLoadBalancerNodePorts":false,"ports":[{"port":80}]}});
        apply(
            Storage::Services,
            &mut svc,
            None,
            &mut Allocated::new(&held, None),
        )
        .expect("no node port needed");
        assert!(svc["spec"]["ports"][0].get("nodePort").is_none());
    }

    #[test]
    fn held_counts_follow_replacements_and_removals() {
        let a = json!({"spec":{"clusterIPs":["10.96.0.5"],"ports":[{"nodePort":30005}]}});
        let b = json!({"spec":{"clusterIPs":["10.96.0.5"],"ports":[{"nodePort":30006}]}});
        let mut held = Held::default();
        held.add(&a);
        held.add(&b);
        assert_eq!(held.ip_count("10.96.0.5"), 2);
        held.remove(&a);
        assert_eq!(held.ip_count("10.96.0.5"), 1);
        assert_eq!(held.port_count(30005), 0);
        assert_eq!(held.port_count(30006), 1);
        // A write replacing b may take what b held, and nothing else held.
        let allocated = Allocated::new(&held, Some(&b));
        assert!(allocated.ip_free("10.96.0.5"));
        assert!(allocated.port_free(30006));
        let allocated = Allocated::new(&held, None);
        assert!(!allocated.ip_free("10.96.0.5"));
        assert!(!allocated.port_free(30006));
    }

    #[test]
    fn ingress_points_with_an_ip_default_to_vip_mode() {
        let mut svc = json!({"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.1"},{"hostname":"h.example"}]}}});
        ingress_ip_mode(&mut svc);
        assert_eq!(
            svc["status"]["loadBalancer"]["ingress"],
            json!([{"ip":"192.0.2.1","ipMode":"VIP"},{"hostname":"h.example"}])
        );
    }
}
