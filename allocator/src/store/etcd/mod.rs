//! The etcd engine: the store contract over an etcd v3 cluster that any
//! number of allocator replicas share. The only files that name etcd.
//!
//! A replica starts by agreeing with etcd on the pool definitions and
//! loading the allocations ([`start`]), then keeps a copy of the committed
//! allocations from etcd's watch ([`mirror`], fed by [`follow`]); reads,
//! scans and the writer's decisions use it, so a /8 costs what a /24 costs
//! and nothing scans etcd. The writer's staged writes become one etcd
//! transaction per flush ([`staged`]), which compares every address and
//! owner key it writes or its decisions read with what the writer decided
//! on (absent for a new allocation, the same mod revision for a release or
//! a key read) and the definition of every pool it allocates in: when
//! another replica got there first the transaction changes nothing, the
//! copy catches up, and the writer decides again. A flush returns only once
//! etcd committed the batch and the copy shows it. A change's revision is
//! etcd's revision of its transaction times [`keys::PER_REVISION`] plus its
//! place among the transaction's changes, so that every change has one of
//! its own and every replica numbers it alike. Every etcd call goes through
//! [`members`], which sends it to another member when one fails and the
//! call cannot apply twice.

mod follow;
pub mod keys;
mod members;
mod mirror;
mod repair;
mod staged;
mod start;
#[cfg(test)]
mod tests;

use std::{
    net::IpAddr,
    ops::Bound,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use etcd_client::Txn;
use tokio::sync::watch;

pub use self::start::EtcdSettings;
use self::{
    keys::Keys,
    members::{Members, Resend},
    mirror::Mirror,
    staged::Staged,
    start::{agree_on_pools, load},
};
use super::{Background, Engine, Observed, Result, Scan, StoreError, Write};
use crate::{
    addresses::pool::{Family, Pools, to_int},
    model::{Change, Record},
};

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Most operations etcd takes in one transaction (its `--max-txn-ops`
/// default); each request writes two keys.
pub const MAX_TXN_OPS: usize = 128;

/// What the etcd engine shares between the writer, the readers and the
/// follower.
struct Inner {
    members: Members,
    keys: Keys,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
    mirror: Mutex<Mirror>,
    staged: Mutex<Staged>,
    /// The copy's revision, for waiting on it.
    seen: watch::Sender<u64>,
    connected: AtomicBool,
    healthy: AtomicBool,
    wake: OnceLock<Box<dyn Fn() + Send + Sync>>,
    fatal: Mutex<Option<String>>,
    pools: Arc<Pools>,
    /// Each pool's definition and the mod revision of its key.
    pool_keys: Vec<(String, i64)>,
    /// The follower's task, until the program's supervisor takes it.
    follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every step leaves the state whole: a poisoned lock is still good.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn mirror(&self) -> MutexGuard<'_, Mirror> {
        lock(&self.mirror)
    }

    fn revision(&self) -> u64 {
        self.mirror().revision
    }

    /// Records whether the watch runs; whether that changed.
    fn set_connected(&self, connected: bool) -> bool {
        let was = self.connected.swap(connected, Ordering::Relaxed);
        if connected && !was {
            tracing::info!("etcd watch established");
        }
        was != connected
    }

    /// The copy moved on: wake whoever waits for it.
    fn advanced(&self) {
        let revision = self.revision();
        self.seen.send_if_modified(|r| {
            let moved = revision > *r;
            *r = revision;
            moved
        });
        if let Some(wake) = self.wake.get() {
            wake();
        }
    }

    /// The store cannot go on: every later flush fails with `why`.
    fn fail(&self, why: String) {
        tracing::error!(error = %why, "etcd store stopped");
        lock(&self.fatal).get_or_insert(why);
        if let Some(wake) = self.wake.get() {
            wake();
        }
    }

    /// Why the change of pool `name`'s key stops this replica, if it does.
    fn pool_changed(
        &self,
        name: &str,
        kind: etcd_client::EventType,
        value: &[u8],
    ) -> Option<String> {
        let index = self.pools.index_of(name)?;
        let ours = keys::pool_definition(self.pools.at(index));
        let theirs = String::from_utf8_lossy(value);
        match kind {
            etcd_client::EventType::Put if theirs == ours => None,
            etcd_client::EventType::Put => Some(format!(
                "pool {name} was redefined in etcd as \"{theirs}\"; this replica's is \"{ours}\""
            )),
            etcd_client::EventType::Delete => Some(format!(
                "the definition of pool {name} was deleted from etcd"
            )),
        }
    }

    /// Whether reads may be served; why not.
    fn readable(&self) -> Result<()> {
        if let Some(why) = lock(&self.fatal).as_ref() {
            return Err(StoreError::Unavailable(why.clone()));
        }
        if !self.connected.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(
                "etcd unreachable: this replica's copy of the allocations may be stale".into(),
            ));
        }
        Ok(())
    }

    /// Writes the sync key: its revision, whose event every replica's watch
    /// delivers after those of all earlier revisions (see `follow.rs`). A
    /// write that may be repeated: on another member when one fails.
    async fn barrier(&self) -> Result<u64> {
        let key = self.keys.sync();
        let put = |mut client: etcd_client::Client| {
            let key = key.clone();
            async move { client.put(key, Vec::new(), None).await }
        };
        let response = self
            .members
            .call(Resend::Always, put)
            .await
            .map_err(|f| unavailable(format!("writing etcd's sync key: {f}")))?;
        Ok(response
            .header()
            .map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0)))
    }

    /// Waits until the copy shows every change etcd has committed so far.
    /// Blocks: call it off the async runtime.
    fn catch_up_now(&self) -> Result<()> {
        let barrier = self.runtime.block_on(self.barrier())?;
        if !self.wait_for(barrier, self.timeout) {
            return Err(unavailable(format!(
                "etcd's watch did not reach revision {barrier} within {:?}",
                self.timeout
            )));
        }
        Ok(())
    }

    /// Waits up to `limit` until the copy reaches etcd revision `revision`;
    /// whether it did.
    fn wait_for(&self, revision: u64, limit: Duration) -> bool {
        let mut seen = self.seen.subscribe();
        let wait = seen.wait_for(|r| *r >= revision);
        matches!(
            self.runtime
                .block_on(async { tokio::time::timeout(limit, wait).await }),
            Ok(Ok(_))
        )
    }
}

