//! A typed client of the allocator: connects lazily (the allocator may start
//! after its client), adds the bearer token, and retries calls that failed
//! with `UNAVAILABLE` with exponential backoff. Every call it retries is safe
//! to repeat: Allocate is idempotent per owner and Release of what is gone
//! is not an error. [`Watcher`] follows a Watch stream across reconnects and
//! allocator restarts, resuming from the last revision it saw.

use std::{collections::VecDeque, time::Duration};

use tonic::{
    Code, Request, Status, Streaming,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use crate::v1::{
    AllocateRequest, Allocation, GetRequest, ListPoolsRequest, ListPoolsResponse, ListRequest,
    ListResponse, ReleaseRequest, ReleaseResponse, WatchEvent, WatchEventType, WatchRequest,
    allocator_client::AllocatorClient,
};

/// How often an idle connection is pinged, so that a watch on a vanished
/// allocator fails (and reconnects) instead of waiting forever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors building a [`Client`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a valid URI.
    #[error("invalid allocator endpoint {endpoint:?}: {source}")]
    Endpoint {
        /// The endpoint given.
        endpoint: String,
        /// Why it is invalid.
        source: tonic::transport::Error,
    },
    /// The token cannot be sent as a header value.
    #[error("invalid bearer token: it must be printable ASCII")]
    Token,
}

/// How calls that fail with `UNAVAILABLE` are retried.
#[derive(Clone, Debug)]
pub struct Backoff {
    /// Wait before the first retry.
    pub initial: Duration,
    /// Longest wait between retries.
    pub max: Duration,
    /// Give up once this much time has passed since the first attempt.
    pub max_elapsed: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(2),
            max_elapsed: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// Never retry.
    pub fn none() -> Self {
        Backoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            max_elapsed: Duration::ZERO,
        }
    }
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Builds a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    endpoint: String,
    token: Option<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    backoff: Backoff,
}

impl ClientBuilder {
    /// Sends this bearer token with every call (needed for Allocate and
    /// Release when the allocator has `--token-file`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Longest time to establish a connection (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Longest time for one attempt of a call (default 10 s); for Watch, the
    /// time until the stream starts.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How `UNAVAILABLE` is retried (default: 50 ms doubling to 2 s, for 30 s).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The client. It connects on first use, so the allocator need not be up.
    pub fn build(self) -> Result<Client, ClientError> {
        let ClientBuilder {
            endpoint,
            token,
            connect_timeout,
            request_timeout,
            backoff,
        } = self;
        let endpoint = Endpoint::from_shared(endpoint.clone())
            .map_err(|source| ClientError::Endpoint { endpoint, source })?
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let token = BearerToken(
            token
                .map(|t| {
                    format!("Bearer {}", t.trim()).parse::<MetadataValue<tonic::metadata::Ascii>>()
                })
                .transpose()
                .map_err(|_| ClientError::Token)?,
        );
        Ok(Client {
            inner: AllocatorClient::with_interceptor(endpoint.connect_lazy(), token.clone()),
            endpoint,
            token,
            backoff,
        })
    }
}

