//! TLS on the proxy's two links: the client-facing stream after an SSLRequest, the client TLS
//! mode (`--client-tls`), and the forwarding loop used when either side is encrypted.
//!
//! Plaintext on both sides keeps the specialised TcpStream loop in `proxy`; this loop works on
//! any stream and is only taken when TLS is involved, where encryption dominates the cost.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use clap::ValueEnum;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::protocol::framing::MessageWalker;
use crate::proxy::{
    ClientVerdict, DRAIN_TIMEOUT, SessionEnd, SessionOutcome, SessionState, inspect_client,
    inspect_server,
};
use crate::stats::hot;

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

/// Size of one read; TLS records are at most 16 kB of plaintext.
const CHUNK: usize = 16 * 1024;

/// Forwards between a client and a server when at least one of them is TLS, with the same
/// session-end and reuse rules as `proxy::run_session`.
pub async fn run_session_any<C, S>(
    client: &mut C,
    server: &mut S,
    max_client_message: usize,
    initial: &[u8],
    mut signal: Option<&mut crate::migrate::MoveSignal>,
) -> SessionOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let state = SessionState::new();
    let hot = hot();
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let mut client_walker = MessageWalker::new();
    let mut server_walker = MessageWalker::new();

    let end = {
        let c2s = async {
            let mut verdict = ClientVerdict::Continue;
            let finish = |verdict: &ClientVerdict| match verdict {
                ClientVerdict::TooLarge(len) => SessionEnd::ClientMessageTooLarge(*len),
                _ => SessionEnd::ClientTerminated,
            };
            if !initial.is_empty() {
                match inspect_client(
                    &mut client_walker,
                    &state,
                    max_client_message,
                    &mut verdict,
                    initial,
                ) {
                    Ok((forward, stop)) => {
                        if write_flush(&mut server_write, &initial[..forward])
                            .await
                            .is_err()
                        {
                            return SessionEnd::ServerGone;
                        }
                        if stop {
                            return finish(&verdict);
                        }
                    }
                    Err(e) => return SessionEnd::ClientProtocol(e),
                }
            }
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return SessionEnd::ClientGone,
                    Ok(n) => n,
                };
                let (forward, stop) = match inspect_client(
                    &mut client_walker,
                    &state,
                    max_client_message,
                    &mut verdict,
                    &buf[..n],
                ) {
                    Ok(v) => v,
                    Err(e) => return SessionEnd::ClientProtocol(e),
                };
                state
                    .client_partial
                    .store(!client_walker.at_boundary(), Relaxed);
                if forward > 0 {
                    state.c2s_writing.store(true, Relaxed);
                    let written = write_flush(&mut server_write, &buf[..forward]).await;
                    state.c2s_writing.store(false, Relaxed);
                    if written.is_err() {
                        return SessionEnd::ServerGone;
                    }
                }
                if stop {
                    return finish(&verdict);
                }
            }
        };
        let s2c = async {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return SessionEnd::ServerGone,
                    Ok(n) => n,
                };
                if inspect_server(&mut server_walker, &state, hot, &buf[..n]).is_err() {
                    return SessionEnd::ServerGone;
                }
                state
                    .server_partial
                    .store(!server_walker.at_boundary(), Relaxed);
                state.s2c_writing.store(true, Relaxed);
                let written = write_flush(&mut client_write, &buf[..n]).await;
                state.s2c_writing.store(false, Relaxed);
                if written.is_err() {
                    return SessionEnd::ClientGone;
                }
                if state.draining.load(Relaxed)
                    && state.pending.load(Relaxed) == 0
                    && server_walker.at_boundary()
                {
                    return SessionEnd::ClientTerminated;
                }
                if let Some(end) = state.stop_after_chunk() {
                    return end;
                }
            }
        };
        tokio::pin!(c2s, s2c);
        let end = crate::proxy::select_with_signal(&mut c2s, &mut s2c, &state, &mut signal).await;
        if end == SessionEnd::ClientTerminated && state.pending.load(Relaxed) > 0 {
            state.draining.store(true, Relaxed);
            match tokio::time::timeout(DRAIN_TIMEOUT, &mut s2c).await {
                Ok(SessionEnd::ClientTerminated) | Err(_) => SessionEnd::ClientTerminated,
                Ok(other) => other,
            }
        } else {
            end
        }
    };
    let server_clean = state.server_clean(&end, &client_walker, &server_walker);
    SessionOutcome { end, server_clean }
}

/// Writes everything and flushes: a TLS stream may keep records buffered until flushed.
async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> io::Result<()> {
    w.write_all(data).await?;
    w.flush().await
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
