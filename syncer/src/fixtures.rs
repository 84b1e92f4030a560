//! The fixtures of the crate's tests: builders of Services for the unit
//! tests of the pure decisions, and, for the scenario tests of the
//! reconciler, scripted doubles of the Kubernetes API and the allocator
//! ([`script`]) and a reconciler over them ([`scenario`]).

pub mod scenario;
pub mod script;

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec, ServiceStatus,
    },
    apimachinery::pkg::{apis::meta::v1::Time, util::intstr::IntOrString},
};

use crate::{
    desired::{FINALIZER, ForwardMethod},
    index::ServiceKey,
    owner::Owners,
    render::{Entry, Legacy},
};

/// An address from a test literal.
pub fn mk_ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// An address from before vipam, recorded by uid only.
pub fn mk_legacy(uid: &str, ip: &str) -> Legacy {
    Legacy {
        uid: Some(uid.into()),
        service: None,
        ip: mk_ip(ip),
    }
}

/// The owners a syncer writes, named after `cluster` when it has one.
pub fn mk_owners(cluster: Option<&str>) -> Owners {
    Owners::new(cluster.map(|c| c.parse().expect("test cluster name")))
}

/// The index key of Service `shop/<name>`.
pub fn mk_key(name: &str) -> ServiceKey {
    ("shop".into(), name.into())
}

/// The ConfigMap entry of Service `namespace/name`.
pub fn mk_entry(namespace: &str, name: &str, forward_method: Option<ForwardMethod>) -> Entry {
    Entry {
        namespace: namespace.into(),
        name: name.into(),
        forward_method,
    }
}

/// A Service under construction.
pub struct MkService(Service);

/// A LoadBalancer Service `shop/<name>` with uid `uid-<name>`, no class, no
/// annotations, no finalizer and no status.
pub fn mk_service(name: &str) -> MkService {
    let mut svc = Service::default();
    svc.metadata.name = Some(name.into());
    svc.metadata.namespace = Some("shop".into());
    svc.metadata.uid = Some(format!("uid-{name}"));
    svc.spec = Some(ServiceSpec {
        type_: Some("LoadBalancer".into()),
        ..Default::default()
    });
    MkService(svc)
}

impl MkService {
    fn spec(&mut self) -> &mut ServiceSpec {
        self.0.spec.get_or_insert_with(ServiceSpec::default)
    }

    /// With an annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    /// With `spec.loadBalancerIP`.
    pub fn load_balancer_ip(mut self, ip: &str) -> Self {
        self.spec().load_balancer_ip = Some(ip.into());
        self
    }

    /// With a port and its numeric `targetPort`.
    pub fn port(mut self, port: i32, target_port: i32) -> Self {
        self.spec()
            .ports
            .get_or_insert_with(Vec::new)
            .push(ServicePort {
                port,
                target_port: Some(IntOrString::Int(target_port)),
                ..Default::default()
            });
        self
    }

    /// With `spec.type`.
    pub fn type_(mut self, type_: &str) -> Self {
        self.spec().type_ = Some(type_.into());
        self
    }

    /// With `spec.loadBalancerClass`.
    pub fn class(mut self, class: &str) -> Self {
        self.spec().load_balancer_class = Some(class.into());
        self
    }

    /// With the vipam finalizer.
    pub fn finalized(mut self) -> Self {
        self.0
            .metadata
            .finalizers
            .get_or_insert_with(Vec::new)
            .push(FINALIZER.into());
        self
    }

    /// With an address in its status.
    pub fn status(mut self, ip: &str) -> Self {
        self.0.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(ip.into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        self
    }

    /// At a resourceVersion.
    pub fn resource_version(mut self, rv: &str) -> Self {
        self.0.metadata.resource_version = Some(rv.into());
        self
    }

    /// Being deleted.
    pub fn deleting(mut self) -> Self {
        self.0.metadata.deletion_timestamp = Some(Time(Default::default()));
        self
    }

    /// The Service.
    pub fn build(self) -> Service {
        self.0
    }
}