/// A client of `vipam.v1.Allocator`.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use vipam::{client::Client, v1::AllocateRequest};
///
/// let client = Client::builder("http://127.0.0.1:50051").token("s3cret").build()?;
/// let allocation = client
///     .allocate(AllocateRequest { owner: "my-tool/vm-42".into(), ..Default::default() })
///     .await?;
/// println!("{} holds {}", allocation.owner, allocation.address);
/// client.release_owner("my-tool/vm-42").await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: AllocatorClient<InterceptedService<Channel, BearerToken>>,
    endpoint: Endpoint,
    token: BearerToken,
    backoff: Backoff,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A builder for a client of the allocator at `endpoint`, such as
    /// `http://127.0.0.1:50051`.
    pub fn builder(endpoint: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            endpoint: endpoint.into(),
            token: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            backoff: Backoff::default(),
        }
    }

    /// The generated client underneath, for calls this type does not wrap.
    pub fn raw(&self) -> AllocatorClient<InterceptedService<Channel, BearerToken>> {
        self.inner.clone()
    }

    async fn retry<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(AllocatorClient<InterceptedService<Channel, BearerToken>>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = tokio::time::Instant::now();
        let mut wait = self.backoff.initial;
        loop {
            match call(self.inner.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status)
                    if status.code() == Code::Unavailable
                        && start.elapsed() + wait < self.backoff.max_elapsed =>
                {
                    tracing::debug!(
                        message = status.message(),
                        ?wait,
                        "allocator unavailable; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2)
                        .min(self.backoff.max)
                        .max(Duration::from_millis(1));
                }
                Err(status) => return Err(status),
            }
        }
    }

    /// Allocates (idempotent per owner).
    pub async fn allocate(&self, request: AllocateRequest) -> Result<Allocation, Status> {
        self.retry(|mut c| {
            let request = request.clone();
            async move { c.allocate(request).await }
        })
        .await
    }

    /// Releases by owner, address or both.
    pub async fn release(&self, request: ReleaseRequest) -> Result<ReleaseResponse, Status> {
        self.retry(|mut c| {
            let request = request.clone();
            async move { c.release(request).await }
        })
        .await
    }

    /// Releases whatever `owner` holds; `Ok(None)` when it held nothing.
    pub async fn release_owner(&self, owner: &str) -> Result<Option<Allocation>, Status> {
        let response = self
            .release(ReleaseRequest {
                owner: owner.to_string(),
                ..Default::default()
            })
            .await?;
        Ok(response.allocation.filter(|_| response.released))
    }

    /// The allocation of an owner; `Ok(None)` when it holds nothing.
    pub async fn get_owner(&self, owner: &str) -> Result<Option<Allocation>, Status> {
        self.get(GetRequest {
            owner: owner.to_string(),
            ..Default::default()
        })
        .await
    }

    /// The allocation at an address; `Ok(None)` when it is free.
    pub async fn get_address(&self, address: &str) -> Result<Option<Allocation>, Status> {
        self.get(GetRequest {
            address: address.to_string(),
            ..Default::default()
        })
        .await
    }

    async fn get(&self, request: GetRequest) -> Result<Option<Allocation>, Status> {
        match self
            .retry(|mut c| {
                let request = request.clone();
                async move { c.get(request).await }
            })
            .await
        {
            Ok(a) => Ok(Some(a)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    /// One page of allocations.
    pub async fn list(&self, request: ListRequest) -> Result<ListResponse, Status> {
        self.retry(|mut c| {
            let request = request.clone();
            async move { c.list(request).await }
        })
        .await
    }

    /// Every allocation of `pool` (empty: all) whose owner starts with
    /// `owner_prefix`, by address, following every page.
    pub async fn list_all(
        &self,
        pool: &str,
        owner_prefix: &str,
    ) -> Result<Vec<Allocation>, Status> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .list(ListRequest {
                    pool: pool.to_string(),
                    owner_prefix: owner_prefix.to_string(),
                    page_size: 1000,
                    page_token,
                })
                .await?;
            out.extend(page.allocations);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = page.next_page_token;
        }
    }

    /// Every pool and the allocations outside them.
    pub async fn list_pools(&self) -> Result<ListPoolsResponse, Status> {
        self.retry(|mut c| async move { c.list_pools(ListPoolsRequest {}).await })
            .await
    }

    /// Starts one Watch stream (retrying the start on `UNAVAILABLE`). The
    /// stream ends when the connection or the allocator does; to follow
    /// changes across those, use [`Client::watcher`]. The stream shares this
    /// client's connection: read it steadily, or use a separate client, since
    /// unread messages hold the connection's flow-control window.
    pub async fn watch(&self, request: WatchRequest) -> Result<Streaming<WatchEvent>, Status> {
        self.retry(|mut c| {
            let request = request.clone();
            async move { c.watch(request).await }
        })
        .await
    }

    /// A [`Watcher`]: the events of `request`, across reconnects, each once.
    /// It has a connection of its own, so a consumer that falls behind never
    /// holds up this client's other calls (HTTP/2 flow control is shared by
    /// the streams of one connection).
    pub fn watcher(&self, request: WatchRequest) -> Watcher {
        let own = Client {
            inner: AllocatorClient::with_interceptor(
                self.endpoint.connect_lazy(),
                self.token.clone(),
            ),
            ..self.clone()
        };
        Watcher {
            client: own,
            revision: request.since_revision,
            request,
            stream: None,
            snapshot: Vec::new(),
            ready: VecDeque::new(),
            failing_since: None,
            wait: self.backoff.initial,
        }
    }
}