/// The etcd engine; clones share one connection and one copy.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.inner.keys.prefix())
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects, agrees on the pool definitions (writing those etcd does not
    /// hold yet; a pool defined differently there refuses the start, naming
    /// it), reads the allocations and starts following etcd. Runs inside the
    /// Tokio runtime the follower will use.
    pub async fn open(settings: &EtcdSettings, pools: Arc<Pools>) -> Result<EtcdStore> {
        let endpoints = &settings.endpoints;
        let members = Members::new(
            endpoints.clone(),
            settings.connect_options()?,
            settings.timeout,
        );
        let keys = Keys::new(&settings.prefix);
        // The first request: where a connection that cannot work shows.
        let pool_keys = agree_on_pools(&members, &keys, &pools).await?;
        let loaded = load(&members, &keys).await?;
        let revision = loaded.revision;
        let history = usize::try_from(settings.history).unwrap_or(usize::MAX);
        // Replay history: as much of etcd's as `history` revisions reach.
        let from = revision.saturating_sub(settings.history).max(1);
        tracing::info!(
            endpoints = %endpoints.join(","),
            prefix = %settings.prefix,
            allocations = loaded.entries.len(),
            revision,
            "etcd store opened"
        );
        let mirror =
            Mirror::new(loaded.entries, revision, history, from).with_owner_keys(loaded.owner_keys);
        warn_of_orphans(&mirror, &keys);
        let inner = Arc::new(Inner {
            members,
            keys,
            timeout: settings.timeout,
            runtime: tokio::runtime::Handle::current(),
            mirror: Mutex::new(mirror),
            staged: Mutex::new(Staged::default()),
            seen: watch::Sender::new(revision),
            connected: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
            wake: OnceLock::new(),
            fatal: Mutex::new(None),
            pools,
            pool_keys,
            follower: Mutex::new(None),
        });
        let follower = tokio::spawn(follow::run(inner.clone(), from));
        *lock(&inner.follower) = Some(follower);
        let store = EtcdStore { inner };
        store.wait_connected().await?;
        Ok(store)
    }

    /// Waits for the follower's watch to be established and to have
    /// replayed the history up to the copy, so the history is whole from
    /// the start.
    async fn wait_connected(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        while !(self.inner.connected.load(Ordering::Relaxed) && self.inner.mirror().replayed()) {
            if tokio::time::Instant::now() > deadline {
                return Err(unavailable(
                    "etcd's watch did not start and catch up in time",
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    fn staged(&self) -> MutexGuard<'_, Staged> {
        lock(&self.inner.staged)
    }

    /// Commits `staged` in one transaction; the etcd revision it got, once
    /// the copy shows it.
    fn commit(&self, staged: &Staged) -> Result<u64> {
        let inner = &self.inner;
        let txn = staged.txn(&inner.keys, &inner.pool_keys, &inner.pools);
        let response = inner.runtime.block_on(send_txn(&inner.members, txn))?;
        let revision = response
            .header()
            .map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0));
        if response.succeeded() {
            // A transaction that only compared wrote nothing to wait for.
            if staged.writes() && !inner.wait_for(revision, inner.timeout) {
                return Err(unavailable(format!(
                    "etcd committed the transaction at revision {revision}, but this \
                     replica's watch did not show it within {:?} (outcome unknown: it is \
                     applied)",
                    inner.timeout
                )));
            }
            return Ok(revision);
        }
        // Another writer got there first: catch up with what it did.
        inner.catch_up_now()?;
        Err(StoreError::Conflict {
            seen: keys::reached(revision),
        })
    }
}

/// Says which owner keys of the copy are orphans (see [`repair`]).
fn warn_of_orphans(mirror: &Mirror, keys: &Keys) {
    let orphans = mirror.orphans();
    if orphans.is_empty() {
        return;
    }
    let named: Vec<String> = orphans
        .iter()
        .take(10)
        .map(|o| String::from_utf8_lossy(&keys.owner(&o.owner)).into_owned())
        .collect();
    tracing::warn!(
        count = orphans.len(),
        keys = %named.join(","),
        "owner keys name an address whose key does not name their owner; each is deleted \
         when its owner is next allocated or released"
    );
}

/// Sends `txn`, which must apply at most once: to another member only when
/// the one tried applied nothing (see [`members`]).
async fn send_txn(members: &Members, txn: Txn) -> Result<etcd_client::TxnResponse> {
    let send = |mut client: etcd_client::Client| {
        let txn = txn.clone();
        async move { client.txn(txn).await }
    };
    members.call(Resend::IfNotApplied, send).await.map_err(|f| {
        if f.unknown {
            unavailable(format!("etcd transaction failed (outcome unknown): {f}"))
        } else {
            unavailable(format!("etcd applied nothing: {f}"))
        }
    })
}

/// A scan over the copy, read in pages so no lock is held between items.
fn scan_copy(
    inner: Arc<Inner>,
    start: Bound<(Family, u128)>,
    last: (Family, u128),
) -> Scan<(IpAddr, Record)> {
    const PAGE: usize = 512;
    if let Err(e) = inner.readable() {
        return Box::new(std::iter::once(Err(e)));
    }
    let mut next = Some(start);
    Box::new(
        std::iter::from_fn(move || {
            let from = next.take()?;
            let page = inner.mirror().range(from, last, PAGE);
            if page.len() == PAGE
                && let Some((ip, _)) = page.last()
            {
                next = Some(Bound::Excluded(to_int(*ip)));
            }
            Some(page)
        })
        .flatten()
        .map(Ok),
    )
}

impl Engine for EtcdStore {
    fn get(&self, ip: IpAddr) -> Result<Option<Record>> {
        self.inner.readable()?;
        Ok(self.inner.mirror().get(ip).map(|e| e.record.clone()))
    }

    fn owner_address(&self, owner: &str) -> Result<Option<IpAddr>> {
        self.inner.readable()?;
        Ok(self.inner.mirror().owner(owner))
    }

    fn record_for_decision(&self, ip: IpAddr) -> Result<Option<Record>> {
        let mut staged = self.staged();
        Ok(staged.record(&self.inner.keys, &self.inner.mirror(), ip))
    }

    fn owner_for_decision(&self, owner: &str) -> Result<Option<IpAddr>> {
        let mut staged = self.staged();
        Ok(staged.owner(&self.inner.keys, &self.inner.mirror(), owner))
    }

    fn revision(&self) -> Result<u64> {
        Ok(keys::reached(self.inner.revision()))
    }

    fn stage(&self, write: Write) -> Result<()> {
        let inner = &self.inner;
        let mut staged = self.staged();
        match write {
            Write::Allocate { address, record } => {
                let pool = inner.pools.containing(address);
                staged.allocate(&inner.keys, pool, address, record);
            }
            Write::Release { address, record } => {
                staged.release(&inner.keys, &inner.mirror(), address, &record);
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<Vec<Change>> {
        let staged = std::mem::take(&mut *self.staged());
        if let Some(why) = lock(&self.inner.fatal).as_ref() {
            return Err(StoreError::Stopped(why.clone()));
        }
        if !staged.orphans.is_empty() {
            // Decided again once they are gone, on a copy that shows it.
            let inner = &self.inner;
            inner
                .runtime
                .block_on(repair::delete(inner, &staged.orphans))?;
            inner.catch_up_now()?;
            return Err(StoreError::Conflict {
                seen: keys::reached(inner.revision()),
            });
        }
        if staged.stale {
            // The copy already shows what overtook the decision.
            return Err(StoreError::Conflict {
                seen: keys::reached(self.inner.revision()),
            });
        }
        if staged.is_empty() {
            return Ok(Vec::new());
        }
        let revision = self.commit(&staged)?;
        if !staged.writes() {
            return Ok(Vec::new());
        }
        Ok(self.inner.mirror().take_committed(revision))
    }

    fn observed(&self) -> Result<Observed> {
        if let Some(why) = lock(&self.inner.fatal).as_ref() {
            return Err(StoreError::Stopped(why.clone()));
        }
        let mut mirror = self.inner.mirror();
        Ok(Observed {
            changes: mirror.take_unread(),
            revision: keys::reached(mirror.revision),
        })
    }

    fn on_observed(&self, wake: Box<dyn Fn() + Send + Sync>) {
        if self.inner.wake.set(wake).is_err() {
            tracing::warn!("a second writer registered on one etcd store; ignored");
        }
    }

    fn catch_up(&self, revision: u64, limit: Duration) -> Result<u64> {
        self.inner.wait_for(keys::etcd_revision(revision), limit);
        Ok(keys::reached(self.inner.revision()))
    }

    fn number_after(&self, _revision: u64) {
        // etcd numbers the transactions; the store's revisions follow.
    }

    fn max_batch(&self) -> usize {
        (MAX_TXN_OPS - self.inner.pools.len().min(MAX_TXN_OPS / 2)) / 2
    }

    fn health(&self) -> std::result::Result<(), String> {
        self.inner.readable().map_err(|e| e.to_string())?;
        if !self.inner.healthy.load(Ordering::Relaxed) {
            return Err("etcd does not answer linearizable reads (no quorum?)".into());
        }
        Ok(())
    }

    fn background(&self) -> Option<Background> {
        let follower = lock(&self.inner.follower).take()?;
        let inner = self.inner.clone();
        Some(Background {
            name: "etcd follower",
            run: Box::pin(async move {
                follower.await?;
                // It ends only when the store cannot go on.
                let why = lock(&inner.fatal).clone();
                Err(why
                    .unwrap_or_else(|| "it stopped following etcd".into())
                    .into())
            }),
        })
    }

    fn scan(&self, family: Family, first: u128, last: u128) -> Scan<(IpAddr, Record)> {
        scan_copy(
            self.inner.clone(),
            Bound::Included((family, first)),
            (family, last),
        )
    }

    fn scan_after(&self, after: Option<IpAddr>) -> Scan<(IpAddr, Record)> {
        let start = after.map_or(Bound::Unbounded, |ip| Bound::Excluded(to_int(ip)));
        scan_copy(self.inner.clone(), start, (Family::V6, u128::MAX))
    }

    fn addresses(&self) -> Scan<IpAddr> {
        Box::new(self.scan_after(None).map(|r| r.map(|(ip, _)| ip)))
    }

    fn changes(&self, after: u64, last: u64) -> Scan<Change> {
        if let Err(e) = self.inner.readable() {
            return Box::new(std::iter::once(Err(e)));
        }
        Box::new(self.inner.mirror().changes(after, last).into_iter().map(Ok))
    }

    fn first_change(&self) -> Result<Option<u64>> {
        self.inner.readable()?;
        Ok(Some(self.inner.mirror().covered_from()))
    }
}
