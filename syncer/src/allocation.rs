//! Calls to the allocator for Services, under this cluster's [`Owners`],
//! and what their failures mean for a Service (the reason an Event shows).

use std::{net::IpAddr, time::Instant};

use tonic::Code;
use vipam::{
    client::Client,
    v1::{AllocateRequest, ReleaseRequest},
};

use crate::{
    desired::{Request, Subject},
    index::ServiceKey,
    metrics::Metrics,
    owner::Owners,
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

/// The allocator as the syncer uses it, with the owners of this cluster's
/// Services.
#[derive(Clone)]
pub struct Allocator {
    client: Client,
    owners: Owners,
    metrics: std::sync::Arc<Metrics>,
}

/// An allocation of this syncer's: its Service, owner and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owned {
    /// The Service's namespace and name.
    pub service: ServiceKey,
    /// The owner.
    pub owner: String,
    /// The address.
    pub address: String,
}

/// The owners to take a Service's address over from, after `error` refused
/// to keep it: those from before its cluster got a name, when the request
/// keeps an address the Service already has (its status, or the Go
/// provider's state) and another owner holds it. Only when the Service's
/// owner under them holds exactly this address is it taken over (see
/// [`Allocator::allocate`]); every other owner is left alone.
pub fn take_over_from(owners: &Owners, request: &Request, error: &AllocError) -> Option<Owners> {
    if !request.adopt || request.address.is_none() || !matches!(error, AllocError::Held(_)) {
        return None;
    }
    owners.former()
}

impl Allocator {
    /// Wraps a client; the Services' owners are those of `owners`.
    pub fn new(client: Client, owners: Owners, metrics: std::sync::Arc<Metrics>) -> Self {
        Allocator {
            client,
            owners,
            metrics,
        }
    }

    fn observe<T>(&self, call: &'static str, start: Instant, result: &Result<T, tonic::Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics
            .observe_allocator(call, code, start.elapsed().as_secs_f64());
    }

    /// Allocates for a Service: the address asked for, or from the pool. An
    /// address the Service keeps that its owner from before the cluster
    /// name holds is moved to its owner now (see [`take_over_from`]).
    pub async fn allocate(
        &self,
        service: &Subject,
        request: &Request,
    ) -> Result<Allocated, AllocError> {
        let refused = match self.allocate_as(&self.owners, service, request).await {
            Err(e) => e,
            allocated => return allocated,
        };
        match (
            take_over_from(&self.owners, request, &refused),
            request.address,
        ) {
            (Some(former), Some(ip)) => self.take_over(service, request, &former, ip).await,
            _ => Err(refused),
        }
    }

    /// Moves `ip` from the Service's owner under `former` to its own: a
    /// release by owner and address (so only if that owner holds exactly
    /// it), then the request again. The allocator refuses an owner its
    /// credential or the pool does not admit before it looks at who holds
    /// the address, so a move it would refuse never gets here; what remains
    /// is the moment between the two calls, in which another client may
    /// take the address (hence the name is turned on before other clusters
    /// share the pool).
    async fn take_over(
        &self,
        service: &Subject,
        request: &Request,
        former: &Owners,
        ip: IpAddr,
    ) -> Result<Allocated, AllocError> {
        let from = former.of(&service.namespace, &service.name);
        let to = self.owners.of(&service.namespace, &service.name);
        let released = match self.release_held(&from, ip).await {
            Ok(released) => released,
            Err(e @ AllocError::Unreachable(_)) => return Err(e),
            // Another owner holds the address; it may be this Service's
            // own by now, taken over by a concurrent call: ask again.
            Err(e) => {
                tracing::debug!(service = %service, address = %ip, owner = from, error = %e, "the address is not the Service's former owner's");
                false
            }
        };
        let moved = self.allocate_as(&self.owners, service, request).await;
        match &moved {
            Ok(_) if released => {
                tracing::info!(service = %service, address = %ip, from, to, "moved the address to the owner with the cluster name");
            }
            Err(e) if released => {
                tracing::warn!(service = %service, address = %ip, from, to, error = %e, "released the address of the owner without the cluster name, but the owner with it did not get it");
            }
            _ => {}
        }
        moved
    }

