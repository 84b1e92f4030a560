//! Reconciling one Service: hold the finalizer while it has an address, get
//! the address from the allocator (keeping the one in its status), record it
//! for the ConfigMap, publish it in the status; and the reverse when the
//! Service goes away or stops being a LoadBalancer.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, events::EventType, reflector::ObjectRef, reflector::Store},
};
use serde_json::json;

use crate::{
    allocation::{AllocError, Allocated, Allocator},
    desired::{self, FINALIZER, Request, Settings, has_finalizer, status_ip},
    events::{Events, reason},
    index::{Index, ServiceKey},
    metrics::Metrics,
    render::{Entry, Legacy},
};

/// Errors of a reconcile; each is retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a call.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// The allocator refused or failed.
    #[error("allocator: {0}")]
    Alloc(#[from] AllocError),
    /// The allocator handed out an address another Service holds: it lost its
    /// state. Every Service's address is adopted again before new ones.
    #[error(
        "the allocator gave {ip} to {owner} but {holder} holds it; adopting every address again"
    )]
    Stale {
        /// The address.
        ip: IpAddr,
        /// Who asked.
        owner: String,
        /// Who holds it.
        holder: String,
    },
    /// The Service cache stopped.
    #[error("the service cache stopped")]
    CacheGone,
    /// The ConfigMap did not drop the entry in time.
    #[error("the ConfigMap entry of {0} is not removed yet")]
    ConfigMapPending(String),
}

impl Error {
    /// The metric label of the error.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kubernetes_api",
            Error::Alloc(e) => e.reason(),
            Error::Stale { .. } => "allocator_lost_state",
            Error::ConfigMapPending(_) => "configmap_pending",
            Error::CacheGone => "cache_gone",
        }
    }
}

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

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.by_uid.len().max(self.by_service.len())
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything a reconcile needs.
pub struct Context {
    /// The Kubernetes client.
    pub client: kube::Client,
    /// The allocator.
    pub allocator: Allocator,
    /// Addresses of managed Services, for the ConfigMap.
    pub index: Arc<Index>,
    /// Event publisher.
    pub events: Events,
    /// What Services get.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Addresses from before vipam.
    pub adoptable: Adoptable,
    /// The watched Services.
    pub store: Store<Service>,
    /// Set when every Service's address must be adopted again before a new
    /// address is handed out (at start, and when the allocator may have lost
    /// its state).
    pub adopt_all: AtomicBool,
    adopting: tokio::sync::Mutex<()>,
    /// Services waiting for a full pool, reconciled again after a release.
    waiting: Mutex<HashSet<ObjectRef<Service>>>,
    /// Services (by uid) whose clean-up started here, so that a retry after
    /// a partial clean-up still knows they were served.
    cleaning: Mutex<HashSet<String>>,
    retrigger: futures::channel::mpsc::UnboundedSender<ObjectRef<Service>>,
    /// How long a clean-up waits for the ConfigMap.
    pub configmap_timeout: Duration,
}

