//! TLS as libpq means it, for both sides of a sidecar: to PostgreSQL (`sslmode` & co.) and to the application's clients.
//!
//! - [`ServerTlsPolicy::from_dsn`] reads a DSN's TLS keywords with libpq's rules (see
//!   [`policy`]'s docs for the details and the few deliberate differences).
//! - [`negotiate`] runs the SSLRequest (or direct TLS) on a fresh TCP connection and returns a
//!   [`PgStream`], whose [`PgStream::tls_server_end_point`] feeds SCRAM-SHA-256-PLUS.
//! - [`ClientTlsAcceptor`] is the listener side: a certificate from files, reloaded on change,
//!   or a self-signed one generated at startup.
//!
//! - With the `tokio-postgres` feature, [`DsnTls`] is the same policy as a tokio-postgres
//!   connector.
//!
//! Everything uses rustls with the `ring` provider passed explicitly, never a process default.

mod acceptor;
mod channel_binding;
mod error;
mod negotiate;
mod pem;
pub mod policy;
#[cfg(feature = "tokio-postgres")]
mod tokio_postgres;
mod verify;

pub use acceptor::{AcceptorState, ClientTlsAcceptor, SELF_SIGNED_NAMES};
pub use channel_binding::tls_server_end_point;
pub use error::TlsError;
pub use negotiate::{PgStream, SSL_REQUEST, negotiate};
pub use policy::{ALPN_POSTGRESQL, Attempt, AttemptFailure, ChannelBinding, ServerTlsPolicy};
#[cfg(feature = "tokio-postgres")]
pub use tokio_postgres::{DsnTls, DsnTlsConnect, DsnTlsStream};
