//! The one writer of the keepalived ConfigMap. It watches the ConfigMap and
//! the index of managed Services; when either differs from the rendered data
//! it waits a short coalescing window (so a burst of changes is one write),
//! renders the data as a whole and writes it only if it changed. A hand edit
//! is reverted and a deleted ConfigMap is recreated. An object that would
//! outgrow the size limit gets the entries that fit and an Event naming the
//! rest; it is never sent to be refused.

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
    ///
    /// The object, as JSON without its managedFields (which the API server
    /// keeps and which count against no limit), stays within
    /// [`MAX_OBJECT_BYTES`]: that bounds the data and binaryData the server
    /// counts against its 1 MiB limit. When not every entry fits, the entries
    /// already written stay, removed Services go (so clean-ups never wait on
    /// a write that cannot happen), new entries fill what room is left, and
    /// an Event on the ConfigMap names what is left out.
    async fn sync(&self, seen: &Seen) -> Result<Option<ConfigMap>, kube::Error> {
        let (generation, entries) = self.index.snapshot();
        let rendered = render::render(&entries);
        let current = match seen {
            Seen::Present(cm) => Some(cm.as_ref()),
            _ => None,
        };
        let current_data = current.and_then(|c| c.data.clone()).unwrap_or_default();
        let mut candidate = current.cloned().unwrap_or_else(|| ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            },
            ..Default::default()
        });
        candidate.data = Some(BTreeMap::new());
        let base = json_bytes(&candidate);
        let fitted = render::fit(
            &rendered.data,
            &current_data,
            MAX_OBJECT_BYTES.saturating_sub(base),
        );
        let bytes = base + render::data_bytes(&rendered.data);
        self.metrics
            .configmap_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        if fitted.left_out.is_empty() {
            self.events
                .clear(&self.reference(), reason::CONFIGMAP_TOO_LARGE);
        } else {
            let note = too_large_note(bytes, rendered.data.len(), &fitted.left_out);
            tracing::warn!("{note}");
            self.events
                .publish(
                    &self.reference(),
                    EventType::Warning,
                    reason::CONFIGMAP_TOO_LARGE,
                    "Render",
                    note,
                )
                .await;
        }
        if current.is_some() && current_data == fitted.data {
            self.index.mark_published(generation);
            return Ok(None);
        }
        let entries = fitted.data.len();
        candidate.data = Some(fitted.data);
        let written = match current {
            None => self.api.create(&PostParams::default(), &candidate).await?,
            // The resourceVersion carried over makes this a compare-and-swap.
            Some(_) => {
                self.api
                    .replace(&candidate.name_any(), &PostParams::default(), &candidate)
                    .await?
            }
        };
        self.metrics.configmap_writes.inc();
        tracing::info!(entries, generation, "wrote the keepalived ConfigMap");
        // Also when entries were left out: every removal is written, and
        // nothing waits for an addition.
        self.index.mark_published(generation);
        Ok(Some(written))
    }
}

/// The size of a ConfigMap as JSON, without its managedFields.
fn json_bytes(cm: &ConfigMap) -> usize {
    let mut cm = cm.clone();
    cm.metadata.managed_fields = None;
    // Serializing plain data cannot fail; if it did, count it as too large.
    serde_json::to_vec(&cm).map_or(usize::MAX, |v| v.len())
}

/// The note of the ConfigMapTooLarge Event: the size, and the first few
/// entries left out.
fn too_large_note(bytes: usize, entries: usize, left_out: &[(String, String)]) -> String {
    const NAMED: usize = 5;
    let mut named: Vec<String> = left_out
        .iter()
        .take(NAMED)
        .map(|(ip, value)| format!("{ip} ({value})"))
        .collect();
    if left_out.len() > NAMED {
        named.push(format!("and {} more", left_out.len() - NAMED));
    }
    format!(
        "the ConfigMap would take about {bytes} bytes with all {entries} addresses, over the \
         {MAX_OBJECT_BYTES}-byte limit of an object; {} are left out: {}",
        left_out.len(),
        named.join(", ")
    )
}

/// The data of a ConfigMap, or nothing.
pub fn data_of(cm: &ConfigMap) -> BTreeMap<String, String> {
    cm.data.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bytes_leave_out_managed_fields() {
        let mut cm = ConfigMap {
            data: Some(BTreeMap::from([("10.0.0.1".into(), "a/b".into())])),
            ..Default::default()
        };
        let plain = json_bytes(&cm);
        assert_eq!(
            plain,
            serde_json::to_vec(&cm).expect("json").len(),
            "the whole object"
        );
        cm.metadata.managed_fields = Some(vec![Default::default(); 3]);
        assert_eq!(json_bytes(&cm), plain);
    }

    #[test]
    fn the_too_large_note_names_the_limit_and_the_first_few_left_out() {
        let left_out: Vec<(String, String)> = (1..=7)
            .map(|i| (format!("10.0.0.{i}"), format!("ns/s{i}")))
            .collect();
        let note = too_large_note(2_000_000, 9, &left_out);
        assert!(note.contains("1048576"), "{note}");
        assert!(note.contains("7 are left out"), "{note}");
        assert!(note.contains("10.0.0.1 (ns/s1)"), "{note}");
        assert!(note.contains("10.0.0.5 (ns/s5), and 2 more"), "{note}");
        assert!(!note.contains("10.0.0.6"), "{note}");
    }
}
