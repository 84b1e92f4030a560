//! Adoption: the addresses Services already have (in their status, or from
//! the Go provider's ConfigMap) are claimed in the allocator before any new
//! address is handed out, at start and whenever the allocator may have lost
//! its state, so that no Service's address changes. Which address a Service
//! keeps is the pure [`candidate`]; [`Adoption::adopt_all`] claims them.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::Store;

use crate::{
    allocation::{AllocError, Allocator},
    configmap::{self, Writer},
    desired::{self, Request, Settings, Subject, status_ip},
    error::Error,
    index::{self, Index, ServiceKey},
    metrics::Metrics,
    render::{self, Entry, Legacy},
};

/// Addresses known from before vipam: the Go provider's annotation and
/// ConfigMap data, by uid and by namespace/name.
#[derive(Debug, Default)]
pub struct Adoptable {
    by_uid: HashMap<String, IpAddr>,
    by_service: HashMap<ServiceKey, IpAddr>,
}

impl Adoptable {
    /// Collects entries; the first seen for a Service wins.
    pub fn new(entries: impl IntoIterator<Item = Legacy>) -> Self {
        let mut a = Adoptable::default();
        for e in entries {
            if let Some(uid) = e.uid {
                a.by_uid.entry(uid).or_insert(e.ip);
            }
            if let Some(key) = e.service {
                a.by_service.entry(key).or_insert(e.ip);
            }
        }
        a
    }

    /// The address recorded for a Service, by uid first.
    pub fn lookup(&self, uid: &str, key: &ServiceKey) -> Option<IpAddr> {
        self.by_uid
            .get(uid)
            .or_else(|| self.by_service.get(key))
            .copied()
    }

