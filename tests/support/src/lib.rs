//! What every test crate of the workspace needs alike and no program does: one plain HTTP/1.1
//! `GET` ([`http`]) for the probe, metrics and health endpoints the tests read, saying that a
//! test cannot run here ([`skip`]), and a small disk to fill ([`tmpfs`]).

pub mod http;
pub mod skip;
pub mod tmpfs;
