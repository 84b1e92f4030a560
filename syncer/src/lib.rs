//! vipam-syncer: gives Kubernetes Services of `type: LoadBalancer` addresses
//! from vipam-allocator, writes them to the kube-keepalived-vip ConfigMap and
//! to each Service's status.
//!
//! Pure parts: [`desired`] (what a Service asks for), [`plan`] (what a
//! reconcile does with it, as ordered steps), [`render`] (the ConfigMap
//! format and the Go provider's state), [`owner`] (the allocator owners of
//! this cluster's Services). Kubernetes-facing parts: [`reconcile`] (takes
//! a plan's steps for one Service), [`writes`] (its patches of a Service),
//! [`adopt`] (the addresses in use, claimed before new ones), [`configmap`]
//! (the one ConfigMap writer), [`events`]. [`allocation`] talks to the allocator;
//! [`context`] is what reconciles share; [`args`] wires it all.

pub mod adopt;
pub mod allocation;
pub mod args;
pub mod configmap;
pub mod context;
pub mod desired;
pub mod error;
pub mod events;
#[cfg(test)]
mod fixtures;
pub mod http;
pub mod index;
pub mod metrics;
pub mod owner;
pub mod plan;
pub mod reconcile;
pub mod render;
pub mod writes;
