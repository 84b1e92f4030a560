//! Watch streams: replaying the change history from a resourceVersion, then following
//! new changes, with bookmarks, timeouts, selector transitions and 410 on compacted history.
//!
//! A watch is a task writing newline-delimited JSON events into a channel the HTTP body
//! reads from. Errors found after the stream started (a too old resourceVersion) are sent
//! as an ERROR event inside the 200 stream, as the real server does; kube-rs relies on that
//! to re-list instead of retrying the same resourceVersion forever.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument as _;

use crate::error::{ApiError, Result};
use crate::objects::{self, Rendering, storage_to_view};
use crate::registry::{Registry, Target};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{Change, ChangeKind};

/// The real server ends watches without `timeoutSeconds` after its minimum request timeout.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long a watch from a future resourceVersion waits for it to exist.
const TOO_LARGE_RV_WAIT: Duration = Duration::from_secs(3);

/// Options of a watch, from its query.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
    /// `resourceVersion`.
    pub resource_version: Option<String>,
    /// `allowWatchBookmarks`.
    pub bookmarks: bool,
    /// `timeoutSeconds`.
    pub timeout: Option<Duration>,
    /// `sendInitialEvents`.
    pub send_initial_events: Option<bool>,
    /// `resourceVersionMatch`.
    pub resource_version_match: Option<String>,
    /// How objects are rendered.
    pub rendering: Rendering,
}

/// A body stream of watch events.
pub type WatchStream = ReceiverStream<std::result::Result<Bytes, Infallible>>;

struct Watcher {
    registry: Arc<Registry>,
    target: Target,
    opts: WatchOptions,
    tx: mpsc::Sender<std::result::Result<Bytes, Infallible>>,
}

/// Checks the options and starts a watch; errors here are HTTP errors, later ones are events.
pub fn start(registry: Arc<Registry>, target: Target, opts: WatchOptions) -> Result<WatchStream> {
    let start_rv = match opts.resource_version.as_deref() {
        None | Some("") | Some("0") => None,
        Some(r) => Some(
            r.parse::<u64>()
                .map_err(|_| ApiError::BadRequest(format!("invalid resource version: {r:?}")))?,
        ),
    };
    if opts.send_initial_events == Some(true) {
        if opts.resource_version_match.as_deref() != Some("NotOlderThan") {
            return Err(ApiError::invalid_one(
                "meta.k8s.io",
                "ListOptions",
                "",
                crate::error::FieldError::forbidden(
                    "resourceVersionMatch",
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ),
            ));
        }
        if !opts.bookmarks {
            return Err(ApiError::invalid_one(
                "meta.k8s.io",
                "ListOptions",
                "",
                crate::error::FieldError::forbidden(
                    "allowWatchBookmarks",
                    "sendInitialEvents requires setting allowWatchBookmarks to true",
                ),
            ));
        }
    } else if opts
        .resource_version_match
        .as_deref()
        .is_some_and(|m| !m.is_empty())
    {
        return Err(ApiError::invalid_one(
            "meta.k8s.io",
            "ListOptions",
            "",
            crate::error::FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ),
        ));
    }
    let (tx, rx) = mpsc::channel(1024);
    let span =
        tracing::info_span!("watch", resource = target.view.plural, namespace = ?target.namespace);
    let watcher = Watcher {
        registry,
        target,
        opts,
        tx,
    };
    tokio::spawn(async move { watcher.run(start_rv).await }.instrument(span));
    Ok(ReceiverStream::new(rx))
}

impl Watcher {
    async fn send(&self, event_type: &str, object: Value) -> bool {
        let line = format!("{}\n", json!({"type": event_type, "object": object}));
        self.tx.send(Ok(Bytes::from(line))).await.is_ok()
    }

    fn render(&self, obj: &Value) -> Value {
        let view = storage_to_view(self.target.view, obj);
        match self.opts.rendering {
            Rendering::Metadata => objects::as_metadata(&view),
            Rendering::Full | Rendering::Table => view,
        }
    }

    fn selected(&self, obj: &Value) -> bool {
        self.target
            .namespace
            .as_deref()
            .is_none_or(|ns| objects::namespace_of(obj) == ns)
            && self.opts.labels.matches(&objects::labels_of(obj))
            && self.opts.fields.matches(obj)
    }

