//! The watch hub: where the writer publishes each durable batch of changes
//! and watchers subscribe. It hands every batch to each subscriber through a
//! queue of its own; a queue holds at most `buffer` events, and a watcher
//! that falls further behind is cut off rather than slowing the writer (it
//! reconnects from its last revision). It also counts watch sessions
//! against `max_watchers`, and says when the allocator shuts down.

use std::{
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{mpsc, watch};

use crate::{
    error::{Error, Result},
    model::Event,
};

/// Most events a watcher may have queued when none is configured.
pub const DEFAULT_BUFFER: usize = 4096;
/// Most watchers at once when none is configured.
pub const DEFAULT_MAX_WATCHERS: usize = 256;
/// How often an idle watcher that skipped changes hears how far it got.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// Limits of watching.
#[derive(Clone, Debug)]
pub struct WatchSettings {
    /// Most events queued for one watcher (at least one batch of writes is
    /// always taken); a watcher further behind is cut off.
    pub buffer: usize,
    /// Most watchers at once.
    pub max_watchers: usize,
    /// How often a watcher whose filter skipped changes is told the revision
    /// it has reached.
    pub progress_interval: Duration,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            buffer: DEFAULT_BUFFER,
            max_watchers: DEFAULT_MAX_WATCHERS,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
        }
    }
}

/// The writes of one flush, published together.
#[derive(Debug)]
pub struct Batch {
    /// The store revision after the batch.
    pub revision: u64,
    /// Its changes, by revision.
    pub events: Vec<Event>,
}

struct Subscriber {
    id: u64,
    tx: mpsc::UnboundedSender<Arc<Batch>>,
    queued: Arc<AtomicUsize>,
    cut: Arc<AtomicBool>,
}

struct HubState {
    published: u64,
    next_id: u64,
    subscribers: Vec<Subscriber>,
}

/// Where the writer publishes durable batches and watchers subscribe.
pub struct Hub {
    state: Mutex<HubState>,
    /// True while anyone is subscribed.
    watched: AtomicBool,
    active: AtomicUsize,
    cutoffs: AtomicU64,
    pub(crate) closed: watch::Sender<bool>,
    pub(crate) settings: WatchSettings,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

pub(crate) enum Subscribe {
    Subscribed(Subscription),
    /// The hub has published past the cursor: replay up to this revision.
    Behind(u64),
    Closed,
}

/// A watcher's place in the hub; leaves it when dropped.
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    pub(crate) rx: mpsc::UnboundedReceiver<Arc<Batch>>,
    pub(crate) queued: Arc<AtomicUsize>,
    pub(crate) cut: Arc<AtomicBool>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = self.hub.lock();
        state.subscribers.retain(|s| s.id != self.id);
        self.hub
            .watched
            .store(!state.subscribers.is_empty(), Ordering::Relaxed);
    }
}

