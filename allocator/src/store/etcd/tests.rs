//! The etcd engine against real etcd (started by `vipam-test-etcd` on
//! loopback): the store contract, and what only a shared store promises, in
//! the submodules: replicas racing and following each other
//! ([`replicas`]), pool agreement ([`pools`]), orphaned owner keys
//! ([`orphans`]), etcd going away
//! ([`outage`]) or some of its members going away ([`quorum`]), TLS and
//! authentication ([`security`]). A test whose etcd
//! (or openssl, etcdctl) is missing says `SKIPPED` and returns, or fails
//! under `CI`.

mod orphans;
mod outage;
mod pools;
mod quorum;
mod replicas;
mod security;

use std::{
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use vipam_test_etcd::{Cluster, require};

use super::{EtcdSettings, EtcdStore};
use crate::{
    addresses::pool::Pools,
    fixtures::mk_pools,
    store::{Result, Store, contract::store_contract},
};

/// The pool every test store allocates in unless it says otherwise.
const POOL: &str = "contract=10.0.0.0/16";

/// How long a test waits for a condition that etcd's watch brings about.
const WAIT: Duration = Duration::from_secs(20);

/// etcd for one test, and the runtime its stores' followers run on; the
/// runtime stops (and with it the followers) before etcd does.
pub(super) struct Etcd {
    runtime: tokio::runtime::Runtime,
    cluster: Mutex<Cluster>,
    /// The installation prefix of this test's stores.
    prefix: String,
}

impl Etcd {
    /// A one-member cluster, or `None` (after saying why) when etcd cannot
    /// run here.
    pub(super) fn start(test: &str) -> Option<Etcd> {
        require(test)?;
        Some(Etcd::on(Cluster::start(1)))
    }

    /// A fixture over `cluster`, with a prefix of its own.
    pub(super) fn on(cluster: Cluster) -> Etcd {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the stores");
        Etcd {
            runtime,
            cluster: Mutex::new(cluster),
            prefix: format!(
                "/vipam-test-{}-{}/",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    pub(super) fn cluster(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Settings for this test's prefix on the cluster, with a 5 s timeout
    /// and no credentials.
    pub(super) fn settings(&self) -> EtcdSettings {
        EtcdSettings::plain(self.cluster().endpoints(), &self.prefix)
    }

    /// Opens a store (a replica) with `settings` and `pools`.
    pub(super) fn open_with(&self, settings: &EtcdSettings, pools: Arc<Pools>) -> Result<Store> {
        self.runtime
            .block_on(EtcdStore::open(settings, pools))
            .map(Store::from)
    }

    /// Opens a store (a replica) with this test's settings and [`POOL`].
    pub(super) fn open(&self) -> Store {
        self.open_with(&self.settings(), mk_pools(&[POOL]))
            .expect("open the etcd store")
    }

    /// Runs `f` on the stores' runtime.
    pub(super) fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

/// A fresh store on etcd of its own for a contract test, or `None` when
/// etcd cannot run here.
fn mk_etcd(test: &str) -> Option<(Etcd, Store)> {
    let etcd = Etcd::start(test)?;
    let store = etcd.open();
    Some((etcd, store))
}

/// Waits until `f` gives `Some`, for up to [`WAIT`]; panics with `what`
/// when it does not.
pub(super) fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

store_contract!(skippable mk_etcd);

#[test]
fn the_follower_is_handed_once_to_whoever_supervises_it() {
    let Some(etcd) = Etcd::start("the_follower_is_handed_once_to_whoever_supervises_it") else {
        return;
    };
    let store = etcd.open();
    let follower = store.background().expect("the follower");
    assert_eq!(follower.name, "etcd follower");
    assert!(store.background().is_none(), "handed once");
}