    async fn bookmark(&self, rv: u64, initial_end: bool) -> bool {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = match self.opts.rendering {
            Rendering::Metadata => {
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta})
            }
            _ => {
                json!({"kind": self.target.view.kind, "apiVersion": self.target.view.api_version(), "metadata": meta})
            }
        };
        self.send("BOOKMARK", object).await
    }

    async fn error(&self, err: &ApiError) {
        self.send("ERROR", err.status_body()).await;
    }

    async fn run(self, start_rv: Option<u64>) {
        let mut rv_rx = self.registry.subscribe_rv();
        let mut close_rx = self.registry.subscribe_close();
        close_rx.borrow_and_update();
        let deadline = Instant::now() + self.opts.timeout.unwrap_or(DEFAULT_WATCH_TIMEOUT);
        let initial = start_rv.is_none() || self.opts.send_initial_events == Some(true);

        if let Some(want) = start_rv {
            let reached = matches!(
                tokio::time::timeout(TOO_LARGE_RV_WAIT, rv_rx.wait_for(|rv| *rv >= want)).await,
                Ok(Ok(_))
            );
            if !reached {
                let current = *rv_rx.borrow();
                self.error(&ApiError::Timeout(format!(
                    "Too large resource version: {want}, current: {current}"
                )))
                .await;
                return;
            }
        }
        rv_rx.borrow_and_update();
        let mut last = match self.initial_events(initial, start_rv).await {
            Some(rv) => rv,
            None => return,
        };
        if self.opts.send_initial_events == Some(true) && !self.bookmark(last, true).await {
            return;
        }
        let mut ticker = tokio::time::interval_at(
            Instant::now() + self.registry.bookmark_interval,
            self.registry.bookmark_interval,
        );
        loop {
            rv_rx.borrow_and_update();
            let batch = match self.registry.lock() {
                Ok(store) => match store.changes_since(last) {
                    Ok(changes) => Ok((changes, store.current_rv())),
                    Err(oldest) => Err(ApiError::Expired(format!(
                        "too old resource version: {last} ({oldest})"
                    ))),
                },
                Err(e) => Err(e),
            };
            let (changes, current) = match batch {
                Ok(b) => b,
                Err(e) => {
                    self.error(&e).await;
                    return;
                }
            };
            for change in changes
                .iter()
                .filter(|c| c.key.0 == self.target.view.storage)
            {
                if let Some((ty, obj)) = self.event_for(change)
                    && !self.send(ty, obj).await
                {
                    return;
                }
            }
            last = current;
            tokio::select! {
                biased;
                _ = close_rx.changed() => return,
                _ = tokio::time::sleep_until(deadline) => {
                    if self.opts.bookmarks {
                        self.bookmark(last, false).await;
                    }
                    return;
                }
                changed = rv_rx.changed() => if changed.is_err() { return },
                _ = ticker.tick(), if self.opts.bookmarks => if !self.bookmark(last, false).await { return },
                _ = self.tx.closed() => return,
            }
        }
    }

    /// Sends the synthetic ADDED events of the current state if asked; returns the
    /// resourceVersion to follow changes from.
    async fn initial_events(&self, initial: bool, start_rv: Option<u64>) -> Option<u64> {
        enum Start {
            From(u64),
            State(Vec<(crate::store::Key, Arc<Value>)>, u64),
            Fail(ApiError),
        }
        let start = match self.registry.lock() {
            Ok(store) => match start_rv {
                Some(rv) if !initial && rv < store.oldest_rv() => Start::Fail(ApiError::Expired(
                    format!("too old resource version: {rv} ({})", store.oldest_rv()),
                )),
                Some(rv) if !initial => Start::From(rv),
                _ => Start::State(
                    store.list(self.target.view.storage, self.target.namespace.as_deref()),
                    store.current_rv(),
                ),
            },
            Err(e) => Start::Fail(e),
        };
        match start {
            Start::From(rv) => Some(rv),
            Start::Fail(e) => {
                self.error(&e).await;
                None
            }
            Start::State(objects, current) => {
                for (_, obj) in objects.iter().filter(|(_, o)| self.selected(o)) {
                    if !self.send("ADDED", self.render(obj)).await {
                        return None;
                    }
                }
                Some(current)
            }
        }
    }

    /// The event a change produces for this watch, with selector transitions: an object that
    /// starts matching is ADDED, one that stops matching is DELETED.
    fn event_for(&self, change: &Change) -> Option<(&'static str, Value)> {
        let now = self.selected(&change.object);
        let before = change.previous.as_deref().is_some_and(|p| self.selected(p));
        let ty = match (change.kind, before, now) {
            (ChangeKind::Added, _, true) => "ADDED",
            (ChangeKind::Modified, true, true) => "MODIFIED",
            (ChangeKind::Modified, false, true) => "ADDED",
            (ChangeKind::Modified, true, false) => "DELETED",
            (ChangeKind::Deleted, true, _) => "DELETED",
            _ => return None,
        };
        Some((ty, self.render(&change.object)))
    }
}
