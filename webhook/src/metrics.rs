//! Prometheus metrics: requests, injections, skips by reason, denials, latency.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::decision::Decision;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns the handle that renders `/metrics`.
/// Later calls (several servers in one test process) share the first recorder.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is already set; then ours just renders nothing.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Counts one admission request and its outcome, and records how long it took.
pub fn record_admission(path: &'static str, decision: Option<&Decision>, elapsed: Duration) {
    metrics::counter!("dbwebhook_requests_total", "path" => path).increment(1);
    metrics::histogram!("dbwebhook_request_duration_seconds").record(elapsed.as_secs_f64());
    match decision {
        Some(Decision::Skip(reason)) => {
            metrics::counter!("dbwebhook_skips_total", "reason" => reason.as_str()).increment(1);
        }
        Some(Decision::Inject { sidecars, .. }) => {
            for s in sidecars {
                metrics::counter!("dbwebhook_injections_total", "sidecar" => s.as_str())
                    .increment(1);
            }
        }
        Some(Decision::Deny { reason, .. }) => {
            metrics::counter!("dbwebhook_denials_total", "reason" => reason.as_str()).increment(1);
        }
        None => {
            metrics::counter!("dbwebhook_bad_requests_total").increment(1);
        }
    }
}
