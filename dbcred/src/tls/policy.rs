//! What a DSN says about TLS to the server, read with libpq's rules (`sslmode`, `sslrootcert`, `sslcert`, ...).
//!
//! The rules, from the PostgreSQL documentation ("SSL Support", "Connection Parameters") and
//! `fe-connect.c` / `fe-secure-openssl.c`:
//!
//! - `disable`: plaintext. `allow`: plaintext first; if the server rejects that login, a new
//!   connection asks for TLS. `prefer` (the default): ask for TLS, use it if the server
//!   answers `S`, else continue in plaintext; if the TLS handshake fails or the server rejects
//!   the login over TLS, retry once in plaintext on a new connection. `require`, `verify-ca`,
//!   `verify-full`: TLS or nothing. [`ServerTlsPolicy::attempts`] and
//!   [`ServerTlsPolicy::fallback`] give the caller this sequence.
//! - Verification: `verify-full` checks chain and host name, `verify-ca` the chain only. Like
//!   libpq, whenever a root certificate file is available (`sslrootcert`, or the default
//!   `~/.postgresql/root.crt` if it exists) the chain is verified in *every* mode that uses TLS:
//!   `require` with a root certificate behaves like `verify-ca`. `sslrootcert=system` uses the
//!   platform's roots (rustls-native-certs) and implies `verify-full`.
//! - The name checked by `verify-full` is `host` (or `hostaddr` when no `host` is given), as
//!   libpq does. Unlike libpq, a certificate without subjectAltName is not matched against its
//!   common name (webpki follows RFC 6125; every current CA issues SANs).
//! - `sslcert`/`sslkey`: a client certificate (default `~/.postgresql/postgresql.crt` and
//!   `.key`, used only if the certificate file exists, as libpq does). Unlike libpq, the key
//!   file's permissions are not checked: Kubernetes Secret volumes are often mode 0644 and the
//!   sidecar's container is the security boundary.
//! - `sslnegotiation=direct`: TLS from the first byte with ALPN `postgresql` (PostgreSQL 17+),
//!   only with `require` or stricter, as libpq insists.
//! - `sslsni` (default 1): send the host name as SNI, never for an IP address.
//! - `ssl_min_protocol_version` (default TLSv1.2) / `ssl_max_protocol_version`: rustls speaks
//!   TLS 1.2 and 1.3 only, so TLSv1 and TLSv1.1 as a minimum mean 1.2.
//! - `sslcrl` / `sslcrldir`: revocation lists, checked for the whole chain when verifying.
//! - `channel_binding` (default prefer): see [`ChannelBinding`].
//! - Over a Unix socket libpq never uses TLS, even with `sslmode=require`; so do we.
//!
//! Not supported, with a clear error: `sslpassword` (encrypted keys), `sslcertmode=require`.
//! Ignored: `sslcompression` (no TLS library compresses any more), `sslkeylogfile`.
//!
//! Files are read when the policy is built, so a broken Secret is rejected before it replaces
//! a working policy; build a new policy when the DSN or the files change.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tracing::warn;

use super::{TlsError, pem, verify};
use crate::{Dsn, HostKind, SslMode};

/// The ALPN protocol name PostgreSQL 17+ requires for direct TLS (libpq sends it always).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// One way of opening a connection, in libpq's order of [`ServerTlsPolicy::attempts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// No SSLRequest: plaintext from the start.
    Plain,
    /// Ask for TLS; use it if the server agrees, else continue in plaintext.
    TlsIfOffered,
    /// TLS or fail (SSLRequest, or a direct TLS handshake with `sslnegotiation=direct`).
    TlsRequired,
}

/// How a connection attempt failed, so [`ServerTlsPolicy::fallback`] can apply libpq's retry rule.
#[derive(Debug, Clone, Copy)]
pub enum AttemptFailure<'a> {
    /// [`negotiate`](crate::tls::negotiate) failed (TLS handshake, SSLRequest rejected, ...).
    Negotiation(&'a TlsError),
    /// The server sent an ErrorResponse before AuthenticationOk (for example pg_hba.conf has no
    /// entry for this encryption); `over_tls` is [`PgStream::is_tls`](crate::tls::PgStream::is_tls).
    Login { over_tls: bool },
}

