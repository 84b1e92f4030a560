//! What every reconcile shares, grouped by what it is: the settings, the
//! clients it acts through, the state shared between reconciles (the index,
//! the Service cache, adoption, the Services waiting for a free address or
//! in clean-up) and the metrics.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::{ObjectRef, Store};

use crate::{
    adopt::{Adoptable, Adoption},
    allocation::Allocator,
    desired::Settings,
    error::Error,
    events::Events,
    index::Index,
    metrics::Metrics,
};

/// Everything a reconcile needs.
pub struct Context {
    /// What Services get.
    pub settings: Settings,
    /// What a reconcile acts through.
    pub clients: Clients,
    /// State shared between reconciles.
    pub state: Shared,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// What a reconcile acts through.
pub struct Clients {
    /// The Kubernetes client.
    pub kube: kube::Client,
    /// The allocator.
    pub allocator: Allocator,
    /// Event publisher.
    pub events: Events,
}

/// State shared between reconciles.
pub struct Shared {
    /// Addresses of managed Services, for the ConfigMap.
    pub index: Arc<Index>,
    /// The watched Services.
    pub services: Store<Service>,
    /// Adoption of the addresses in use.
    pub adoption: Adoption,
    /// Services waiting for a full pool, reconciled again after a release.
    waiting: Mutex<HashSet<ObjectRef<Service>>>,
    retrigger: UnboundedSender<ObjectRef<Service>>,
    /// Services (by uid) whose clean-up started here, so that a retry after
    /// a partial clean-up still knows they were served.
    cleaning: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each set is changed by single inserts and removals, so a panic while
    // holding the lock leaves it consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Shared state over the index and the Service cache; `retrigger` feeds
    /// the controller's extra reconciles.
    pub fn new(
        index: Arc<Index>,
        services: Store<Service>,
        adoptable: Adoptable,
        retrigger: UnboundedSender<ObjectRef<Service>>,
    ) -> Self {
        Shared {
            index,
            services,
            adoption: Adoption::new(adoptable),
            waiting: Mutex::default(),
            retrigger,
            cleaning: Mutex::default(),
        }
    }

    /// Reconciles the Service again after the next release.
    pub fn wait_for_release(&self, svc: ObjectRef<Service>) {
        lock(&self.waiting).insert(svc);
    }

    /// Reconciles again every Service waiting for a free address.
    pub fn wake_waiting(&self) {
        for r in lock(&self.waiting).drain() {
            let _ = self.retrigger.unbounded_send(r);
        }
    }

    /// Whether the clean-up of the Service (by uid) started here.
    pub fn is_cleaning(&self, uid: &str) -> bool {
        lock(&self.cleaning).contains(uid)
    }

    /// Records that the clean-up of the Service started (`true`) or ended.
    pub fn set_cleaning(&self, uid: &str, cleaning: bool) {
        if cleaning {
            lock(&self.cleaning).insert(uid.to_string());
        } else {
            lock(&self.cleaning).remove(uid);
        }
    }
}

impl Context {
    /// A context of its four parts.
    pub fn new(settings: Settings, clients: Clients, state: Shared, metrics: Arc<Metrics>) -> Self {
        Context {
            settings,
            clients,
            state,
            metrics,
        }
    }

    /// Adopts the address of every managed Service that has one, unless
    /// that was done since the allocator was last seen failing (see
    /// [`Adoption::adopt_all`]).
    pub async fn adopt_all(&self) -> Result<(), Error> {
        self.state
            .adoption
            .adopt_all(
                &self.state.services,
                &self.settings,
                &self.clients.allocator,
                &self.state.index,
                &self.metrics,
            )
            .await
    }
}
