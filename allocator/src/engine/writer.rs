//! The writer: one thread that takes every Allocate and Release from a
//! queue and applies them in batches (as many as are waiting, up to 512
//! requests or what one flush of the store may carry). One path on every
//! engine: decide each request, stage its write, commit the batch with one
//! flush (group commit), publish to the watch hub what the store says it
//! committed (with what other writers sharing it committed), and only then
//! answer: an answer is never sent before its write is durable. A request
//! that would write an address the flush already writes waits for the next
//! flush, so that every write is a change with a revision of its own. A
//! request whose caller has gone (it timed out or was cancelled) is dropped
//! before it is decided: its caller may have gone on elsewhere (another
//! replica), and a write decided now would undo what it did there.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    engine::{
        hub::Hub,
        ipam::{Ipam, Step},
        stats::Stats,
    },
    error::{Error, Result},
    model::{AllocateArgs, Allocation, Change, ChangeKind, Event, ReleaseArgs},
    store::StoreError,
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

impl Command {
    /// Whether nobody waits for the answer any more.
    fn abandoned(&self) -> bool {
        match self {
            Command::Allocate(_, tx) => tx.is_closed(),
            Command::Release(_, tx) => tx.is_closed(),
            Command::Barrier(_) | Command::Observe => false,
        }
    }
}

/// What a request came to, before its flush.
enum Outcome {
    Allocate(Result<Step<Allocation>>),
    Release(Result<Step<Option<Allocation>>>),
    Nothing,
}

impl Outcome {
    /// Whether the request waits for the next flush.
    fn is_later(&self) -> bool {
        matches!(
            self,
            Outcome::Allocate(Ok(Step::Later)) | Outcome::Release(Ok(Step::Later))
        )
    }
}

/// The answer of a step taken in a committed flush.
fn settled<T>(step: Result<Step<T>>) -> Result<T> {
    match step? {
        Step::Read(t) | Step::Wrote(t) => Ok(t),
        // Kept for the next flush before answering; never answered.
        Step::Later => Err(Error::Unavailable),
    }
}

/// Answers `cmd` with its `outcome` in a committed flush; `committed` gives
/// the revision of each address the flush allocated.
fn answer(cmd: Command, outcome: Outcome, committed: &HashMap<IpAddr, u64>, revision: u64) {
    // A requester that has gone away (timeout, cancelled) needs no answer.
    match (cmd, outcome) {
        (Command::Allocate(_, tx), Outcome::Allocate(step)) => {
            let answer = settled(step).map(|mut a| {
                if let Some(r) = committed.get(&a.address) {
                    a.record.revision = *r;
                }
                a
            });
            drop(tx.send(answer));
        }
        (Command::Release(_, tx), Outcome::Release(step)) => drop(tx.send(settled(step))),
        (Command::Barrier(tx), _) => drop(tx.send(revision)),
        // A dropped sender answers UNAVAILABLE.
        _ => {}
    }
}

/// Runs the writer until every [`Queue`] is dropped (then it returns `Ok`)
/// or the store fails for good (then it returns the error and every later
/// write is answered `UNAVAILABLE`).
fn run_writer(
    mut ipam: Ipam,
    mut rx: mpsc::Receiver<Command>,
    hub: &Hub,
) -> Result<(), StoreError> {
    let stats = ipam.stats();
    let max = MAX_BATCH.min(ipam.store().max_batch()).max(1);
    let mut batch = Vec::with_capacity(max);
    let result = loop {
        let Some(first) = rx.blocking_recv() else {
            // Nothing is ever left staged between batches.
            break Ok(());
        };
        batch.push(first);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        stats.writes.fetch_add(requests(&batch), Ordering::Relaxed);
        if let Err(e) = write_batch(&mut ipam, std::mem::take(&mut batch), hub, &stats) {
            break Err(e);
        }
    };
    stats.writer_alive.store(false, Ordering::Relaxed);
    rx.close();
    hub.close();
    result
}

/// Commits the requests of one batch, in as many flushes as they need
/// (one, unless some write an address twice).
fn write_batch(
    ipam: &mut Ipam,
    mut commands: Vec<Command>,
    hub: &Hub,
    stats: &Stats,
) -> Result<(), StoreError> {
    while !commands.is_empty() {
        commands = commit(ipam, commands, hub, stats)?;
    }
    Ok(())
}

