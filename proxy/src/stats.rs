//! Metric handles, registered once so the hot path only touches atomics.

use metrics::{Counter, Gauge, counter, gauge};

pub struct Stats {
    pub clients: Gauge,
    pub server_connections: Gauge,
    pub rotations_applied: Counter,
    pub rotations_rejected: Counter,
    pub generation: Gauge,
    /// 1 while the newest DSN read from the file is not in use (rejected or failing validation).
    pub credential_rejected: Gauge,
    pub client_login_failures: Counter,
    pub pool_timeouts: Counter,
}

impl Stats {
    /// Registers the metrics with whatever recorder is installed (none in unit tests).
    pub fn new() -> Self {
        Stats {
            clients: gauge!("dbproxy_clients"),
            server_connections: gauge!("dbproxy_server_connections"),
            rotations_applied: counter!("dbproxy_rotations_applied_total"),
            rotations_rejected: counter!("dbproxy_rotations_rejected_total"),
            generation: gauge!("dbproxy_credential_generation"),
            credential_rejected: gauge!("dbproxy_credential_rejected"),
            client_login_failures: counter!("dbproxy_client_login_failures_total"),
            pool_timeouts: counter!("dbproxy_pool_timeouts_total"),
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}
