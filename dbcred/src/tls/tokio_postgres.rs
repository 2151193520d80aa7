//! [`DsnTls`]: the DSN's TLS policy as a `tokio_postgres` connector, for programs (dsnexec) that log in with tokio-postgres.
//!
//! tokio-postgres sends the SSLRequest itself and only knows `sslmode` disable/prefer/require,
//! so the caller sets [`DsnTls::tokio_postgres_ssl_mode`] on its `Config` (verify-ca and
//! verify-full become `require` there; the verification happens here) and tokio-postgres'
//! own `channel_binding`; [`DsnTls`] does the handshake with this policy's verification, client
//! certificate, SNI and ALPN, and provides the `tls-server-end-point` data for
//! SCRAM-SHA-256-PLUS. `allow` is approximated by `prefer` (tokio-postgres has no retry).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode as TpSslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::TlsConnector;

use super::channel_binding::tls_server_end_point;
use super::negotiate::{classify_handshake_error, server_name};
use super::{ServerTlsPolicy, TlsError};
use crate::SslMode;

/// A `tokio_postgres` TLS connector following a [`ServerTlsPolicy`]:
/// `config.ssl_mode(tls.tokio_postgres_ssl_mode()); config.connect(tls)`.
#[derive(Debug, Clone)]
pub struct DsnTls {
    policy: ServerTlsPolicy,
}

impl DsnTls {
    pub fn new(policy: ServerTlsPolicy) -> DsnTls {
        DsnTls { policy }
    }

    /// The `sslmode` to give tokio-postgres' `Config` so it sends the SSLRequest when it should.
    pub fn tokio_postgres_ssl_mode(&self) -> TpSslMode {
        match self.policy.sslmode() {
            SslMode::Disable => TpSslMode::Disable,
            SslMode::Allow | SslMode::Prefer => TpSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => TpSslMode::Require,
        }
    }
}

impl<S> MakeTlsConnect<S> for DsnTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = DsnTlsStream<S>;
    type TlsConnect = DsnTlsConnect;
    type Error = TlsError;

    /// Never fails: tokio-postgres calls this for every host even when it will not use TLS,
    /// so problems are reported by `connect`.
    fn make_tls_connect(&mut self, domain: &str) -> Result<DsnTlsConnect, TlsError> {
        Ok(DsnTlsConnect {
            policy: self.policy.clone(),
            host: domain.to_string(),
        })
    }
}

/// One handshake, made by [`DsnTls`] for one host.
#[derive(Debug)]
pub struct DsnTlsConnect {
    policy: ServerTlsPolicy,
    host: String,
}

impl<S> TlsConnect<S> for DsnTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = DsnTlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<DsnTlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self.policy.client_config().cloned().ok_or_else(|| {
                TlsError::Config("sslmode=disable but the server connection asked for TLS".into())
            })?;
            let name = server_name(&self.host)?;
            let tls = TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|e| classify_handshake_error(e, &self.host, &self.policy, false))?;
            Ok(DsnTlsStream(Box::new(tls)))
        })
    }
}

/// The TLS stream tokio-postgres reads and writes through.
pub struct DsnTlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for DsnTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        match self
            .0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| tls_server_end_point(leaf))
        {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for DsnTlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for DsnTlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().0.as_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_shutdown(cx)
    }
}
