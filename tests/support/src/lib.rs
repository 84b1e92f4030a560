//! What every test crate of the workspace needs alike and no program does: for now, one plain
//! HTTP/1.1 `GET` ([`http`]) for the probe, metrics and health endpoints the tests read.

pub mod http;
