//! vipam-allocator: named pools of IPv4 and IPv6 addresses, kept in a store
//! (an embedded sled database by default, or etcd shared by replicas) and
//! served over gRPC.

pub mod addresses;
pub mod api;
pub mod args;
pub mod engine;
pub mod error;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod model;
pub mod policy;
pub mod store;

pub use engine::{Handle, Ipam, Stats, WatchSettings, Writer, start, start_with};
pub use error::{Error, Result};
