//! Serves the webhook certificate from files and swaps it when the files change, without a
//! restart; an invalid new pair is refused and the previous one stays in use.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

use crate::error::WebhookError;

/// The current certificate and key, read from two files. Readiness means `is_loaded`.
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Option<Arc<CertifiedKey>>>,
    /// The bytes last read (valid or not), so an unchanged pair is not parsed or logged again.
    last_seen: Mutex<Option<(Vec<u8>, Vec<u8>)>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("loaded", &self.is_loaded())
            .finish()
    }
}

impl CertStore {
    /// A store with nothing loaded yet; call [`CertStore::reload`] or start the watcher.
    pub fn new(cert_path: impl Into<PathBuf>, key_path: impl Into<PathBuf>) -> Arc<Self> {
        Arc::new(CertStore {
            cert_path: cert_path.into(),
            key_path: key_path.into(),
            current: RwLock::new(None),
            last_seen: Mutex::new(None),
        })
    }

    /// Whether a certificate is being served.
    pub fn is_loaded(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }

    /// Re-reads both files; `Ok(true)` when a new valid pair is now served, `Ok(false)` when
    /// nothing changed, `Err` when the files cannot be read or do not form a usable pair.
    pub fn reload(&self) -> Result<bool, WebhookError> {
        let cert = read(&self.cert_path)?;
        let key = read(&self.key_path)?;
        {
            let mut last = self
                .last_seen
                .lock()
                .map_err(|_| self.invalid("internal lock poisoned".into()))?;
            if last.as_ref() == Some(&(cert.clone(), key.clone())) {
                return Ok(false);
            }
            *last = Some((cert.clone(), key.clone()));
        }
        let certified = self.parse(&cert, &key)?;
        if let Ok(mut current) = self.current.write() {
            *current = Some(Arc::new(certified));
        }
        Ok(true)
    }

    fn invalid(&self, reason: String) -> WebhookError {
        WebhookError::CertInvalid {
            cert: self.cert_path.clone(),
            key: self.key_path.clone(),
            reason,
        }
    }

    fn parse(&self, cert: &[u8], key: &[u8]) -> Result<CertifiedKey, WebhookError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| self.invalid(format!("certificate PEM: {e}")))?;
        if chain.is_empty() {
            return Err(self.invalid("no CERTIFICATE block in the certificate file".into()));
        }
        // The key's error text never includes key material.
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| self.invalid(format!("private key PEM: {e}")))?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| self.invalid(format!("unsupported private key: {e}")))?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
                Ok(certified)
            }
            Err(e) => Err(self.invalid(format!("key does not match certificate: {e}"))),
        }
    }

    /// A rustls server configuration that always serves the current pair (HTTP/1.1 only).
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, WebhookError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| WebhookError::Config {
                setting: "TLS".into(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Reloads on every change in the files' directories (kubelet's `..data` swap, in-place
    /// writes) and every `poll_interval` regardless, in case an event is lost.
    pub fn spawn_watcher(self: Arc<Self>, poll_interval: Duration) -> tokio::task::JoinHandle<()> {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let watcher = {
            let tx = tx.clone();
            notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
                // A full channel already means "reload soon".
                let _ = tx.try_send(());
            })
        };
        let watcher = match watcher {
            Ok(mut w) => {
                for dir in [parent(&self.cert_path), parent(&self.key_path)] {
                    if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch certificate directory; polling only");
                    }
                }
                Some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, "file watching unavailable; polling only");
                None
            }
        };
        tokio::spawn(async move {
            let _watcher = watcher;
            let _tx = tx;
            loop {
                self.reload_logged();
                tokio::select! {
                    Some(()) = rx.recv() => {
                        // Debounce: let a burst of events (cert then key) settle.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        while rx.try_recv().is_ok() {}
                    }
                    () = tokio::time::sleep(poll_interval) => {}
                }
            }
        })
    }

    fn reload_logged(&self) {
        match self.reload() {
            Ok(true) => {
                metrics::counter!("dbwebhook_certificate_reloads_total", "result" => "loaded")
                    .increment(1);
                tracing::info!(cert = %self.cert_path.display(), "serving new certificate");
            }
            Ok(false) => {}
            Err(e) => {
                metrics::counter!("dbwebhook_certificate_reloads_total", "result" => "rejected")
                    .increment(1);
                tracing::warn!(error = %e, "certificate not loaded");
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok()?.clone()
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, WebhookError> {
    std::fs::read(path).map_err(|e| WebhookError::CertRead {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
