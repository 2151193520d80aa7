//! A Secret volume written exactly the way the kubelet's atomic writer does it.
//! API CONTRACT (stub, being implemented in issue 2).

use std::path::{Path, PathBuf};

/// A directory laid out like a mounted Secret: `key -> ..data/key`, `..data -> ..<timestamp>`.
pub struct SecretDir {
    root: PathBuf,
}

impl SecretDir {
    /// A fresh Secret directory in a temporary location, removed on drop.
    pub fn new() -> std::io::Result<SecretDir> {
        Ok(SecretDir {
            root: std::env::temp_dir(),
        })
    }
    /// The volume's mount directory.
    pub fn path(&self) -> &Path {
        &self.root
    }
    /// Path of one key's file (the symlink the application reads).
    pub fn file(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
    /// Publishes a new version of the whole Secret with the atomic writer sequence.
    pub fn write(&self, _files: &[(&str, &[u8])]) -> std::io::Result<()> {
        Ok(())
    }
}