/// Decides `commands` in order, commits their writes with one flush,
/// publishes the changes to watchers, then answers; returns the requests
/// that wait for the next flush. A flush that lost a race to another writer
/// sharing the store is decided again (at most [`MAX_ROUNDS`] times); when
/// the store cannot commit, every request decided in it is answered with the
/// failure, and only a failure of the store itself stops the writer.
fn commit(
    ipam: &mut Ipam,
    mut commands: Vec<Command>,
    hub: &Hub,
    stats: &Stats,
) -> Result<Vec<Command>, StoreError> {
    let mut round = 1;
    loop {
        drop_abandoned(&mut commands, stats);
        publish(ipam, hub, Vec::new())?;
        let outcomes: Vec<Outcome> = commands.iter().map(|cmd| apply(ipam, cmd)).collect();
        // Answers wait for the flush even when their request wrote nothing:
        // an answer may report a write made earlier in this flush, and a
        // store shared with other writers checks then what decisions read.
        let flushed = if decides(&commands) {
            ipam.flush()
        } else {
            Ok(Vec::new())
        };
        let failure = match flushed {
            Ok(changes) => {
                let committed = allocated_at(&changes);
                publish(ipam, hub, changes)?;
                return Ok(answer_all(commands, outcomes, |cmd, outcome| {
                    answer(cmd, outcome, &committed, ipam.revision());
                }));
            }
            Err(StoreError::Conflict { seen }) if round < MAX_ROUNDS => {
                stats.conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(seen, round, "lost a race to another writer; deciding again");
                ipam.rollback();
                round += 1;
                continue;
            }
            Err(e) => e,
        };
        ipam.rollback();
        return fail(commands, outcomes, failure, ipam.revision(), stats);
    }
}

/// Drops the requests whose caller has gone, before they are decided (again).
fn drop_abandoned(commands: &mut Vec<Command>, stats: &Stats) {
    let before = commands.len();
    commands.retain(|cmd| !cmd.abandoned());
    let dropped = before - commands.len();
    if dropped > 0 {
        tracing::debug!(dropped, "requests whose caller has gone; not applied");
        stats.abandoned.fetch_add(dropped as u64, Ordering::Relaxed);
    }
}

/// Answers a flush that failed with `e`: every request decided in it gets
/// the failure, unless it was refused on its own; the requests that wait
/// for the next flush come back, unless the store failed for good.
fn fail(
    commands: Vec<Command>,
    outcomes: Vec<Outcome>,
    e: StoreError,
    revision: u64,
    stats: &Stats,
) -> Result<Vec<Command>, StoreError> {
    let error = || match &e {
        StoreError::Conflict { .. } => Error::LostRace { rounds: MAX_ROUNDS },
        StoreError::Unavailable(why) => Error::StoreUnavailable { why: why.clone() },
        _ => Error::Unavailable,
    };
    let stopped = match &e {
        StoreError::Conflict { .. } => {
            stats.conflicts.fetch_add(1, Ordering::Relaxed);
            false
        }
        StoreError::Unavailable(why) => {
            tracing::warn!(error = %why, "store cannot commit; answering UNAVAILABLE");
            stats.unavailable.fetch_add(1, Ordering::Relaxed);
            false
        }
        _ => {
            tracing::error!(error = %e, "store flush failed; refusing further writes");
            true
        }
    };
    let later = answer_all(commands, outcomes, |cmd, outcome| match (cmd, outcome) {
        (Command::Allocate(_, tx), Outcome::Allocate(Err(own))) => drop(tx.send(Err(own))),
        (Command::Release(_, tx), Outcome::Release(Err(own))) => drop(tx.send(Err(own))),
        (Command::Allocate(_, tx), _) => drop(tx.send(Err(error()))),
        (Command::Release(_, tx), _) => drop(tx.send(Err(error()))),
        // A dropped barrier answers UNAVAILABLE.
        (Command::Barrier(tx), _) if !stopped => drop(tx.send(revision)),
        _ => {}
    });
    if stopped { Err(e) } else { Ok(later) }
}

/// Answers each command with `answer` but those that wait for the next
/// flush, which come back in order.
fn answer_all(
    commands: Vec<Command>,
    outcomes: Vec<Outcome>,
    mut answer: impl FnMut(Command, Outcome),
) -> Vec<Command> {
    let mut later = Vec::new();
    for (cmd, outcome) in commands.into_iter().zip(outcomes) {
        if outcome.is_later() {
            later.push(cmd);
        } else {
            answer(cmd, outcome);
        }
    }
    later
}

/// The revision of each allocation among `changes`.
fn allocated_at(changes: &[Change]) -> HashMap<IpAddr, u64> {
    changes
        .iter()
        .filter(|c| c.kind == ChangeKind::Allocated)
        .map(|c| (c.address, c.revision))
        .collect()
}