    /// Allocates for the Service's owner under `owners`.
    async fn allocate_as(
        &self,
        owners: &Owners,
        service: &Subject,
        request: &Request,
    ) -> Result<Allocated, AllocError> {
        let req = AllocateRequest {
            pool: request.pool.clone().unwrap_or_default(),
            owner: owners.of(&service.namespace, &service.name),
            address: request.address.map(|a| a.to_string()).unwrap_or_default(),
            labels: owners.labels(service),
            family: 0,
            adopt: request.adopt,
            replace_held: request.moving,
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

    /// Releases `ip` if `owner` holds it; whether it was released. Another
    /// holder is an error of the allocator's (`FAILED_PRECONDITION`).
    async fn release_held(&self, owner: &str, ip: IpAddr) -> Result<bool, AllocError> {
        let start = Instant::now();
        let result = self
            .client
            .release(ReleaseRequest {
                owner: owner.to_string(),
                address: ip.to_string(),
            })
            .await;
        self.observe("Release", start, &result);
        Ok(result.map_err(|s| AllocError::from_status(&s))?.released)
    }

    /// Releases whatever the Service holds; `Ok(None)` when it held nothing.
    pub async fn release(&self, namespace: &str, name: &str) -> Result<Option<IpAddr>, AllocError> {
        let start = Instant::now();
        let result = self
            .client
            .release_owner(&self.owners.of(namespace, name))
            .await;
        self.observe("Release", start, &result);
        let released = result.map_err(|s| AllocError::from_status(&s))?;
        Ok(released.and_then(|a| a.address.parse().ok()))
    }

    /// Every allocation of this syncer's own (see
    /// [`Owners::parse`]): never one of another cluster or of the other form.
    pub async fn owned(&self) -> Result<Vec<Owned>, AllocError> {
        let start = Instant::now();
        let result = self.client.list_all("", &self.owners.prefix()).await;
        self.observe("List", start, &result);
        Ok(result
            .map_err(|s| AllocError::from_status(&s))?
            .into_iter()
            .filter_map(|a| {
                let (namespace, name) = self.owners.parse(&a.owner)?;
                Some(Owned {
                    service: (namespace.to_string(), name.to_string()),
                    owner: a.owner.clone(),
                    address: a.address,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        error::Error,
        fixtures::{mk_ip, mk_owners},
    };

    fn held() -> AllocError {
        AllocError::Held("10.0.0.1 is held by service:shop/web".into())
    }

    #[test]
    fn a_named_syncer_takes_a_kept_address_over_from_the_services_unnamed_owner() {
        let keep = Request::keep(mk_ip("10.0.0.1"));
        assert_eq!(
            take_over_from(&mk_owners(Some("c1")), &keep, &held()),
            Some(mk_owners(None))
        );
    }

    #[test]
    fn an_unnamed_syncer_takes_nothing_over() {
        let keep = Request::keep(mk_ip("10.0.0.1"));
        assert_eq!(take_over_from(&mk_owners(None), &keep, &held()), None);
    }

    #[test]
    fn only_an_address_the_service_already_has_is_taken_over() {
        let owners = mk_owners(Some("c1"));
        let asked = Request {
            address: Some(mk_ip("10.0.0.1")),
            ..Default::default()
        };
        assert_eq!(take_over_from(&owners, &asked, &held()), None);
        assert_eq!(take_over_from(&owners, &Request::default(), &held()), None);
    }

    #[test]
    fn only_an_address_held_by_another_owner_is_taken_over() {
        let owners = mk_owners(Some("c1"));
        let keep = Request::keep(mk_ip("10.0.0.1"));
        for e in [
            AllocError::Exhausted("default".into()),
            AllocError::Denied("x".into()),
            AllocError::Invalid("x".into()),
            AllocError::Unreachable("x".into()),
            AllocError::Refused("FAILED_PRECONDITION: x".into()),
            AllocError::UnknownPool("x".into()),
        ] {
            assert_eq!(take_over_from(&owners, &keep, &e), None, "{e}");
        }
    }

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
