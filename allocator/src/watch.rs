//! Watch: the current allocations matching a filter, then every allocation
//! and release as it happens, each once, in revision order, and never before
//! it is durable.
//!
//! The writer publishes each flushed batch of writes to the [`Hub`], which
//! hands it to every subscribed watcher through a queue of its own. A queue
//! holds at most `buffer` events; a watcher that falls further behind is cut
//! off rather than slowing the writer, and reconnects from its last revision.
//! Past changes come from the store's change log, so a watcher can resume
//! from any revision the log still holds, also after a restart.
//!
//! A session runs in three steps: a snapshot (when it starts from revision
//! 0), a replay from the change log up to the revision the hub last
//! published, and the live queue. A snapshot reads the store while writes go
//! on, so each address may show a state anywhere between the revisions `s`
//! (published before the scan) and `p` (durable after it, from a writer
//! barrier); replaying the changes `s+1..=p` over it gives exactly the state
//! at `p`.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::{
    ipam::{Allocation, Error, Handle, ListArgs, MAX_PAGE_SIZE, Result},
    store::{Change, ChangeKind},
};

/// Most events a watcher may have queued when none is configured.
pub const DEFAULT_BUFFER: usize = 4096;
/// Most watchers at once when none is configured.
pub const DEFAULT_MAX_WATCHERS: usize = 256;
/// How often an idle watcher that skipped changes hears how far it got.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// Items a session has ready for its stream before it waits for the client.
const OUT_BUFFER: usize = 64;
/// Changes read from the log at a time.
const REPLAY_CHUNK: u64 = 1000;
/// Snapshots tried before giving up when the history moves on meanwhile.
const SNAPSHOT_ATTEMPTS: usize = 3;

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

/// One durable change, as watchers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Revision of the write.
    pub revision: u64,
    /// Allocated or released.
    pub kind: ChangeKind,
    /// The allocation created, or the one released as it was.
    pub allocation: Allocation,
}

/// The writes of one flush, published together.
#[derive(Debug)]
pub struct Batch {
    /// The store revision after the batch.
    pub revision: u64,
    /// Its changes, by revision.
    pub events: Vec<Event>,
}

/// What a watch stream carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchItem {
    /// A matching allocation of the snapshot.
    Snapshot(Allocation),
    /// The snapshot is complete and shows the state at this revision.
    SnapshotComplete {
        /// The snapshot's revision.
        revision: u64,
    },
    /// A matching change.
    Event(Event),
    /// Every matching change up to this revision has been sent.
    Progress {
        /// The revision reached.
        revision: u64,
    },
}

/// A checked Watch request.
#[derive(Clone, Debug, Default)]
pub struct WatchArgs {
    /// Only this pool.
    pub pool: Option<String>,
    /// Only owners with this prefix.
    pub owner_prefix: String,
    /// 0: start with a snapshot; N: start after revision N.
    pub since: u64,
}

impl WatchArgs {
    fn matches(&self, a: &Allocation) -> bool {
        self.pool
            .as_deref()
            .is_none_or(|p| a.pool.as_deref() == Some(p))
            && a.record.owner.starts_with(self.owner_prefix.as_str())
    }
}

/// The receiving end of a watch: items in order, then at most one error.
pub type WatchStream = mpsc::Receiver<Result<WatchItem>>;

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
    /// True while anyone is subscribed: the writer collects events only then.
    watched: AtomicBool,
    active: AtomicUsize,
    cutoffs: AtomicU64,
    closed: watch::Sender<bool>,
    settings: WatchSettings,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

enum Subscribe {
    Subscribed(Subscription),
    /// The hub has published past the cursor: replay up to this revision.
    Behind(u64),
    Closed,
}