/// Takes in this writer's committed changes `own` and what other writers
/// sharing the store committed, and publishes them to watchers by
/// revision.
fn publish(ipam: &mut Ipam, hub: &Hub, own: Vec<Change>) -> Result<(), StoreError> {
    let observed = ipam.observed()?;
    let mut changes = own;
    if !observed.changes.is_empty() {
        changes.extend(observed.changes);
        changes.sort_by_key(|c| c.revision);
    }
    let before = ipam.revision();
    ipam.absorb(&changes, observed.revision);
    if ipam.revision() > before {
        let pools = ipam.pools().clone();
        hub.publish(ipam.revision(), move || {
            changes
                .into_iter()
                .map(|c| Event::from_change(&pools, c))
                .collect()
        });
    }
    Ok(())
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

/// Whether a batch holds a request the writer decides (an Allocate or a
/// Release), not only barriers and wake-ups.
fn decides(commands: &[Command]) -> bool {
    requests(commands) > 0
}

/// Applies one request.
fn apply(ipam: &mut Ipam, cmd: &Command) -> Outcome {
    match cmd {
        Command::Allocate(args, _) => Outcome::Allocate(ipam.allocate(args.clone())),
        Command::Release(args, _) => Outcome::Release(ipam.release(args.clone())),
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
pub fn spawn(ipam: Ipam, queue: usize, hub: Arc<Hub>) -> std::io::Result<(Queue, Writer)> {
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

    use tokio::sync::oneshot;

    use super::{Command, write_batch};
    use crate::{
        engine::{handle::start, hub::Hub, watch::WatchSettings},
        fixtures::{ip, mk_args, mk_ipam, mk_release},
    };

    #[tokio::test]
    async fn only_allocate_and_release_requests_count_as_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, _writer) = start(mk_ipam(dir.path(), &["a=10.0.0.0/24"]), 16).expect("start");
        handle.allocate(mk_args("svc")).await.expect("allocate");
        handle.barrier().await.expect("barrier");
        handle.release(mk_release("svc")).await.expect("release");
        handle.barrier().await.expect("barrier");
        assert_eq!(handle.stats().writes.load(Ordering::Relaxed), 2);
        assert_eq!(handle.stats().flushes.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_request_whose_caller_has_gone_is_not_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
        let stats = ipam.stats();
        let hub = Hub::new(ipam.revision(), WatchSettings::default());
        let (gone, _) = oneshot::channel();
        let (kept, kept_answer) = oneshot::channel();
        let batch = vec![
            Command::Allocate(mk_args("gone"), gone),
            Command::Allocate(mk_args("kept"), kept),
        ];
        write_batch(&mut ipam, batch, &hub, &stats).expect("written");

        let kept = kept_answer.blocking_recv().expect("answered");
        assert_eq!(kept.expect("allocated").address, ip("10.0.0.1"));
        assert_eq!(ipam.store().owner_address("gone").expect("read"), None);
        assert_eq!(stats.abandoned.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_request_writing_an_address_its_flush_writes_already_waits_for_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = mk_ipam(dir.path(), &["a=10.0.0.0/24"]);
        let stats = ipam.stats();
        let hub = Hub::new(ipam.revision(), WatchSettings::default());
        let (svc, svc_answer) = oneshot::channel();
        let (release, release_answer) = oneshot::channel();
        let (other, other_answer) = oneshot::channel();
        let batch = vec![
            Command::Allocate(mk_args("svc"), svc),
            Command::Release(mk_release("svc"), release),
            Command::Allocate(mk_args("other"), other),
        ];
        write_batch(&mut ipam, batch, &hub, &stats).expect("written");

        let svc = svc_answer
            .blocking_recv()
            .expect("answered")
            .expect("allocated");
        let other = other_answer
            .blocking_recv()
            .expect("answered")
            .expect("allocated");
        let released = release_answer
            .blocking_recv()
            .expect("answered")
            .expect("released")
            .expect("something released");
        assert_eq!((svc.address, svc.record.revision), (ip("10.0.0.1"), 1));
        // 10.0.0.1 was still taken in the first flush.
        assert_eq!((other.address, other.record.revision), (ip("10.0.0.2"), 2));
        assert_eq!(released.address, ip("10.0.0.1"));
        assert_eq!(stats.flushes.load(Ordering::Relaxed), 2);
        let history: Vec<u64> = ipam
            .store()
            .changes(0, u64::MAX)
            .map(|c| c.expect("change").revision)
            .collect();
        assert_eq!(history, vec![1, 2, 3], "each write a change of its own");
        assert_eq!(hub.published(), 3);
    }
}
