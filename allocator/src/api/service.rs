//! The `vipam.v1.Allocator` gRPC service: proto ⇄ domain conversions, the
//! caller's credential (from its bearer token) and the scope it grants, the
//! log line of every accepted change, error codes and per-RPC metrics. The
//! only module that builds `tonic::Status`.

use std::{net::IpAddr, pin::Pin, sync::Arc, time::Instant};

use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use vipam::v1::{
    self as pb,
    allocator_server::{Allocator, AllocatorServer},
};

use crate::{
    addresses::pool::Family,
    api::metrics::Metrics,
    engine::handle::Handle,
    engine::watch::{WatchArgs, WatchItem},
    error::{self, Error},
    model::{AllocateArgs, Allocation, ChangeKind, ListArgs, ReleaseArgs, Scope},
    policy::checks::{
        DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, parse_address, parse_labels, parse_owner, parse_pool,
    },
    policy::credentials::{Access, AuthError},
    policy::scope,
    store::StoreError,
};

/// Maps an allocation error to the gRPC status a client can act on.
pub fn status(e: Error) -> Status {
    let message = e.to_string();
    match e {
        Error::Invalid { .. } => Status::invalid_argument(message),
        Error::UnknownPool { .. } | Error::NotFound { .. } => Status::not_found(message),
        Error::Exhausted { .. } => Status::resource_exhausted(message),
        Error::Held { .. } => Status::already_exists(message),
        Error::OwnerHoldsOther { .. }
        | Error::Excluded { .. }
        | Error::NotInPool { .. }
        | Error::ExplicitOnly { .. }
        | Error::NoFamily { .. }
        | Error::HeldByOther { .. } => Status::failed_precondition(message),
        Error::Unavailable
        | Error::StoreUnavailable { .. }
        | Error::LostRace { .. }
        | Error::Store(StoreError::Unavailable(_))
        | Error::WatchInterrupted { .. }
        | Error::TooManyWatchers { .. } => Status::unavailable(message),
        Error::HistoryTrimmed { .. } | Error::RevisionAhead { .. } => Status::out_of_range(message),
        Error::WatcherTooSlow { .. } => Status::resource_exhausted(message),
        Error::Store(_) => Status::internal(message),
        Error::OwnerNotPermitted { .. }
        | Error::PoolNotPermitted { .. }
        | Error::OutsidePoolsNotPermitted { .. }
        | Error::ReadNotPermitted { .. }
        | Error::PoolRefusesOwner { .. } => Status::permission_denied(message),
        Error::OutsidePools { .. } => Status::failed_precondition(message),
    }
}

pub use crate::policy::credentials::Token;

/// The gRPC service over the allocator.
#[derive(Clone)]
pub struct Service {
    ipam: Handle,
    access: Access,
    metrics: Arc<Metrics>,
}

impl Service {
    /// A service over `ipam`; `access` says which calls need a credential.
    pub fn new(ipam: Handle, access: Access, metrics: Arc<Metrics>) -> Self {
        Service {
            ipam,
            access,
            metrics,
        }
    }

    /// The tonic server for this service, with message size limits.
    pub fn into_server(self, max_message_bytes: usize) -> AllocatorServer<Service> {
        AllocatorServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }

    /// The scope of the caller: its credential's, from the bearer token it
    /// carries, or every right where the listener lets a call without one
    /// through. `changes` is set for Allocate and Release.
    fn caller<T>(&self, request: &Request<T>, changes: bool) -> Result<Scope, Status> {
        let header = request.metadata().get("authorization");
        let token = match header {
            None => None,
            Some(v) => Some(v.as_bytes().strip_prefix(b"Bearer ").ok_or_else(|| {
                Status::unauthenticated("the authorization header is not \"Bearer <token>\"")
            })?),
        };
        self.access.scope(token, changes).map_err(|e| match e {
            AuthError::Missing => {
                Status::unauthenticated("this call needs an authorization: Bearer <token> header")
            }
            AuthError::Unknown => Status::unauthenticated("the bearer token is not valid"),
        })
    }

    async fn observe<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let start = Instant::now();
        let result = call.await;
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics
            .observe(method, code, start.elapsed().as_secs_f64());
        if let Err(s) = &result {
            tracing::debug!(method, code = ?s.code(), message = s.message(), "request failed");
        }
        result.map(Response::new)
    }

    /// Runs a blocking store read off the async workers.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Handle) -> error::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let ipam = self.ipam.clone();
        tokio::task::spawn_blocking(move || f(&ipam))
            .await
            .map_err(|e| Status::internal(format!("read task failed: {e}")))?
            .map_err(status)
    }
}

