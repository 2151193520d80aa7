//! Throwaway PostgreSQL clusters started from the system's server binaries.
//! API CONTRACT (stub, being implemented in issue 2).

/// How a role's password is stored on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordKind {
    Scram,
    Md5,
}

/// A running throwaway cluster; stopped and removed on drop (also after a panic).
pub struct PgCluster {
    port: u16,
}

impl PgCluster {
    /// Starts a new cluster with scram-sha-256 auth on 127.0.0.1 and a random free port.
    pub fn start() -> anyhow::Result<PgCluster> {
        anyhow::bail!("harness not implemented yet")
    }
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }
    pub fn port(&self) -> u16 {
        self.port
    }
}
