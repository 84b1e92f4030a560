//! Events on Services and the ConfigMap (`events.k8s.io/v1`). A warning is
//! published when it first appears or changes, not on every reconcile, so a
//! steady state makes no writes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::metrics::{EventLabels, Metrics};

/// Reasons of the Events the syncer publishes.
pub mod reason {
    /// An address was allocated (Normal).
    pub const ALLOCATED: &str = "Allocated";
    /// An address was released (Normal).
    pub const RELEASED: &str = "Released";
    /// Allocation failed: pool exhausted, address held, unknown pool,
    /// allocator unreachable (Warning).
    pub const ALLOCATION_FAILED: &str = "AllocationFailed";
    /// An annotation or field has an unusable value (Warning).
    pub const INVALID_ANNOTATION: &str = "InvalidAnnotation";
    /// The address is IPv6, which the keepalived ConfigMap cannot hold (Warning).
    pub const IPV6_NOT_SUPPORTED: &str = "IPv6NotSupported";
    /// The rendered ConfigMap would exceed the 1 MiB object limit (Warning,
    /// on the ConfigMap).
    pub const CONFIGMAP_TOO_LARGE: &str = "ConfigMapTooLarge";
}

/// Publishes Events, once per (object, reason, message).
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
    metrics: Arc<Metrics>,
    seen: Arc<Mutex<HashMap<(String, &'static str), String>>>,
}

fn key(object: &ObjectReference) -> String {
    format!(
        "{}/{}/{}/{}",
        object.kind.as_deref().unwrap_or_default(),
        object.namespace.as_deref().unwrap_or_default(),
        object.name.as_deref().unwrap_or_default(),
        object.uid.as_deref().unwrap_or_default()
    )
}

impl Events {
    /// Events reported as `controller`/`instance`.
    pub fn new(client: kube::Client, instance: String, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: "vipam-syncer".to_string(),
            instance: Some(instance),
        };
        Events {
            recorder: Recorder::new(client, reporter),
            metrics,
            seen: Arc::default(),
        }
    }

    fn remember(&self, object: &ObjectReference, reason: &'static str, note: &str) -> bool {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match seen.insert((key(object), reason), note.to_string()) {
            Some(previous) => previous != note,
            None => true,
        }
    }

    /// Forgets that a warning was published, so it is published again if it
    /// comes back.
    pub fn clear(&self, object: &ObjectReference, reason: &'static str) {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.remove(&(key(object), reason));
    }

    /// Publishes an Event unless the same one was already published for the
    /// object. Failures are logged: an Event is never worth failing a
    /// reconcile for.
    pub async fn publish(
        &self,
        object: &ObjectReference,
        type_: EventType,
        reason: &'static str,
        action: &str,
        note: String,
    ) {
        if !self.remember(object, reason, &note) {
            return;
        }
        self.metrics
            .events
            .get_or_create(&EventLabels { reason })
            .inc();
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, object).await {
            tracing::warn!(error = %e, reason, "publishing an event failed");
            // Allow a retry on the next reconcile.
            self.clear(object, reason);
        }
    }
}
