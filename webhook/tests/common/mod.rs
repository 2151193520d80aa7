//! Shared helpers for dbwebhook's tests: fixture reviews, a local Kubernetes API, pod checks.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use base64::Engine;
use dbwebhook::admission::AppState;
use dbwebhook::claims::{ClaimResolver, ResolverConfig};
use dbwebhook::config::InjectConfig;
use dbwebhook::tls::CertStore;
use serde_json::{Value, json};

/// A pod as a Deployment's ReplicaSet creates it: generateName, no name, no namespace.
pub fn deployment_pod(labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "myapp-7d9c5b6f4-",
            "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "myapp-7d9c5b6f4",
                                  "uid": "6b3a1c9e-0000-4000-8000-000000000001", "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "containers": [{
                "name": "app",
                "image": "myapp:1.0",
                "env": [{"name": "DATABASE_URL", "value": "postgres://myapp@localhost:5432/myapp"}],
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true
        }
    })
}

/// The usual labels: claim `myapp-db`, proxy enabled.
pub fn proxy_labels() -> Value {
    json!({
        "app": "myapp",
        "persistance.atlas.infoblox.com/claim": "myapp-db",
        "persistance.atlas.infoblox.com/dbproxy": "enabled"
    })
}

/// An admission.k8s.io/v1 AdmissionReview for `pod` in `namespace`.
pub fn review(uid: &str, operation: &str, namespace: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

/// (namespace, kind plural, name) of an object the fake API server holds.
pub type ObjectKey = (String, String, String);

/// Claims the fake API server knows.
#[derive(Clone, Default)]
pub struct FakeApi {
    pub objects: Arc<Mutex<HashMap<ObjectKey, Value>>>,
    pub requests: Arc<AtomicUsize>,
    /// Delay before answering, to exercise the lookup timeout.
    pub delay: Arc<Mutex<Duration>>,
}

impl FakeApi {
    /// Adds a claim of `kind` (`DatabaseClaim` or `DbRoleClaim`) with an optional secretName.
    pub fn add_claim(&self, namespace: &str, kind: &str, name: &str, secret: Option<&str>) {
        let plural = match kind {
            "DatabaseClaim" => "databaseclaims",
            _ => "dbroleclaims",
        };
        let mut spec = json!({"databaseName": "myapp", "dbVersion": "15"});
        if let Some(s) = secret {
            spec["secretName"] = json!(s);
        }
        // The shape the API server returns for a custom resource GET.
        let obj = json!({
            "apiVersion": "persistance.atlas.infoblox.com/v1",
            "kind": kind,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": "0b6c6f3e-1111-4000-8000-000000000002",
                "resourceVersion": "4242",
                "generation": 1,
                "creationTimestamp": "2025-01-01T00:00:00Z"
            },
            "spec": spec,
            "status": {}
        });
        if let Ok(mut objects) = self.objects.lock() {
            objects.insert((namespace.into(), plural.into(), name.into()), obj);
        }
    }

    pub fn request_count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn get_claim(
    State(api): State<FakeApi>,
    Path((namespace, plural, name)): Path<(String, String, String)>,
) -> impl IntoResponse {
    api.requests.fetch_add(1, Ordering::SeqCst);
    let delay = api.delay.lock().map(|d| *d).unwrap_or_default();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let found = api
        .objects
        .lock()
        .ok()
        .and_then(|o| o.get(&(namespace, plural.clone(), name.clone())).cloned());
    match found {
        Some(obj) => (StatusCode::OK, axum::Json(obj)),
        // The API server's real 404 Status body.
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("{plural}.persistance.atlas.infoblox.com \"{name}\" not found"),
                "reason": "NotFound",
                "details": {"name": name, "group": "persistance.atlas.infoblox.com", "kind": plural},
                "code": 404
            })),
        ),
    }
}

/// Starts a plain-HTTP server on loopback that answers the claim GET endpoints like the
/// Kubernetes API server does; returns it and a `kube::Client` pointed at it.
pub async fn start_fake_api() -> (FakeApi, kube::Client, SocketAddr) {
    let api = FakeApi::default();
    let app = axum::Router::new()
        .route(
            "/apis/persistance.atlas.infoblox.com/v1/namespaces/{namespace}/{plural}/{name}",
            get(get_claim),
        )
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let url: axum::http::Uri = format!("http://{addr}").parse().unwrap();
    let mut config = kube::Config::new(url);
    config.default_namespace = "default".into();
    let client = kube::Client::try_from(config).unwrap();
    (api, client, addr)
}

/// Server state for in-process admission tests (no TLS needed for `admission::review`).
pub fn app_state(config: InjectConfig, client: kube::Client, resolver: ResolverConfig) -> AppState {
    AppState {
        config: Arc::new(config),
        resolver: Arc::new(ClaimResolver::new(client, resolver)),
        certs: CertStore::new("/nonexistent/tls.crt", "/nonexistent/tls.key"),
        metrics: dbwebhook::metrics::install(),
    }
}

/// Decodes the response's base64 JSON Patch, if any.
pub fn response_patch(response: &Value) -> Option<json_patch::Patch> {
    let b64 = response.pointer("/response/patch")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Asserts `pod` is a valid Pod: it round-trips through k8s-openapi's `Pod` with nothing
/// lost, container and volume names are unique, and every mount has a volume.
pub fn assert_valid_pod(pod: &Value) {
    let typed: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(pod.clone()).expect("patched pod does not deserialise as a Pod");
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &strip_nulls(back),
        &strip_nulls(pod.clone()),
        "the pod changed in a k8s-openapi round trip (a field is unknown or mistyped)"
    );
    let spec = &pod["spec"];
    let mut names = HashSet::new();
    let mut mounts = Vec::new();
    for field in ["initContainers", "containers"] {
        for c in spec[field].as_array().into_iter().flatten() {
            let name = c["name"].as_str().expect("container without name");
            assert!(
                names.insert(name.to_string()),
                "duplicate container name {name}"
            );
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                mounts.push(m["name"].as_str().unwrap().to_string());
            }
        }
    }
    let mut volumes = HashSet::new();
    for v in spec["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().expect("volume without name");
        assert!(
            volumes.insert(name.to_string()),
            "duplicate volume name {name}"
        );
    }
    for m in mounts {
        assert!(volumes.contains(&m), "mount {m} has no volume");
    }
}

/// k8s-openapi leaves out empty/None fields; the input may carry `{}` or `null`.
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

/// Names of init containers, in order.
pub fn init_names(pod: &Value) -> Vec<String> {
    pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap_or("").to_string())
        .collect()
}
