//! The writer: one thread that takes every Allocate and Release from a
//! queue, applies them in batches (as many as are waiting, up to 512
//! requests), commits each batch with one flush (group commit), then
//! publishes the batch's changes to the watch hub and only then answers its
//! requests: an answer is never sent before its write is durable.

use std::sync::{Arc, atomic::Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::{
    engine::hub::Hub,
    engine::ipam::Ipam,
    engine::stats::Stats,
    error::{Error, Result},
    model::{AllocateArgs, Allocation, ChangeKind, Event, ReleaseArgs},
    store::{Store, StoreError},
};

/// Most requests one flush makes durable.
const MAX_BATCH: usize = 512;

/// How often one batch is decided again after losing a race to another
/// writer sharing the store, before its requests are answered UNAVAILABLE.
pub const MAX_ROUNDS: u32 = 24;

enum Command {
    Allocate(AllocateArgs, oneshot::Sender<Result<Allocation>>),
    Release(ReleaseArgs, oneshot::Sender<Result<Option<Allocation>>>),
    /// Answered with the store revision once every write applied before it
    /// is durable and published.
    Barrier(oneshot::Sender<u64>),
    /// Other writers sharing the store committed something: take it in.
    Observe,
}

/// What a request came to, before its batch is durable.
enum Outcome {
    /// The allocation, and whether this request wrote it.
    Allocate(Result<(Allocation, bool)>),
    Release(Result<Option<Allocation>>),
    Nothing,
}

impl Outcome {
    /// A request that wrote, answered with `error` instead; with
    /// `checked`, also one that wrote nothing, whose answer the flush was
    /// to check (a store shared with other writers).
    fn fail(self, error: impl Fn() -> Error, checked: bool) -> Outcome {
        match self {
            Outcome::Allocate(Ok((_, wrote))) if wrote || checked => {
                Outcome::Allocate(Err(error()))
            }
            Outcome::Release(Ok(released)) if released.is_some() || checked => {
                Outcome::Release(Err(error()))
            }
            other => other,
        }
    }

    /// Gives the allocations this batch made (numbered after `base` while
    /// staged) the revision the store assigned the batch.
    fn renumber(&mut self, assigned: Option<u64>, base: u64) {
        let Some(r) = assigned else { return };
        let record = match self {
            Outcome::Allocate(Ok((a, _))) | Outcome::Release(Ok(Some(a))) => &mut a.record,
            _ => return,
        };
        if record.revision > base {
            record.revision = r;
        }
    }
}

/// Answers `cmd` with `outcome`; a requester that has gone away (timeout,
/// cancelled) needs no answer.
fn answer(cmd: Command, outcome: Outcome, revision: u64) {
    match (cmd, outcome) {
        (Command::Allocate(_, tx), Outcome::Allocate(r)) => drop(tx.send(r.map(|(a, _)| a))),
        (Command::Release(_, tx), Outcome::Release(r)) => drop(tx.send(r)),
        (Command::Barrier(tx), _) => drop(tx.send(revision)),
        // A dropped sender answers UNAVAILABLE.
        _ => {}
    }
}

/// Runs the writer until every [`Queue`] is dropped (then it flushes and
/// returns `Ok`) or the store fails for good (then it returns the error and
/// every later write is answered `UNAVAILABLE`).
fn run_writer<S: Store>(
    mut ipam: Ipam<S>,
    mut rx: mpsc::Receiver<Command>,
    hub: &Hub,
) -> Result<(), StoreError> {
    let stats = ipam.stats();
    let max = MAX_BATCH.min(ipam.max_batch()).max(1);
    let mut batch = Vec::with_capacity(max);
    let result = loop {
        let Some(first) = rx.blocking_recv() else {
            break ipam.flush().map(drop);
        };
        batch.push(first);
        while batch.len() < max {
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

/// Publishes to watchers what the store observed of every writer sharing
/// it (nothing for a store of its own).
fn publish_observed<S: Store>(ipam: &mut Ipam<S>, hub: &Hub) -> Result<(), StoreError> {
    let published = hub.published();
    let events = ipam.observe(published)?;
    if ipam.revision() > published {
        hub.publish(ipam.revision(), Some(events), || Ok(Vec::new()));
    }
    Ok(())
}

/// Applies the requests of one batch, commits them with one flush, publishes
/// the batch's changes to watchers, then answers the requests. A batch that
/// lost a race to another writer sharing the store is decided again (at
/// most [`MAX_ROUNDS`] times); when the store cannot commit, every request
/// that wrote is answered `UNAVAILABLE`, and only a failure of the store
/// itself stops the writer.
fn write_batch<S: Store>(
    ipam: &mut Ipam<S>,
    batch: &mut Vec<Command>,
    hub: &Hub,
    stats: &Stats,
) -> Result<(), StoreError> {
    let commands: Vec<Command> = std::mem::take(batch);
    stats
        .writes
        .fetch_add(requests(&commands), Ordering::Relaxed);
    let mut round = 1;
    loop {
        publish_observed(ipam, hub)?;
        let published = ipam.revision();
        // Events are built only while someone watches and only when no
        // other writer shares the store (then they come from the store); a
        // watcher that subscribes during the batch gets them from the log.
        let mut events = (hub.is_watched() && !ipam.is_shared()).then(Vec::new);
        let mut dirty = false;
        let mut outcomes: Vec<Outcome> = commands
            .iter()
            .map(|cmd| apply(ipam, cmd, &mut dirty, &mut events))
            .collect();
        // Answers wait for the flush even when this request wrote nothing: an
        // idempotent answer may report a write made earlier in this batch.
        // A store shared with other writers also checks then what the
        // decisions that wrote nothing read.
        let flushed = if dirty || (ipam.is_shared() && decides(&commands)) {
            ipam.flush()
        } else {
            Ok(None)
        };
        let failure = match flushed {
            Ok(assigned) => {
                outcomes
                    .iter_mut()
                    .for_each(|o| o.renumber(assigned, published));
                publish_batch(ipam, hub, published, dirty.then_some(events))?;
                None
            }
            Err(StoreError::Conflict { seen }) if round < MAX_ROUNDS => {
                stats.conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(seen, round, "lost a race to another writer; deciding again");
                ipam.rollback()?;
                round += 1;
                continue;
            }
            Err(StoreError::Conflict { .. }) => {
                stats.conflicts.fetch_add(1, Ordering::Relaxed);
                ipam.rollback()?;
                Some(Failure::Lost)
            }
            Err(StoreError::Unavailable(why)) => {
                tracing::warn!(error = %why, "store cannot commit; answering UNAVAILABLE");
                stats.unavailable.fetch_add(1, Ordering::Relaxed);
                ipam.rollback()?;
                Some(Failure::Unavailable(why))
            }
            Err(e) => {
                tracing::error!(error = %e, "store flush failed; refusing further writes");
                answer_all(commands, outcomes, Failure::Stopped, 0, ipam.is_shared());
                return Err(e);
            }
        };
        let revision = ipam.revision();
        match failure {
            None => commands
                .into_iter()
                .zip(outcomes)
                .for_each(|(cmd, outcome)| answer(cmd, outcome, revision)),
            Some(failure) => answer_all(commands, outcomes, failure, revision, ipam.is_shared()),
        }
        return Ok(());
    }
}

/// How many Allocate and Release requests a batch holds: a shared store's
/// wake-ups (Observe) and barriers ride in the same batches.
fn requests(commands: &[Command]) -> u64 {
    let n = commands
        .iter()
        .filter(|c| matches!(c, Command::Allocate(..) | Command::Release(..)))
        .count();
    n as u64
}

/// Publishes a committed batch to watchers: on a shared store what the
/// store observed (this batch included), else, when it `wrote`, its own
/// `events` (collected while watched) after revision `published`.
fn publish_batch<S: Store>(
    ipam: &mut Ipam<S>,
    hub: &Hub,
    published: u64,
    wrote: Option<Option<Vec<Event>>>,
) -> Result<(), StoreError> {
    if ipam.is_shared() {
        return publish_observed(ipam, hub);
    }
    if let Some(events) = wrote {
        hub.publish(ipam.revision(), events, || {
            ipam.events_between(published, ipam.revision())
        });
    }
    Ok(())
}

/// Whether a batch holds a request the writer decides (an Allocate or a
/// Release), not only barriers and wake-ups.
fn decides(commands: &[Command]) -> bool {
    commands
        .iter()
        .any(|c| matches!(c, Command::Allocate(..) | Command::Release(..)))
}

/// Why a batch's writes were not committed.
enum Failure {
    /// Lost to other writers [`MAX_ROUNDS`] times.
    Lost,
    /// The store could not commit now.
    Unavailable(String),
    /// The store failed for good.
    Stopped,
}

/// Answers every request of a batch whose writes failed: those that wrote
/// get the failure, the others their own answer, but on a `shared` store,
/// where the failed flush was also to check what answers that wrote
/// nothing read, those get the failure too.
fn answer_all(
    commands: Vec<Command>,
    outcomes: Vec<Outcome>,
    failure: Failure,
    revision: u64,
    shared: bool,
) {
    let error = || match &failure {
        Failure::Lost => Error::LostRace { rounds: MAX_ROUNDS },
        Failure::Unavailable(why) => Error::StoreUnavailable { why: why.clone() },
        Failure::Stopped => Error::Unavailable,
    };
    for (cmd, outcome) in commands.into_iter().zip(outcomes) {
        if matches!(failure, Failure::Stopped) && matches!(cmd, Command::Barrier(_)) {
            // A dropped barrier answers UNAVAILABLE.
            continue;
        }
        answer(cmd, outcome.fail(error, shared), revision);
    }
}

/// Applies one request; notes whether it wrote and, while watched, its
/// event.
fn apply<S: Store>(
    ipam: &mut Ipam<S>,
    cmd: &Command,
    dirty: &mut bool,
    events: &mut Option<Vec<Event>>,
) -> Outcome {
    match cmd {
        Command::Allocate(args, _) => {
            let result = ipam.allocate(args.clone());
            if let Ok((a, true)) = &result {
                *dirty = true;
                if let Some(events) = events {
                    events.push(Event {
                        revision: a.record.revision,
                        kind: ChangeKind::Allocated,
                        allocation: a.clone(),
                    });
                }
            }
            Outcome::Allocate(result)
        }
        Command::Release(args, _) => {
            let result = ipam.release(args.clone());
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
            Outcome::Release(result)
        }
        Command::Barrier(_) | Command::Observe => Outcome::Nothing,
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
    let weak = tx.downgrade();
    ipam.store().on_observed(Box::new(move || {
        if let Some(tx) = weak.upgrade() {
            // A full queue means the writer takes the changes in anyway.
            drop(tx.try_send(Command::Observe));
        }
    }));
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use crate::{
        engine::handle::start,
        engine::ipam::Ipam,
        fixtures::{mk_args, mk_pools},
        model::ReleaseArgs,
        store::SledStore,
    };

    #[tokio::test]
    async fn only_allocate_and_release_requests_count_as_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), 8 << 20).expect("open");
        let ipam = Ipam::load(store.clone(), mk_pools(&["a=10.0.0.0/24"])).expect("load");
        let (handle, _writer) = start(ipam, store, 16).expect("start");
        handle.allocate(mk_args("svc")).await.expect("allocate");
        handle.barrier().await.expect("barrier");
        let release = ReleaseArgs {
            owner: Some("svc".into()),
            address: None,
            scope: Default::default(),
        };
        handle.release(release).await.expect("release");
        handle.barrier().await.expect("barrier");
        assert_eq!(handle.stats().writes.load(Ordering::Relaxed), 2);
        assert_eq!(handle.stats().flushes.load(Ordering::Relaxed), 2);
    }
}
