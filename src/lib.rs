//! The public API of the vipam address allocator: the Rust code generated from
//! `proto/vipam/v1/allocator.proto` and the file descriptor set that the
//! allocator serves through gRPC reflection, and a typed [`client::Client`].
//! With the `runtime` feature, also what both programs share to run as
//! services (`runtime`).

pub mod client;
pub mod names;
#[cfg(feature = "runtime")]
pub mod runtime;

/// Generated messages, client and server of package `vipam.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
    tonic::include_proto!("vipam.v1");
}

/// The encoded `FileDescriptorSet` of every proto file of the API, with its
/// imports, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vipam_descriptor.bin"));
