//! The allocator as the gRPC service and the HTTP endpoints use it: one
//! [`Handle`] that sends writes to the writer's queue, reads through the
//! [`Reader`], and starts watches on the hub. [`start`] and [`start_with`]
//! put the pieces together over a loaded [`Ipam`].

use std::{
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
};

use crate::{
    addresses::pool::Pools,
    engine::hub::{Hub, WatchSettings},
    engine::ipam::Ipam,
    engine::reader::Reader,
    engine::stats::Stats,
    engine::watch::{self, WatchArgs, WatchStream},
    engine::writer::{self, Queue, Writer},
    error::Result,
    model::{AllocateArgs, Allocation, ListArgs, Page, PoolsReport, ReleaseArgs, Scope},
};

/// The allocator as the gRPC service and HTTP endpoints use it.
#[derive(Clone)]
pub struct Handle {
    queue: Queue,
    reader: Reader,
    hub: Arc<Hub>,
}

/// Starts the writer thread over `ipam`, with room for `queue` waiting
/// requests and the default watch limits.
pub fn start(ipam: Ipam, queue: usize) -> std::io::Result<(Handle, Writer)> {
    start_with(ipam, queue, WatchSettings::default())
}

/// Starts the writer thread over `ipam`, with room for `queue` waiting
/// requests and the given watch limits; the [`Handle`] reads the store
/// `ipam` writes to.
pub fn start_with(
    ipam: Ipam,
    queue: usize,
    watch: WatchSettings,
) -> std::io::Result<(Handle, Writer)> {
    let reader = Reader::new(ipam.store().clone(), ipam.pools().clone(), ipam.stats());
    let hub = Hub::new(ipam.revision(), watch);
    let (queue, writer) = writer::spawn(ipam, queue, hub.clone())?;
    Ok((Handle { queue, reader, hub }, writer))
}

impl Handle {
    /// The configured pools.
    pub fn pools(&self) -> &Pools {
        self.reader.pools()
    }

    /// Shared counters.
    pub fn stats(&self) -> &Stats {
        self.reader.stats()
    }

    /// Where watchers subscribe.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Ends every watch stream (on shutdown, before draining requests).
    pub fn close_watchers(&self) {
        self.hub.close();
    }

    /// The store revision once every write applied so far is durable and
    /// published to watchers.
    pub async fn barrier(&self) -> Result<u64> {
        self.queue.barrier().await
    }

    /// Whether the writer still takes requests and the store serves reads;
    /// why not. A store that serves reads but cannot write now (a full
    /// disk) is ready: its writes say why they fail.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if !self.stats().writer_alive.load(Ordering::Relaxed) || self.queue.is_closed() {
            return Err("store writer stopped");
        }
        if self.reader.health().is_err() {
            return Err("store unavailable");
        }
        Ok(())
    }

    /// Allocates; answered once durable.
    pub async fn allocate(&self, args: AllocateArgs) -> Result<Allocation> {
        self.queue.allocate(args).await
    }

    /// Releases; answered once durable.
    pub async fn release(&self, args: ReleaseArgs) -> Result<Option<Allocation>> {
        self.queue.release(args).await
    }

    /// The allocation held by an owner, if `scope` may read it.
    pub fn get_by_owner(&self, owner: &str, scope: &Scope) -> Result<Allocation> {
        self.reader.get_by_owner(owner, scope)
    }

    /// The allocation at an address, if `scope` may read it.
    pub fn get_by_address(&self, ip: IpAddr, scope: &Scope) -> Result<Allocation> {
        self.reader.get_by_address(ip, scope)
    }

    /// One page of the allocations the caller may read, by address.
    pub fn list(&self, args: &ListArgs) -> Result<Page> {
        self.reader.list(args)
    }

    /// Figures of every pool, and the first allocations outside them.
    pub fn pools_report(&self) -> Result<PoolsReport> {
        self.reader.pools_report()
    }

    /// Starts a watch. Fails at once for an unknown pool, a `since`
    /// revision outside the kept history, too many watchers, or shutdown;
    /// later failures end the stream.
    pub async fn watch(&self, args: WatchArgs) -> Result<WatchStream> {
        watch::start(&self.reader, &self.queue, &self.hub, args).await
    }
}