impl Context {
    /// A context; `retrigger` feeds the controller's extra reconciles.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        allocator: Allocator,
        index: Arc<Index>,
        events: Events,
        settings: Settings,
        metrics: Arc<Metrics>,
        adoptable: Adoptable,
        store: Store<Service>,
        retrigger: futures::channel::mpsc::UnboundedSender<ObjectRef<Service>>,
    ) -> Self {
        Context {
            client,
            allocator,
            index,
            events,
            settings,
            metrics,
            adoptable,
            store,
            adopt_all: AtomicBool::new(true),
            adopting: tokio::sync::Mutex::new(()),
            waiting: Mutex::default(),
            cleaning: Mutex::default(),
            retrigger,
            configmap_timeout: Duration::from_secs(30),
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashSet<ObjectRef<Service>>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cleaning(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.cleaning
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reconciles again every Service waiting for a free address.
    fn wake_waiting(&self) {
        for r in self.waiting().drain() {
            let _ = self.retrigger.unbounded_send(r);
        }
    }

    /// Adopts the address of every managed Service that has one (in its
    /// status, or from before vipam) unless that was done since the
    /// allocator was last seen failing. New addresses are handed out only
    /// after this, so none can collide with an address a Service already has.
    pub async fn adopt_all(&self) -> Result<(), Error> {
        if !self.adopt_all.load(Ordering::Acquire) {
            return Ok(());
        }
        let _guard = self.adopting.lock().await;
        if !self.adopt_all.load(Ordering::Acquire) {
            return Ok(());
        }
        tracing::debug!("adopting every address in use");
        // The first full list must be in before "every Service" means anything.
        // Polled in short waits: the store's readiness wakes only the last of
        // several concurrent waiters, and the controller waits on it too.
        loop {
            match tokio::time::timeout(Duration::from_millis(50), self.store.wait_until_ready())
                .await
            {
                Ok(Ok(())) => break,
                Ok(Err(_)) => return Err(Error::CacheGone),
                Err(_) => {}
            }
        }
        let services = self.store.state();
        tracing::debug!(services = services.len(), "service cache ready");
        let mut adopted = 0usize;
        for svc in &services {
            let d = desired::desired(svc, &self.settings);
            if !d.managed || svc.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let (ns, name, uid) = names(svc);
            let key = (ns.clone(), name.clone());
            let Some(ip) = status_ip(svc).or_else(|| self.adoptable.lookup(&uid, &key)) else {
                continue;
            };
            if ip.is_ipv6() {
                // Never published by vipam; its own reconcile reports it.
                continue;
            }
            match self
                .allocator
                .allocate(
                    &ns,
                    &name,
                    &uid,
                    &Request {
                        address: Some(ip),
                        pool: None,
                    },
                )
                .await
            {
                Ok(a) if a.ip == ip => {
                    self.index.upsert(
                        key,
                        ip,
                        Entry {
                            namespace: ns,
                            name,
                            forward_method: d.forward_method,
                        },
                    );
                    adopted += 1;
                }
                Ok(a) => {
                    tracing::warn!(service = %format!("{ns}/{name}"), have = %ip, allocator = %a.ip, "the allocator keeps another address for this Service")
                }
                Err(e @ AllocError::Unreachable(_)) => return Err(e.into()),
                // Reported on the Service by its own reconcile.
                Err(e) => {
                    tracing::warn!(service = %format!("{ns}/{name}"), address = %ip, error = %e, "cannot adopt the address")
                }
            }
        }
        self.metrics
            .managed
            .set(i64::try_from(self.index.len()).unwrap_or(i64::MAX));
        tracing::info!(
            services = services.len(),
            adopted,
            "adopted every address in use"
        );
        self.adopt_all.store(false, Ordering::Release);
        Ok(())
    }
}

fn names(svc: &Service) -> (String, String, String) {
    (
        svc.namespace().unwrap_or_default(),
        svc.name_any(),
        svc.metadata.uid.clone().unwrap_or_default(),
    )
}

/// Longest a reconcile waits for the Service cache to see its own writes.
const CACHE_WAIT: Duration = Duration::from_secs(2);

/// The resourceVersions a reconcile's own writes took its Service through.
///
/// The next reconcile of a Service reads it from the watch cache, which
/// learns of a write a moment after the write returns. Starting from the
/// copy from before the write, it would write the same again (a second
/// status PATCH for every new Service under load). So a reconcile that wrote
/// returns only once the cache holds none of the versions its writes
/// replaced; resourceVersions are only compared for equality.
struct OwnWrites {
    replaced: Vec<String>,
    last: Option<String>,
}

impl From<&Service> for OwnWrites {
    fn from(svc: &Service) -> Self {
        OwnWrites {
            replaced: svc.metadata.resource_version.clone().into_iter().collect(),
            last: None,
        }
    }
}

impl OwnWrites {
    /// Records a write, from the object it returned.
    fn wrote(&mut self, written: &Service) {
        if let Some(rv) = written.metadata.resource_version.clone()
            && let Some(previous) = self.last.replace(rv)
        {
            self.replaced.push(previous);
        }
    }

    /// Waits (at most [`CACHE_WAIT`]) until the cache holds the Service as
    /// last written or later, or no longer holds it.
    async fn settle(self, ctx: &Context, svc: &Service) {
        if self.last.is_none() {
            return;
        }
        let object = ObjectRef::from_obj(svc);
        let deadline = tokio::time::Instant::now() + CACHE_WAIT;
        loop {
            let stale = ctx.store.get(&object).is_some_and(|cached| {
                cached
                    .metadata
                    .resource_version
                    .as_ref()
                    .is_some_and(|rv| self.replaced.contains(rv))
            });
            if !stale {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::debug!(service = %object, "the Service cache has not caught up with the last write");
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn reference(svc: &Service) -> ObjectReference {
    svc.object_ref(&())
}

/// Reconciles one Service.
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let d = desired::desired(&svc, &ctx.settings);
    if svc.metadata.deletion_timestamp.is_some() || !d.managed {
        if has_finalizer(&svc) && (d.managed || desired::may_have_been_managed(&svc, &ctx.settings))
        {
            cleanup(&svc, &ctx, d.managed).await?;
        }
        return Ok(Action::await_change());
    }
    let object = reference(&svc);
    for w in &d.warnings {
        ctx.events
            .publish(
                &object,
                EventType::Warning,
                reason::INVALID_ANNOTATION,
                "Validate",
                w.to_string(),
            )
            .await;
    }
    let request = match d.request {
        Ok(r) => r,
        Err(problem) => {
            ctx.events
                .publish(
                    &object,
                    EventType::Warning,
                    reason::INVALID_ANNOTATION,
                    "Validate",
                    problem.to_string(),
                )
                .await;
            return Ok(Action::await_change());
        }
    };
    if d.warnings.is_empty() {
        ctx.events.clear(&object, reason::INVALID_ANNOTATION);
    }
    if let Some(ip) = request.address.filter(IpAddr::is_ipv6) {
        // Like an unusable annotation: nothing is allocated and what the
        // Service has stays.
        ctx.events
            .publish(
                &object,
                EventType::Warning,
                reason::IPV6_NOT_SUPPORTED,
                "Allocate",
                format!(
                    "the requested address {ip} is IPv6, which kube-keepalived-vip cannot announce (its ConfigMap keys cannot hold ':'); it is not allocated"
                ),
            )
            .await;
        return Ok(Action::await_change());
    }
    let (ns, name, uid) = names(&svc);
    let key = (ns.clone(), name.clone());
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let mut own = OwnWrites::from(svc.as_ref());
    if !has_finalizer(&svc) {
        own.wrote(&add_finalizer(&api, &svc).await?);
    }

    let current = status_ip(&svc);
    let adopted = current
        .is_none()
        .then(|| ctx.adoptable.lookup(&uid, &key))
        .flatten();
    let ask = match (current, request.address) {
        // The user asks for another address: move (and only then).
        (Some(have), Some(want)) if have != want => {
            if let Err(e) = ctx.allocator.release(&ns, &name).await {
                return Err(allocation_failed(&ctx, &svc, e).await);
            }
            request.clone()
        }
        (Some(have), _) => Request {
            address: Some(have),
            pool: None,
        },
        (None, Some(_)) => request.clone(),
        (None, None) => match adopted {
            Some(ip) => Request {
                address: Some(ip),
                pool: None,
            },
            None => {
                ctx.adopt_all().await?;
                request.clone()
            }
        },
    };
    let allocated = match ctx.allocator.allocate(&ns, &name, &uid, &ask).await {
        Ok(a) => a,
        Err(e) => {
            if matches!(e, AllocError::Exhausted(_)) {
                ctx.waiting().insert(ObjectRef::from_obj(svc.as_ref()));
            }
            return Err(allocation_failed(&ctx, &svc, e).await);
        }
    };
    ctx.events.clear(&object, reason::ALLOCATION_FAILED);
    let Allocated { ip, pool } = allocated;
    if let Some(holder) = ctx.index.holder(ip)
        && holder != key
    {
        // Never publish an address twice. Give it back and adopt everything.
        let _ = ctx.allocator.release(&ns, &name).await;
        ctx.adopt_all.store(true, Ordering::Release);
        return Err(Error::Stale {
            ip,
            owner: format!("{ns}/{name}"),
            holder: format!("{}/{}", holder.0, holder.1),
        });
    }
    if ip.is_ipv6() {
        // Nothing can announce it, so nothing is held for it: a later change
        // of pool allocates anew instead of meeting this address.
        if let Err(e) = ctx.allocator.release(&ns, &name).await {
            return Err(allocation_failed(&ctx, &svc, e).await);
        }
        let from = if pool.is_empty() {
            "outside every pool".to_string()
        } else {
            format!("from pool {pool}")
        };
        let note = format!(
            "{ip} {from} is IPv6, which kube-keepalived-vip cannot announce (its ConfigMap keys cannot hold ':'); it is released and not published"
        );
        ctx.events
            .publish(
                &object,
                EventType::Warning,
                reason::IPV6_NOT_SUPPORTED,
                "Allocate",
                note,
            )
            .await;
        ctx.index.remove(&key);
        return Ok(Action::await_change());
    }
    ctx.index.upsert(
        key,
        ip,
        Entry {
            namespace: ns.clone(),
            name: name.clone(),
            forward_method: d.forward_method,
        },
    );
    ctx.metrics
        .managed
        .set(i64::try_from(ctx.index.len()).unwrap_or(i64::MAX));
    if current != Some(ip) {
        let patch = json!({"status": {"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}});
        own.wrote(
            &api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?,
        );
        let from = if pool.is_empty() {
            "outside every pool".to_string()
        } else {
            format!("from pool {pool}")
        };
        let how = if adopted == Some(ip) {
            "adopted"
        } else {
            "allocated"
        };
        ctx.events
            .publish(
                &object,
                EventType::Normal,
                reason::ALLOCATED,
                "Allocate",
                format!("{how} {ip} {from}"),
            )
            .await;
    }
    own.settle(&ctx, &svc).await;
    Ok(Action::await_change())
}

async fn allocation_failed(ctx: &Context, svc: &Service, e: AllocError) -> Error {
    if matches!(e, AllocError::Unreachable(_)) {
        // It may come back without its data: adopt before allocating anew.
        ctx.adopt_all.store(true, Ordering::Release);
    }
    ctx.events
        .publish(
            &reference(svc),
            EventType::Warning,
            reason::ALLOCATION_FAILED,
            "Allocate",
            e.to_string(),
        )
        .await;
    Error::Alloc(e)
}

/// Releases the address, waits until the ConfigMap no longer holds it, clears
/// the status of a Service that is no longer a LoadBalancer, then drops the
/// finalizer. Unless `managed`, only a Service this syncer served (its
/// address held by the allocator, in the index, in the ConfigMap it started
/// with, or its clean-up begun) is touched: another implementation may hold
/// the same finalizer.
async fn cleanup(svc: &Service, ctx: &Context, managed: bool) -> Result<(), Error> {
    let (ns, name, uid) = names(svc);
    let key = (ns.clone(), name.clone());
    let released = match ctx.allocator.release(&ns, &name).await {
        Ok(r) => r,
        Err(e) => return Err(allocation_failed(ctx, svc, e).await),
    };
    if !managed
        && released.is_none()
        && ctx.index.address(&key).is_none()
        && ctx.adoptable.lookup(&uid, &key).is_none()
        && !ctx.cleaning().contains(&uid)
    {
        tracing::debug!(service = %format!("{ns}/{name}"), "not served by this syncer; its finalizer is left alone");
        return Ok(());
    }
    ctx.cleaning().insert(uid.clone());
    let generation = ctx.index.remove(&key);
    ctx.metrics
        .managed
        .set(i64::try_from(ctx.index.len()).unwrap_or(i64::MAX));
    if tokio::time::timeout(ctx.configmap_timeout, ctx.index.wait_published(generation))
        .await
        .is_err()
    {
        return Err(Error::ConfigMapPending(format!("{ns}/{name}")));
    }
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let mut own = OwnWrites::from(svc);
    if svc.metadata.deletion_timestamp.is_none() && status_ip(svc).is_some() {
        let patch = json!({"status": {"loadBalancer": {"ingress": null}}});
        own.wrote(
            &api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?,
        );
    }
    if let Some(written) = remove_finalizer(&api, svc).await? {
        own.wrote(&written);
    }
    ctx.cleaning().remove(&uid);
    if let Some(ip) = released {
        ctx.events
            .publish(
                &reference(svc),
                EventType::Normal,
                reason::RELEASED,
                "Release",
                format!("released {ip}"),
            )
            .await;
        ctx.wake_waiting();
    }
    if svc.metadata.deletion_timestamp.is_some() {
        ctx.events.forget(&reference(svc));
    }
    own.settle(ctx, svc).await;
    Ok(())
}

fn json_patch(ops: serde_json::Value) -> Result<json_patch::Patch, Error> {
    serde_json::from_value(ops).map_err(|e| Error::Kube(kube::Error::SerdeError(e)))
}

async fn add_finalizer(api: &Api<Service>, svc: &Service) -> Result<Service, Error> {
    let patch = match &svc.metadata.finalizers {
        None => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ]),
        Some(existing) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": existing},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ]),
    };
    Ok(api
        .patch(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(json_patch(patch)?),
        )
        .await?)
}

/// Drops the finalizer; the Service as written, or `None` when it had none.
async fn remove_finalizer(api: &Api<Service>, svc: &Service) -> Result<Option<Service>, Error> {
    let Some(i) = svc
        .metadata
        .finalizers
        .as_ref()
        .and_then(|f| f.iter().position(|x| x == FINALIZER))
    else {
        return Ok(None);
    };
    let path = format!("/metadata/finalizers/{i}");
    let patch = json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]);
    Ok(Some(
        api.patch(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(json_patch(patch)?),
        )
        .await?,
    ))
}

/// How long to wait before trying a failed Service again.
pub fn error_policy(_svc: Arc<Service>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.reason());
    tracing::warn!(error = %error, "reconcile failed");
    Action::requeue(match error {
        Error::Alloc(AllocError::Unreachable(_)) | Error::Stale { .. } => Duration::from_secs(2),
        Error::Alloc(AllocError::Exhausted(_)) => Duration::from_secs(30),
        Error::Alloc(_) => Duration::from_secs(60),
        Error::Kube(_) | Error::ConfigMapPending(_) | Error::CacheGone => Duration::from_secs(5),
    })
}

/// Releases allocations the syncer owns whose Service is gone. Run after the
/// first full sync.
pub async fn release_orphans(ctx: &Context) -> Result<usize, Error> {
    let owned = ctx.allocator.owned().await?;
    let mut released = 0;
    for (owner, address) in owned {
        let Some((ns, name)) = desired::parse_owner(&owner) else {
            continue;
        };
        let exists = ctx.store.get(&ObjectRef::new(name).within(ns)).is_some();
        if !exists {
            ctx.allocator.release(ns, name).await?;
            tracing::info!(
                owner,
                address,
                "released the address of a Service that is gone"
            );
            released += 1;
        }
    }
    Ok(released)
}
