//! libpq connection strings (key=value and URI forms) and db-controller's one-file-per-key Secret.
//! API CONTRACT (stub, being implemented in issue 2): other crates code against these signatures.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::DsnError;

/// libpq `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Where one host entry points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKind {
    /// Host name or IP literal (IPv6 without brackets).
    Tcp(String),
    /// Unix-socket directory (a host starting with `/` or `@`).
    Unix(PathBuf),
}

/// One entry of the DSN's host list, after applying libpq's host/hostaddr/port pairing rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetHost {
    pub host: HostKind,
    /// `hostaddr` for this entry, if given (skips DNS).
    pub hostaddr: Option<String>,
    pub port: u16,
}

/// A parsed connection string. Holds every keyword given, canonicalised to libpq names
/// (`user`, `password`, `dbname`, `host`, `port`, `sslmode`, ...). `Debug` and `Display`
/// never show the password.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Dsn {
    params: Vec<(String, String)>,
}

impl Dsn {
    /// Parses either form: a `postgres://` / `postgresql://` URI or libpq key=value text.
    /// Surrounding whitespace (a trailing newline in a Secret file) is ignored.
    pub fn parse(_text: &str) -> Result<Dsn, DsnError> {
        Err(DsnError::Invalid("parser not implemented yet".into()))
    }

    /// Reads db-controller's one-file-per-key layout (`hostname`, `port`, `database`,
    /// `username`, `password`, `sslmode`) from a directory.
    pub fn from_secret_dir(_dir: &Path) -> Result<Dsn, DsnError> {
        Err(DsnError::Invalid("parser not implemented yet".into()))
    }

    /// Value of a libpq keyword, if set (last one wins).
    pub fn get(&self, keyword: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, v)| v.as_str())
    }

    /// Every keyword and value, including the password: never log this.
    pub fn params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn user(&self) -> Option<&str> {
        self.get("user")
    }
    pub fn password(&self) -> Option<&str> {
        self.get("password")
    }
    pub fn dbname(&self) -> Option<&str> {
        self.get("dbname")
    }
    pub fn sslmode(&self) -> SslMode {
        SslMode::default()
    }
    /// `connect_timeout` as libpq reads it (values below 2 s count as 2 s; 0 or absent = none).
    pub fn connect_timeout(&self) -> Option<Duration> {
        None
    }
    /// Hosts in the order libpq tries them; defaults to `localhost:5432` like libpq.
    pub fn hosts(&self) -> Vec<TargetHost> {
        Vec::new()
    }
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dsn").finish_non_exhaustive()
    }
}

impl std::fmt::Display for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(dsn)")
    }
}
