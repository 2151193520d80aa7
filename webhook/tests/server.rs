//! The HTTPS admission server end to end on loopback: health, readiness, mutation over TLS,
//! and certificate rotation (kubelet-style Secret update and in-place rewrite) without restart.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use dbtests::SecretDir;
use dbwebhook::admission::{self, AppState};
use dbwebhook::claims::{ClaimResolver, ResolverConfig};
use dbwebhook::config::InjectConfig;
use dbwebhook::tls::CertStore;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA and a leaf for `localhost` signed by it, as PEM.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn make_pki(name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
    }
}

fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One HTTP/1.1 request over TLS trusting `ca_pem`; returns (status, body).
async fn https(
    addr: SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let connector = tokio_rustls::TlsConnector::from(client_config(ca_pem));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(body).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no header end")?;
    Ok((status, out[split + 4..].to_vec()))
}

async fn start(certs: Arc<CertStore>) -> SocketAddr {
    let (_api, client, _) = start_fake_api().await;
    let state = AppState {
        config: Arc::new(InjectConfig::default()),
        resolver: Arc::new(ClaimResolver::new(client, ResolverConfig::default())),
        certs: certs.clone(),
        metrics: dbwebhook::metrics::install(),
    };
    let _watcher = certs.spawn_watcher(Duration::from_millis(500));
    std::mem::forget(_watcher);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(admission::serve(listener, state, std::future::pending()));
    addr
}

/// Polls until `ok` holds, up to 20 s (the watcher reacts in well under a second normally).
async fn eventually<F, Fut>(what: &str, mut ok: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if ok().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_style_rotation_is_served_without_restart() {
    let pki1 = make_pki("one");
    let pki2 = make_pki("two");
    let secret = SecretDir::new().unwrap();
    let certs = CertStore::new(secret.file("tls.crt"), secret.file("tls.key"));
    assert!(!certs.is_loaded());
    let addr = start(certs.clone()).await;

    // Not ready (no handshake possible) until a certificate exists.
    assert!(
        https(addr, &pki1.ca_pem, "GET", "/readyz", b"")
            .await
            .is_err()
    );
    secret
        .write(&[
            ("tls.crt", pki1.cert_pem.as_bytes()),
            ("tls.key", pki1.key_pem.as_bytes()),
            ("ca.crt", pki1.ca_pem.as_bytes()),
        ])
        .unwrap();
    eventually("first certificate served", || async {
        matches!(
            https(addr, &pki1.ca_pem, "GET", "/readyz", b"").await,
            Ok((200, _))
        )
    })
    .await;
    assert_eq!(
        https(addr, &pki1.ca_pem, "GET", "/healthz", b"")
            .await
            .unwrap()
            .0,
        200
    );

    // A mutation over TLS.
    let mut pod = deployment_pod(proxy_labels());
    pod["metadata"]["annotations"] =
        serde_json::json!({"persistance.atlas.infoblox.com/secret-name": "creds"});
    let review = review("tls-1", "CREATE", "myapp", pod);
    let (status, body) = https(
        addr,
        &pki1.ca_pem,
        "POST",
        "/mutate--v1-pod",
        &serde_json::to_vec(&review).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let response: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(response["response"]["uid"], "tls-1");
    assert!(response_patch(&response).is_some());

    // An invalid new pair (key of another certificate) is refused: the old one stays.
    secret
        .write(&[
            ("tls.crt", pki2.cert_pem.as_bytes()),
            ("tls.key", pki1.key_pem.as_bytes()),
        ])
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        https(addr, &pki1.ca_pem, "GET", "/healthz", b"")
            .await
            .unwrap()
            .0,
        200
    );
    assert!(
        https(addr, &pki2.ca_pem, "GET", "/healthz", b"")
            .await
            .is_err()
    );

    // The kubelet swaps in the new pair: clients trusting CA 2 now succeed, CA 1 fails.
    secret
        .write(&[
            ("tls.crt", pki2.cert_pem.as_bytes()),
            ("tls.key", pki2.key_pem.as_bytes()),
        ])
        .unwrap();
    eventually("rotated certificate served", || async {
        matches!(
            https(addr, &pki2.ca_pem, "GET", "/healthz", b"").await,
            Ok((200, _))
        )
    })
    .await;
    assert!(
        https(addr, &pki1.ca_pem, "GET", "/healthz", b"")
            .await
            .is_err()
    );

    // Metrics show the traffic.
    let (status, metrics) = https(addr, &pki2.ca_pem, "GET", "/metrics", b"")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("dbwebhook_requests_total"), "{metrics}");
    assert!(metrics.contains("dbwebhook_injections_total"), "{metrics}");
    assert!(
        metrics.contains("dbwebhook_request_duration_seconds"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_rewrite_is_served_without_restart() {
    let pki1 = make_pki("one");
    let pki2 = make_pki("two");
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, &pki1.cert_pem).unwrap();
    std::fs::write(&key, &pki1.key_pem).unwrap();
    let certs = CertStore::new(&cert, &key);
    let addr = start(certs).await;
    eventually("first certificate served", || async {
        matches!(
            https(addr, &pki1.ca_pem, "GET", "/readyz", b"").await,
            Ok((200, _))
        )
    })
    .await;
    // Key first, then certificate: the mismatched moment in between is refused.
    std::fs::write(&key, &pki2.key_pem).unwrap();
    std::fs::write(&cert, &pki2.cert_pem).unwrap();
    eventually("rewritten certificate served", || async {
        matches!(
            https(addr, &pki2.ca_pem, "GET", "/healthz", b"").await,
            Ok((200, _))
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_unreadable_bodies_are_refused() {
    let pki = make_pki("one");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c"), &pki.cert_pem).unwrap();
    std::fs::write(dir.path().join("k"), &pki.key_pem).unwrap();
    let addr = start(CertStore::new(dir.path().join("c"), dir.path().join("k"))).await;
    eventually("served", || async {
        https(addr, &pki.ca_pem, "GET", "/healthz", b"")
            .await
            .is_ok()
    })
    .await;
    let (status, body) = https(addr, &pki.ca_pem, "POST", "/mutate", b"{{{")
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("AdmissionReview"));
    let huge = vec![b' '; dbwebhook::admission::MAX_BODY_BYTES + 1];
    let (status, _) = https(addr, &pki.ca_pem, "POST", "/mutate", &huge)
        .await
        .unwrap();
    assert_eq!(status, 413);
}
