//! Who may take which addresses, as pure decisions: the checks of request
//! fields ([`checks`]), the operator's rules ([`operator`]: addresses
//! outside the pools, the owners a pool admits, default pools), what a
//! credential may touch ([`scope`]) and the configured credentials
//! ([`credentials`]), and the allocation rules that decide every Allocate
//! and Release ([`rules`]).

pub mod checks;
pub mod credentials;
pub mod operator;
pub mod rules;
pub mod scope;

pub use operator::Policy;