/// Follows a Watch across broken connections, cut-offs and allocator
/// restarts: after a failure it reconnects with the revision of the last
/// event it handed out, so its caller misses no change and sees none twice.
///
/// It hands out SNAPSHOT events only once the whole snapshot has arrived
/// (a snapshot cut short is taken again from the start), then the
/// SNAPSHOT_COMPLETE event; then ALLOCATED, RELEASED and PROGRESS events.
/// It reconnects, with the client's backoff, after the stream ends or fails
/// with `UNAVAILABLE`, `RESOURCE_EXHAUSTED` (a watcher cut off for being
/// slow), `UNKNOWN`, `INTERNAL`, `CANCELLED`, `ABORTED` or
/// `DEADLINE_EXCEEDED`. Any other error, or failing for longer than the
/// backoff's `max_elapsed`, is returned; `OUT_OF_RANGE` means the revision
/// is no longer in the allocator's history: list again and watch from 0.
///
/// One case repeats a marker: a snapshot of a store that was never written
/// to completes at revision 0, and revision 0 asks for a snapshot. If the
/// stream breaks before the first change, the watcher hands out a fresh
/// snapshot (its SNAPSHOT events, then SNAPSHOT_COMPLETE again); the first
/// one was empty, so still no allocation is handed out twice.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use vipam::{
///     client::Client,
///     v1::{WatchEventType, WatchRequest},
/// };
///
/// let client = Client::builder("http://127.0.0.1:50051").build()?;
/// let mut watcher = client.watcher(WatchRequest {
///     owner_prefix: "my-tool/".into(),
///     since_revision: 0, // start with a snapshot
///     ..Default::default()
/// });
/// loop {
///     let event = watcher.next().await?;
///     let kind = event.r#type();
///     let allocation = event.allocation.unwrap_or_default();
///     match kind {
///         WatchEventType::Snapshot | WatchEventType::Allocated => {
///             println!("{} holds {}", allocation.owner, allocation.address)
///         }
///         WatchEventType::Released => println!("{} is free", allocation.address),
///         WatchEventType::SnapshotComplete => println!("in sync at {}", event.revision),
///         WatchEventType::Progress | WatchEventType::Unspecified => {}
///     }
///     // Persist watcher.revision() to resume from it after a restart.
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Watcher {
    client: Client,
    request: WatchRequest,
    revision: u64,
    stream: Option<Streaming<WatchEvent>>,
    /// SNAPSHOT events of a snapshot not yet complete.
    snapshot: Vec<WatchEvent>,
    /// Events received and not yet handed out.
    ready: VecDeque<WatchEvent>,
    failing_since: Option<tokio::time::Instant>,
    wait: Duration,
}

fn resumable(code: Code) -> bool {
    match code {
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::Unknown
        | Code::Internal
        | Code::Cancelled
        | Code::Aborted
        | Code::DeadlineExceeded => true,
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::DataLoss
        | Code::Unauthenticated => false,
    }
}

impl Watcher {
    /// The revision up to which every matching change has been handed out:
    /// the `since_revision` to resume from (0 before a snapshot completed).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The next event, waiting for it as long as it takes.
    pub async fn next(&mut self) -> Result<WatchEvent, Status> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                if event.revision > 0 {
                    self.revision = event.revision;
                }
                return Ok(event);
            }
            let received = match &mut self.stream {
                Some(stream) => stream.message().await,
                None => {
                    let request = WatchRequest {
                        since_revision: self.revision,
                        ..self.request.clone()
                    };
                    match self.client.inner.clone().watch(request).await {
                        Ok(response) => {
                            self.stream = Some(response.into_inner());
                            continue;
                        }
                        Err(status) => Err(status),
                    }
                }
            };
            match received {
                Ok(Some(event)) => {
                    self.failing_since = None;
                    self.wait = self.client.backoff.initial;
                    match event.r#type() {
                        WatchEventType::Snapshot => self.snapshot.push(event),
                        WatchEventType::SnapshotComplete => {
                            self.ready.extend(self.snapshot.drain(..));
                            self.ready.push_back(event);
                        }
                        WatchEventType::Allocated
                        | WatchEventType::Released
                        | WatchEventType::Progress
                        | WatchEventType::Unspecified => self.ready.push_back(event),
                    }
                }
                Ok(None) => {
                    self.reconnect(Status::unavailable("watch stream ended"))
                        .await?
                }
                Err(status) => self.reconnect(status).await?,
            }
        }
    }

    /// Drops the stream and waits before the next attempt, or gives up.
    async fn reconnect(&mut self, status: Status) -> Result<(), Status> {
        self.stream = None;
        self.snapshot.clear();
        let backoff = &self.client.backoff;
        let since = *self
            .failing_since
            .get_or_insert_with(tokio::time::Instant::now);
        if !resumable(status.code()) || since.elapsed() + self.wait >= backoff.max_elapsed {
            self.failing_since = None;
            return Err(status);
        }
        tracing::debug!(
            code = ?status.code(),
            message = status.message(),
            revision = self.revision,
            wait = ?self.wait,
            "watch interrupted; resuming"
        );
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2)
            .min(backoff.max)
            .max(Duration::from_millis(1));
        Ok(())
    }
}
