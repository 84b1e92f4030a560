//! The server on one port: gRPC (the allocator, `grpc.health.v1`, reflection
//! v1 and v1alpha) over HTTP/2 without TLS, and `/healthz`, `/readyz`,
//! `/metrics` over HTTP/1.1. Limits message size, time per request and
//! requests in flight; on shutdown it stops accepting and drains what is in
//! flight.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{service::Routes, transport::Server};
use vipam::v1::allocator_server::AllocatorServer;

use crate::{
    ipam::Handle,
    metrics::Metrics,
    service::{Service, Token},
};

/// Server limits and settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Largest gRPC message, in bytes, either way.
    pub max_message_bytes: usize,
    /// Longest time one request may take.
    pub request_timeout: Duration,
    /// Most requests handled at once; more wait.
    pub max_concurrent_requests: usize,
    /// Bearer token for mutating calls.
    pub token: Option<Token>,
}

#[derive(Clone)]
struct HttpState {
    ipam: Handle,
    metrics: Arc<Metrics>,
    shutting_down: Arc<AtomicBool>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.shutting_down.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if !s.ipam.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "store writer stopped\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn metrics_page(State(s): State<HttpState>) -> axum::response::Response {
    match s.metrics.render() {
        Ok(body) => (
            [(
                http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

/// A bound, not yet serving, server.
pub struct Bound {
    listener: TcpListener,
    routes: Routes,
    settings: Settings,
    health: tonic_health::server::HealthReporter,
    shutting_down: Arc<AtomicBool>,
}

/// Builds the services and binds `addr`.
pub async fn bind(addr: SocketAddr, ipam: Handle, settings: Settings) -> anyhow::Result<Bound> {
    let metrics = Arc::new(Metrics::new(ipam.clone()));
    let service = Service::new(ipam.clone(), settings.token.clone(), metrics.clone())
        .into_server(settings.max_message_bytes);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AllocatorServer<Service>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(vipam::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let shutting_down = Arc::new(AtomicBool::new(false));
    let http = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(HttpState {
            ipam,
            metrics,
            shutting_down: shutting_down.clone(),
        });
    let routes = Routes::new(service)
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .into_axum_router()
        .merge(http);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {addr}: cannot bind: {e}"))?;
    Ok(Bound {
        listener,
        routes: Routes::from(routes),
        settings,
        health,
        shutting_down,
    })
}

impl Bound {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then stops accepting and drains
    /// requests in flight for at most `grace`.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) -> anyhow::Result<()> {
        let Bound {
            listener,
            routes,
            settings,
            health,
            shutting_down,
        } = self;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = Server::builder()
            .accept_http1(true)
            .timeout(settings.request_timeout)
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                settings.max_concurrent_requests.max(1),
            ))
            .add_routes(routes)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                drop(stop_rx.await);
            });
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => return result.map_err(Into::into),
            () = shutdown => {}
        }
        tracing::info!(grace = ?grace, "shutting down: no new connections, draining requests in flight");
        shutting_down.store(true, Ordering::Relaxed);
        health.set_not_serving::<AllocatorServer<Service>>().await;
        let _ = stop_tx.send(());
        match tokio::time::timeout(grace, &mut server).await {
            Ok(result) => result.map_err(Into::into),
            Err(_) => {
                tracing::warn!("shutdown grace period over; closing remaining connections");
                Ok(())
            }
        }
    }
}
