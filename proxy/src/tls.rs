//! TLS on the proxy's client-facing link: the stream after an SSLRequest and the client TLS
//! mode (`--client-tls`). The session loop (`proxy::run_session`) works on these streams as
//! on plain sockets.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use clap::ValueEnum;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// `--client-tls`: what the listener does with SSLRequest, like a server's `ssl` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientTlsMode {
    /// Answer `N` to every SSLRequest: clients stay in plaintext.
    Disable,
    /// Accept TLS when the client asks (same as prefer on the server side of the protocol).
    Allow,
    /// Accept TLS when the client asks (the default).
    Prefer,
    /// Refuse clients that do not ask for TLS.
    Require,
}

impl ClientTlsMode {
    /// Whether an SSLRequest is answered `S`.
    pub fn offers_tls(self) -> bool {
        self != ClientTlsMode::Disable
    }
}

/// A client connection: plaintext, or TLS after an accepted SSLRequest. `Closed` only exists
/// while the handshake owns the socket (or after it failed): reads see end of stream.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Closed,
}

impl ClientStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "client connection closed")
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientStream::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientStream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientStream::Closed => Poll::Ready(Ok(())),
        }
    }
}

/// The listener's TLS settings: the mode, and the certificate when TLS is offered.
#[derive(Clone)]
pub struct ClientTls {
    pub mode: ClientTlsMode,
    pub acceptor: Option<dbcred::tls::ClientTlsAcceptor>,
}

impl ClientTls {
    /// Builds the listener side from the flags: the certificate files (followed for changes)
    /// or a self-signed certificate generated in memory. Files that cannot be used fail the
    /// start with the reason, never their content.
    pub fn from_flags(
        mode: ClientTlsMode,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
        poll_interval: std::time::Duration,
    ) -> crate::error::Result<ClientTls> {
        use crate::error::ProxyError;
        use dbcred::tls::ClientTlsAcceptor;
        if !mode.offers_tls() {
            return Ok(ClientTls {
                mode,
                acceptor: None,
            });
        }
        let acceptor = match (cert, key) {
            (Some(cert), Some(key)) => ClientTlsAcceptor::from_files(
                cert,
                key,
                dbcred::WatchConfig {
                    poll_interval,
                    ..dbcred::WatchConfig::default()
                },
            )
            .map_err(|e| ProxyError::Config(format!("--client-tls-cert/--client-tls-key: {e}")))?,
            (None, None) => {
                let acceptor = ClientTlsAcceptor::self_signed().map_err(|e| {
                    ProxyError::Config(format!("client-facing TLS certificate: {e}"))
                })?;
                tracing::info!(
                    "client-facing TLS uses a self-signed certificate generated at startup; \
                     give --client-tls-cert and --client-tls-key for clients that verify it"
                );
                acceptor
            }
            _ => {
                return Err(ProxyError::Config(
                    "--client-tls-cert and --client-tls-key must be given together".into(),
                ));
            }
        };
        Ok(ClientTls {
            mode,
            acceptor: Some(acceptor),
        })
    }

    /// No TLS at all (tests and `--client-tls disable`).
    pub fn disabled() -> ClientTls {
        ClientTls {
            mode: ClientTlsMode::Disable,
            acceptor: None,
        }
    }
}
