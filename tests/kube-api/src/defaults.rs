//! Defaulting and allocation the real server performs on writes: Service types, ports,
//! traffic policies, cluster IPs and node ports; Namespace finalizers, phase and name label;
//! the `ipMode` of load-balancer ingress points.
//!
//! A client comparing what it wrote with what it reads back sees these fields on a real
//! cluster, so it must see them here too, or a "no writes in steady state" test would
//! pass here and loop on a real cluster.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::objects::metadata_mut;
use crate::resources::Storage;

/// Service cluster IPs come from this range, as with kubeadm's default `10.96.0.0/12`.
const SERVICE_CIDR_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
const SERVICE_CIDR_SIZE: u32 = 1 << 20;
/// The default node port range.
const NODE_PORTS: std::ops::RangeInclusive<i64> = 30000..=32767;

/// What is already allocated among Services.
#[derive(Debug, Default)]
pub struct Allocated {
    /// Cluster IPs in use.
    pub cluster_ips: BTreeSet<String>,
    /// Node ports in use.
    pub node_ports: BTreeSet<i64>,
}

impl Allocated {
    /// Collects allocations from stored Services.
    pub fn from_services<'a>(services: impl Iterator<Item = &'a Value>) -> Self {
        let mut a = Self::default();
        for s in services {
            if let Some(ips) = s.pointer("/spec/clusterIPs").and_then(Value::as_array) {
                a.cluster_ips
                    .extend(ips.iter().filter_map(Value::as_str).map(str::to_owned));
            }
            if let Some(ports) = s.pointer("/spec/ports").and_then(Value::as_array) {
                a.node_ports.extend(
                    ports
                        .iter()
                        .filter_map(|p| p.get("nodePort").and_then(Value::as_i64)),
                );
            }
        }
        a
    }

    fn next_ip(&mut self) -> String {
        // Skip the network address and the first address, which the API server keeps for itself.
        for offset in 2..SERVICE_CIDR_SIZE - 1 {
            let ip = Ipv4Addr::from(SERVICE_CIDR_BASE + offset).to_string();
            if self.cluster_ips.insert(ip.clone()) {
                return ip;
            }
        }
        String::new()
    }

    fn next_node_port(&mut self) -> i64 {
        let port = NODE_PORTS
            .clone()
            .find(|p| !self.node_ports.contains(p))
            .unwrap_or(0);
        self.node_ports.insert(port);
        port
    }
}

/// Applies the defaults of `storage` to a new or updated object (`old` on update).
pub fn apply(storage: Storage, obj: &mut Value, old: Option<&Value>, allocated: &mut Allocated) {
    match storage {
        Storage::Services => service(obj, old, allocated),
        Storage::Namespaces => namespace(obj, old),
        Storage::ConfigMaps | Storage::Events | Storage::Leases => {}
    }
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

fn service(obj: &mut Value, old: Option<&Value>, allocated: &mut Allocated) {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
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
        return;
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
            let ip = allocated.next_ip();
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
                let np = same
                    .and_then(|o| o.get("nodePort"))
                    .and_then(Value::as_i64)
                    .unwrap_or_else(|| allocated.next_node_port());
                port.insert("nodePort".into(), json!(np));
            } else if !node_ports_wanted && ty == "ClusterIP" {
                let np = port.get("nodePort").cloned();
                if np.is_some() && old_ports.iter().any(|o| o.get("nodePort") == np.as_ref()) {
                    port.remove("nodePort");
                }
            }
        }
    }
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

    #[test]
    fn load_balancer_services_get_the_real_defaults() {
        let mut svc =
            json!({"metadata":{"name":"s"},"spec":{"type":"LoadBalancer","ports":[{"port":80}]}});
        apply(Storage::Services, &mut svc, None, &mut Allocated::default());
        let spec = &svc["spec"];
        assert_eq!(spec["clusterIP"], "10.96.0.2");
        assert_eq!(spec["clusterIPs"], json!(["10.96.0.2"]));
        assert_eq!(
            spec["ports"][0],
            json!({"port":80,"protocol":"TCP","targetPort":80,"nodePort":30000})
        );
        assert_eq!(spec["externalTrafficPolicy"], "Cluster");
        assert_eq!(spec["allocateLoadBalancerNodePorts"], true);
        assert_eq!(spec["sessionAffinity"], "None");
        assert_eq!(spec["ipFamilyPolicy"], "SingleStack");
    }

    #[test]
    fn updates_keep_allocated_cluster_ips_and_node_ports() {
        let mut old = json!({"spec":{"type":"NodePort","ports":[{"port":80}]}});
        apply(Storage::Services, &mut old, None, &mut Allocated::default());
        let mut new = json!({"spec":{"type":"NodePort","ports":[{"port":80}]}});
        apply(
            Storage::Services,
            &mut new,
            Some(&old),
            &mut Allocated::from_services([&old].into_iter()),
        );
        assert_eq!(new["spec"]["clusterIP"], old["spec"]["clusterIP"]);
        assert_eq!(
            new["spec"]["ports"][0]["nodePort"],
            old["spec"]["ports"][0]["nodePort"]
        );
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