/// libpq `channel_binding`: whether SCRAM-SHA-256-PLUS with `tls-server-end-point` is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelBinding {
    /// Never use channel binding.
    Disable,
    /// Use SCRAM-SHA-256-PLUS when the connection is TLS and the server offers it.
    #[default]
    Prefer,
    /// Fail unless the login used SCRAM-SHA-256-PLUS (so also fail without TLS, or when the
    /// server asks for another method or no authentication at all).
    Require,
}

/// Where trusted roots come from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RootSource {
    File(PathBuf),
    System,
}

/// The server-side TLS behaviour a DSN asks for, with its rustls configuration ready.
/// Cheap to clone (the configuration is shared).
#[derive(Clone)]
pub struct ServerTlsPolicy {
    mode: SslMode,
    direct: bool,
    channel_binding: ChannelBinding,
    roots: Option<RootSource>,
    /// `None` for `sslmode=disable`.
    config: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for ServerTlsPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTlsPolicy")
            .field("sslmode", &self.mode)
            .field("direct", &self.direct)
            .field("channel_binding", &self.channel_binding)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl ServerTlsPolicy {
    /// Reads the TLS keywords of `dsn` with libpq's rules (default files under `$HOME/.postgresql`).
    pub fn from_dsn(dsn: &Dsn) -> Result<ServerTlsPolicy, TlsError> {
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from);
        Self::from_dsn_with_home(dsn, home.as_deref())
    }

    /// Like [`ServerTlsPolicy::from_dsn`] with an explicit home directory for libpq's default
    /// files (`.postgresql/root.crt`, `postgresql.crt`, `postgresql.key`); `None` = no defaults.
    pub fn from_dsn_with_home(dsn: &Dsn, home: Option<&Path>) -> Result<ServerTlsPolicy, TlsError> {
        let mode = dsn.sslmode();
        let direct = dsn.get("sslnegotiation") == Some("direct");
        let channel_binding = match dsn.get("channel_binding") {
            Some("disable") => ChannelBinding::Disable,
            Some("require") => ChannelBinding::Require,
            _ => ChannelBinding::Prefer,
        };
        if direct
            && !matches!(
                mode,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
            )
        {
            return Err(TlsError::Config(format!(
                "sslnegotiation=direct cannot be used with sslmode={mode}: use require, \
                 verify-ca or verify-full"
            )));
        }
        if mode == SslMode::Disable && channel_binding == ChannelBinding::Require {
            return Err(TlsError::Config(
                "channel_binding=require needs TLS but sslmode=disable: use sslmode=require \
                 or stricter"
                    .into(),
            ));
        }
        if dsn.get("sslcertmode") == Some("require") {
            return Err(TlsError::Config(
                "sslcertmode=require is not supported: remove it (a client certificate given \
                 with sslcert is sent when the server asks for one)"
                    .into(),
            ));
        }
        if dsn.get("sslpassword").is_some_and(|p| !p.is_empty()) {
            return Err(TlsError::Config(
                "sslpassword (an encrypted sslkey) is not supported: store the key unencrypted"
                    .into(),
            ));
        }
        if mode == SslMode::Disable {
            return Ok(ServerTlsPolicy {
                mode,
                direct,
                channel_binding,
                roots: None,
                config: None,
            });
        }

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let dot_pg = home.map(|h| h.join(".postgresql"));
        let roots = root_source(dsn, mode, dot_pg.as_deref())?;
        let verifier = build_verifier(dsn, mode, roots.as_ref(), &provider)?;
        let versions = protocol_versions(dsn)?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| TlsError::Config(format!("TLS protocol versions: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match client_certificate(dsn, dot_pg.as_deref())? {
            Some((certs, key)) => builder.with_client_auth_cert(certs, key).map_err(|e| {
                TlsError::Config(format!(
                    "sslcert and sslkey do not form a usable pair: {}",
                    rustls_problem(&e)
                ))
            })?,
            None => builder.with_no_client_auth(),
        };
        config.enable_sni = dsn.get("sslsni").is_none_or(|v| v.starts_with('1'));
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(ServerTlsPolicy {
            mode,
            direct,
            channel_binding,
            roots,
            config: Some(Arc::new(config)),
        })
    }

    /// The effective `sslmode`.
    pub fn sslmode(&self) -> SslMode {
        self.mode
    }

    /// `sslnegotiation=direct`: TLS starts with the first byte, no SSLRequest.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The DSN's `channel_binding`.
    pub fn channel_binding(&self) -> ChannelBinding {
        self.channel_binding
    }

    /// The rustls client configuration (`None` for `sslmode=disable`).
    pub fn client_config(&self) -> Option<&Arc<ClientConfig>> {
        self.config.as_ref()
    }

    /// Attempts in libpq's order for a TCP host. Begin with the first; go to the next one only
    /// as [`ServerTlsPolicy::fallback`] says. Unix sockets never use TLS: use
    /// [`ServerTlsPolicy::attempts_for`].
    pub fn attempts(&self) -> &'static [Attempt] {
        match self.mode {
            SslMode::Disable => &[Attempt::Plain],
            SslMode::Allow => &[Attempt::Plain, Attempt::TlsIfOffered],
            SslMode::Prefer => &[Attempt::TlsIfOffered, Attempt::Plain],
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => &[Attempt::TlsRequired],
        }
    }

