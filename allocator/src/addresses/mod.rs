//! Address arithmetic, without I/O: the two families ([`family`]), sets of
//! address intervals ([`intervals`]), the special-purpose blocks that are
//! never handed out ([`special`]) and the pools ([`pool`]).

pub mod family;
pub mod intervals;
pub mod pool;
pub mod special;
