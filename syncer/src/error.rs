//! The error of a reconcile (and of adoption, which a reconcile may run):
//! what failed, its metric label, and how soon the Service is tried again.

use std::{net::IpAddr, time::Duration};

use crate::allocation::AllocError;

/// Errors of a reconcile; each is retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a call.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// The allocator refused or failed.
    #[error("allocator: {0}")]
    Alloc(#[from] AllocError),
    /// The allocator handed out an address another Service holds: it lost its
    /// state. Every Service's address is adopted again before new ones.
    #[error(
        "the allocator gave {ip} to {owner} but {holder} holds it; adopting every address again"
    )]
    Stale {
        /// The address.
        ip: IpAddr,
        /// Who asked.
        owner: String,
        /// Who holds it.
        holder: String,
    },
    /// The Service cache stopped.
    #[error("the service cache stopped")]
    CacheGone,
    /// The ConfigMap did not drop the entry in time.
    #[error("the ConfigMap entry of {0} is not removed yet")]
    ConfigMapPending(String),
}

impl Error {
    /// The metric label of the error.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kubernetes_api",
            Error::Alloc(e) => e.reason(),
            Error::Stale { .. } => "allocator_lost_state",
            Error::ConfigMapPending(_) => "configmap_pending",
            Error::CacheGone => "cache_gone",
        }
    }

    /// How long to wait before trying the Service again.
    pub fn retry_after(&self) -> Duration {
        match self {
            Error::Alloc(AllocError::Unreachable(_)) | Error::Stale { .. } => {
                Duration::from_secs(2)
            }
            Error::Alloc(AllocError::Exhausted(_)) => Duration::from_secs(30),
            Error::Alloc(_) => Duration::from_secs(60),
            Error::Kube(_) | Error::ConfigMapPending(_) | Error::CacheGone => {
                Duration::from_secs(5)
            }
        }
    }
}