/// A watcher's place in the hub; leaves it when dropped.
struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    rx: mpsc::UnboundedReceiver<Arc<Batch>>,
    queued: Arc<AtomicUsize>,
    cut: Arc<AtomicBool>,
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
struct Active(Arc<Hub>);

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

    /// Publishes the durable batch that took the store to `revision`. The
    /// events are `collected` when the writer saw watchers before the batch;
    /// otherwise `load` reads them from the change log, and only if someone
    /// subscribed meanwhile.
    pub fn publish(
        &self,
        revision: u64,
        collected: Option<Vec<Event>>,
        load: impl FnOnce() -> Result<Vec<Event>>,
    ) {
        let mut state = self.lock();
        state.published = revision;
        if state.subscribers.is_empty() {
            return;
        }
        let events = match collected {
            Some(events) => events,
            None => match load() {
                Ok(events) => events,
                Err(e) => {
                    // The watchers replay from the log when they reconnect.
                    tracing::warn!(error = %e, "reading changes for watchers failed; closing them");
                    state.subscribers.clear();
                    self.watched.store(false, Ordering::Relaxed);
                    return;
                }
            },
        };
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

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn enter(self: &Arc<Self>) -> Result<Active> {
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

    fn subscribe(self: &Arc<Self>, cursor: u64) -> Subscribe {
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

impl Handle {
    /// Starts a watch. Fails at once for an unknown pool, a `since`
    /// revision outside the kept history, too many watchers, or shutdown;
    /// later failures end the stream.
    pub async fn watch(&self, args: WatchArgs) -> Result<WatchStream> {
        if let Some(pool) = &args.pool
            && self.pools().index_of(pool).is_none()
        {
            return Err(Error::UnknownPool { pool: pool.clone() });
        }
        let active = self.hub().enter()?;
        if args.since > 0 {
            let handle = self.clone();
            let since = args.since;
            tokio::task::spawn_blocking(move || handle.check_since(since))
                .await
                .map_err(|_| Error::Unavailable)??;
        }
        let (tx, rx) = mpsc::channel(OUT_BUFFER);
        let session = Session {
            handle: self.clone(),
            closed: self.hub().closed.subscribe(),
            out: tx,
            args,
            last_sent: 0,
        };
        let span = tracing::debug_span!(
            "watch",
            pool = session.args.pool.as_deref().unwrap_or(""),
            owner_prefix = %session.args.owner_prefix,
            since = session.args.since
        );
        tokio::spawn(session.run(active).instrument(span));
        Ok(rx)
    }

    /// Refuses a `since` revision this allocator never reached or whose
    /// following changes the log no longer holds.
    fn check_since(&self, since: u64) -> Result<()> {
        let published = self.hub().published();
        if since > published {
            return Err(Error::RevisionAhead {
                since,
                current: published,
            });
        }
        let oldest = self.oldest_resumable(published)?;
        if since < oldest {
            return Err(Error::HistoryTrimmed { since, oldest });
        }
        Ok(())
    }

    /// The oldest revision a watch can resume from.
    fn oldest_resumable(&self, published: u64) -> Result<u64> {
        Ok(match self.store().first_change()? {
            Some(first) => first.saturating_sub(1).min(published),
            None => published,
        })
    }

    fn event(&self, change: Change) -> Event {
        let Change {
            revision,
            kind,
            address,
            record,
        } = change;
        Event {
            revision,
            kind,
            allocation: self.allocation(address, record),
        }
    }

    /// The changes after `after` up to `last`, which the log must hold
    /// without a gap.
    fn read_changes(&self, after: u64, last: u64) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        let mut expect = after + 1;
        for change in self.store().changes(after, last) {
            let change = change?;
            if change.revision != expect {
                break;
            }
            expect += 1;
            out.push(self.event(change));
        }
        if expect != last + 1 {
            return Err(Error::HistoryTrimmed {
                since: after,
                oldest: self.oldest_resumable(last)?,
            });
        }
        Ok(out)
    }

    /// The matching allocations, as read while writes go on.
    fn scan(&self, args: &WatchArgs) -> Result<BTreeMap<IpAddr, Allocation>> {
        let mut out = BTreeMap::new();
        let mut after = None;
        loop {
            let page = self.list(&ListArgs {
                pool: args.pool.clone(),
                owner_prefix: args.owner_prefix.clone(),
                page_size: MAX_PAGE_SIZE,
                after,
            })?;
            out.extend(page.allocations.into_iter().map(|a| (a.address, a)));
            match page.next_after {
                Some(next) => after = Some(next),
                None => return Ok(out),
            }
        }
    }
}

/// Why a session stopped sending.
enum Stop {
    /// The client went away: nothing more to say.
    Gone,
    /// End the stream with this error.
    Fail(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Fail(e)
    }
}

async fn blocking<T: Send + 'static>(
    handle: &Handle,
    f: impl FnOnce(&Handle) -> Result<T> + Send + 'static,
) -> Result<T> {
    let handle = handle.clone();
    tokio::task::spawn_blocking(move || f(&handle))
        .await
        .map_err(|_| Error::Unavailable)?
}

struct Session {
    handle: Handle,
    closed: watch::Receiver<bool>,
    out: mpsc::Sender<Result<WatchItem>>,
    args: WatchArgs,
    /// Revision of the last item sent that a client may resume from.
    last_sent: u64,
}

impl Session {
    async fn run(mut self, _active: Active) {
        let mut cursor = self.args.since;
        let stop = self.stream(&mut cursor).await;
        let Stop::Fail(e) = stop else {
            return;
        };
        tracing::debug!(error = %e, "watch ended");
        // Hand the client its status after what it already has queued,
        // unless the allocator shuts down first.
        let send = self.out.send(Err(e));
        tokio::select! {
            biased;
            _ = send => {}
            _ = self.closed.wait_for(|c| *c) => {}
        }
    }

    async fn send(&mut self, item: WatchItem) -> Result<(), Stop> {
        let resume = match &item {
            WatchItem::Snapshot(_) => None,
            WatchItem::SnapshotComplete { revision } | WatchItem::Progress { revision } => {
                Some(*revision)
            }
            WatchItem::Event(e) => Some(e.revision),
        };
        tokio::select! {
            // Sending wins while there is room; shutdown only interrupts a
            // client that does not read.
            biased;
            sent = self.out.send(Ok(item)) => sent.map_err(|_| Stop::Gone)?,
            _ = self.closed.wait_for(|c| *c) => {
                return Err(Stop::Fail(Error::WatchInterrupted { resume: self.last_sent }));
            }
        }
        if let Some(r) = resume {
            self.last_sent = r;
        }
        Ok(())
    }

    /// Sends until something ends the stream; `cursor` is the revision up
    /// to which every matching change has been sent.
    async fn stream(&mut self, cursor: &mut u64) -> Stop {
        match self.stream_inner(cursor).await {
            Ok(never) => match never {},
            Err(stop) => stop,
        }
    }

    async fn stream_inner(&mut self, cursor: &mut u64) -> Result<std::convert::Infallible, Stop> {
        if *cursor == 0 {
            *cursor = self.snapshot().await?;
        }
        let hub = self.handle.hub().clone();
        let mut sub = loop {
            match hub.subscribe(*cursor) {
                Subscribe::Subscribed(sub) => break sub,
                Subscribe::Behind(published) => self.replay(cursor, published).await?,
                Subscribe::Closed => {
                    return Err(Stop::Fail(Error::WatchInterrupted { resume: *cursor }));
                }
            }
        };
        let mut progress = tokio::time::interval(hub.settings.progress_interval);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        progress.reset();
        loop {
            tokio::select! {
                batch = sub.rx.recv() => {
                    let Some(batch) = batch else {
                        return Err(Stop::Fail(if sub.cut.load(Ordering::Relaxed) {
                            Error::WatcherTooSlow { resume: *cursor }
                        } else {
                            Error::WatchInterrupted { resume: *cursor }
                        }));
                    };
                    sub.queued.fetch_sub(batch.events.len().max(1), Ordering::Relaxed);
                    if sub.cut.load(Ordering::Relaxed) {
                        return Err(Stop::Fail(Error::WatcherTooSlow { resume: *cursor }));
                    }
                    for event in &batch.events {
                        if event.revision > *cursor && self.args.matches(&event.allocation) {
                            self.send(WatchItem::Event(event.clone())).await?;
                        }
                    }
                    *cursor = (*cursor).max(batch.revision);
                }
                _ = progress.tick() => {
                    if *cursor > self.last_sent {
                        self.send(WatchItem::Progress { revision: *cursor }).await?;
                    }
                }
                // The client went away: free the slot now, not at the next
                // change.
                () = self.out.closed() => return Err(Stop::Gone),
            }
        }
    }

    /// Sends the matching changes after `cursor` up to `last` from the log.
    async fn replay(&mut self, cursor: &mut u64, last: u64) -> Result<(), Stop> {
        if last < *cursor {
            return Err(Stop::Fail(Error::RevisionAhead {
                since: *cursor,
                current: last,
            }));
        }
        while *cursor < last {
            let from = *cursor;
            let to = last.min(from.saturating_add(REPLAY_CHUNK));
            let events = blocking(&self.handle, move |h| h.read_changes(from, to)).await?;
            for event in events {
                if self.args.matches(&event.allocation) {
                    self.send(WatchItem::Event(event)).await?;
                }
            }
            *cursor = to;
        }
        Ok(())
    }

    /// Sends the matching allocations as of one revision, then the marker;
    /// returns that revision.
    async fn snapshot(&mut self) -> Result<u64, Stop> {
        let hub = self.handle.hub().clone();
        let mut attempt = 0;
        let (revision, state) = loop {
            attempt += 1;
            let start = hub.published();
            let args = self.args.clone();
            let mut state = blocking(&self.handle, move |h| h.scan(&args)).await?;
            // Every write the scan may have seen is durable at `end`.
            let end = self.handle.barrier().await?;
            let changes = match blocking(&self.handle, move |h| h.read_changes(start, end)).await {
                Ok(changes) => changes,
                Err(Error::HistoryTrimmed { .. }) if attempt < SNAPSHOT_ATTEMPTS => continue,
                Err(Error::HistoryTrimmed { .. }) => {
                    return Err(Stop::Fail(Error::Unavailable));
                }
                Err(e) => return Err(Stop::Fail(e)),
            };
            for event in changes {
                let address = event.allocation.address;
                match event.kind {
                    ChangeKind::Allocated if self.args.matches(&event.allocation) => {
                        state.insert(address, event.allocation);
                    }
                    ChangeKind::Allocated | ChangeKind::Released => {
                        state.remove(&address);
                    }
                }
            }
            break (end, state);
        };
        for allocation in state.into_values() {
            self.send(WatchItem::Snapshot(allocation)).await?;
        }
        self.send(WatchItem::SnapshotComplete { revision }).await?;
        Ok(revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Record;

    fn mk_event(revision: u64) -> Event {
        Event {
            revision,
            kind: ChangeKind::Allocated,
            allocation: Allocation {
                address: IpAddr::from([10, 0, 0, revision as u8]),
                pool: None,
                record: Record {
                    owner: format!("o{revision}"),
                    labels: BTreeMap::new(),
                    created_unix_nanos: 0,
                    revision,
                },
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

    fn no_load() -> Result<Vec<Event>> {
        panic!("events were collected; nothing to load")
    }

    #[test]
    fn subscribing_needs_the_cursor_at_the_published_revision() {
        let hub = mk_hub(8);
        hub.publish(3, None, || Ok(Vec::new()));
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
            hub.publish(r, Some(vec![mk_event(r)]), no_load);
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
        hub.publish(5, Some((1..=5).map(mk_event).collect()), no_load);
        assert!(!sub.cut.load(Ordering::Relaxed));
        assert_eq!(sub.queued.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn events_are_loaded_only_for_a_watcher_that_subscribed_during_the_batch() {
        let hub = mk_hub(8);
        hub.publish(1, None, no_load);
        let mut sub = subscribed(&hub, 1);
        let mut loaded = false;
        hub.publish(2, None, || {
            loaded = true;
            Ok(vec![mk_event(2)])
        });
        assert!(loaded);
        let batch = sub.rx.try_recv().expect("batch");
        assert_eq!(batch.events, vec![mk_event(2)]);
    }

    #[test]
    fn a_dropped_subscription_leaves_the_hub() {
        let hub = mk_hub(8);
        let sub = subscribed(&hub, 0);
        assert!(hub.is_watched());
        drop(sub);
        assert!(!hub.is_watched());
        hub.publish(1, None, no_load);
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
