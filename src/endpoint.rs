//! The worker's HTTP endpoint (default `127.0.0.1:9187`): `/healthz` (the process
//! answers), `/readyz` (it consumes `backup.commands`; 503 with the reason otherwise) and
//! `/metrics` (Prometheus text, see [`crate::metrics`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::WorkerState;

/// Binds `listen` (an error names the address) and serves until `shutdown`.
pub async fn serve(
    listen: &str,
    state: Arc<WorkerState>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), std::io::Error> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|err| std::io::Error::new(err.kind(), format!("http.listen {listen}: {err}")))?;
    let address = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "the HTTP endpoint stopped");
        }
    });
    tracing::info!(%address, "HTTP endpoint: /healthz /readyz /metrics");
    Ok((address, task))
}

async fn ready(State(state): State<Arc<WorkerState>>) -> impl IntoResponse {
    if state.is_consuming() {
        (StatusCode::OK, "ready: consuming backup.commands\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not connected to the broker (reconnecting)\n",
        )
    }
}

async fn metrics(State(state): State<Arc<WorkerState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.render(),
    )
}
