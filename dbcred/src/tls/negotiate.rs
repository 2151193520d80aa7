//! Opens TLS on a fresh connection to PostgreSQL: SSLRequest (or direct TLS), handshake, and the stream that results.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use rustls::{CertificateError, Error as RustlsError};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::TlsError;
use super::channel_binding::tls_server_end_point;
use super::policy::{ALPN_POSTGRESQL, Attempt, ServerTlsPolicy};

/// The SSLRequest packet: length 8, code 80877103.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A connection to PostgreSQL after TLS negotiation: plaintext or TLS, read and written alike.
#[derive(Debug)]
pub enum PgStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// The plaintext socket was taken out ([`PgStream::detach`]) to wait outside the
    /// runtime; every read and write fails with `NotConnected` until it is put back.
    Detached,
}

impl PgStream {
    /// True when the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, PgStream::Tls(_))
    }

    /// RFC 5929 `tls-server-end-point` data for SCRAM-SHA-256-PLUS: the hash of the server's
    /// leaf certificate. `None` for plaintext, or when the certificate's signature algorithm
    /// has no defined hash (EdDSA, RSASSA-PSS; PostgreSQL cannot bind those either).
    pub fn tls_server_end_point(&self) -> Option<Vec<u8>> {
        match self {
            PgStream::Plain(_) | PgStream::Detached => None,
            PgStream::Tls(tls) => {
                let leaf = tls.get_ref().1.peer_certificates()?.first()?;
                tls_server_end_point(leaf)
            }
        }
    }

    /// The underlying TCP connection (for socket options and addresses); none while
    /// detached.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            PgStream::Plain(tcp) => Some(tcp),
            PgStream::Tls(tls) => Some(tls.get_ref().0),
            PgStream::Detached => None,
        }
    }

    /// Takes a plaintext connection's socket out, leaving [`PgStream::Detached`]; a TLS
    /// stream (whose socket lives inside its TLS state) is left as it is.
    pub fn detach(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, PgStream::Detached) {
            PgStream::Plain(tcp) => Some(tcp),
            other => {
                *self = other;
                None
            }
        }
    }

    /// Puts back a socket taken out by [`PgStream::detach`].
    pub fn attach(&mut self, tcp: TcpStream) {
        *self = PgStream::Plain(tcp);
    }
}

fn detached() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the connection's socket is detached",
    )
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            PgStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            PgStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            PgStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PgStream::Plain(s) => s.is_write_vectored(),
            PgStream::Tls(s) => s.is_write_vectored(),
            PgStream::Detached => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            PgStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            PgStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

/// Negotiates encryption on a fresh TCP connection to the server, before the StartupMessage.
///
/// `host` is the name TLS verifies and sends as SNI: the DSN's `host` entry (or `hostaddr` when
/// there is no `host`), never the address actually dialled. `attempt` comes from
/// [`ServerTlsPolicy::attempts`]. Returns the stream to send the StartupMessage on.
pub async fn negotiate(
    mut tcp: TcpStream,
    host: &str,
    policy: &ServerTlsPolicy,
    attempt: Attempt,
) -> Result<PgStream, TlsError> {
    let config = match (attempt, policy.client_config()) {
        (Attempt::Plain, _) | (_, None) => return Ok(PgStream::Plain(tcp)),
        (_, Some(config)) => config.clone(),
    };
    let io_err = |source| TlsError::Io {
        host: host.to_string(),
        source,
    };
    let direct = policy.direct() && attempt == Attempt::TlsRequired;
    if !direct {
        tcp.write_all(&SSL_REQUEST).await.map_err(io_err)?;
        // Read exactly one byte straight from the socket: nothing the server sends after `S`
        // may be taken as plaintext (CVE-2021-23222).
        let mut answer = [0u8; 1];
        match tcp.read(&mut answer).await {
            Ok(0) => {
                return Err(TlsError::SslRequestRejected {
                    host: host.to_string(),
                });
            }
            Ok(_) => {}
            Err(e) => return Err(io_err(e)),
        }
        match answer[0] {
            b'S' => {}
            b'N' if attempt == Attempt::TlsIfOffered => return Ok(PgStream::Plain(tcp)),
            b'N' => {
                return Err(TlsError::ServerRefusedTls {
                    host: host.to_string(),
                    mode: policy.sslmode().as_str(),
                });
            }
            // An ErrorResponse: a server too old to know SSLRequest. It closes the connection.
            b'E' => {
                return Err(TlsError::SslRequestRejected {
                    host: host.to_string(),
                });
            }
            byte => {
                return Err(TlsError::BadSslResponse {
                    host: host.to_string(),
                    byte,
                });
            }
        }
    }
    let name = server_name(host)?;
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| classify_handshake_error(e, host, policy, direct))?;
    if direct && tls.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
        return Err(TlsError::Handshake {
            host: host.to_string(),
            detail: "direct TLS connection was established without ALPN protocol \
                     \"postgresql\" (the server is not PostgreSQL 17+)"
                .into(),
        });
    }
    Ok(PgStream::Tls(Box::new(tls)))
}

/// The rustls name for `host`: an IP literal (zone index dropped) or a DNS name.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let bare = bare.split_once('%').map_or(bare, |(addr, _zone)| addr);
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::InvalidHostName(host.to_string()))
}

/// Turns a failed handshake into the error that tells the user what to change.
pub(crate) fn classify_handshake_error(
    e: io::Error,
    host: &str,
    policy: &ServerTlsPolicy,
    direct: bool,
) -> TlsError {
    let host = host.to_string();
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<RustlsError>());
    match rustls_error {
        Some(RustlsError::InvalidCertificate(cert)) => match cert {
            // BadSignature during chain building: a trusted CA with the issuer's name that did
            // not sign it (another CA with the same name), so still "not our CA".
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                TlsError::UnknownCa {
                    host,
                    roots: policy.roots_description(),
                }
            }
            CertificateError::NotValidForName => TlsError::WrongHostName {
                host,
                presented: String::new(),
            },
            CertificateError::NotValidForNameContext { presented, .. } => TlsError::WrongHostName {
                host,
                presented: if presented.is_empty() {
                    String::new()
                } else {
                    let names: Vec<&str> = presented.iter().map(|p| bare_name(p)).collect();
                    format!(" (it is issued for {})", names.join(", "))
                },
            },
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => TlsError::CertificateExpired {
                host,
                detail: cert.to_string(),
            },
            other => TlsError::BadCertificate {
                host,
                detail: other.to_string(),
            },
        },
        // A pre-17 server reads the ClientHello as a broken startup packet and answers with a
        // plaintext ErrorResponse or closes: not TLS records.
        Some(invalid @ RustlsError::InvalidMessage(_)) if direct => TlsError::DirectNotSupported {
            host,
            detail: invalid.to_string(),
        },
        Some(other) => TlsError::Handshake {
            host,
            detail: other.to_string(),
        },
        None if direct
            && matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ) =>
        {
            TlsError::DirectNotSupported {
                host,
                detail: e.to_string(),
            }
        }
        None => TlsError::Io { host, source: e },
    }
}

/// `DnsName("db.example")` -> `db.example`: rustls reports presented names in Debug form.
fn bare_name(presented: &str) -> &str {
    match presented.split_once('(') {
        Some((_, inner)) => inner.trim_end_matches(')').trim_matches('"'),
        None => presented,
    }
}
