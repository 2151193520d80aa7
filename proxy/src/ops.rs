//! The ops HTTP port: /healthz (alive), /readyz (listener bound and credentials validated),
//! /metrics (Prometheus text).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::credentials::Credentials;
use crate::error::{ProxyError, Result};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// What /readyz looks at.
pub struct Readiness {
    pub listeners_bound: AtomicBool,
    pub credentials: Arc<Credentials>,
}

#[derive(Clone)]
struct OpsState {
    readiness: Arc<Readiness>,
    metrics: Option<PrometheusHandle>,
    stats: Arc<Stats>,
}

/// How often histogram samples are folded into their buckets when nobody scrapes (keeps
/// the recorder's memory bounded under load).
const UPKEEP_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// The /readyz answer: status and a short plain-text reason, never a secret.
pub fn readiness_report(readiness: &Readiness) -> (StatusCode, String) {
    if !readiness.listeners_bound.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no listener bound yet\n".into(),
        );
    }
    match readiness.credentials.current() {
        None => {
            let why = readiness
                .credentials
                .problem()
                .unwrap_or_else(|| "no DSN validated yet".into());
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            )
        }
        Some(g) => {
            let mut body = format!(
                "ready: credential generation {} ({})\n",
                g.number,
                g.describe()
            );
            if let Some(problem) = readiness.credentials.problem() {
                body.push_str(&format!("warning: {problem}\n"));
            }
            (StatusCode::OK, body)
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<OpsState>) -> (StatusCode, String) {
    readiness_report(&state.readiness)
}

async fn metrics(State(state): State<OpsState>) -> (StatusCode, String) {
    match &state.metrics {
        Some(h) => {
            state.stats.refresh();
            let mut text = h.render();
            crate::stats::render_hot(&mut text);
            (StatusCode::OK, text)
        }
        None => (
            StatusCode::NOT_FOUND,
            "metrics recorder not installed\n".into(),
        ),
    }
}

/// Binds the ops port (failing fast if it cannot) and serves it in the background.
pub async fn serve(
    addr: SocketAddr,
    readiness: Arc<Readiness>,
    metrics: Option<PrometheusHandle>,
    stats: Arc<Stats>,
    mut shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>> {
    if let Some(handle) = metrics.clone() {
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_PERIOD);
            loop {
                tokio::select! {
                    _ = tick.tick() => handle.run_upkeep(),
                    _ = stop.recv() => return,
                }
            }
        });
    }
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(self::metrics))
        .with_state(OpsState {
            readiness,
            metrics,
            stats,
        });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ProxyError::Config(format!("cannot bind --ops-addr {addr}: {e}")))?;
    tracing::info!(%addr, "ops endpoints listening (/healthz, /readyz, /metrics)");
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.recv().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "ops server failed");
        }
    }))
}
