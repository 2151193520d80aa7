//! dsnexec: renders templated commands from mounted secrets and runs them on change.

pub mod config; // the config file: db-controller's schema plus our run settings
pub mod destination; // postgres, shelldb and fprintf destinations
pub mod error; // the crate's error enum
pub mod ops; // /healthz, /readyz, /metrics
pub mod runner; // one config: debounce, runs, transactions, retries
pub mod source; // reading source files (postgres, json, yaml, none)
pub mod status; // per-config run state for readiness
pub mod supervisor; // one runner per enabled config; applies a changed config file
pub mod template; // Go templates, our functions, redaction
pub mod watch; // one change stream from all files of a config

pub use error::{Error, Result};
