//! The one writer of the keepalived ConfigMap. It watches the ConfigMap and
//! the index of managed Services; when either differs from the rendered data
//! it waits a short coalescing window (so a burst of changes is one write),
//! renders the data as a whole and writes it only if it changed. A hand edit
//! is reverted and a deleted ConfigMap is recreated.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::{
    Api, Resource, ResourceExt,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt, events::EventType, watcher},
};

use crate::{
    events::{Events, reason},
    index::Index,
    metrics::Metrics,
    render::{self, MAX_OBJECT_BYTES},
};

/// The ConfigMap writer.
pub struct Writer {
    api: Api<ConfigMap>,
    name: String,
    namespace: String,
    index: Arc<Index>,
    events: Events,
    metrics: Arc<Metrics>,
    coalesce: Duration,
}

/// What the writer knows of the ConfigMap on the server.
enum Seen {
    /// Not listed yet.
    Unknown,
    /// Listed: absent.
    Absent,
    /// Listed: this object.
    Present(Box<ConfigMap>),
}

impl Writer {
    /// A writer of `namespace/name`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        index: Arc<Index>,
        events: Events,
        metrics: Arc<Metrics>,
        coalesce: Duration,
    ) -> Self {
        Writer {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            namespace: namespace.to_string(),
            index,
            events,
            metrics,
            coalesce,
        }
    }

    /// Reads the ConfigMap once (for adoption at start).
    pub async fn read(&self) -> Result<Option<ConfigMap>, kube::Error> {
        self.api.get_opt(&self.name).await
    }

    /// Runs until the process stops.
    pub async fn run(self) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut server = std::pin::pin!(watcher(self.api.clone(), config).default_backoff());
        let mut changes = self.index.changes();
        let mut seen = Seen::Unknown;
        let mut pending_init: Option<Option<ConfigMap>> = None;
        // When to sync next. Every trigger (a change of the index, a watch
        // event) waits out the coalescing window, so a burst of changes and
        // the echoes of our own writes end in one comparison and at most one
        // write.
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            let wake =
                due.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                event = server.next() => {
                    match event {
                        Some(Ok(watcher::Event::Init)) => pending_init = Some(None),
                        Some(Ok(watcher::Event::InitApply(cm))) => pending_init = Some(Some(cm)),
                        Some(Ok(watcher::Event::InitDone)) => {
                            seen = match pending_init.take().flatten() {
                                Some(cm) => Seen::Present(Box::new(cm)),
                                None => Seen::Absent,
                            };
                        }
                        Some(Ok(watcher::Event::Apply(cm))) => seen = Seen::Present(Box::new(cm)),
                        Some(Ok(watcher::Event::Delete(_))) => seen = Seen::Absent,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "watching the ConfigMap failed; retrying");
                            continue;
                        }
                        None => return,
                    }
                    due.get_or_insert_with(|| tokio::time::Instant::now() + self.coalesce);
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    due.get_or_insert_with(|| tokio::time::Instant::now() + self.coalesce);
                }
                () = tokio::time::sleep_until(wake), if due.is_some() => {
                    due = None;
                    if matches!(seen, Seen::Unknown) {
                        continue;
                    }
                    match self.sync(&seen).await {
                        Ok(Some(written)) => seen = Seen::Present(Box::new(written)),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "writing the ConfigMap failed; retrying");
                            // Read the object afresh rather than wait for the watch.
                            match self.api.get_opt(&self.name).await {
                                Ok(Some(cm)) => seen = Seen::Present(Box::new(cm)),
                                Ok(None) => seen = Seen::Absent,
                                Err(e) => tracing::warn!(error = %e, "reading the ConfigMap failed"),
                            }
                            due = Some(tokio::time::Instant::now() + Duration::from_millis(500));
                        }
                    }
                }
            }
        }
    }

    fn reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(ConfigMap::api_version(&()).to_string()),
            kind: Some(ConfigMap::kind(&()).to_string()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            ..Default::default()
        }
    }

    /// Writes the rendered data if the ConfigMap differs. Returns the written
    /// object, or `None` when nothing was written.
    async fn sync(&self, seen: &Seen) -> Result<Option<ConfigMap>, kube::Error> {
        let (generation, entries) = self.index.snapshot();
        let rendered = render::render(&entries);
        let current = match seen {
            Seen::Present(cm) => Some(cm.as_ref()),
            _ => None,
        };
        let current_data = current.and_then(|c| c.data.clone()).unwrap_or_default();
        if current.is_some() && current_data == rendered.data {
            self.index.mark_published(generation);
            return Ok(None);
        }
        let metadata_bytes = current.map_or(256, |c| {
            serde_json::to_vec(&c.metadata).map_or(256, |v| v.len())
        });
        let bytes = render::object_bytes(&rendered.data, metadata_bytes);
        self.metrics
            .configmap_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        if bytes > MAX_OBJECT_BYTES {
            let note = format!(
                "the ConfigMap would hold {} addresses in about {bytes} bytes, over the {MAX_OBJECT_BYTES}-byte object limit; it is left as it is",
                rendered.data.len()
            );
            tracing::error!("{note}");
            self.events
                .publish(
                    &self.reference(),
                    EventType::Warning,
                    reason::CONFIGMAP_TOO_LARGE,
                    "Render",
                    note,
                )
                .await;
            // Nothing more can be written; do not hold up clean-ups.
            self.index.mark_published(generation);
            return Ok(None);
        }
        self.events
            .clear(&self.reference(), reason::CONFIGMAP_TOO_LARGE);
        let written = match current {
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..Default::default()
                    },
                    data: Some(rendered.data.clone()),
                    ..Default::default()
                };
                self.api.create(&PostParams::default(), &cm).await?
            }
            Some(cm) => {
                let mut cm = cm.clone();
                cm.data = Some(rendered.data.clone());
                // The resourceVersion carried over makes this a compare-and-swap.
                self.api
                    .replace(&cm.name_any(), &PostParams::default(), &cm)
                    .await?
            }
        };
        self.metrics.configmap_writes.inc();
        tracing::info!(
            entries = rendered.data.len(),
            generation,
            "wrote the keepalived ConfigMap"
        );
        self.index.mark_published(generation);
        Ok(Some(written))
    }
}

/// The data of a ConfigMap, or nothing.
pub fn data_of(cm: &ConfigMap) -> BTreeMap<String, String> {
    cm.data.clone().unwrap_or_default()
}
