//! The running allocator: the writer's state ([`ipam`]: the rules applied
//! to the store), the single writer thread ([`writer`]: batches, group
//! commit, publishing), where committed changes are published ([`hub`]),
//! reads of committed state ([`reader`]), watch sessions ([`watch`]), the
//! counters ([`stats`]) and the one [`Handle`] over all of them
//! ([`handle`]).

pub mod handle;
pub mod hub;
pub mod ipam;
pub mod reader;
pub mod stats;
pub mod watch;
pub mod writer;

pub use handle::{Handle, start, start_with};
pub use ipam::Ipam;
pub use stats::Stats;
pub use watch::WatchSettings;
pub use writer::Writer;
