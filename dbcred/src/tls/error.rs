//! Why TLS setup or a TLS connection failed, phrased so the user knows what to change.
//!
//! No variant ever carries file content, key material or a password: only paths, host names,
//! keyword names and the category of the problem.

use std::path::PathBuf;

/// A TLS failure, for the server side (libpq `sslmode` & co.) and the client-facing listener.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A DSN keyword combination libpq would refuse, or one we do not support.
    #[error("invalid TLS settings: {0}")]
    Config(String),
    /// A certificate, key, CA or CRL file could not be read or parsed. `what` names the keyword
    /// or role of the file (`sslrootcert`, `sslcert`, `sslkey`, `certificate`, ...).
    #[error("cannot use {what} file {}: {problem}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
    /// `sslrootcert=system` and the platform store gave no usable certificate.
    #[error(
        "sslrootcert=system: no trusted root certificates found in the system store ({0}); \
         install the ca-certificates package or set SSL_CERT_FILE"
    )]
    SystemRoots(String),
    /// The host to verify or to send as SNI is not a valid DNS name or IP address.
    #[error("host \"{0}\" is not a valid DNS name or IP address for TLS")]
    InvalidHostName(String),
    /// The server answered `N` to SSLRequest while TLS is required.
    #[error(
        "the server at {host} does not support TLS (it refused the SSLRequest) but sslmode={mode} \
         requires it: enable ssl=on on the server, or use sslmode=prefer or disable"
    )]
    ServerRefusedTls { host: String, mode: &'static str },
    /// The server closed or sent an error in answer to SSLRequest (a pre-TLS or broken
    /// server); libpq then retries without TLS on a new connection when sslmode allows it.
    #[error(
        "the server at {host} rejected the SSLRequest (it answered with an error or closed the \
         connection): it does not support TLS"
    )]
    SslRequestRejected { host: String },
    /// The server sent a byte that is not a valid answer to SSLRequest.
    #[error("the server at {host} sent an invalid answer (byte {byte:#04x}) to the SSLRequest")]
    BadSslResponse { host: String, byte: u8 },
    /// `sslnegotiation=direct` against a server that does not speak it (before PostgreSQL 17).
    #[error(
        "direct TLS to {host} failed: the server does not accept TLS without an SSLRequest \
         (sslnegotiation=direct needs PostgreSQL 17 or later); remove sslnegotiation=direct \
         ({detail})"
    )]
    DirectNotSupported { host: String, detail: String },
    /// The server's certificate chain does not lead to a trusted root.
    #[error(
        "the certificate of {host} is not signed by a trusted CA ({roots}): give the CA that \
         issued it in sslrootcert, or use sslmode=require without sslrootcert to skip verification"
    )]
    UnknownCa { host: String, roots: String },
    /// verify-full and the certificate is not issued for the host name.
    #[error(
        "the certificate of {host} is not valid for the name \"{host}\"{presented}: connect \
         with a host name the certificate lists, or use sslmode=verify-ca to check only the CA"
    )]
    WrongHostName { host: String, presented: String },
    /// The server's certificate (or one in its chain) is outside its validity period.
    #[error(
        "the certificate of {host} has expired or is not yet valid ({detail}): the server must \
         renew its certificate (check the clocks too)"
    )]
    CertificateExpired { host: String, detail: String },
    /// Any other certificate problem (bad signature, revoked, wrong purpose, ...).
    #[error("the certificate of {host} was rejected: {detail}")]
    BadCertificate { host: String, detail: String },
    /// The TLS handshake failed for a reason other than the server certificate.
    #[error("TLS handshake with {host} failed: {detail}")]
    Handshake { host: String, detail: String },
    /// The network failed while negotiating.
    #[error("I/O error while negotiating TLS with {host}: {source}")]
    Io {
        host: String,
        #[source]
        source: std::io::Error,
    },
}

impl TlsError {
    /// True when libpq would try the next attempt (see
    /// [`ServerTlsPolicy::fallback`](crate::tls::ServerTlsPolicy::fallback)): the TLS handshake
    /// or the SSLRequest failed, as opposed to a configuration error.
    pub fn is_handshake_failure(&self) -> bool {
        !matches!(
            self,
            TlsError::Config(_)
                | TlsError::File { .. }
                | TlsError::SystemRoots(_)
                | TlsError::InvalidHostName(_)
                | TlsError::ServerRefusedTls { .. }
        )
    }
}
