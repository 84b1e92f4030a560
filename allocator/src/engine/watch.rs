//! Watch: the current allocations matching a filter, then every allocation
//! and release as it happens, each once, in revision order, and never before
//! it is durable.
//!
//! The writer publishes each flushed batch of writes to the hub
//! ([`crate::engine::hub`]), which hands it to every subscribed session. Past changes
//! come from the store's change history, so a watcher can resume from any
//! revision the history still holds, also after a restart.
//!
//! A session runs in three steps: a snapshot (when it starts from revision
//! 0), a replay from the change history up to the revision the hub last
//! published, and the live queue. A snapshot reads the store while writes go
//! on, so each address may show a state anywhere between the revisions `s`
//! (published before the scan) and `p` (durable after it, from a writer
//! barrier); replaying the changes `s+1..=p` over it gives exactly the state
//! at `p`.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
};

use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::{
    engine::hub::{Active, Hub, Subscribe},
    engine::reader::Reader,
    engine::writer::Queue,
    error::{Error, Result},
    model::{Allocation, ChangeKind, Event, ListArgs, Scope},
    policy::{checks::MAX_PAGE_SIZE, scope},
};

pub use crate::engine::hub::{
    DEFAULT_BUFFER, DEFAULT_MAX_WATCHERS, DEFAULT_PROGRESS_INTERVAL, WatchSettings,
};

/// Items a session has ready for its stream before it waits for the client.
const OUT_BUFFER: usize = 64;
/// Changes read from the log at a time.
const REPLAY_CHUNK: u64 = 1000;
/// Snapshots tried before giving up when the history moves on meanwhile.
const SNAPSHOT_ATTEMPTS: usize = 3;

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
    /// Who asks: only what it may read is sent.
    pub scope: Scope,
    /// 0: start with a snapshot; N: start after revision N.
    pub since: u64,
}

impl WatchArgs {
    fn matches(&self, a: &Allocation) -> bool {
        self.pool
            .as_deref()
            .is_none_or(|p| a.pool.as_deref() == Some(p))
            && a.record.owner.starts_with(self.owner_prefix.as_str())
            && scope::sees(&self.scope, &a.record.owner, a.pool.as_deref())
    }
}

/// The receiving end of a watch: items in order, then at most one error.
pub type WatchStream = mpsc::Receiver<Result<WatchItem>>;

/// Starts a watch session over `reader`, using `queue` for barriers and
/// `hub` for live changes. Fails at once for an unknown pool, a `since`
/// revision outside the kept history, too many watchers, or shutdown; later
/// failures end the stream.
pub async fn start(
    reader: &Reader,
    queue: &Queue,
    hub: &Arc<Hub>,
    args: WatchArgs,
) -> Result<WatchStream> {
    if let Some(pool) = &args.pool
        && reader.pools().index_of(pool).is_none()
    {
        return Err(Error::UnknownPool { pool: pool.clone() });
    }
    let active = hub.enter()?;
    if args.since > 0 {
        let since = args.since;
        let published = catch_up(reader, queue, hub, since).await?;
        blocking(reader, move |r| check_since(r, published, since)).await?;
    }
    let (tx, rx) = mpsc::channel(OUT_BUFFER);
    let session = Session {
        reader: reader.clone(),
        queue: queue.clone(),
        hub: hub.clone(),
        closed: hub.closed.subscribe(),
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

/// How long a watch waits to have seen a revision a watcher got from
/// another allocator sharing the store.
const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

/// The revision published to watchers, once it reaches `since` (a revision
/// another allocator sharing the store may have served first) or the store
/// says it has shown everything it can within [`CATCH_UP`].
async fn catch_up(reader: &Reader, queue: &Queue, hub: &Hub, since: u64) -> Result<u64> {
    let published = hub.published();
    if since <= published {
        return Ok(published);
    }
    let shown = blocking(reader, move |r| r.catch_up(since, CATCH_UP)).await?;
    if shown <= published {
        return Ok(published);
    }
    // The writer takes in what the store has shown before answering.
    queue.barrier().await
}

/// Refuses a `since` revision this allocator never reached (beyond the
/// `published` one) or whose following changes the history no longer holds.
fn check_since(reader: &Reader, published: u64, since: u64) -> Result<()> {
    if since > published {
        return Err(Error::RevisionAhead {
            since,
            current: published,
        });
    }
    let oldest = reader.oldest_resumable(published)?;
    if since < oldest {
        return Err(Error::HistoryTrimmed { since, oldest });
    }
    Ok(())
}

/// The matching allocations, as read while writes go on.
fn scan(reader: &Reader, args: &WatchArgs) -> Result<BTreeMap<IpAddr, Allocation>> {
    let mut out = BTreeMap::new();
    let mut after = None;
    loop {
        let page = reader.list(&ListArgs {
            pool: args.pool.clone(),
            owner_prefix: args.owner_prefix.clone(),
            scope: args.scope.clone(),
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
    reader: &Reader,
    f: impl FnOnce(&Reader) -> Result<T> + Send + 'static,
) -> Result<T> {
    let reader = reader.clone();
    tokio::task::spawn_blocking(move || f(&reader))
        .await
        .map_err(|_| Error::Unavailable)?
}

struct Session {
    reader: Reader,
    queue: Queue,
    hub: Arc<Hub>,
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
        let hub = self.hub.clone();
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
            let events = blocking(&self.reader, move |r| r.read_changes(from, to)).await?;
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
        let hub = self.hub.clone();
        let mut attempt = 0;
        let (revision, state) = loop {
            attempt += 1;
            let start = hub.published();
            let args = self.args.clone();
            let mut state = blocking(&self.reader, move |r| scan(r, &args)).await?;
            // Every write the scan may have seen is durable at `end`.
            let end = self.queue.barrier().await?;
            let changes = match blocking(&self.reader, move |r| r.read_changes(start, end)).await {
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
