//! Test harness shared by every crate: throwaway PostgreSQL clusters and kubelet-style Secret directories.

pub mod binaries;
pub mod kubelet;
pub mod postgres;

pub use kubelet::SecretDir;
pub use postgres::{AuthMethod, PasswordKind, PgCluster, PgOptions};
pub mod load;
pub mod tls;
