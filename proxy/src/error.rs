//! The crate's one error type: every message says what went wrong and what to do, never a secret.

use std::io;

/// A server's ErrorResponse, reduced to the fields we relay or log. Servers never echo a
/// password back, so these are safe to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerErrorFields {
    /// Whether the server rejected our credentials (invalid_password or
    /// invalid_authorization_specification), the sign that the Secret has just rotated.
    pub fn is_auth_failure(&self) -> bool {
        self.code == "28P01" || self.code == "28000"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),

    #[error("protocol violation: {0}")]
    Protocol(String),

    #[error("timed out {0}")]
    Timeout(&'static str),

    #[error("could not connect to server {host}:{port}: {reason}")]
    Connect {
        host: String,
        port: u16,
        reason: String,
    },

    #[error("server {host}:{port} rejected the login of user \"{user}\": {} ({})", .fields.message, .fields.code)]
    ServerRejected {
        host: String,
        port: u16,
        user: String,
        fields: Box<ServerErrorFields>,
    },

    #[error(
        "the server asked for authentication method {0}, which dbproxy does not support; configure scram-sha-256, md5 or password for this user in pg_hba.conf"
    )]
    UnsupportedAuth(String),

    #[error(
        "the DSN has sslmode={0}, which needs TLS to the server, which this build does not support yet; use sslmode=disable, allow or prefer"
    )]
    TlsRequired(String),

    #[error("the DSN is unusable: {0}")]
    BadDsn(String),

    #[error("the server rejected SET ROLE {role}: {message} ({code})")]
    SetRole {
        role: String,
        code: String,
        message: String,
    },

    #[error("resetting the server connection failed: {0}")]
    Reset(String),

    /// One of dbproxy's own statements (session bookkeeping) was canceled on the server,
    /// usually by the client's tiny statement_timeout: safe to try again.
    #[error("a dbproxy bookkeeping statement was canceled on the server: {0}")]
    Canceled(String),

    #[error(
        "pool exhausted: no server connection became free within {0} s; increase --pool-size or --pool-timeout"
    )]
    PoolExhausted(u64),

    #[error("no valid credentials yet: {0}")]
    NoCredentials(String),

    #[error("the proxy is shutting down")]
    ShuttingDown,

    /// The session could not follow a rotation within the migration timeout.
    #[error("{0}")]
    Unmovable(String),

    #[error("configuration error: {0}")]
    Config(String),
}

impl ProxyError {
    /// The SQLSTATE a client sees when this error ends its login or session.
    pub fn sqlstate(&self) -> &str {
        match self {
            ProxyError::ServerRejected { fields, .. } => &fields.code,
            ProxyError::Protocol(_) => "08P01",
            ProxyError::PoolExhausted(_) => "53300",
            ProxyError::ShuttingDown | ProxyError::Unmovable(_) => "57P01",
            ProxyError::UnsupportedAuth(_) | ProxyError::TlsRequired(_) => "08004",
            ProxyError::SetRole { code, .. } => code,
            _ => "08006",
        }
    }
}

pub type Result<T, E = ProxyError> = std::result::Result<T, E>;