    /// [`ServerTlsPolicy::attempts`] for one host entry: only [`Attempt::Plain`] over a Unix
    /// socket (libpq never requests TLS there, whatever `sslmode` says).
    pub fn attempts_for(&self, host: &HostKind) -> &'static [Attempt] {
        match host {
            HostKind::Unix(_) => &[Attempt::Plain],
            HostKind::Tcp(_) => self.attempts(),
        }
    }

    /// The attempt libpq makes next, on a new connection to the same host, after `failed`
    /// failed as `how`; `None` means give up on this host (try the next host, if any).
    ///
    /// - `allow`: a plaintext login the server rejected is retried asking for TLS;
    /// - `prefer`: a failed TLS handshake, an SSLRequest the server rejected with an error, or
    ///   a login rejected over TLS is retried in plaintext.
    pub fn fallback(&self, failed: Attempt, how: AttemptFailure<'_>) -> Option<Attempt> {
        match (self.mode, failed, how) {
            (SslMode::Allow, Attempt::Plain, AttemptFailure::Login { .. }) => {
                Some(Attempt::TlsIfOffered)
            }
            (SslMode::Prefer, Attempt::TlsIfOffered, AttemptFailure::Login { over_tls: true }) => {
                Some(Attempt::Plain)
            }
            (SslMode::Prefer, Attempt::TlsIfOffered, AttemptFailure::Negotiation(e))
                if e.is_handshake_failure() =>
            {
                Some(Attempt::Plain)
            }
            _ => None,
        }
    }

    /// Describes the trusted roots for errors ("sslrootcert file /x", "the system roots").
    pub(crate) fn roots_description(&self) -> String {
        match &self.roots {
            Some(RootSource::File(p)) => format!("sslrootcert file {}", p.display()),
            Some(RootSource::System) => "sslrootcert=system: the platform's trusted roots".into(),
            None => "no root certificate configured".into(),
        }
    }
}

/// Where the roots come from: `sslrootcert` (a file or `system`), else libpq's default file if
/// it exists. verify-ca/verify-full without any is an error, as in libpq.
fn root_source(
    dsn: &Dsn,
    mode: SslMode,
    dot_pg: Option<&Path>,
) -> Result<Option<RootSource>, TlsError> {
    let verifying = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull);
    match dsn.get("sslrootcert").filter(|v| !v.is_empty()) {
        Some("system") => Ok(Some(RootSource::System)),
        Some(path) => {
            let path = PathBuf::from(path);
            // libpq: a missing file is an error only when verifying (require ignores it).
            if !verifying && !path.exists() {
                return Ok(None);
            }
            Ok(Some(RootSource::File(path)))
        }
        None => {
            let default = dot_pg.map(|d| d.join("root.crt"));
            match default {
                Some(p) if p.exists() => Ok(Some(RootSource::File(p))),
                _ if verifying => Err(TlsError::Config(format!(
                    "sslmode={mode} needs a root certificate to verify the server, but sslrootcert \
                     is not set{}: set sslrootcert to the CA file, or sslrootcert=system for \
                     the platform's trusted roots, or use sslmode=require",
                    match dot_pg {
                        Some(d) => format!(" and {} does not exist", d.join("root.crt").display()),
                        None => String::new(),
                    }
                ))),
                _ => Ok(None),
            }
        }
    }
}