    /// The address recorded for a Service.
    pub fn of(&self, subject: &Subject) -> Option<IpAddr> {
        self.lookup(&subject.uid, &subject.key())
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.by_uid.len().max(self.by_service.len())
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An address a Service keeps, to claim in the allocator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The Service.
    pub subject: Subject,
    /// The address it has.
    pub ip: IpAddr,
    /// Its ConfigMap entry.
    pub entry: Entry,
}

/// The address a Service keeps: the one in its status, else the one from
/// before vipam. `None` for a Service this syncer does not manage, one being
/// deleted, one without an address, and an IPv6 address (never published by
/// vipam; the Service's own reconcile reports it).
pub fn candidate(svc: &Service, settings: &Settings, adoptable: &Adoptable) -> Option<Candidate> {
    let d = desired::desired(svc, settings);
    if !d.managed || svc.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let subject = Subject::of(svc);
    let ip = status_ip(svc).or_else(|| adoptable.of(&subject))?;
    if ip.is_ipv6() {
        return None;
    }
    Some(Candidate {
        entry: Entry::of(&subject, d.forward_method),
        subject,
        ip,
    })
}

/// Whether every address must be adopted (again) before a new one is handed
/// out, and the addresses from before vipam.
#[derive(Debug)]
pub struct Adoption {
    adoptable: Adoptable,
    needed: AtomicBool,
    running: tokio::sync::Mutex<()>,
}

impl Adoption {
    /// Adoption still to do, with the addresses from before vipam.
    pub fn new(adoptable: Adoptable) -> Self {
        Adoption {
            adoptable,
            needed: AtomicBool::new(true),
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// The addresses from before vipam.
    pub fn adoptable(&self) -> &Adoptable {
        &self.adoptable
    }

    /// Requires adoption again before the next new address (the allocator
    /// may have lost its state).
    pub fn require(&self) {
        self.needed.store(true, Ordering::Release);
    }

    fn needed(&self) -> bool {
        self.needed.load(Ordering::Acquire)
    }

    /// Adopts the address of every managed Service that has one unless that
    /// was done since adoption was last required. New addresses are handed
    /// out only after this, so none can collide with an address a Service
    /// already has.
    pub async fn adopt_all(
        &self,
        services: &Store<Service>,
        settings: &Settings,
        allocator: &Allocator,
        index: &Index,
        metrics: &Metrics,
    ) -> Result<(), Error> {
        if !self.needed() {
            return Ok(());
        }
        let _guard = self.running.lock().await;
        if !self.needed() {
            return Ok(());
        }
        tracing::debug!("adopting every address in use");
        wait_ready(services).await?;
        let services = services.state();
        tracing::debug!(services = services.len(), "service cache ready");
        let mut adopted = 0usize;
        for c in services
            .iter()
            .filter_map(|svc| candidate(svc, settings, &self.adoptable))
        {
            if claim(allocator, index, c).await? {
                adopted += 1;
            }
        }
        index::record_managed(index, metrics);
        tracing::info!(
            services = services.len(),
            adopted,
            "adopted every address in use"
        );
        self.needed.store(false, Ordering::Release);
        Ok(())
    }
}

/// Waits for the first full list of Services: before it, "every Service"
/// means nothing.
async fn wait_ready(services: &Store<Service>) -> Result<(), Error> {
    // Polled in short waits: the store's readiness wakes only the last of
    // several concurrent waiters, and the controller waits on it too.
    loop {
        match tokio::time::timeout(Duration::from_millis(50), services.wait_until_ready()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => return Err(Error::CacheGone),
            Err(_) => {}
        }
    }
}

/// Claims a Service's address; whether it is the Service's now. Only an
/// unreachable allocator stops adoption: other refusals are reported on the
/// Service by its own reconcile.
async fn claim(allocator: &Allocator, index: &Index, c: Candidate) -> Result<bool, Error> {
    match allocator.allocate(&c.subject, &Request::keep(c.ip)).await {
        Ok(a) if a.ip == c.ip => {
            index.upsert(c.subject.key(), c.ip, c.entry);
            Ok(true)
        }
        Ok(a) => {
            tracing::warn!(service = %c.subject, have = %c.ip, allocator = %a.ip, "the allocator keeps another address for this Service");
            Ok(false)
        }
        Err(e @ AllocError::Unreachable(_)) => Err(e.into()),
        Err(e) => {
            tracing::warn!(service = %c.subject, address = %c.ip, error = %e, "cannot adopt the address");
            Ok(false)
        }
    }
}

/// Reads the ConfigMap, retrying until it can, for the addresses to adopt.
pub async fn read_adoptable(writer: &Writer) -> Adoptable {
    loop {
        match writer.read().await {
            Ok(cm) => return adoptable_from(cm.as_ref()),
            Err(e) => {
                tracing::warn!(error = %e, "reading the ConfigMap failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The addresses to adopt from the keepalived ConfigMap: the Go provider's
/// annotation and the entries of its data.
fn adoptable_from(cm: Option<&k8s_openapi::api::core::v1::ConfigMap>) -> Adoptable {
    let Some(cm) = cm else {
        return Adoptable::default();
    };
    let mut entries = Vec::new();
    if let Some(json) = cm
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(render::LEGACY_ANNOTATION))
    {
        match render::parse_legacy_annotation(json) {
            Ok((good, bad)) => {
                bad.iter().for_each(|b| tracing::warn!("{b}"));
                tracing::info!(
                    entries = good.len(),
                    "found keepalived-cloud-provider state; adopting its addresses"
                );
                entries.extend(good);
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
    let (good, bad) = render::parse_data(&configmap::data_of(cm));
    bad.iter()
        .for_each(|b| tracing::warn!("ConfigMap data: {b}"));
    entries.extend(good);
    Adoptable::new(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{mk_ip, mk_legacy, mk_service};

    fn mk_adoptable() -> Adoptable {
        Adoptable::new([
            mk_legacy("uid-old", "10.0.0.3"),
            Legacy {
                uid: None,
                service: Some(("shop".into(), "named".into())),
                ip: mk_ip("10.0.0.4"),
            },
        ])
    }

    fn adopted(svc: &Service) -> Option<IpAddr> {
        candidate(svc, &Settings::default(), &mk_adoptable()).map(|c| c.ip)
    }

    #[test]
    fn the_status_address_is_adopted_before_one_from_before_vipam() {
        let svc = mk_service("old").status("10.0.0.1").build();
        let c = candidate(&svc, &Settings::default(), &mk_adoptable()).expect("a candidate");
        assert_eq!(c.ip, mk_ip("10.0.0.1"));
        assert_eq!(c.subject.key(), ("shop".to_string(), "old".to_string()));
        assert_eq!(c.entry.value(), "shop/old");
    }

    #[test]
    fn addresses_from_before_vipam_are_found_by_uid_then_by_name() {
        assert_eq!(adopted(&mk_service("old").build()), Some(mk_ip("10.0.0.3")));
        assert_eq!(
            adopted(&mk_service("named").build()),
            Some(mk_ip("10.0.0.4"))
        );
        assert_eq!(adopted(&mk_service("new").build()), None);
    }

    #[test]
    fn deleted_unmanaged_and_ipv6_services_are_not_adopted() {
        assert_eq!(
            adopted(&mk_service("a").status("10.0.0.1").deleting().build()),
            None
        );
        assert_eq!(
            adopted(
                &mk_service("b")
                    .status("10.0.0.1")
                    .type_("ClusterIP")
                    .build()
            ),
            None
        );
        assert_eq!(
            adopted(&mk_service("c").status("10.0.0.1").class("other").build()),
            None
        );
        assert_eq!(
            adopted(&mk_service("d").status("2001:db8::1").build()),
            None
        );
    }
}
