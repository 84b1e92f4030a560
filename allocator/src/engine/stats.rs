//! Counters the writer keeps and readers show: allocations per pool and
//! outside pools, flushes, writes answered or dropped, the store revision,
//! and whether the writer still runs. Lock-free, so reading them never waits for a write.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use crate::addresses::pool::Pools;

/// Counters shared between the writer and readers.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) in_pool: Vec<AtomicU64>,
    pub(crate) usable_in_pool: Vec<AtomicU64>,
    pub(crate) outside: AtomicU64,
    /// Flushes that made writes durable.
    pub flushes: AtomicU64,
    /// Requests answered by the writer.
    pub writes: AtomicU64,
    /// Flushes that lost a race to another writer sharing the store.
    pub conflicts: AtomicU64,
    /// Flushes the store could not commit for now (etcd unreachable, a full
    /// disk).
    pub unavailable: AtomicU64,
    /// Requests dropped undecided because their caller had gone.
    pub abandoned: AtomicU64,
    /// Current store revision.
    pub revision: AtomicU64,
    /// False once the writer has stopped.
    pub writer_alive: AtomicBool,
}

impl Stats {
    pub(crate) fn new(pools: usize) -> Self {
        Stats {
            in_pool: (0..pools).map(|_| AtomicU64::new(0)).collect(),
            usable_in_pool: (0..pools).map(|_| AtomicU64::new(0)).collect(),
            writer_alive: AtomicBool::new(true),
            ..Default::default()
        }
    }

    pub(crate) fn count(&self, pools: &Pools, ip: IpAddr, delta: i64) {
        let add = |c: &AtomicU64| {
            if delta > 0 {
                c.fetch_add(1, Ordering::Relaxed);
            } else {
                c.fetch_sub(1, Ordering::Relaxed);
            }
        };
        match pools.containing(ip) {
            Some(i) => {
                add(&self.in_pool[i]);
                if pools.at(i).is_usable(ip) {
                    add(&self.usable_in_pool[i]);
                }
            }
            None => add(&self.outside),
        }
    }
}
