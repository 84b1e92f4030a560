//! Events on Services and the ConfigMap (`events.k8s.io/v1`). An Event is
//! published when it first appears, not on every reconcile, so a steady
//! state makes no writes, also when one reconcile publishes several notes
//! under one reason.

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
    /// not permitted, refused, allocator unreachable (Warning).
    pub const ALLOCATION_FAILED: &str = "AllocationFailed";
    /// An annotation or field has an unusable value (Warning).
    pub const INVALID_ANNOTATION: &str = "InvalidAnnotation";
    /// The address is IPv6, which the keepalived ConfigMap cannot hold (Warning).
    pub const IPV6_NOT_SUPPORTED: &str = "IPv6NotSupported";
    /// The forward method is DR and a port differs from its target port:
    /// keepalived rewrites it to the virtual port (Warning).
    pub const PORT_REWRITE: &str = "PortRewrite";
    /// The Service's address lies outside every pool of the allocator; it
    /// is kept (Warning).
    pub const OUTSIDE_POOLS: &str = "OutsidePools";
    /// The rendered ConfigMap would exceed the 1 MiB object limit (Warning,
    /// on the ConfigMap).
    pub const CONFIGMAP_TOO_LARGE: &str = "ConfigMapTooLarge";
}

/// How many notes are remembered per object and reason; past that they are
/// forgotten and published again.
const NOTES_PER_REASON: usize = 8;

/// The notes published, by object and reason.
type Published = HashMap<(String, &'static str), Vec<String>>;

/// Publishes Events, once per (object, reason, message) until the reason is
/// cleared.
#[derive(Clone)]
pub struct Events {
    client: kube::Client,
    reporter: Reporter,
    metrics: Arc<Metrics>,
    seen: Arc<Mutex<Published>>,
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
            client,
            reporter,
            metrics,
            seen: Arc::default(),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<(String, &'static str), Vec<String>>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a note; returns whether it is new for the object and reason.
    fn remember(&self, object: &ObjectReference, reason: &'static str, note: &str) -> bool {
        let mut seen = self.seen();
        let notes = seen.entry((key(object), reason)).or_default();
        if notes.iter().any(|n| n == note) {
            return false;
        }
        if notes.len() >= NOTES_PER_REASON {
            notes.clear();
        }
        notes.push(note.to_string());
        true
    }

    /// Forgets one published note, so that it is published again.
    fn forget_note(&self, object: &ObjectReference, reason: &'static str, note: &str) {
        if let Some(notes) = self.seen().get_mut(&(key(object), reason)) {
            notes.retain(|n| n != note);
        }
    }

    /// Forgets that a reason's Events were published, so they are published
    /// again if they come back.
    pub fn clear(&self, object: &ObjectReference, reason: &'static str) {
        self.seen().remove(&(key(object), reason));
    }

    /// Forgets everything published about an object (one that is gone).
    pub fn forget(&self, object: &ObjectReference) {
        let key = key(object);
        self.seen().retain(|(k, _), _| *k != key);
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
        // A Recorder of its own for each Event: kube's Recorder treats an
        // Event with the reason, action and object of one it sent in the
        // last minutes as a repeat of it, whatever its note, and only bumps
        // that one's count; a new note would never be seen. Repeats of the
        // same note are already kept out above.
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        if let Err(e) = recorder.publish(&event, object).await {
            tracing::warn!(error = %e, reason, "publishing an event failed");
            // Allow a retry on the next reconcile.
            self.forget_note(object, reason, event.note.as_deref().unwrap_or_default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_events() -> Events {
        let uri = http::Uri::from_static("http://127.0.0.1:9");
        let client = kube::Client::try_from(kube::Config::new(uri)).expect("client");
        Events::new(client, "test".into(), Arc::new(Metrics::new()))
    }

    fn mk_ref(name: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("Service".into()),
            namespace: Some("ns".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn two_notes_under_one_reason_are_each_published_once() {
        let events = mk_events();
        let web = mk_ref("web");
        assert!(events.remember(&web, reason::INVALID_ANNOTATION, "bad method"));
        assert!(events.remember(&web, reason::INVALID_ANNOTATION, "bad pool"));
        // The next reconciles publish both again: neither is new.
        for _ in 0..3 {
            assert!(!events.remember(&web, reason::INVALID_ANNOTATION, "bad method"));
            assert!(!events.remember(&web, reason::INVALID_ANNOTATION, "bad pool"));
        }
        assert!(events.remember(&mk_ref("db"), reason::INVALID_ANNOTATION, "bad pool"));
    }

    #[tokio::test]
    async fn clearing_or_forgetting_publishes_again() {
        let events = mk_events();
        let web = mk_ref("web");
        assert!(events.remember(&web, reason::ALLOCATION_FAILED, "pool exhausted"));
        events.clear(&web, reason::ALLOCATION_FAILED);
        assert!(events.remember(&web, reason::ALLOCATION_FAILED, "pool exhausted"));
        events.forget_note(&web, reason::ALLOCATION_FAILED, "pool exhausted");
        assert!(events.remember(&web, reason::ALLOCATION_FAILED, "pool exhausted"));
        events.forget(&web);
        assert!(events.remember(&web, reason::ALLOCATION_FAILED, "pool exhausted"));
    }
}
