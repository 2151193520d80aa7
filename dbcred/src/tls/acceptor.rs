//! TLS for the proxy's own listener: a certificate from files, reloaded when they change, or a self-signed one made at startup.
//!
//! Each accepted connection takes the configuration current at that moment
//! ([`ClientTlsAcceptor::acceptor`]); a reload never touches connections already established.
//! A new certificate/key pair replaces the old one only when both files parse and the key
//! matches the certificate; otherwise the old pair stays in force and the problem is logged and
//! reported through [`ClientTlsAcceptor::subscribe`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::policy::{ALPN_POSTGRESQL, rustls_problem};
use super::{TlsError, pem};
use crate::{FileWatcher, WatchConfig, WatchEvent};

/// Names the self-signed certificate is valid for: what a client of a loopback sidecar dials.
pub const SELF_SIGNED_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// What the acceptor serves right now.
#[derive(Clone)]
pub struct AcceptorState {
    /// The configuration new connections get.
    pub config: Arc<ServerConfig>,
    /// The leaf certificate being served (lets a test or a health check see which one).
    pub leaf: CertificateDer<'static>,
    /// Incremented each time a new pair is taken into use (0 = the first one).
    pub generation: u64,
    /// Why the latest change of the files was refused, if it was (cleared by the next success).
    pub last_rejection: Option<String>,
}

impl std::fmt::Debug for AcceptorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcceptorState")
            .field("generation", &self.generation)
            .field("last_rejection", &self.last_rejection)
            .finish_non_exhaustive()
    }
}

/// The client-facing TLS configuration of a listener. Cheap to clone; the file watchers stop
/// when the last clone is dropped.
#[derive(Clone)]
pub struct ClientTlsAcceptor {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<watch::Sender<AcceptorState>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl std::fmt::Debug for ClientTlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTlsAcceptor")
            .field("state", &*self.inner.state.borrow())
            .finish()
    }
}

/// A certificate chain and key as read from the files, compared by content so an unchanged
/// pair (or the same pair reported by both file watchers) is not a new generation.
#[derive(Clone)]
struct LoadedPair {
    certs: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    config: Arc<ServerConfig>,
}

impl PartialEq for LoadedPair {
    fn eq(&self, other: &Self) -> bool {
        self.certs == other.certs && self.key.secret_der() == other.key.secret_der()
    }
}

impl ClientTlsAcceptor {
    /// A self-signed certificate for [`SELF_SIGNED_NAMES`], generated in memory (ECDSA P-256):
    /// encryption without setup for clients that use `sslmode=require` (which does not verify).
    pub fn self_signed() -> Result<ClientTlsAcceptor, TlsError> {
        let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|s| s.to_string()).collect();
        let generated = rcgen::generate_simple_self_signed(names).map_err(|e| {
            TlsError::Config(format!("cannot generate a self-signed certificate: {e}"))
        })?;
        let certs = vec![generated.cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            generated.signing_key.serialize_der(),
        ));
        let config = server_config(certs.clone(), key)
            .map_err(|p| TlsError::Config(format!("self-signed certificate: {p}")))?;
        let (state, _) = watch::channel(AcceptorState {
            config,
            leaf: certs[0].clone(),
            generation: 0,
            last_rejection: None,
        });
        Ok(ClientTlsAcceptor {
            inner: Arc::new(Inner {
                state: Arc::new(state),
                tasks: Vec::new(),
            }),
        })
    }

    /// Serves the PEM certificate chain in `cert` with the PEM private key in `key`, and
    /// follows both files (kubelet atomic-writer updates included) with `watch`. Fails now if
    /// the pair cannot be used, so a listener never starts with a broken certificate. Must be
    /// called inside a tokio runtime.
    pub fn from_files(
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
        watch_config: WatchConfig,
    ) -> Result<ClientTlsAcceptor, TlsError> {
        let cert = cert.into();
        let key = key.into();
        let first = load_pair(&cert, &key)?;
        let (state, _) = watch::channel(AcceptorState {
            config: first.config.clone(),
            leaf: first.certs[0].clone(),
            generation: 0,
            last_rejection: None,
        });
        let state = Arc::new(state);
        // One watcher per directory: the kubelet swaps both files with one rename, but the
        // two files may live in different mounts.
        let mut targets = vec![cert.clone()];
        if cert.parent() != key.parent() {
            targets.push(key.clone());
        }
        let mut tasks = Vec::new();
        let current = Arc::new(std::sync::Mutex::new(first));
        for target in targets {
            let (c, k) = (cert.clone(), key.clone());
            let watcher = FileWatcher::spawn(target, watch_config.clone(), move |_: &Path| {
                load_pair(&c, &k)
            })
            .map_err(|e| TlsError::Config(format!("cannot watch the certificate files: {e}")))?;
            tasks.push(tokio::spawn(follow(
                watcher,
                state.clone(),
                current.clone(),
                cert.clone(),
            )));
        }
        Ok(ClientTlsAcceptor {
            inner: Arc::new(Inner { state, tasks }),
        })
    }

    /// The configuration for the connection being accepted now.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.inner.state.borrow().config.clone()
    }

    /// A tokio-rustls acceptor with the current configuration; take one per accepted connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current())
    }

    /// What is served now, including the last refused change.
    pub fn state(&self) -> AcceptorState {
        self.inner.state.borrow().clone()
    }

    /// Changes of [`AcceptorState`] (new pair taken into use, or a change refused).
    pub fn subscribe(&self) -> watch::Receiver<AcceptorState> {
        self.inner.state.subscribe()
    }
}

/// Applies the watcher's events to the shared state until the watcher stops.
async fn follow(
    mut watcher: FileWatcher<LoadedPair>,
    state: Arc<watch::Sender<AcceptorState>>,
    current: Arc<std::sync::Mutex<LoadedPair>>,
    shown: PathBuf,
) {
    while let Some(event) = watcher.next().await {
        match event {
            WatchEvent::Changed(pair) => {
                {
                    let mut current = current.lock().unwrap_or_else(|e| e.into_inner());
                    if *current == pair {
                        continue;
                    }
                    *current = pair.clone();
                }
                state.send_modify(|s| {
                    s.config = pair.config.clone();
                    s.leaf = pair.certs[0].clone();
                    s.generation += 1;
                    s.last_rejection = None;
                });
                info!(cert = %shown.display(), "client-facing TLS certificate reloaded");
            }
            WatchEvent::Rejected(reason) => {
                warn!(cert = %shown.display(), %reason, "new client-facing TLS certificate refused; keeping the previous one");
                state.send_modify(|s| s.last_rejection = Some(reason));
            }
        }
    }
}

/// Reads and checks a certificate chain and its key.
fn load_pair(cert: &Path, key: &Path) -> Result<LoadedPair, TlsError> {
    let certs = pem::certificates("certificate", cert)?;
    let key_der = pem::private_key("private key", key)?;
    let config =
        server_config(certs.clone(), key_der.clone_key()).map_err(|problem| TlsError::File {
            what: "certificate/key pair",
            path: cert.to_path_buf(),
            problem,
        })?;
    Ok(LoadedPair {
        certs,
        key: Arc::new(key_der),
        config,
    })
}

/// A rustls server configuration (ring provider, TLS 1.2 and 1.3, ALPN `postgresql` for
/// clients using direct TLS). Fails if the key does not match the certificate.
fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| rustls_problem(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "cannot use this certificate with this key: {}",
                rustls_problem(&e)
            )
        })?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}