/// A session's slot among the `max_watchers`; freed when dropped.
pub(crate) struct Active(Arc<Hub>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hub {
    /// A hub whose last published revision is `revision` (everything in the
    /// store is durable when the writer starts).
    pub fn new(revision: u64, settings: WatchSettings) -> Arc<Hub> {
        Arc::new(Hub {
            state: Mutex::new(HubState {
                published: revision,
                next_id: 0,
                subscribers: Vec::new(),
            }),
            watched: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            cutoffs: AtomicU64::new(0),
            closed: watch::Sender::new(false),
            settings,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // Nothing can panic while holding the lock, and every step leaves the
        // state whole: a poisoned lock is still good to use.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether any watcher is subscribed (a hint: the answer may change
    /// right after).
    pub fn is_watched(&self) -> bool {
        self.watched.load(Ordering::Relaxed)
    }

    /// The last revision published (and so durable).
    pub fn published(&self) -> u64 {
        self.lock().published
    }

    /// Watch sessions open.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Watchers cut off for being too slow, since start.
    pub fn cutoffs(&self) -> u64 {
        self.cutoffs.load(Ordering::Relaxed)
    }

    /// Publishes the durable changes that took the store to `revision`;
    /// `events` gives them, by revision, and is called only while someone
    /// watches.
    pub fn publish(&self, revision: u64, events: impl FnOnce() -> Vec<Event>) {
        let mut state = self.lock();
        state.published = revision;
        if state.subscribers.is_empty() {
            return;
        }
        let events = events();
        let n = events.len().max(1);
        let batch = Arc::new(Batch { revision, events });
        let buffer = self.settings.buffer;
        state.subscribers.retain(|s| {
            let queued = s.queued.load(Ordering::Relaxed);
            if queued > 0 && queued + n > buffer {
                s.cut.store(true, Ordering::Relaxed);
                self.cutoffs.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            s.queued.fetch_add(n, Ordering::Relaxed);
            s.tx.send(batch.clone()).is_ok()
        });
        self.watched
            .store(!state.subscribers.is_empty(), Ordering::Relaxed);
    }

    /// Ends every watch (shutdown): each stream ends with `UNAVAILABLE`
    /// naming the revision to reconnect with.
    pub fn close(&self) {
        self.closed.send_replace(true);
        let mut state = self.lock();
        state.subscribers.clear();
        self.watched.store(false, Ordering::Relaxed);
    }

    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    pub(crate) fn enter(self: &Arc<Self>) -> Result<Active> {
        if self.is_closed() {
            return Err(Error::Unavailable);
        }
        let max = self.settings.max_watchers;
        self.active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Error::TooManyWatchers { max })?;
        Ok(Active(self.clone()))
    }

    pub(crate) fn subscribe(self: &Arc<Self>, cursor: u64) -> Subscribe {
        if self.is_closed() {
            return Subscribe::Closed;
        }
        let mut state = self.lock();
        if state.published != cursor {
            return Subscribe::Behind(state.published);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let id = state.next_id;
        state.next_id += 1;
        let queued = Arc::new(AtomicUsize::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        state.subscribers.push(Subscriber {
            id,
            tx,
            queued: queued.clone(),
            cut: cut.clone(),
        });
        self.watched.store(true, Ordering::Relaxed);
        Subscribe::Subscribed(Subscription {
            hub: self.clone(),
            id,
            rx,
            queued,
            cut,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        fixtures::mk_record,
        model::{Allocation, ChangeKind},
    };
    use std::net::IpAddr;

    fn mk_event(revision: u64) -> Event {
        Event {
            revision,
            kind: ChangeKind::Allocated,
            allocation: Allocation {
                address: IpAddr::from([10, 0, 0, revision as u8]),
                pool: None,
                record: mk_record(&format!("o{revision}"), revision),
            },
        }
    }

    fn mk_hub(buffer: usize) -> Arc<Hub> {
        Hub::new(
            0,
            WatchSettings {
                buffer,
                ..WatchSettings::default()
            },
        )
    }

    fn subscribed(hub: &Arc<Hub>, cursor: u64) -> Subscription {
        match hub.subscribe(cursor) {
            Subscribe::Subscribed(s) => s,
            Subscribe::Behind(p) => panic!("behind: published {p}"),
            Subscribe::Closed => panic!("closed"),
        }
    }

    fn unwatched() -> Vec<Event> {
        panic!("nobody watches: no events to build")
    }

    #[test]
    fn subscribing_needs_the_cursor_at_the_published_revision() {
        let hub = mk_hub(8);
        hub.publish(3, unwatched);
        assert!(matches!(hub.subscribe(1), Subscribe::Behind(3)));
        let _sub = subscribed(&hub, 3);
        assert!(hub.is_watched());
        hub.close();
        assert!(matches!(hub.subscribe(3), Subscribe::Closed));
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_the_buffer_is_cut_off_and_others_are_not() {
        let hub = mk_hub(4);
        let mut slow = subscribed(&hub, 0);
        let mut fast = subscribed(&hub, 0);
        for r in 1..=10u64 {
            hub.publish(r, || vec![mk_event(r)]);
            let batch = fast.rx.recv().await.expect("fast watcher gets every batch");
            assert_eq!(batch.revision, r);
            fast.queued.fetch_sub(1, Ordering::Relaxed);
        }
        assert!(slow.cut.load(Ordering::Relaxed), "slow watcher cut off");
        assert!(!fast.cut.load(Ordering::Relaxed));
        assert_eq!(hub.cutoffs(), 1);
        // It keeps what was queued before the cut, then its queue ends.
        let mut got = Vec::new();
        while let Some(batch) = slow.rx.recv().await {
            got.push(batch.revision);
        }
        assert_eq!(got, vec![1, 2, 3, 4]);
    }

    #[test]
    fn a_batch_larger_than_the_buffer_still_reaches_an_idle_watcher() {
        let hub = mk_hub(2);
        let sub = subscribed(&hub, 0);
        hub.publish(5, || (1..=5).map(mk_event).collect());
        assert!(!sub.cut.load(Ordering::Relaxed));
        assert_eq!(sub.queued.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn events_are_built_only_while_someone_watches() {
        let hub = mk_hub(8);
        hub.publish(1, unwatched);
        let mut sub = subscribed(&hub, 1);
        hub.publish(2, || vec![mk_event(2)]);
        let batch = sub.rx.try_recv().expect("batch");
        assert_eq!(batch.events, vec![mk_event(2)]);
        assert_eq!(batch.revision, 2);
    }

    #[test]
    fn a_dropped_subscription_leaves_the_hub() {
        let hub = mk_hub(8);
        let sub = subscribed(&hub, 0);
        assert!(hub.is_watched());
        drop(sub);
        assert!(!hub.is_watched());
        hub.publish(1, unwatched);
    }

    #[test]
    fn watchers_beyond_the_limit_are_refused() {
        let hub = Hub::new(
            0,
            WatchSettings {
                max_watchers: 2,
                ..WatchSettings::default()
            },
        );
        let a = hub.enter().expect("first");
        let _b = hub.enter().expect("second");
        assert!(matches!(
            hub.enter(),
            Err(Error::TooManyWatchers { max: 2 })
        ));
        drop(a);
        assert_eq!(hub.active(), 1);
        let _c = hub.enter().expect("a slot was freed");
    }
}
