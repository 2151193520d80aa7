//! The ops HTTP port: `/healthz` (alive), `/readyz` (first run of every enabled config
//! succeeded) and `/metrics` (Prometheus text). Never touches a database.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::error::{Error, Result};
use crate::status::Status;

#[derive(Clone)]
struct OpsState {
    status: Status,
    metrics: Option<PrometheusHandle>,
}

/// Binds the ops port now (so a bad address fails at start) and serves it in the background.
pub async fn serve(
    addr: SocketAddr,
    status: Status,
    metrics: Option<PrometheusHandle>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Ops {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    let local = listener.local_addr().map_err(|e| Error::Ops {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(OpsState { status, metrics });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "ops listener stopped");
        }
    });
    Ok((local, task))
}

async fn readyz(State(s): State<OpsState>) -> (StatusCode, String) {
    if s.status.ready() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "waiting for the first successful run of: {}\n",
                s.status.waiting().join(", ")
            ),
        )
    }
}

async fn render_metrics(State(s): State<OpsState>) -> (StatusCode, String) {
    match &s.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n".into()),
    }
}
