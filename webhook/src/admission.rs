//! The HTTPS admission server: decodes AdmissionReviews, asks the decision, answers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::claims::ClaimResolver;
use crate::config::InjectConfig;
use crate::decision::{self, Decision, PodRequest};
use crate::error::WebhookError;
use crate::tls::CertStore;

/// Largest request body accepted. The API server accepts objects up to 3 MiB and an
/// AdmissionReview may carry `object` and `oldObject` plus the envelope; 8 MiB admits every
/// review the API server can send while refusing a runaway client early.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<InjectConfig>,
    pub resolver: Arc<ClaimResolver>,
    pub certs: Arc<CertStore>,
    pub metrics: PrometheusHandle,
}

/// The routes: `/mutate` and db-controller's `/mutate--v1-pod`, health, readiness, metrics.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/mutate--v1-pod", post(mutate_v1_pod))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.certs.is_loaded() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no certificate loaded yet").into_response()
    }
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn mutate(State(state): State<AppState>, body: Bytes) -> Response {
    handle(&state, "/mutate", &body).await
}

async fn mutate_v1_pod(State(state): State<AppState>, body: Bytes) -> Response {
    handle(&state, "/mutate--v1-pod", &body).await
}

async fn handle(state: &AppState, path: &'static str, body: &[u8]) -> Response {
    let start = Instant::now();
    let (response, decision) = review(state, body).await;
    crate::metrics::record_admission(path, decision.as_ref(), start.elapsed());
    response
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, message).into_response()
}

fn json_response(review: &AdmissionReview<DynamicObject>) -> Response {
    let encoded = serde_json::to_value(review).map(|mut v| {
        base64_patch(&mut v);
        v
    });
    match encoded.and_then(|v| serde_json::to_vec(&v)) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode response: {e}"),
        )
            .into_response(),
    }
}

/// kube serialises `response.patch` (`Vec<u8>`) as an array of numbers; Kubernetes documents
/// it as a base64 string (Go's `[]byte`), which is what every API server version expects.
fn base64_patch(review: &mut Value) {
    use base64::Engine;
    let Some(patch) = review.pointer_mut("/response/patch") else {
        return;
    };
    if let Some(bytes) = patch.as_array().and_then(|items| {
        items
            .iter()
            .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect::<Option<Vec<u8>>>()
    }) {
        *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
}

/// Position-only description of a JSON error: serde's own text can quote input values,
/// and a pod's env may hold secrets.
fn describe(e: &serde_json::Error) -> String {
    format!(
        "{:?} error at line {} column {}",
        e.classify(),
        e.line(),
        e.column()
    )
}

/// Decodes the review, decides, and builds the HTTP response. Returns the decision for metrics.
pub async fn review(state: &AppState, body: &[u8]) -> (Response, Option<Decision>) {
    let raw: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return (
                bad_request(format!(
                    "request body is not JSON ({}); send an admission.k8s.io/v1 AdmissionReview",
                    describe(&e)
                )),
                None,
            );
        }
    };
    let typed: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            // Still answer with the uid when there is one, so the API server can match it.
            let uid = raw.pointer("/request/uid").and_then(Value::as_str);
            let api_version = raw.get("apiVersion").and_then(Value::as_str);
            return match (uid, api_version) {
                (Some(uid), Some(api_version)) => {
                    let mut resp = AdmissionResponse::invalid(format!(
                        "malformed AdmissionReview request ({})",
                        describe(&e)
                    ));
                    resp.uid = uid.to_string();
                    resp.types.api_version = api_version.to_string();
                    (json_response(&resp.into_review()), None)
                }
                _ => (
                    bad_request(format!(
                        "body is not an AdmissionReview with a request uid ({}); send an admission.k8s.io/v1 AdmissionReview",
                        describe(&e)
                    )),
                    None,
                ),
            };
        }
    };
    let request: AdmissionRequest<DynamicObject> = match typed.try_into() {
        Ok(r) => r,
        Err(_) => {
            return (
                bad_request("AdmissionReview has no request; send an admission.k8s.io/v1 AdmissionReview with .request".into()),
                None,
            );
        }
    };
    let op = operation_name(&request);
    let pod_request = PodRequest {
        operation: &op,
        group: &request.kind.group,
        kind: &request.kind.kind,
        sub_resource: request.sub_resource.as_deref(),
        namespace: request.namespace.as_deref(),
        object: raw.pointer("/request/object").filter(|o| !o.is_null()),
    };
    let lookup = match decision::claim_to_resolve(&pod_request, &state.config) {
        Some((namespace, claim)) => Some(state.resolver.resolve(&namespace, &claim).await),
        None => None,
    };
    let decision = decision::decide(&pod_request, &state.config, lookup.as_ref());
    let base = AdmissionResponse::from(&request);
    let response = match &decision {
        Decision::Skip(_) => base,
        Decision::Inject { patch, sidecars } => match base.clone().with_patch(patch.clone()) {
            Ok(r) => {
                tracing::info!(
                    namespace = request.namespace.as_deref().unwrap_or(""),
                    uid = %request.uid,
                    dry_run = request.dry_run,
                    sidecars = ?sidecars.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                    "injecting"
                );
                r
            }
            Err(e) => base.deny(format!("cannot encode patch: {e}")),
        },
        Decision::Deny { message, reason } => {
            tracing::info!(
                namespace = request.namespace.as_deref().unwrap_or(""),
                uid = %request.uid,
                reason = reason.as_str(),
                %message,
                "denying pod"
            );
            base.deny(message)
        }
    };
    (json_response(&response.into_review()), Some(decision))
}

fn operation_name(request: &AdmissionRequest<DynamicObject>) -> String {
    // Operation serialises as CREATE/UPDATE/DELETE/CONNECT.
    serde_json::to_value(&request.operation)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Accepts TLS connections on `listener` until `shutdown` completes; each connection is its
/// own task, so a slow or broken client never affects another.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WebhookError> {
    let tls = TlsAcceptor::from(Arc::new(state.certs.server_config()?));
    let app = router(state);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(connection(stream, peer, tls.clone(), app.clone()));
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: TlsAcceptor,
    app: Router,
) {
    let stream = match tokio::time::timeout(Duration::from_secs(10), tls.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let service = hyper_util::service::TowerToHyperService::new(app);
    let result = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
