//! vipam-allocator: named pools of IPv4 and IPv6 addresses, kept in a store
//! (an embedded sled database by default) and served over gRPC.
//!
//! Layers, from the inside out, each depending only on those before it:
//! [`intervals`], [`family`] and [`pool`] (address arithmetic, no I/O); [`store`] (the
//! store seam and its engines, the only place that knows a database);
//! [`migrate`] (copying the allocations from one engine to another);
//! [`error`] and [`request`] (the error enum, input checks, requests and
//! answers); [`scope`] (what a credential may touch, pure checks);
//! [`rules`] (the allocation rules, pure decisions); [`stats`],
//! [`ipam`] (the writer's state: the rules applied to the store) and
//! [`hub`] (where durable changes are published); [`writer`] (the single
//! writer thread: batching, group commit, publishing), [`reader`] (reads of
//! committed state) and [`watch`] (watch sessions); [`handle`] (the one
//! [`Handle`] over all of them); [`credentials`] (the configured clients
//! and what each listener requires of a call); [`service`] (the only module
//! that builds `tonic::Status`), [`metrics`], [`server`] and [`args`]
//! (wiring).

pub mod args;
pub mod credentials;
pub mod error;
pub mod family;
pub mod handle;
pub mod hub;
pub mod intervals;
pub mod ipam;
pub mod metrics;
pub mod migrate;
pub mod policy;
pub mod pool;
pub mod reader;
pub mod request;
pub mod rules;
pub mod scope;
pub mod server;
pub mod service;
pub mod special;
pub mod stats;
pub mod store;
pub mod watch;
pub mod writer;

pub use error::{Error, Result};
pub use handle::{Handle, start, start_with};
pub use ipam::Ipam;
pub use stats::Stats;
pub use store::{SledStore, Store, StoreError};
pub use watch::WatchSettings;
pub use writer::Writer;
