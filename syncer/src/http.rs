//! The syncer's `/healthz`, `/readyz` (200 once leading with the first sync
//! done) and `/metrics` over HTTP/1.1.

use std::sync::Arc;

use crate::metrics::Metrics;

/// Serves until the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let ready = metrics.clone();
    let app = vipam::runtime::probe_router(
        move || {
            if ready.is_ready() {
                Ok(())
            } else {
                Err("not leading, or the first sync is not done")
            }
        },
        move || metrics.render(),
    );
    axum::serve(listener, app).await
}
