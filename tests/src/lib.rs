//! Test harness shared by every crate: throwaway PostgreSQL clusters and kubelet-style Secret directories.
