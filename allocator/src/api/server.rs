//! The server: gRPC (the allocator, `grpc.health.v1`, reflection v1 and
//! v1alpha) over HTTP/2 without TLS, and `/healthz`, `/readyz`, `/metrics`
//! over HTTP/1.1, on one or more listeners that differ only in which calls
//! need a credential (see [`crate::policy::credentials::Access`]). Limits message size, time per
//! request and requests in flight (shared by all listeners). Each listener
//! runs as a task of the program's [`Supervisor`]; when it stops, they stop
//! accepting and drain what is in flight, and the watch streams end.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{service::Routes, transport::Server};
use vipam::{runtime::Supervisor, v1::allocator_server::AllocatorServer};

use crate::{
    api::metrics::Metrics,
    api::service::{Service, Token},
    engine::handle::Handle,
    policy::credentials::{Access, Credentials, Needs},
};

/// Server limits and settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Largest gRPC message, in bytes, either way.
    pub max_message_bytes: usize,
    /// Longest time one request may take (until its response starts: a
    /// Watch stream lasts as long as the client wants).
    pub request_timeout: Duration,
    /// Most requests handled at once; more wait.
    pub max_concurrent_requests: usize,
    /// Bearer token for mutating calls on the listener of [`bind`] (the
    /// listeners of [`bind_all`] carry their own [`Access`]).
    pub token: Option<Token>,
}

/// One address to serve on.
#[derive(Clone, Debug)]
pub struct Listener {
    /// The address to bind.
    pub addr: SocketAddr,
    /// The flag that set it, named when binding fails.
    pub flag: &'static str,
    /// Which calls on it need a credential, and the credentials.
    pub access: Access,
}

/// How often an idle HTTP/2 connection is pinged, so that the watch streams
/// of a client that vanished end.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// `/healthz`, `/readyz` and `/metrics`: not ready while shutting down,
/// once the store writer has stopped, or while the store serves no reads.
fn probes(ipam: Handle, metrics: Arc<Metrics>, shutting_down: Arc<AtomicBool>) -> axum::Router {
    vipam::runtime::probe_router(
        move || {
            if shutting_down.load(Ordering::Relaxed) {
                Err("shutting down")
            } else {
                ipam.readiness()
            }
        },
        move || metrics.render(),
    )
}

/// A bound, not yet serving, server.
pub struct Bound {
    listeners: Vec<(TcpListener, Routes)>,
    http: axum::Router,
    http_listener: Option<TcpListener>,
    ipam: Handle,
    settings: Settings,
    health: tonic_health::server::HealthReporter,
    shutting_down: Arc<AtomicBool>,
}

/// Builds the services and binds `addr`; mutating calls need
/// `settings.token` when it is set.
pub async fn bind(addr: SocketAddr, ipam: Handle, settings: Settings) -> anyhow::Result<Bound> {
    let access = match settings.token.clone() {
        Some(token) => Access {
            credentials: Arc::new(Credentials::single(token)),
            needs: Needs::Changes,
        },
        None => Access::open(),
    };
    let listener = Listener {
        addr,
        flag: "--listen",
        access,
    };
    bind_all(vec![listener], ipam, settings).await
}

/// Builds the services and binds every listener; all serve the same
/// allocator, health, reflection and HTTP endpoints.
pub async fn bind_all(
    listeners: Vec<Listener>,
    ipam: Handle,
    settings: Settings,
) -> anyhow::Result<Bound> {
    let metrics = Arc::new(Metrics::new(ipam.clone()));
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AllocatorServer<Service>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(vipam::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let shutting_down = Arc::new(AtomicBool::new(false));
    let http = probes(ipam.clone(), metrics.clone(), shutting_down.clone());
    let mut bound = Vec::with_capacity(listeners.len());
    for Listener { addr, flag, access } in listeners {
        let service = Service::new(ipam.clone(), access, metrics.clone())
            .into_server(settings.max_message_bytes);
        let routes = Routes::new(service)
            .add_service(health_service.clone())
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .into_axum_router()
            .merge(http.clone());
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("{flag} {addr}: cannot bind: {e}"))?;
        bound.push((listener, Routes::from(routes)));
    }
    Ok(Bound {
        listeners: bound,
        http,
        http_listener: None,
        ipam,
        settings,
        health,
        shutting_down,
    })
}

impl Bound {
    /// The address actually bound by the first listener (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self.listeners.first() {
            Some((listener, _)) => listener.local_addr(),
            None => Err(std::io::Error::other("no listener")),
        }
    }

    /// Also serves `/healthz`, `/readyz` and `/metrics` (HTTP/1.1 only, no
    /// gRPC) on `addr`: for probes and scrapes on the pod address while gRPC
    /// stays on loopback.
    pub async fn with_http_listener(mut self, addr: SocketAddr) -> anyhow::Result<Bound> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("--http-listen {addr}: cannot bind: {e}"))?;
        self.http_listener = Some(listener);
        Ok(self)
    }

    /// The address of the HTTP-only listener, if any.
    pub fn http_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.http_listener.as_ref().map(TcpListener::local_addr)
    }

    /// The addresses actually bound, in the order the listeners were given.
    pub fn local_addrs(&self) -> std::io::Result<Vec<SocketAddr>> {
        self.listeners.iter().map(|(l, _)| l.local_addr()).collect()
    }

    /// Serves every listener as a task of `running` until it stops: then
    /// readiness and health say so, watch streams end (each naming the
    /// revision to reconnect with), and the listeners stop accepting and
    /// drain what is in flight (for as long as the supervisor's stop
    /// allows).
    pub fn spawn(self, running: &mut Supervisor) -> anyhow::Result<()> {
        let Bound {
            listeners,
            http,
            http_listener,
            ipam,
            settings,
            health,
            shutting_down,
        } = self;
        // One limit for all listeners.
        let limit =
            tower::limit::GlobalConcurrencyLimitLayer::new(settings.max_concurrent_requests.max(1));
        for (listener, routes) in listeners {
            let name = format!("gRPC listener on {}", listener.local_addr()?);
            let server = Server::builder()
                .accept_http1(true)
                .timeout(settings.request_timeout)
                .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
                .layer(limit.clone())
                .add_routes(routes)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), running.stopping());
            running.spawn(name, server);
        }
        if let Some(listener) = http_listener {
            let name = format!("HTTP listener on {}", listener.local_addr()?);
            let server = axum::serve(listener, http).with_graceful_shutdown(running.stopping());
            running.spawn(name, server.into_future());
        }
        let stopping = running.stopping();
        running.spawn("shutdown of watches", async move {
            stopping.await;
            tracing::info!("shutting down: no new connections, draining requests in flight");
            shutting_down.store(true, Ordering::Relaxed);
            health.set_not_serving::<AllocatorServer<Service>>().await;
            // Watch streams never end by themselves: end them, each telling
            // its client the revision to reconnect with.
            ipam.close_watchers();
            Ok::<(), std::convert::Infallible>(())
        });
        Ok(())
    }
}
