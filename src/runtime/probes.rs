//! The HTTP/1.1 probe and scrape routes both programs serve: `/healthz`
//! (alive), `/readyz` (a readiness check the program supplies) and
//! `/metrics` (a renderer the program supplies, in the OpenMetrics text
//! format).

use std::sync::Arc;

use axum::{
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

/// Content type of `/metrics`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type ReadyCheck = dyn Fn() -> Result<(), &'static str> + Send + Sync;
type Renderer = dyn Fn() -> Result<String, std::fmt::Error> + Send + Sync;

#[derive(Clone)]
struct Probes {
    ready: Arc<ReadyCheck>,
    metrics: Arc<Renderer>,
}

/// The `/healthz`, `/readyz` and `/metrics` routes. `/readyz` answers 200
/// `ok` when `ready` returns `Ok`, else 503 with the reason it returns;
/// `/metrics` serves what `metrics` renders (500 when encoding fails).
pub fn probe_router<R, M>(ready: R, metrics: M) -> axum::Router
where
    R: Fn() -> Result<(), &'static str> + Send + Sync + 'static,
    M: Fn() -> Result<String, std::fmt::Error> + Send + Sync + 'static,
{
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(Probes {
            ready: Arc::new(ready),
            metrics: Arc::new(metrics),
        })
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(probes): State<Probes>) -> Response {
    match (probes.ready)() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn metrics_page(State(probes): State<Probes>) -> Response {
    match (probes.metrics)() {
        Ok(body) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use axum::body::{Body, to_bytes};
    use tower::ServiceExt;

    use super::*;

    async fn mk_get(router: axum::Router, path: &str) -> (StatusCode, String, Option<String>) {
        let request = axum::http::Request::get(path)
            .body(Body::empty())
            .expect("request");
        let response = router.oneshot(request).await.expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = to_bytes(response.into_body(), 1 << 20).await.expect("body");
        (
            status,
            String::from_utf8_lossy(&body).into_owned(),
            content_type,
        )
    }

    fn mk_router(ready: Arc<AtomicBool>) -> axum::Router {
        probe_router(
            move || {
                if ready.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("not leading")
                }
            },
            || Ok("up 1\n# EOF\n".to_string()),
        )
    }

    #[tokio::test]
    async fn healthz_answers_ok() {
        let router = mk_router(Arc::new(AtomicBool::new(false)));
        let (status, body, _) = mk_get(router, "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
    }

    #[tokio::test]
    async fn readyz_answers_503_with_the_reason_until_the_check_passes() {
        let ready = Arc::new(AtomicBool::new(false));
        let router = mk_router(ready.clone());
        let (status, body, _) = mk_get(router.clone(), "/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "not leading\n")
        );
        ready.store(true, Ordering::Relaxed);
        let (status, body, _) = mk_get(router, "/readyz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
    }

    #[tokio::test]
    async fn metrics_serves_the_rendered_text_as_openmetrics() {
        let router = mk_router(Arc::new(AtomicBool::new(true)));
        let (status, body, content_type) = mk_get(router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "up 1\n# EOF\n");
        assert_eq!(content_type.as_deref(), Some(METRICS_CONTENT_TYPE));
    }

    #[tokio::test]
    async fn metrics_answers_500_when_encoding_fails() {
        let router = probe_router(|| Ok(()), || Err(std::fmt::Error));
        let (status, body, _) = mk_get(router, "/metrics").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.starts_with("encoding metrics failed"), "{body}");
    }
}
