//! Calls to the allocator for Services, and what their failures mean for a
//! Service (the reason an Event shows).

use std::{collections::HashMap, net::IpAddr, time::Instant};

use tonic::Code;
use vipam::{client::Client, v1::AllocateRequest};

use crate::{
    desired::{LABEL_NAME, LABEL_NAMESPACE, LABEL_UID, Request, Subject, owner},
    metrics::Metrics,
};

/// Why an allocation failed, as a Service's Event says it.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    /// The pool has no free address.
    #[error("pool exhausted: {0}")]
    Exhausted(String),
    /// The requested address belongs to someone else.
    #[error("address held: {0}")]
    Held(String),
    /// The pool does not exist.
    #[error("unknown pool: {0}")]
    UnknownPool(String),
    /// The Service may not use the pool, the address or the owner it asks
    /// for.
    #[error("not permitted: {0}")]
    Denied(String),
    /// The allocator found the request invalid (the address, the owner or
    /// the pool name).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The allocator cannot be reached (retried with backoff).
    #[error("allocator unreachable: {0}")]
    Unreachable(String),
    /// The allocator refused the request as it stands.
    #[error("refused: {0}")]
    Refused(String),
}

impl AllocError {
    /// The metric label of the reason.
    pub fn reason(&self) -> &'static str {
        match self {
            AllocError::Exhausted(_) => "pool_exhausted",
            AllocError::Held(_) => "address_held",
            AllocError::UnknownPool(_) => "unknown_pool",
            AllocError::Denied(_) => "permission_denied",
            AllocError::Invalid(_) => "invalid_request",
            AllocError::Unreachable(_) => "allocator_unreachable",
            AllocError::Refused(_) => "refused",
        }
    }

    /// What an allocator's status means for the Service. Every refusal of
    /// the request as it stands is the Service's (an Event, a retry later);
    /// only transient faults are the allocator's being unreachable.
    fn from_status(s: &tonic::Status) -> Self {
        let message = s.message().to_string();
        match s.code() {
            Code::ResourceExhausted => AllocError::Exhausted(message),
            Code::AlreadyExists => AllocError::Held(message),
            Code::NotFound => AllocError::UnknownPool(message),
            Code::PermissionDenied => AllocError::Denied(message),
            Code::InvalidArgument => AllocError::Invalid(message),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                AllocError::Unreachable(message)
            }
            code @ (Code::Ok
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Internal
            | Code::DataLoss
            | Code::Unauthenticated) => {
                AllocError::Refused(format!("{}: {message}", vipam::names::code_name(code)))
            }
        }
    }
}

/// An address the allocator gave a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocated {
    /// The address.
    pub ip: IpAddr,
    /// The pool containing it (empty when outside every pool).
    pub pool: String,
}

/// The allocator as the syncer uses it.
#[derive(Clone)]
pub struct Allocator {
    client: Client,
    metrics: std::sync::Arc<Metrics>,
}

impl Allocator {
    /// Wraps a client.
    pub fn new(client: Client, metrics: std::sync::Arc<Metrics>) -> Self {
        Allocator { client, metrics }
    }

    fn observe<T>(&self, call: &'static str, start: Instant, result: &Result<T, tonic::Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics
            .observe_allocator(call, code, start.elapsed().as_secs_f64());
    }

    /// Allocates for a Service: the address asked for, or from the pool.
    pub async fn allocate(
        &self,
        service: &Subject,
        request: &Request,
    ) -> Result<Allocated, AllocError> {
        let labels = HashMap::from([
            (LABEL_NAMESPACE.to_string(), service.namespace.clone()),
            (LABEL_NAME.to_string(), service.name.clone()),
            (LABEL_UID.to_string(), service.uid.clone()),
        ]);
        let req = AllocateRequest {
            pool: request.pool.clone().unwrap_or_default(),
            owner: owner(&service.namespace, &service.name),
            address: request.address.map(|a| a.to_string()).unwrap_or_default(),
            labels,
            family: 0,
            adopt: request.adopt,
        };
        let start = Instant::now();
        let result = self.client.allocate(req).await;
        self.observe("Allocate", start, &result);
        let allocation = result.map_err(|s| AllocError::from_status(&s))?;
        let ip = allocation.address.parse().map_err(|_| {
            AllocError::Refused(format!(
                "the allocator answered with {:?}, not an address",
                allocation.address
            ))
        })?;
        Ok(Allocated {
            ip,
            pool: allocation.pool,
        })
    }

    /// Releases whatever the Service holds; `Ok(None)` when it held nothing.
    pub async fn release(&self, namespace: &str, name: &str) -> Result<Option<IpAddr>, AllocError> {
        let start = Instant::now();
        let result = self.client.release_owner(&owner(namespace, name)).await;
        self.observe("Release", start, &result);
        let released = result.map_err(|s| AllocError::from_status(&s))?;
        Ok(released.and_then(|a| a.address.parse().ok()))
    }

    /// Every allocation the syncer owns, as (owner, address).
    pub async fn owned(&self) -> Result<Vec<(String, String)>, AllocError> {
        let start = Instant::now();
        let result = self.client.list_all("", crate::desired::OWNER_PREFIX).await;
        self.observe("List", start, &result);
        Ok(result
            .map_err(|s| AllocError::from_status(&s))?
            .into_iter()
            .map(|a| (a.owner, a.address))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn each_refusal_of_the_allocator_keeps_its_message_and_only_transient_faults_are_unreachable() {
        let msg = "the allocator's reason";
        for (code, want) in [
            (Code::ResourceExhausted, AllocError::Exhausted(msg.into())),
            (Code::AlreadyExists, AllocError::Held(msg.into())),
            (Code::NotFound, AllocError::UnknownPool(msg.into())),
            (Code::PermissionDenied, AllocError::Denied(msg.into())),
            (Code::InvalidArgument, AllocError::Invalid(msg.into())),
            (
                Code::FailedPrecondition,
                AllocError::Refused(format!("FAILED_PRECONDITION: {msg}")),
            ),
            (
                Code::Unauthenticated,
                AllocError::Refused(format!("UNAUTHENTICATED: {msg}")),
            ),
            (Code::Unavailable, AllocError::Unreachable(msg.into())),
            (Code::DeadlineExceeded, AllocError::Unreachable(msg.into())),
        ] {
            let got = AllocError::from_status(&tonic::Status::new(code, msg));
            assert_eq!(got, want, "{code:?}");
            assert!(got.to_string().contains(msg), "{got}");
        }
    }

    #[test]
    fn a_denied_or_invalid_request_is_retried_after_a_refusals_backoff_not_at_once() {
        let refusal = Error::Alloc(AllocError::Held("x".into())).retry_after();
        for e in [
            AllocError::Denied("pool \"dmz\" is not for owner service:b/web".into()),
            AllocError::Invalid("address \"127.0.0.1\" is special-purpose".into()),
        ] {
            let unreachable = Error::Alloc(AllocError::Unreachable("down".into())).retry_after();
            let e = Error::Alloc(e);
            assert_eq!(e.retry_after(), refusal, "{e}");
            assert!(e.retry_after() > unreachable, "{e}");
        }
    }
}
