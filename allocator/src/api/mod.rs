//! The allocator on the network: the gRPC service ([`service`], the only
//! module that builds `tonic::Status`), the server with its listeners and
//! HTTP endpoints ([`server`]) and the Prometheus metrics ([`metrics`]).

pub mod metrics;
pub mod server;
pub mod service;
