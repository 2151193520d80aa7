//! Per-config run state shared by the runners, `/readyz` and the metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What is known about one config's runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigStatus {
    /// The first run (or a later one) succeeded at least once.
    pub succeeded_once: bool,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Error of the last failed run (already free of secrets).
    pub last_error: Option<String>,
}

/// Shared, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Status {
    inner: Arc<Mutex<BTreeMap<String, ConfigStatus>>>,
}

impl Status {
    /// Registers an enabled config, so readiness waits for it.
    pub fn register(&self, name: &str) {
        self.with(|m| {
            m.entry(name.to_owned()).or_default();
        });
    }

    /// Forgets a config that no longer runs (removed or disabled by a new config file).
    pub fn unregister(&self, name: &str) {
        self.with(|m| {
            m.remove(name);
        });
    }

    pub fn record_success(&self, name: &str) {
        self.with(|m| {
            let s = m.entry(name.to_owned()).or_default();
            s.succeeded_once = true;
            s.consecutive_failures = 0;
            s.last_error = None;
        });
    }

    pub fn record_failure(&self, name: &str, error: &str) {
        self.with(|m| {
            let s = m.entry(name.to_owned()).or_default();
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
            s.last_error = Some(error.to_owned());
        });
    }

    /// Ready once every registered config succeeded once.
    pub fn ready(&self) -> bool {
        self.with(|m| m.values().all(|s| s.succeeded_once))
    }

    /// Names of the configs still waiting for their first success.
    pub fn waiting(&self) -> Vec<String> {
        self.with(|m| {
            m.iter()
                .filter(|(_, s)| !s.succeeded_once)
                .map(|(k, _)| k.clone())
                .collect()
        })
    }

    pub fn get(&self, name: &str) -> Option<ConfigStatus> {
        self.with(|m| m.get(name).cloned())
    }

    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, ConfigStatus>) -> R) -> R {
        // A poisoned lock only means a panic elsewhere; the map itself is still consistent.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}
