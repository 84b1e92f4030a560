//! A Kubernetes API test server that behaves like kube-apiserver for the requests vipam's
//! syncer and its crates (kube, kube-runtime, kube-lease-manager) and kubectl make.
//!
//! It serves core/v1 Namespaces, Services (with `status`), ConfigMaps and Events,
//! events.k8s.io/v1 Events (the same objects as core Events) and coordination.k8s.io/v1
//! Leases, as JSON over plain HTTP/1.1, with the real server's resourceVersion, watch,
//! list pagination, patch, server-side apply, finalizer, validation and error semantics.
//! Whatever it does not implement is refused with an error Status, never answered with a
//! 200 that ignored part of the request.
//!
//! In tests:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use vipam_kube_api::{Fault, TestServer};
//! let server = TestServer::start().await?;
//! let client = server.client()?;
//! server.seed(serde_json::json!({
//!     "apiVersion": "v1", "kind": "ConfigMap",
//!     "metadata": {"name": "c", "namespace": "default"},
//! }))?;
//! server.fail_next(Fault::status(503).method(http::Method::PATCH).path("/api/v1/namespaces/*/services/*/status"));
//! let writes = server.requests().iter().filter(|r| r.is_write()).count();
//! # let _ = (client, writes); Ok(()) }
//! ```
//!
//! Standalone, listening on a fixed address and writing a kubeconfig for kubectl or the
//! syncer:
//!
//! ```text
//! cargo run -p vipam-kube-api -- --listen 127.0.0.1:6443 --kubeconfig /tmp/kubeconfig
//! KUBECONFIG=/tmp/kubeconfig kubectl get services -A
//! ```
//!
//! kubectl works with its default `--validate=strict` (the server publishes OpenAPI v3
//! documents that declare `fieldValidation`, and rejects unknown fields itself). `kubectl get`
//! prints NAME and AGE columns only: the server does not produce Tables.

pub mod apply;
pub mod defaults;
pub mod discovery;
pub mod error;
pub mod faults;
pub mod http;
pub mod kubeconfig;
pub mod objects;
pub mod patch;
pub mod registry;
pub mod resources;
pub mod selectors;
pub mod server;
pub mod store;
pub mod validation;
pub mod watch;

pub use error::ApiError;
pub use faults::{Fault, LoggedRequest};
pub use server::{Config, TestServer};
