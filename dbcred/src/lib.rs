//! Credentials as a db-controller Secret delivers them: DSN parsing and watching mounted files.

pub mod dsn;
pub mod error;
pub mod tls;
pub mod watch;

pub use dsn::{Dsn, HostKind, SslMode, TargetHost};
pub use error::DsnError;
pub use tls::{ClientTlsAcceptor, PgStream, ServerTlsPolicy, TlsError};
pub use watch::{FileWatcher, ReloadHandle, TimedEvent, WatchConfig, WatchEvent};
