//! vipam-allocator: named pools of IPv4 and IPv6 addresses, kept in an
//! embedded sled database and served over gRPC.
//!
//! Layers, from the inside out: [`intervals`] and [`pool`] (address
//! arithmetic, no I/O), [`store`] (the only module that touches sled),
//! [`ipam`] (the allocation rules and the single writer), [`service`] (the
//! only module that builds `tonic::Status`), [`server`] and [`args`] (wiring).
//! [`watch`] streams the writer's durable changes to watchers.

pub mod args;
pub mod intervals;
pub mod ipam;
pub mod metrics;
pub mod pool;
pub mod server;
pub mod service;
pub mod store;
pub mod watch;
