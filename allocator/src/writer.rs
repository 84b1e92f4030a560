//! The writer: one thread that takes every Allocate and Release from a
//! queue, applies them in batches (as many as are waiting, up to 512
//! requests), commits each batch with one flush (group commit), then
//! publishes the batch's changes to the watch hub and only then answers its
//! requests: an answer is never sent before its write is durable.

use std::sync::{Arc, atomic::Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::{
    error::{Error, Result},
    hub::{Event, Hub},
    ipam::Ipam,
    request::{AllocateArgs, Allocation, ReleaseArgs},
    stats::Stats,
    store::{ChangeKind, Store, StoreError},
};

/// Most requests one flush makes durable.
const MAX_BATCH: usize = 512;

enum Command {
    Allocate(AllocateArgs, oneshot::Sender<Result<Allocation>>),
    Release(ReleaseArgs, oneshot::Sender<Result<Option<Allocation>>>),
    /// Answered with the store revision once every write applied before it
    /// is durable and published.
    Barrier(oneshot::Sender<u64>),
}

/// Answers a request once its batch is durable.
enum Reply {
    Allocate(oneshot::Sender<Result<Allocation>>, Result<Allocation>),
    Release(
        oneshot::Sender<Result<Option<Allocation>>>,
        Result<Option<Allocation>>,
    ),
    Barrier(oneshot::Sender<u64>),
}

impl Reply {
    fn fail(self) -> Option<Self> {
        match self {
            Reply::Allocate(tx, Ok(_)) => Some(Reply::Allocate(tx, Err(Error::Unavailable))),
            Reply::Release(tx, Ok(_)) => Some(Reply::Release(tx, Err(Error::Unavailable))),
            // A dropped barrier answers UNAVAILABLE.
            Reply::Barrier(_) => None,
            other => Some(other),
        }
    }

    fn send(self, revision: u64) {
        // A requester that has gone away (timeout, cancelled) needs no answer.
        match self {
            Reply::Allocate(tx, r) => drop(tx.send(r)),
            Reply::Release(tx, r) => drop(tx.send(r)),
            Reply::Barrier(tx) => drop(tx.send(revision)),
        }
    }
}

/// Runs the writer until every [`Queue`] is dropped (then it flushes and
/// returns `Ok`) or a flush fails (then it returns the error and every later
/// write is answered `UNAVAILABLE`).
fn run_writer<S: Store>(
    mut ipam: Ipam<S>,
    mut rx: mpsc::Receiver<Command>,
    hub: &Hub,
) -> Result<(), StoreError> {
    let stats = ipam.stats();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let result = loop {
        let Some(first) = rx.blocking_recv() else {
            break ipam.flush();
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        if let Err(e) = write_batch(&mut ipam, &mut batch, hub, &stats) {
            break Err(e);
        }
    };
    stats.writer_alive.store(false, Ordering::Relaxed);
    rx.close();
    hub.close();
    result
}

/// Applies the requests of one batch, commits them with one flush, publishes
/// the batch's changes to watchers, then answers the requests. When the
/// flush fails, every request that wrote is answered `UNAVAILABLE`.
fn write_batch<S: Store>(
    ipam: &mut Ipam<S>,
    batch: &mut Vec<Command>,
    hub: &Hub,
    stats: &Stats,
) -> Result<(), StoreError> {
    let published = ipam.revision();
    // Events are built only while someone watches; a watcher that
    // subscribes during the batch gets them from the change log.
    let mut events = hub.is_watched().then(Vec::new);
    let mut dirty = false;
    let replies: Vec<Reply> = batch
        .drain(..)
        .map(|cmd| apply(ipam, cmd, &mut dirty, &mut events))
        .collect();
    stats
        .writes
        .fetch_add(replies.len() as u64, Ordering::Relaxed);
    // Answers wait for the flush even when this request wrote nothing: an
    // idempotent answer may report a write made earlier in this batch.
    let flushed = if dirty { ipam.flush() } else { Ok(()) };
    match flushed {
        Ok(()) => {
            if dirty {
                hub.publish(ipam.revision(), events, || {
                    ipam.events_between(published, ipam.revision())
                });
            }
            let revision = ipam.revision();
            replies.into_iter().for_each(|r| r.send(revision));
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "store flush failed; refusing further writes");
            replies
                .into_iter()
                .filter_map(Reply::fail)
                .for_each(|r| r.send(0));
            Err(e)
        }
    }
}

/// Applies one request; notes whether it wrote and, while watched, its
/// event.
fn apply<S: Store>(
    ipam: &mut Ipam<S>,
    cmd: Command,
    dirty: &mut bool,
    events: &mut Option<Vec<Event>>,
) -> Reply {
    match cmd {
        Command::Allocate(args, tx) => {
            let result = ipam.allocate(args).map(|(a, wrote)| {
                *dirty |= wrote;
                if wrote && let Some(events) = events {
                    events.push(Event {
                        revision: a.record.revision,
                        kind: ChangeKind::Allocated,
                        allocation: a.clone(),
                    });
                }
                a
            });
            Reply::Allocate(tx, result)
        }
        Command::Release(args, tx) => {
            let result = ipam.release(args);
            if let Ok(Some(a)) = &result {
                *dirty = true;
                if let Some(events) = events {
                    events.push(Event {
                        revision: ipam.revision(),
                        kind: ChangeKind::Released,
                        allocation: a.clone(),
                    });
                }
            }
            Reply::Release(tx, result)
        }
        Command::Barrier(tx) => Reply::Barrier(tx),
    }
}

/// The running writer thread.
pub struct Writer {
    done: oneshot::Receiver<Result<(), StoreError>>,
}

impl Writer {
    /// Waits until the writer stops: after the last [`Queue`] is dropped
    /// (`Ok`, all writes flushed) or when a flush fails.
    pub async fn wait(self) -> Result<(), StoreError> {
        self.done.await.unwrap_or(Ok(()))
    }
}

/// Where requests join the writer's queue; clones share it.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<Command>,
}

/// Starts the writer thread over `ipam`, with room for `queue` waiting
/// requests, publishing to `hub`.
pub fn spawn<S: Store>(
    ipam: Ipam<S>,
    queue: usize,
    hub: Arc<Hub>,
) -> std::io::Result<(Queue, Writer)> {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name("vipam-writer".into())
        .spawn(move || {
            let result = run_writer(ipam, rx, &hub);
            drop(done_tx.send(result));
        })?;
    Ok((Queue { tx }, Writer { done }))
}

impl Queue {
    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(command(tx))
            .await
            .map_err(|_| Error::Unavailable)?;
        rx.await.map_err(|_| Error::Unavailable)
    }

    /// Allocates; answered once durable.
    pub async fn allocate(&self, args: AllocateArgs) -> Result<Allocation> {
        self.ask(|tx| Command::Allocate(args, tx)).await?
    }

    /// Releases; answered once durable.
    pub async fn release(&self, args: ReleaseArgs) -> Result<Option<Allocation>> {
        self.ask(|tx| Command::Release(args, tx)).await?
    }

    /// The store revision once every write applied so far is durable and
    /// published to watchers.
    pub async fn barrier(&self) -> Result<u64> {
        self.ask(Command::Barrier).await
    }

    /// Whether the writer has stopped taking requests.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}
