//! The crate's one error type; every message says what was wrong and what to do, never a secret.

use std::path::PathBuf;

/// Everything that can go wrong in dbwebhook outside an admission decision
/// (decisions answer with a denial message instead of failing).
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {reason}")]
    CertRead { path: PathBuf, reason: String },
    /// The certificate and key files were read but are not a usable pair.
    #[error(
        "certificate {cert} and key {key} are not a usable pair: {reason}; the previous pair stays in use"
    )]
    CertInvalid {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    /// A command-line or configuration value is invalid.
    #[error("invalid setting {setting}: {reason}")]
    Config { setting: String, reason: String },
    /// A manifest given to `dbwebhook inject` cannot be processed.
    #[error("document {document}: {reason}")]
    Manifest { document: usize, reason: String },
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The Kubernetes API could not be reached or answered with an error.
    #[error("Kubernetes API: {0}")]
    Kube(String),
}

impl WebhookError {
    /// Wraps an I/O error with what we were doing when it happened.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        WebhookError::Io {
            context: context.into(),
            source,
        }
    }
}
