//! vipam-syncer: gives Kubernetes Services of `type: LoadBalancer` addresses
//! from vipam-allocator, writes them to the kube-keepalived-vip ConfigMap and
//! to each Service's status.
//!
//! Pure parts: [`desired`] (what a Service asks for) and [`render`] (the
//! ConfigMap format and the Go provider's state). Kubernetes-facing parts:
//! [`reconcile`] (one Service), [`configmap`] (the one ConfigMap writer),
//! [`events`]. [`allocation`] talks to the allocator; [`args`] wires it all.

pub mod allocation;
pub mod args;
pub mod configmap;
pub mod desired;
pub mod events;
pub mod http;
pub mod index;
pub mod metrics;
pub mod reconcile;
pub mod render;