/// The certificate verifier for `mode` and the available roots.
fn build_verifier(
    dsn: &Dsn,
    mode: SslMode,
    roots: Option<&RootSource>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let Some(source) = roots else {
        return Ok(Arc::new(verify::AcceptAnyCertificate::new(provider)));
    };
    let mut store = RootCertStore::empty();
    match source {
        RootSource::File(path) => {
            for cert in pem::certificates("sslrootcert", path)? {
                store.add(cert).map_err(|e| TlsError::File {
                    what: "sslrootcert",
                    path: path.clone(),
                    problem: format!("unusable CA certificate: {}", rustls_problem(&e)),
                })?;
            }
        }
        RootSource::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = match found.errors.first() {
                    Some(e) => e.to_string(),
                    None => "the store is empty".into(),
                };
                return Err(TlsError::SystemRoots(why));
            }
        }
    }
    let mut crls = Vec::new();
    if let Some(path) = dsn.get("sslcrl").filter(|v| !v.is_empty()) {
        crls.extend(pem::crls("sslcrl", Path::new(path))?);
    }
    if let Some(dir) = dsn.get("sslcrldir").filter(|v| !v.is_empty()) {
        let entries = std::fs::read_dir(dir).map_err(|e| TlsError::File {
            what: "sslcrldir",
            path: PathBuf::from(dir),
            problem: format!("cannot list the directory ({e})"),
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_file() {
                crls.extend(pem::crls("sslcrldir", &path)?);
            }
        }
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .with_crls(crls)
        .build()
        .map_err(|e| TlsError::Config(format!("cannot build the certificate verifier: {e}")))?;
    Ok(match mode {
        SslMode::VerifyFull => webpki,
        _ => Arc::new(verify::ChainOnly::new(webpki)),
    })
}

/// `ssl_min_protocol_version` / `ssl_max_protocol_version` as rustls versions.
fn protocol_versions(dsn: &Dsn) -> Result<Vec<&'static SupportedProtocolVersion>, TlsError> {
    // 0 = TLSv1, 1 = TLSv1.1, 2 = TLSv1.2, 3 = TLSv1.3 (values are checked by the DSN parser).
    let level = |key: &str, default: u8| -> u8 {
        match dsn.get(key).map(str::to_ascii_lowercase).as_deref() {
            Some("tlsv1") => 0,
            Some("tlsv1.1") => 1,
            Some("tlsv1.2") => 2,
            Some("tlsv1.3") => 3,
            _ => default,
        }
    };
    let min = level("ssl_min_protocol_version", 2);
    let max = level("ssl_max_protocol_version", 3);
    let mut versions = Vec::new();
    if min <= 2 && max >= 2 {
        versions.push(&rustls::version::TLS12);
    }
    if max >= 3 {
        versions.push(&rustls::version::TLS13);
    }
    if versions.is_empty() {
        return Err(TlsError::Config(
            "ssl_min_protocol_version/ssl_max_protocol_version leave no TLS version this \
             client supports (TLSv1.2 and TLSv1.3)"
                .into(),
        ));
    }
    Ok(versions)
}

type CertAndKey = (
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
);

/// `sslcert`/`sslkey` with libpq's defaults: no certificate file means no client certificate;
/// a certificate without a readable key is an error.
fn client_certificate(dsn: &Dsn, dot_pg: Option<&Path>) -> Result<Option<CertAndKey>, TlsError> {
    if dsn.get("sslcertmode") == Some("disable") {
        return Ok(None);
    }
    let cert_path = match dsn.get("sslcert").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => match dot_pg {
            Some(d) => d.join("postgresql.crt"),
            None => return Ok(None),
        },
    };
    if !cert_path.exists() {
        if dsn.get("sslcert").is_some() {
            // libpq silently connects without a certificate here; say it at least once.
            warn!(path = %cert_path.display(), "sslcert file does not exist; connecting without a client certificate, as libpq does");
        }
        return Ok(None);
    }
    let key_path = match dsn.get("sslkey").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => match dot_pg {
            Some(d) => d.join("postgresql.key"),
            None => cert_path.with_extension("key"),
        },
    };
    let certs = pem::certificates("sslcert", &cert_path)?;
    let key = pem::private_key("sslkey", &key_path)?;
    Ok(Some((certs, key)))
}

/// A rustls error as text; rustls errors never contain key material.
pub(crate) fn rustls_problem(e: &rustls::Error) -> String {
    e.to_string()
}