/// The credential's name in logs; a call without one is "local".
fn credential_name(scope: &Scope) -> String {
    if scope.credential.is_empty() {
        "local".to_string()
    } else {
        scope.credential.clone()
    }
}

fn optional(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn allocate_args(request: pb::AllocateRequest, scope: Scope) -> Result<AllocateArgs, Error> {
    let pb::AllocateRequest {
        pool,
        owner,
        address,
        labels,
        family,
        adopt,
        replace_held,
    } = request;
    if adopt && address.is_empty() {
        return Err(Error::Invalid {
            field: "adopt",
            value: "true".into(),
            why: "adopting needs the address in use".into(),
        });
    }
    let family = match pb::Family::try_from(family) {
        Ok(pb::Family::Unspecified) => None,
        Ok(pb::Family::Ipv4) => Some(Family::V4),
        Ok(pb::Family::Ipv6) => Some(Family::V6),
        Err(_) => {
            return Err(Error::Invalid {
                field: "family",
                value: family.to_string(),
                why: "not a known family".into(),
            });
        }
    };
    Ok(AllocateArgs {
        pool: optional(&pool).map(|p| parse_pool("pool", p)).transpose()?,
        owner: parse_owner("owner", &owner)?,
        address: optional(&address)
            .map(|a| parse_address("address", a))
            .transpose()?,
        labels: parse_labels(labels)?,
        family,
        adopt,
        replace_held,
        scope,
    })
}

fn release_args(request: pb::ReleaseRequest, scope: Scope) -> Result<ReleaseArgs, Error> {
    let pb::ReleaseRequest { owner, address } = request;
    Ok(ReleaseArgs {
        owner: optional(&owner)
            .map(|o| parse_owner("owner", o))
            .transpose()?,
        address: optional(&address)
            .map(|a| parse_address("address", a))
            .transpose()?,
        scope,
    })
}

const PAGE_TOKEN_PREFIX: &str = "after:";

fn list_args(request: pb::ListRequest, scope: Scope) -> Result<ListArgs, Error> {
    let pb::ListRequest {
        pool,
        owner_prefix,
        page_size,
        page_token,
    } = request;
    let page_size = match page_size {
        0 => DEFAULT_PAGE_SIZE,
        n if n < 0 || n as usize > MAX_PAGE_SIZE => {
            return Err(Error::Invalid {
                field: "page_size",
                value: n.to_string(),
                why: format!("must be 0 (for {}) to {}", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
            });
        }
        n => n as usize,
    };
    let after = match optional(&page_token) {
        None => None,
        Some(t) => {
            let bad = || Error::Invalid {
                field: "page_token",
                value: t.to_string(),
                why: "not a token returned by List".into(),
            };
            let addr = t.strip_prefix(PAGE_TOKEN_PREFIX).ok_or_else(bad)?;
            Some(addr.parse::<IpAddr>().map_err(|_| bad())?)
        }
    };
    Ok(ListArgs {
        pool: optional(&pool).map(|p| parse_pool("pool", p)).transpose()?,
        owner_prefix,
        scope,
        page_size,
        after,
    })
}

fn watch_args(request: pb::WatchRequest, scope: Scope) -> Result<WatchArgs, Error> {
    let pb::WatchRequest {
        pool,
        owner_prefix,
        since_revision,
    } = request;
    Ok(WatchArgs {
        pool: optional(&pool).map(|p| parse_pool("pool", p)).transpose()?,
        owner_prefix,
        scope,
        since: since_revision,
    })
}

fn watch_event(item: WatchItem) -> pb::WatchEvent {
    let (kind, revision, allocation) = match item {
        WatchItem::Snapshot(a) => (pb::WatchEventType::Snapshot, 0, Some(a)),
        WatchItem::SnapshotComplete { revision } => {
            (pb::WatchEventType::SnapshotComplete, revision, None)
        }
        WatchItem::Event(e) => {
            let kind = match e.kind {
                ChangeKind::Allocated => pb::WatchEventType::Allocated,
                ChangeKind::Released => pb::WatchEventType::Released,
            };
            (kind, e.revision, Some(e.allocation))
        }
        WatchItem::Progress { revision } => (pb::WatchEventType::Progress, revision, None),
    };
    pb::WatchEvent {
        r#type: kind as i32,
        revision,
        allocation: allocation.map(to_proto),
    }
}

/// The stream of a Watch call.
pub type WatchEvents = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

fn timestamp(unix_nanos: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (unix_nanos / 1_000_000_000) as i64,
        nanos: (unix_nanos % 1_000_000_000) as i32,
    }
}

fn to_proto(a: Allocation) -> pb::Allocation {
    let Allocation {
        address,
        pool,
        record,
    } = a;
    let crate::model::Record {
        owner,
        labels,
        created_unix_nanos,
        revision,
    } = record;
    pb::Allocation {
        address: address.to_string(),
        pool: pool.unwrap_or_default(),
        owner,
        labels: labels.into_iter().collect(),
        created_at: Some(timestamp(created_unix_nanos)),
        revision,
    }
}

#[tonic::async_trait]
impl Allocator for Service {
    async fn allocate(
        &self,
        request: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        self.observe("Allocate", async {
            let scope = self.caller(&request, true)?;
            let credential = credential_name(&scope);
            let args = allocate_args(request.into_inner(), scope).map_err(status)?;
            let allocation = self.ipam.allocate(args).await.map_err(status)?;
            tracing::info!(credential, owner = allocation.record.owner, address = %allocation.address, "allocated");
            Ok(to_proto(allocation))
        })
        .await
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.observe("Release", async {
            let scope = self.caller(&request, true)?;
            let credential = credential_name(&scope);
            let args = release_args(request.into_inner(), scope).map_err(status)?;
            let released = self.ipam.release(args).await.map_err(status)?;
            match &released {
                Some(a) => {
                    tracing::info!(credential, owner = a.record.owner, address = %a.address, "released");
                }
                None => tracing::info!(credential, "release matched no allocation"),
            }
            Ok(pb::ReleaseResponse {
                released: released.is_some(),
                allocation: released.map(to_proto),
            })
        })
        .await
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        self.observe("Get", async {
            let scope = self.caller(&request, false)?;
            let pb::GetRequest { owner, address } = request.into_inner();
            let allocation = match (optional(&owner), optional(&address)) {
                (Some(owner), None) => {
                    let owner = parse_owner("owner", owner).map_err(status)?;
                    self.read(move |h| h.get_by_owner(&owner, &scope)).await?
                }
                (None, Some(address)) => {
                    let ip = parse_address("address", address).map_err(status)?;
                    self.read(move |h| h.get_by_address(ip, &scope)).await?
                }
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "give exactly one of owner ({owner:?}) and address ({address:?})"
                    )));
                }
            };
            Ok(to_proto(allocation))
        })
        .await
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.observe("List", async {
            let scope = self.caller(&request, false)?;
            let args = list_args(request.into_inner(), scope).map_err(status)?;
            let page = self.read(move |h| h.list(&args)).await?;
            Ok(pb::ListResponse {
                allocations: page.allocations.into_iter().map(to_proto).collect(),
                next_page_token: page
                    .next_after
                    .map(|a| format!("{PAGE_TOKEN_PREFIX}{a}"))
                    .unwrap_or_default(),
            })
        })
        .await
    }

    type WatchStream = WatchEvents;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.observe("Watch", async {
            let scope = self.caller(&request, false)?;
            let args = watch_args(request.into_inner(), scope).map_err(status)?;
            let items = self.ipam.watch(args).await.map_err(status)?;
            let events =
                ReceiverStream::new(items).map(|item| item.map(watch_event).map_err(status));
            Ok(Box::pin(events) as WatchEvents)
        })
        .await
    }

    async fn list_pools(
        &self,
        request: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        self.observe("ListPools", async {
            let scope = self.caller(&request, false)?;
            let pb::ListPoolsRequest {} = request.into_inner();
            let report = self.read(|h| h.pools_report()).await?;
            let pools = self.ipam.pools();
            let mut out: Vec<pb::Pool> = report
                .pools
                .iter()
                .map(|r| {
                    let pool = pools.at(r.index);
                    pb::Pool {
                        name: pool.name().to_string(),
                        ranges: pool.elements().iter().map(ToString::to_string).collect(),
                        reserved: pool.reserved().iter().map(ToString::to_string).collect(),
                        explicit_only: pool.explicit_only(),
                        all_addresses: pool.all_addresses(),
                        is_default: r.index == pools.default_index(),
                        size: r.size.to_string(),
                        allocated: r.allocated,
                        free: r.free.to_string(),
                    }
                })
                .collect();
            out.sort_by(|a, b| {
                b.is_default
                    .cmp(&a.is_default)
                    .then_with(|| a.name.cmp(&b.name))
            });
            Ok(pb::ListPoolsResponse {
                pools: out,
                outside_count: report.outside_count,
                // Figures are the allocator's; the allocations listed, the
                // caller's to read.
                outside: report
                    .outside
                    .into_iter()
                    .filter(|a| scope::sees(&scope, &a.record.owner, a.pool.as_deref()))
                    .map(to_proto)
                    .collect(),
            })
        })
        .await
    }
}
